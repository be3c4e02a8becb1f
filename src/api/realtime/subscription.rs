//! What a client wants to hear: channels and filters, set from the query string and
//! changed later by `subscribe` / `unsubscribe` messages.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::Value;

use crate::api::query::Query;
use crate::events::{Channel, Event};
use crate::model::FieldError;

/// Most values one filter may list; a client naming more wants no filter.
pub const MAX_FILTER_VALUES: usize = 256;
/// Longest per-sensor reading interval a client may ask for.
const MAX_RATE_MS: u64 = 3_600_000;

/// Channels and filters of one client. An absent filter lets everything through.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Subscription {
    pub channels: BTreeSet<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensor_id: Option<BTreeSet<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tipo: Option<BTreeSet<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<BTreeSet<String>>,
    /// At most one reading per sensor and `tipo` every this many milliseconds; the latest
    /// wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_ms: Option<u64>,
}

/// Why a subscription request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionError {
    UnknownChannel(String),
    Invalid(FieldError),
}

impl Subscription {
    /// The channels, typed.
    pub fn channel_list(&self) -> Vec<Channel> {
        Channel::ALL
            .into_iter()
            .filter(|c| self.channels.contains(c.as_str()))
            .collect()
    }

    /// Whether the client wants this event.
    pub fn matches(&self, event: &Event) -> bool {
        self.channels.contains(event.channel.as_str())
            && self
                .sensor_id
                .as_ref()
                .is_none_or(|ids| event.sensor_id.is_some_and(|id| ids.contains(&id)))
            && self
                .tipo
                .as_ref()
                .is_none_or(|tipos| event.tipo.as_ref().is_some_and(|t| tipos.contains(t)))
            && self
                .event_type
                .as_ref()
                .is_none_or(|types| types.contains(&event.event_type))
    }
}

fn channel(name: &str) -> Result<&'static str, SubscriptionError> {
    name.parse::<Channel>()
        .map(Channel::as_str)
        .map_err(|_| SubscriptionError::UnknownChannel(name.to_owned()))
}

fn invalid(field: &str, message: &str) -> SubscriptionError {
    SubscriptionError::Invalid(FieldError::new(field, message))
}

fn bounded<T: Ord>(
    field: &str,
    values: BTreeSet<T>,
) -> Result<Option<BTreeSet<T>>, SubscriptionError> {
    match values.len() {
        0 => Ok(None),
        n if n > MAX_FILTER_VALUES => Err(invalid(field, "lists more than 256 values")),
        _ => Ok(Some(values)),
    }
}

fn rate(field: &str, value: u64) -> Result<Option<u64>, SubscriptionError> {
    match value {
        0 => Ok(None),
        ms if ms <= MAX_RATE_MS => Ok(Some(ms)),
        _ => Err(invalid(field, "must be at most 3600000")),
    }
}

/// A subscription as asked for when connecting, with resume and snapshot requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub subscription: Subscription,
    /// Replay stored events after this `seq` before going live.
    pub since: Option<u64>,
    /// Send the current state first.
    pub snapshot: bool,
}

impl Request {
    /// Reads `channel`, `sensor_id`, `tipo`, `event_type`, `rate_ms`, `since` and
    /// `snapshot` from a query string. Without `channel`, `general`.
    pub fn from_query(query: &Query) -> Result<Request, SubscriptionError> {
        let mut channels = BTreeSet::new();
        for name in query.all("channel") {
            channels.insert(channel(name)?);
        }
        if channels.is_empty() {
            channels.insert(Channel::General.as_str());
        }
        let mut ids = BTreeSet::new();
        for text in query.all("sensor_id") {
            ids.insert(
                text.parse::<i64>()
                    .map_err(|_| invalid("sensor_id", "must be integers"))?,
            );
        }
        let tipos = query.all("tipo").into_iter().map(str::to_owned).collect();
        let types = query
            .all("event_type")
            .into_iter()
            .map(str::to_owned)
            .collect();
        let rate_ms = match query.get("rate_ms") {
            None => None,
            Some(text) => rate(
                "rate_ms",
                text.parse()
                    .map_err(|_| invalid("rate_ms", "must be a whole number of milliseconds"))?,
            )?,
        };
        let since = match query.get("since") {
            None | Some("") => None,
            Some(text) => Some(
                text.parse::<u64>()
                    .map_err(|_| invalid("since", "must be a seq number"))?,
            ),
        };
        let snapshot = match query.get("snapshot") {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") | Some("") => true,
            Some(_) => return Err(invalid("snapshot", "must be true or false")),
        };
        Ok(Request {
            subscription: Subscription {
                channels,
                sensor_id: bounded("sensor_id", ids)?,
                tipo: bounded("tipo", tipos)?,
                event_type: bounded("event_type", types)?,
                rate_ms,
            },
            since,
            snapshot,
        })
    }
}

/// A `subscribe` or `unsubscribe` message, applied to the current subscription.
/// Returns whether a snapshot was asked for.
///
/// `subscribe` adds the listed `channels` (or `channel`) and replaces each filter it
/// names (`sensor_id`, `tipo`, `event_type`: a list, or null for no filter; `rate_ms`: a
/// number, 0 or null for none). `unsubscribe` removes the listed channels.
pub fn apply_message(
    current: &Subscription,
    action: &str,
    message: &Value,
) -> Result<(Subscription, bool), SubscriptionError> {
    let mut next = current.clone();
    let listed = listed_channels(message)?;
    match action {
        "subscribe" => {
            next.channels.extend(listed);
            if let Some(v) = message.get("sensor_id") {
                next.sensor_id = ids(v)?;
            }
            if let Some(v) = message.get("tipo") {
                next.tipo = strings("tipo", v)?;
            }
            if let Some(v) = message.get("event_type") {
                next.event_type = strings("event_type", v)?;
            }
            if let Some(v) = message.get("rate_ms") {
                next.rate_ms = match v {
                    Value::Null => None,
                    v => rate(
                        "rate_ms",
                        v.as_u64().ok_or_else(|| {
                            invalid("rate_ms", "must be a whole number of milliseconds")
                        })?,
                    )?,
                };
            }
            let snapshot = match message.get("snapshot") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(invalid("snapshot", "must be true or false")),
            };
            Ok((next, snapshot))
        }
        _ => {
            if listed.is_empty() {
                return Err(invalid("channels", "name the channels to leave"));
            }
            for c in listed {
                next.channels.remove(c);
            }
            Ok((next, false))
        }
    }
}

fn listed_channels(message: &Value) -> Result<Vec<&'static str>, SubscriptionError> {
    let mut names = Vec::new();
    for key in ["channel", "channels"] {
        match message.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(name)) => names.push(channel(name)?),
            Some(Value::Array(items)) => {
                for item in items {
                    let name = item
                        .as_str()
                        .ok_or_else(|| invalid(key, "must be channel names"))?;
                    names.push(channel(name)?);
                }
            }
            Some(_) => return Err(invalid(key, "must be a channel name or a list of them")),
        }
    }
    Ok(names)
}

fn list(field: &str, value: &Value) -> Result<Option<Vec<Value>>, SubscriptionError> {
    match value {
        Value::Null => Ok(None),
        Value::Array(items) if items.len() > MAX_FILTER_VALUES => {
            Err(invalid(field, "lists more than 256 values"))
        }
        Value::Array(items) if items.is_empty() => Ok(None),
        Value::Array(items) => Ok(Some(items.clone())),
        single => Ok(Some(vec![single.clone()])),
    }
}

fn ids(value: &Value) -> Result<Option<BTreeSet<i64>>, SubscriptionError> {
    list("sensor_id", value)?
        .map(|items| {
            items
                .iter()
                .map(|v| {
                    v.as_i64()
                        .ok_or_else(|| invalid("sensor_id", "must be integers"))
                })
                .collect()
        })
        .transpose()
}

fn strings(field: &str, value: &Value) -> Result<Option<BTreeSet<String>>, SubscriptionError> {
    list(field, value)?
        .map(|items| {
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| invalid(field, "must be strings"))
                })
                .collect()
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(
        channel: Channel,
        sensor_id: Option<i64>,
        tipo: Option<&str>,
        event_type: &str,
    ) -> Event {
        Event {
            seq: 1,
            channel,
            event_type: event_type.into(),
            sensor_id,
            tipo: tipo.map(Into::into),
            body: crate::events::Body::Data(serde_json::Value::Null),
            frame: "{}".into(),
        }
    }

    fn request(query: &str) -> Result<Request, SubscriptionError> {
        Request::from_query(&Query::parse(Some(query)))
    }

    #[test]
    fn query_sets_channels_filters_and_resume() {
        let r = request("channel=readings,sensors&sensor_id=3&sensor_id=4&tipo=humedad&since=17&snapshot=true&rate_ms=500").unwrap();
        assert_eq!(
            r.subscription.channel_list(),
            [Channel::Sensors, Channel::Readings]
        );
        assert_eq!(r.since, Some(17));
        assert!(r.snapshot);
        assert_eq!(r.subscription.rate_ms, Some(500));
        let s = &r.subscription;
        assert!(s.matches(&event(
            Channel::Readings,
            Some(3),
            Some("humedad"),
            "created"
        )));
        assert!(!s.matches(&event(
            Channel::Readings,
            Some(5),
            Some("humedad"),
            "created"
        )));
        assert!(!s.matches(&event(
            Channel::Readings,
            Some(3),
            Some("temperatura"),
            "created"
        )));
        assert!(!s.matches(&event(
            Channel::General,
            Some(3),
            Some("humedad"),
            "created"
        )));
    }

    #[test]
    fn default_is_general_without_filters() {
        let r = request("").unwrap();
        assert_eq!(r.subscription.channel_list(), [Channel::General]);
        assert!(r
            .subscription
            .matches(&event(Channel::General, None, None, "test")));
        assert_eq!(r.since, None);
    }

    #[test]
    fn bad_queries_are_refused() {
        assert_eq!(
            request("channel=weather"),
            Err(SubscriptionError::UnknownChannel("weather".into()))
        );
        for q in [
            "since=x",
            "sensor_id=a",
            "rate_ms=-1",
            "snapshot=perhaps",
            "rate_ms=99999999",
        ] {
            assert!(
                matches!(request(q), Err(SubscriptionError::Invalid(_))),
                "{q}"
            );
        }
    }

    #[test]
    fn subscribe_adds_and_replaces_filters() {
        let current = request("channel=sensors&tipo=humedad")
            .unwrap()
            .subscription;
        let (next, snapshot) = apply_message(
            &current,
            "subscribe",
            &json!({"channels": ["readings"], "sensor_id": [1, 2], "tipo": null, "snapshot": true}),
        )
        .unwrap();
        assert!(snapshot);
        assert_eq!(next.channel_list(), [Channel::Sensors, Channel::Readings]);
        assert_eq!(next.sensor_id, Some([1, 2].into()));
        assert_eq!(next.tipo, None);
        let (left, _) =
            apply_message(&next, "unsubscribe", &json!({"channel": "sensors"})).unwrap();
        assert_eq!(left.channel_list(), [Channel::Readings]);
        assert!(apply_message(&next, "unsubscribe", &json!({})).is_err());
        assert!(apply_message(&next, "subscribe", &json!({"channels": ["nope"]})).is_err());
        assert!(apply_message(&next, "subscribe", &json!({"sensor_id": ["x"]})).is_err());
    }

    mod proptests {
        use super::*;
        use crate::model::arbitrary::{json, json_with_keys, text};
        use proptest::prelude::*;

        const MESSAGE_FIELDS: [&str; 9] = [
            "type",
            "id",
            "channel",
            "channels",
            "sensor_id",
            "tipo",
            "event_type",
            "rate_ms",
            "snapshot",
        ];

        fn channel_name() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => prop::sample::select(vec!["sensors", "readings", "general"]).prop_map(str::to_owned),
                1 => text(),
            ]
        }

        /// Filter lists on both sides of the 256-value bound (of distinct values, which
        /// are cheap to make, or of one repeated value), and single values.
        fn filter(
            item: BoxedStrategy<Value>,
            distinct: fn(u64) -> Value,
        ) -> impl Strategy<Value = Value> {
            prop_oneof![
                2 => prop::collection::vec(item.clone(), 0..8).prop_map(Value::Array),
                1 => (250u64..=260).prop_map(move |n| Value::Array((0..n).map(distinct).collect())),
                1 => (item.clone(), 250usize..=260).prop_map(|(v, n)| Value::Array(vec![v; n])),
                1 => item,
                1 => Just(Value::Null),
            ]
        }

        fn message() -> impl Strategy<Value = Value> {
            let ids = prop_oneof![
                4 => (0i64..1000).prop_map(Value::from),
                1 => json(),
            ]
            .boxed();
            let names = prop_oneof![4 => text().prop_map(Value::String), 1 => json()].boxed();
            let channels = prop_oneof![
                channel_name().prop_map(Value::String),
                prop::collection::vec(channel_name().prop_map(Value::String), 0..5)
                    .prop_map(Value::Array),
                json(),
            ];
            let rate = prop_oneof![
                (0u64..4_000_000).prop_map(Value::from),
                Just(Value::from(MAX_RATE_MS)),
                Just(Value::from(MAX_RATE_MS + 1)),
                json(),
            ];
            let fields = (
                prop::option::of(channels.clone()),
                prop::option::of(channels),
                prop::option::of(filter(ids, Value::from)),
                prop::option::of(filter(names.clone(), |n| Value::String(n.to_string()))),
                prop::option::of(filter(names, |n| Value::String(n.to_string()))),
                prop::option::of(rate),
                prop::option::of(prop_oneof![any::<bool>().prop_map(Value::Bool), json()]),
            );
            prop_oneof![
                4 => fields.prop_map(|(channel, channels, ids, tipo, types, rate, snapshot)| {
                    let mut m = serde_json::Map::new();
                    for (key, value) in [
                        ("channel", channel),
                        ("channels", channels),
                        ("sensor_id", ids),
                        ("tipo", tipo),
                        ("event_type", types),
                        ("rate_ms", rate),
                        ("snapshot", snapshot),
                    ] {
                        if let Some(value) = value {
                            m.insert(key.to_owned(), value);
                        }
                    }
                    Value::Object(m)
                }),
                1 => json_with_keys(&MESSAGE_FIELDS, 3, 6),
            ]
        }

        fn action() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => prop::sample::select(vec!["subscribe", "unsubscribe"]).prop_map(str::to_owned),
                1 => text(),
            ]
        }

        fn check_bounds(s: &Subscription) -> Result<(), TestCaseError> {
            prop_assert!(s
                .sensor_id
                .as_ref()
                .is_none_or(|v| !v.is_empty() && v.len() <= MAX_FILTER_VALUES));
            prop_assert!(s
                .tipo
                .as_ref()
                .is_none_or(|v| !v.is_empty() && v.len() <= MAX_FILTER_VALUES));
            prop_assert!(s
                .event_type
                .as_ref()
                .is_none_or(|v| !v.is_empty() && v.len() <= MAX_FILTER_VALUES));
            prop_assert!(s.rate_ms.is_none_or(|ms| ms > 0 && ms <= MAX_RATE_MS));
            prop_assert!(s.channels.iter().all(|c| c.parse::<Channel>().is_ok()));
            Ok(())
        }

        /// Query strings: arbitrary text, and pairs of the real keys with escaped,
        /// repeated and comma-separated values.
        fn query_text() -> impl Strategy<Value = String> {
            let key = prop_oneof![
                4 => prop::sample::select(vec![
                    "channel", "sensor_id", "tipo", "event_type", "rate_ms", "since", "snapshot",
                    "token",
                ])
                .prop_map(str::to_owned),
                1 => "[a-z%+=&]{0,6}",
            ];
            let value = prop_oneof![
                "[a-z0-9,%+ ]{0,12}",
                (0usize..300)
                    .prop_map(|n| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")),
                "(%[0-9a-fA-F]{2}){0,6}",
                "%.?.?",
                any::<i64>().prop_map(|n| n.to_string()),
                Just(u64::MAX.to_string() + "0"),
                prop::sample::select(vec![
                    "true",
                    "false",
                    "1",
                    "0",
                    "",
                    "sensors,readings",
                    "general,nope"
                ])
                .prop_map(str::to_owned),
            ];
            prop_oneof![
                4 => prop::collection::vec((key, value), 0..8).prop_map(|pairs| {
                    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
                }),
                1 => ".{0,100}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn socket_messages_keep_subscriptions_bounded(
                query in query_text(),
                action in action(),
                message in message(),
            ) {
                let current = Request::from_query(&Query::parse(Some(&query)))
                    .map(|r| r.subscription)
                    .unwrap_or_default();
                check_bounds(&current)?;
                if let Ok((next, snapshot)) = apply_message(&current, &action, &message) {
                    check_bounds(&next)?;
                    if action == "subscribe" {
                        prop_assert!(current.channels.is_subset(&next.channels));
                    } else {
                        prop_assert!(!snapshot);
                        prop_assert!(next.channels.is_subset(&current.channels));
                        prop_assert_eq!(
                            (&next.sensor_id, &next.tipo, &next.event_type, next.rate_ms),
                            (&current.sensor_id, &current.tipo, &current.event_type, current.rate_ms)
                        );
                    }
                }
            }

            #[test]
            fn query_strings_give_bounded_requests(query in query_text()) {
                let parsed = Query::parse(Some(&query));
                match Request::from_query(&parsed) {
                    Ok(request) => {
                        check_bounds(&request.subscription)?;
                        prop_assert!(!request.subscription.channels.is_empty());
                    }
                    Err(SubscriptionError::UnknownChannel(name)) => {
                        prop_assert!(name.len() <= query.len());
                    }
                    Err(SubscriptionError::Invalid(e)) => {
                        prop_assert!(e.message.len() <= 100, "{:?}", e);
                    }
                }
            }

            #[test]
            fn filter_lists_in_queries_are_bounded(
                key in prop::sample::select(vec!["sensor_id", "tipo", "event_type"]),
                n in 250usize..=262,
                per_param in 1usize..=300,
            ) {
                // `n` distinct values, `per_param` of them comma-separated in each parameter.
                let values: Vec<String> = (0..n).map(|i| i.to_string()).collect();
                let query: Vec<String> = values
                    .chunks(per_param)
                    .map(|chunk| format!("{key}={}", chunk.join(",")))
                    .collect();
                let request = Request::from_query(&Query::parse(Some(&query.join("&"))));
                if n <= MAX_FILTER_VALUES {
                    let s = request.expect("a filter of at most 256 values").subscription;
                    let len = match key {
                        "sensor_id" => s.sensor_id.map(|v| v.len()),
                        "tipo" => s.tipo.map(|v| v.len()),
                        _ => s.event_type.map(|v| v.len()),
                    };
                    prop_assert_eq!(len, Some(n));
                } else {
                    prop_assert!(matches!(request, Err(SubscriptionError::Invalid(e)) if e.field == key));
                }
            }
        }
    }
}
