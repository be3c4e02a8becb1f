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
}
