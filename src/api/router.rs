//! Maps method and path to a route, and applies in one place what every route needs:
//! the URI limit, the token check for the route's access level, and the write rate
//! limit. Paths are matched with or without a trailing slash, as the original
//! service's clients use both.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use hyper::body::{Body as _, Incoming};
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request, Response};
use tokio::time::Instant;

use super::limits::{Key, Slot};
use super::metrics::Limit;
use super::query::Query;
use super::realtime::{sse, ws};
use super::{
    alerts, export, rest, tokens, Admission, ApiError, Body, Client, State, StreamAdmission,
};
use crate::auth::{Access, AuthError, Principal};

/// Everything the API answers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Index,
    ClientModule,
    Asset(String),
    Health,
    Metrics,
    OpenApi,
    ListSensors,
    CreateSensor,
    GetSensor(i64),
    UpdateSensor(i64),
    DeleteSensor(i64),
    CalibrationHistory(i64),
    ListReadings,
    CreateReading,
    GetReading(i64),
    UpdateReading(i64),
    DeleteReading(i64),
    AggregatedReadings,
    ExportReadings,
    Socket,
    SecureSocket,
    Events,
    SocketStats,
    ChannelStats(String),
    TestEvent,
    ListTokens,
    CreateToken,
    RevokeToken(String),
    ListAlerts,
    CreateAlert,
    GetAlert(i64),
    UpdateAlert(i64),
    DeleteAlert(i64),
    AcknowledgeAlert(i64),
    ListSilences,
    CreateSilence,
    DeleteSilence(i64),
}

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// Anyone: the dashboard and its assets, the client module, the health check, the
    /// API document, and the development routes.
    Open,
    /// As the policy says for this access.
    Needs(Access),
}

/// The two ends of the TCP connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The gateway's address the client connected to.
    pub local: IpAddr,
}

/// Answers one request. Before anything else, the `Host` it names must be one of the
/// gateway's (see [`crate::auth::host`]): on every route, since a page that rebinds a
/// name of its own to the gateway can `fetch()` REST as well as open the socket.
pub async fn route(
    req: Request<Incoming>,
    state: Arc<State>,
    ends: Connection,
    admission: Arc<Admission>,
) -> Response<Body> {
    // An error answered to a request with a body may leave some of it unread: the
    // connection then ends, and drains the rest first so that the client reads the answer.
    let has_body = !req.body().is_end_stream();
    let connection = admission.clone();
    let peer = ends.peer;
    let client = state.proxies.client(peer.ip(), req.headers());
    let result = async {
        let host = req.headers().get(HOST).map(|v| v.to_str().unwrap_or("?"));
        if !state.allowed_hosts.allows(host, ends.local) {
            state.counters.hit(Limit::ForbiddenHost);
            return Err(ApiError::host_not_allowed(host.unwrap_or_default()));
        }
        let uri_length = req.uri().to_string().len();
        if uri_length > state.limits.max_uri_bytes {
            state.counters.hit(Limit::UriLength);
            return Err(ApiError::uri_too_long(state.limits.max_uri_bytes));
        }
        let (route, guard) = resolve(req.method(), req.uri().path(), state.server.dev)?;
        let principal = guard_route(&req, &state, &route, guard).await?;
        if matches!(guard, Guard::Needs(Access::Write | Access::Admin)) {
            limit_writes(&state, client, principal.as_ref())?;
        }
        let slot = stream_slot(&state, &route, peer, client)?;
        let from = Client {
            peer,
            address: client,
        };
        dispatch(route, req, &state, from, principal, admission, slot).await
    };
    result.await.unwrap_or_else(|error| {
        let error = if has_body {
            error.ending_connection()
        } else {
            error
        };
        if error.ends_connection {
            connection.linger_on_close();
        }
        error.into_response()
    })
}

/// A place under `limits.max_connections_per_address` for a stream that comes through a
/// trusted proxy, whose connections were admitted without one: the stream is the client's
/// connection. Other connections hold theirs from the moment they were accepted.
fn stream_slot(
    state: &State,
    route: &Route,
    peer: SocketAddr,
    client: IpAddr,
) -> Result<Option<Slot>, ApiError> {
    let streaming = matches!(route, Route::Socket | Route::SecureSocket | Route::Events);
    if !streaming || !state.proxies.trusts(peer.ip()) {
        return Ok(None);
    }
    let max = state.limits.max_connections_per_address;
    match state.address_slots.take(client, max) {
        Some(slot) => Ok(Some(slot)),
        None => {
            state.counters.hit(Limit::ConnectionsPerAddress);
            log::warn!("stream for {client} (through {peer}) refused: {max} open for it");
            Err(ApiError::too_many_connections(max))
        }
    }
}

/// A method as the route table lists it; `Get` answers HEAD as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    /// In the order `Allow` names them.
    const ALL: [Verb; 4] = [Verb::Get, Verb::Post, Verb::Put, Verb::Delete];

    fn of(method: &Method) -> Option<Verb> {
        match *method {
            Method::GET | Method::HEAD => Some(Verb::Get),
            Method::POST => Some(Verb::Post),
            Method::PUT => Some(Verb::Put),
            Method::DELETE => Some(Verb::Delete),
            _ => None,
        }
    }

    /// The methods it stands for in `Allow`.
    fn allows(self) -> &'static str {
        match self {
            Verb::Get => "GET, HEAD",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Delete => "DELETE",
        }
    }

    fn bit(self) -> usize {
        1 << self as usize
    }
}

/// One segment of a path in the table.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// A fixed word, in any of its spellings (the original service's Spanish, and English).
    Word(&'static [&'static str]),
    /// A parameter: any segment, except a word that another path of the table spells out
    /// in the same place (`/lecturas/export` is the export, never a reading `export`).
    Param,
}

impl Part {
    /// Whether some segment could match both.
    fn overlaps(self, other: Part) -> bool {
        match (self, other) {
            (Part::Word(a), Part::Word(b)) => a.iter().any(|word| b.contains(word)),
            _ => true,
        }
    }
}

/// Builds the route from the path's parameters, in order.
type Make = fn(&[&str]) -> Result<Route, ApiError>;

/// What one method does on one path.
struct Action {
    verb: Verb,
    guard: Guard,
    make: Make,
}

/// One path of the API and the methods it answers.
struct Entry {
    parts: &'static [Part],
    /// A development copy (`server.dev` only): the same actions, open to anyone.
    dev: bool,
    actions: &'static [Action],
    /// The 404 detail of the paths below this one that the table does not have.
    not_found_below: Option<&'static str>,
}

impl Entry {
    /// The path's parameters when `segments` is this path.
    fn matches<'a>(&self, segments: &[&'a str]) -> Option<Vec<&'a str>> {
        if segments.len() != self.parts.len() {
            return None;
        }
        let mut params = Vec::new();
        for (place, (part, segment)) in self.parts.iter().zip(segments).enumerate() {
            match part {
                Part::Word(spellings) if spellings.contains(segment) => {}
                Part::Word(_) => return None,
                Part::Param if self.spelled_out_elsewhere(place, segment) => return None,
                Part::Param => params.push(*segment),
            }
        }
        Some(params)
    }

    /// Whether another path that can share this one's segments up to `place` has `word`
    /// there as a fixed word.
    fn spelled_out_elsewhere(&self, place: usize, word: &str) -> bool {
        ROUTES.iter().any(|other| {
            other.parts.len() > place
                && other.parts[..place]
                    .iter()
                    .zip(&self.parts[..place])
                    .all(|(a, b)| a.overlaps(*b))
                && matches!(other.parts[place], Part::Word(spellings) if spellings.contains(&word))
        })
    }

    /// The `Allow` of a 405 on this path.
    fn allow(&self) -> &'static str {
        static ALLOW: OnceLock<Vec<String>> = OnceLock::new();
        let by_mask = ALLOW.get_or_init(|| {
            (0..1 << Verb::ALL.len())
                .map(|mask| {
                    let verbs = Verb::ALL.iter().filter(|verb| mask & verb.bit() != 0);
                    verbs
                        .map(|verb| verb.allows())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .collect()
        });
        let mask = self
            .actions
            .iter()
            .fold(0, |mask, action| mask | action.verb.bit());
        &by_mask[mask]
    }
}

const fn get(guard: Guard, make: Make) -> Action {
    Action {
        verb: Verb::Get,
        guard,
        make,
    }
}

const fn post(guard: Guard, make: Make) -> Action {
    Action {
        verb: Verb::Post,
        guard,
        make,
    }
}

const fn put(guard: Guard, make: Make) -> Action {
    Action {
        verb: Verb::Put,
        guard,
        make,
    }
}

const fn delete(guard: Guard, make: Make) -> Action {
    Action {
        verb: Verb::Delete,
        guard,
        make,
    }
}

const fn path(parts: &'static [Part], actions: &'static [Action]) -> Entry {
    Entry {
        parts,
        dev: false,
        actions,
        not_found_below: None,
    }
}

const fn dev_path(parts: &'static [Part], actions: &'static [Action]) -> Entry {
    Entry {
        dev: true,
        ..path(parts, actions)
    }
}

impl Entry {
    /// The same path, whose unknown subpaths answer 404 with `detail`.
    const fn not_found_below(self, detail: &'static str) -> Entry {
        Entry {
            not_found_below: Some(detail),
            ..self
        }
    }
}

const OPEN: Guard = Guard::Open;
const READ: Guard = Guard::Needs(Access::Read);
const WRITE: Guard = Guard::Needs(Access::Write);
const ADMIN: Guard = Guard::Needs(Access::Admin);

use Part::{Param, Word};

const API: Part = Word(&["api"]);
const V1: Part = Word(&["v1"]);
const SENSORS: Part = Word(&["sensores", "sensors"]);
const TEST_SENSORS: Part = Word(&["test-sensors"]);
const READINGS: Part = Word(&["lecturas", "readings"]);
const WS: Part = Word(&["ws"]);
const TOKENS: Part = Word(&["tokens"]);
const ALERTS: Part = Word(&["alertas", "alerts"]);
const SILENCES: Part = Word(&["silencios", "silences"]);

/// Sensors are read with read access and changed with write access; the development
/// copy under `test-sensors` is open.
const SENSOR_LIST: &[Action] = &[
    get(READ, |_| Ok(Route::ListSensors)),
    post(WRITE, |_| Ok(Route::CreateSensor)),
];
const SENSOR: &[Action] = &[
    get(READ, |p| Ok(Route::GetSensor(parse_id(p[0])?))),
    put(WRITE, |p| Ok(Route::UpdateSensor(parse_id(p[0])?))),
    delete(WRITE, |p| Ok(Route::DeleteSensor(parse_id(p[0])?))),
];
const SENSOR_CALIBRATION: &[Action] = &[get(READ, |p| {
    Ok(Route::CalibrationHistory(parse_id(p[0])?))
})];

/// Every path the API answers: what routing follows and what a 405's `Allow` names.
/// One reading is read like the list, changed and deleted with the access a new reading
/// needs. Alert rules are read with read access and changed by an admin; a firing alert is
/// acknowledged with write access, as operators have. Silences are listed with read
/// access, set and lifted with write access.
static ROUTES: &[Entry] = &[
    path(&[], &[get(OPEN, |_| Ok(Route::Index))]),
    path(
        &[Word(&["sensorgate.js"])],
        &[get(OPEN, |_| Ok(Route::ClientModule))],
    ),
    path(
        &[Word(&["assets"]), Param],
        &[get(OPEN, |p| Ok(Route::Asset(p[0].to_owned())))],
    ),
    path(&[Word(&["healthz"])], &[get(OPEN, |_| Ok(Route::Health))]),
    path(&[Word(&["metrics"])], &[get(READ, |_| Ok(Route::Metrics))]),
    path(
        &[API, V1, Word(&["openapi.json"])],
        &[get(OPEN, |_| Ok(Route::OpenApi))],
    ),
    path(&[API, V1, SENSORS], SENSOR_LIST).not_found_below("No such sensor route"),
    path(&[API, V1, SENSORS, Param], SENSOR),
    path(
        &[API, V1, SENSORS, Param, Word(&["calibracion"])],
        SENSOR_CALIBRATION,
    ),
    dev_path(&[API, V1, TEST_SENSORS], SENSOR_LIST).not_found_below("No such sensor route"),
    dev_path(&[API, V1, TEST_SENSORS, Param], SENSOR),
    dev_path(
        &[API, V1, TEST_SENSORS, Param, Word(&["calibracion"])],
        SENSOR_CALIBRATION,
    ),
    path(
        &[API, V1, READINGS],
        &[
            get(READ, |_| Ok(Route::ListReadings)),
            post(WRITE, |_| Ok(Route::CreateReading)),
        ],
    ),
    path(
        &[API, V1, Word(&["lecturas"]), Word(&["agregadas"])],
        &[get(READ, |_| Ok(Route::AggregatedReadings))],
    ),
    path(
        &[API, V1, Word(&["readings"]), Word(&["aggregated"])],
        &[get(READ, |_| Ok(Route::AggregatedReadings))],
    ),
    path(
        &[API, V1, READINGS, Word(&["export"])],
        &[get(READ, |_| Ok(Route::ExportReadings))],
    ),
    path(
        &[API, V1, READINGS, Param],
        &[
            get(READ, |p| Ok(Route::GetReading(parse_id(p[0])?))),
            put(WRITE, |p| Ok(Route::UpdateReading(parse_id(p[0])?))),
            delete(WRITE, |p| Ok(Route::DeleteReading(parse_id(p[0])?))),
        ],
    ),
    path(&[API, V1, WS], &[get(READ, |_| Ok(Route::Socket))]),
    path(
        &[API, V1, WS, Word(&["secure"])],
        &[get(Guard::Needs(Access::Secure), |_| {
            Ok(Route::SecureSocket)
        })],
    ),
    path(
        &[API, V1, Word(&["events"])],
        &[get(READ, |_| Ok(Route::Events))],
    ),
    path(
        &[API, V1, WS, Word(&["stats"])],
        &[get(READ, |_| Ok(Route::SocketStats))],
    ),
    path(
        &[API, V1, WS, Word(&["stats"]), Param],
        &[get(READ, |p| Ok(Route::ChannelStats(p[0].to_owned())))],
    ),
    path(
        &[API, V1, WS, Word(&["test-event"])],
        &[post(ADMIN, |_| Ok(Route::TestEvent))],
    ),
    path(
        &[API, V1, TOKENS],
        &[
            get(ADMIN, |_| Ok(Route::ListTokens)),
            post(ADMIN, |_| Ok(Route::CreateToken)),
        ],
    ),
    path(
        &[API, V1, TOKENS, Param],
        &[delete(ADMIN, |p| Ok(Route::RevokeToken(p[0].to_owned())))],
    ),
    path(
        &[API, V1, ALERTS],
        &[
            get(READ, |_| Ok(Route::ListAlerts)),
            post(ADMIN, |_| Ok(Route::CreateAlert)),
        ],
    )
    .not_found_below("No such alert route"),
    path(
        &[API, V1, ALERTS, Param],
        &[
            get(READ, |p| Ok(Route::GetAlert(parse_id(p[0])?))),
            put(ADMIN, |p| Ok(Route::UpdateAlert(parse_id(p[0])?))),
            delete(ADMIN, |p| Ok(Route::DeleteAlert(parse_id(p[0])?))),
        ],
    ),
    path(
        &[API, V1, ALERTS, Param, Word(&["ack"])],
        &[post(WRITE, |p| {
            Ok(Route::AcknowledgeAlert(parse_id(p[0])?))
        })],
    ),
    path(
        &[API, V1, SILENCES],
        &[
            get(READ, |_| Ok(Route::ListSilences)),
            post(WRITE, |_| Ok(Route::CreateSilence)),
        ],
    )
    .not_found_below("No such silence route"),
    path(
        &[API, V1, SILENCES, Param],
        &[delete(WRITE, |p| Ok(Route::DeleteSilence(parse_id(p[0])?)))],
    ),
];

/// The route and its guard for a method and path; 405 with `Allow` for a path of the table
/// asked with another method, 404 for any other path. The development paths exist only
/// with `dev`.
fn resolve(method: &Method, path: &str, dev: bool) -> Result<(Route, Guard), ApiError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let found = ROUTES
        .iter()
        .filter(|entry| dev || !entry.dev)
        .find_map(|entry| entry.matches(&segments).map(|params| (entry, params)));
    let Some((entry, params)) = found else {
        return Err(not_found_under(&segments, dev).unwrap_or_else(|| not_found(path)));
    };
    let verb = Verb::of(method);
    let Some(action) = entry
        .actions
        .iter()
        .find(|action| Some(action.verb) == verb)
    else {
        return Err(ApiError::method_not_allowed(entry.allow()));
    };
    let route = (action.make)(&params)?;
    Ok((route, if entry.dev { Guard::Open } else { action.guard }))
}

/// The 404 of the resource `segments` lie under, if it has one.
fn not_found_under(segments: &[&str], dev: bool) -> Option<ApiError> {
    ROUTES
        .iter()
        .filter(|entry| dev || !entry.dev)
        .find_map(|entry| {
            let detail = entry.not_found_below?;
            let under = segments.len() >= entry.parts.len()
                && entry
                    .parts
                    .iter()
                    .zip(segments)
                    .all(|(part, segment)| match part {
                        Part::Word(spellings) => spellings.contains(segment),
                        Part::Param => true,
                    });
            under.then(|| ApiError::not_found(detail))
        })
}

/// The token a request presents: `Authorization: Bearer`, or `?token=` on the socket
/// and event-stream URLs, where browsers cannot set headers.
fn presented_token(req: &Request<Incoming>, route: &Route) -> Option<String> {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned());
    header.or_else(|| match route {
        Route::Socket | Route::SecureSocket | Route::Events => Query::parse(req.uri().query())
            .get("token")
            .map(str::to_owned),
        _ => None,
    })
}

async fn guard_route(
    req: &Request<Incoming>,
    state: &State,
    route: &Route,
    guard: Guard,
) -> Result<Option<Principal>, ApiError> {
    let Guard::Needs(access) = guard else {
        return Ok(None);
    };
    let token = presented_token(req, route);
    // The secure socket may also authenticate with its first message.
    if *route == Route::SecureSocket && token.is_none() {
        return Ok(None);
    }
    match state.auth.authorize(token.as_deref(), access).await {
        Ok(principal) => Ok(principal),
        Err(e) => {
            state.counters.hit(match e {
                AuthError::Forbidden { .. } => Limit::Forbidden,
                _ => Limit::Unauthorized,
            });
            Err(ApiError::from(e))
        }
    }
}

fn limit_writes(
    state: &State,
    client: IpAddr,
    principal: Option<&Principal>,
) -> Result<(), ApiError> {
    state
        .write_limiter
        .take(&[Key::of(client, principal)], Instant::now())
        .map_err(|wait| {
            state.counters.hit(Limit::WriteRate);
            ApiError::rate_limited(wait)
        })
}

async fn dispatch(
    route: Route,
    req: Request<Incoming>,
    state: &Arc<State>,
    from: Client,
    principal: Option<Principal>,
    admission: Arc<Admission>,
    slot: Option<Slot>,
) -> Result<Response<Body>, ApiError> {
    let stream = StreamAdmission {
        _connection: admission,
        _client: slot,
    };
    match route {
        Route::Index => Ok(rest::index(req.headers())),
        Route::ClientModule => Ok(rest::client_module(req.headers())),
        Route::Asset(name) => rest::dashboard_asset(&name, req.headers()),
        Route::Health => Ok(rest::health(state).await),
        Route::Metrics => Ok(rest::metrics(state).await),
        Route::OpenApi => Ok(rest::openapi(req.headers())),
        Route::ListSensors => rest::list_sensors(&req, state).await,
        Route::CreateSensor => rest::create_sensor(req, state).await,
        Route::GetSensor(id) => rest::get_sensor(state, id).await,
        Route::UpdateSensor(id) => rest::update_sensor(req, state, id).await,
        Route::DeleteSensor(id) => rest::delete_sensor(state, id).await,
        Route::CalibrationHistory(id) => rest::calibration_history(state, id).await,
        Route::ListReadings => rest::list_readings(&req, state).await,
        Route::CreateReading => rest::create_reading(req, state).await,
        Route::GetReading(id) => rest::get_reading(state, id).await,
        Route::UpdateReading(id) => rest::update_reading(req, state, id).await,
        Route::DeleteReading(id) => rest::delete_reading(state, id).await,
        Route::AggregatedReadings => rest::aggregated_readings(&req, state).await,
        Route::ExportReadings => export::readings(&req, state),
        Route::Socket => ws::upgrade(req, state.clone(), from, principal, false, stream),
        Route::SecureSocket => ws::upgrade(req, state.clone(), from, principal, true, stream),
        Route::Events => sse::stream(&req, state.clone(), principal, stream),
        Route::SocketStats => Ok(rest::ws_stats(state)),
        Route::ChannelStats(channel) => rest::ws_channel_stats(state, &channel),
        Route::TestEvent => rest::test_event(req, state).await,
        Route::ListTokens => tokens::list(state).await,
        Route::CreateToken => tokens::create(req, state).await,
        Route::RevokeToken(name) => tokens::revoke(state, name).await,
        Route::ListAlerts => alerts::list(state).await,
        Route::CreateAlert => alerts::create(req, state).await,
        Route::GetAlert(id) => alerts::get(state, id).await,
        Route::UpdateAlert(id) => alerts::update(req, state, id).await,
        Route::DeleteAlert(id) => alerts::delete(state, id).await,
        Route::AcknowledgeAlert(id) => alerts::acknowledge(req, state, id).await,
        Route::ListSilences => alerts::silences(state).await,
        Route::CreateSilence => alerts::silence(req, state).await,
        Route::DeleteSilence(id) => alerts::unsilence(state, id).await,
    }
}

fn parse_id(text: &str) -> Result<i64, ApiError> {
    match text.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(ApiError::invalid_field("id", "must be a positive integer")),
    }
}

fn not_found(path: &str) -> ApiError {
    ApiError::not_found(format!("No route for {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;

    /// A route and its guard, or the error's status, detail, `Allow` and fields.
    fn answer(method: &str, path: &str, dev: bool) -> String {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        match resolve(&method, path, dev) {
            Ok((route, guard)) => format!("{route:?} {guard:?}"),
            Err(e) => {
                let mut text = format!("{} {}", e.status.as_u16(), e.detail);
                if let Some(allow) = e.allow {
                    text += &format!(" [{allow}]");
                }
                for field in &e.errors {
                    text += &format!(" {field:?}");
                }
                text
            }
        }
    }

    /// What the API answered before it had a route table, on the paths where that is
    /// easiest to get wrong: both spellings and mixed ones, parameters next to fixed words,
    /// development paths, bad ids, the resource 404s.
    #[test]
    fn answers_stay_as_they_were() {
        for (method, path, dev, expected) in ANSWERS {
            assert_eq!(
                answer(method, path, *dev),
                *expected,
                "{method} {path} dev={dev}"
            );
        }
    }

    /// The path of `entry` with every parameter `1`.
    fn example(entry: &Entry) -> String {
        let path: String = entry
            .parts
            .iter()
            .map(|part| match part {
                Part::Word(spellings) => format!("/{}", spellings[0]),
                Part::Param => "/1".to_owned(),
            })
            .collect();
        if path.is_empty() {
            "/".to_owned()
        } else {
            path
        }
    }

    #[test]
    fn every_route_answers_exactly_the_methods_its_allow_names() {
        const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
        for entry in ROUTES {
            let path = example(entry);
            let mut answered = Vec::new();
            let mut allows = Vec::new();
            for name in METHODS {
                let method = Method::from_bytes(name.as_bytes()).unwrap();
                match resolve(&method, &path, true) {
                    Ok(_) => answered.push(name),
                    Err(e) if e.status == StatusCode::METHOD_NOT_ALLOWED => allows.extend(e.allow),
                    Err(e) => panic!("{name} {path}: {} {}", e.status, e.detail),
                }
            }
            assert!(!answered.is_empty(), "{path} answers nothing");
            assert!(allows.len() >= 2, "{path}: {allows:?}");
            for allow in allows {
                assert_eq!(allow, answered.join(", "), "{path}");
            }
        }
    }

    const ANSWERS: &[(&str, &str, bool, &str)] = &[
        ("GET", "/", false, "Index Open"),
        ("HEAD", "/", false, "Index Open"),
        ("POST", "/", false, "405 Method not allowed; this path answers GET, HEAD [GET, HEAD]"),
        ("GET", "/sensorgate.js", false, "ClientModule Open"),
        ("PUT", "/healthz", false, "405 Method not allowed; this path answers GET, HEAD [GET, HEAD]"),
        ("GET", "/assets/app.js", false, "Asset(\"app.js\") Open"),
        ("GET", "/assets", false, "404 No route for /assets"),
        ("GET", "/assets/a/b", false, "404 No route for /assets/a/b"),
        ("GET", "/metrics/", false, "Metrics Needs(Read)"),
        ("GET", "//api//v1//sensores//", false, "ListSensors Needs(Read)"),
        ("GET", "/api/v1/openapi.json", false, "OpenApi Open"),
        ("DELETE", "/api/v1/openapi.json", false, "405 Method not allowed; this path answers GET, HEAD [GET, HEAD]"),
        ("GET", "/api/v1/sensores", false, "ListSensors Needs(Read)"),
        ("POST", "/api/v1/sensors", false, "CreateSensor Needs(Write)"),
        ("PATCH", "/api/v1/sensors", false, "405 Method not allowed; this path answers GET, HEAD, POST [GET, HEAD, POST]"),
        ("GET", "/api/v1/sensors/7", false, "GetSensor(7) Needs(Read)"),
        ("PUT", "/api/v1/sensores/7", false, "UpdateSensor(7) Needs(Write)"),
        ("DELETE", "/api/v1/sensors/7", false, "DeleteSensor(7) Needs(Write)"),
        ("POST", "/api/v1/sensors/7", false, "405 Method not allowed; this path answers GET, HEAD, PUT, DELETE [GET, HEAD, PUT, DELETE]"),
        ("GET", "/api/v1/sensors/abc", false, "422 Validation failed: id: must be a positive integer FieldError { field: \"id\", message: \"must be a positive integer\" }"),
        ("POST", "/api/v1/sensors/abc", false, "405 Method not allowed; this path answers GET, HEAD, PUT, DELETE [GET, HEAD, PUT, DELETE]"),
        ("GET", "/api/v1/sensors/0", false, "422 Validation failed: id: must be a positive integer FieldError { field: \"id\", message: \"must be a positive integer\" }"),
        ("GET", "/api/v1/sensors/7/calibracion", false, "CalibrationHistory(7) Needs(Read)"),
        ("POST", "/api/v1/sensors/7/calibracion", false, "405 Method not allowed; this path answers GET, HEAD [GET, HEAD]"),
        ("GET", "/api/v1/sensors/7/other", false, "404 No such sensor route"),
        ("GET", "/api/v1/sensors/7/calibracion/x", false, "404 No such sensor route"),
        ("GET", "/api/v1/sensors/export", false, "422 Validation failed: id: must be a positive integer FieldError { field: \"id\", message: \"must be a positive integer\" }"),
        ("GET", "/api/v1/test-sensors", false, "404 No route for /api/v1/test-sensors"),
        ("GET", "/api/v1/test-sensors", true, "ListSensors Open"),
        ("POST", "/api/v1/test-sensors/3", true, "405 Method not allowed; this path answers GET, HEAD, PUT, DELETE [GET, HEAD, PUT, DELETE]"),
        ("GET", "/api/v1/test-sensors/3/x", true, "404 No such sensor route"),
        ("PUT", "/api/v1/test-sensors/3", false, "404 No route for /api/v1/test-sensors/3"),
        ("GET", "/api/v1/lecturas", false, "ListReadings Needs(Read)"),
        ("POST", "/api/v1/readings", false, "CreateReading Needs(Write)"),
        ("PUT", "/api/v1/readings", false, "405 Method not allowed; this path answers GET, HEAD, POST [GET, HEAD, POST]"),
        ("GET", "/api/v1/lecturas/agregadas", false, "AggregatedReadings Needs(Read)"),
        ("GET", "/api/v1/readings/aggregated", false, "AggregatedReadings Needs(Read)"),
        ("POST", "/api/v1/readings/aggregated", false, "405 Method not allowed; this path answers GET, HEAD [GET, HEAD]"),
        ("GET", "/api/v1/lecturas/aggregated", false, "404 No route for /api/v1/lecturas/aggregated"),
        ("POST", "/api/v1/lecturas/aggregated", false, "404 No route for /api/v1/lecturas/aggregated"),
        ("GET", "/api/v1/readings/agregadas", false, "404 No route for /api/v1/readings/agregadas"),
        ("GET", "/api/v1/lecturas/export", false, "ExportReadings Needs(Read)"),
        ("PUT", "/api/v1/readings/export", false, "405 Method not allowed; this path answers GET, HEAD [GET, HEAD]"),
        ("GET", "/api/v1/readings/12", false, "GetReading(12) Needs(Read)"),
        ("PUT", "/api/v1/readings/12", false, "UpdateReading(12) Needs(Write)"),
        ("DELETE", "/api/v1/lecturas/12", false, "DeleteReading(12) Needs(Write)"),
        ("POST", "/api/v1/lecturas/12", false, "405 Method not allowed; this path answers GET, HEAD, PUT, DELETE [GET, HEAD, PUT, DELETE]"),
        ("GET", "/api/v1/lecturas/x", false, "422 Validation failed: id: must be a positive integer FieldError { field: \"id\", message: \"must be a positive integer\" }"),
        ("PATCH", "/api/v1/lecturas/x", false, "405 Method not allowed; this path answers GET, HEAD, PUT, DELETE [GET, HEAD, PUT, DELETE]"),
        ("GET", "/api/v1/lecturas/1/2", false, "404 No route for /api/v1/lecturas/1/2"),
        ("GET", "/api/v1/ws", false, "Socket Needs(Read)"),
        ("POST", "/api/v1/ws", false, "405 Method not allowed; this path answers GET, HEAD [GET, HEAD]"),
        ("GET", "/api/v1/ws/secure", false, "SecureSocket Needs(Secure)"),
        ("HEAD", "/api/v1/events", false, "Events Needs(Read)"),
        ("POST", "/api/v1/events", false, "405 Method not allowed; this path answers GET, HEAD [GET, HEAD]"),
        ("GET", "/api/v1/ws/stats", false, "SocketStats Needs(Read)"),
        ("GET", "/api/v1/ws/stats/readings", false, "ChannelStats(\"readings\") Needs(Read)"),
        ("DELETE", "/api/v1/ws/stats/readings", false, "405 Method not allowed; this path answers GET, HEAD [GET, HEAD]"),
        ("POST", "/api/v1/ws/test-event", false, "TestEvent Needs(Admin)"),
        ("GET", "/api/v1/ws/test-event", false, "405 Method not allowed; this path answers POST [POST]"),
        ("GET", "/api/v1/ws/other", false, "404 No route for /api/v1/ws/other"),
        ("GET", "/api/v1/tokens", false, "ListTokens Needs(Admin)"),
        ("POST", "/api/v1/tokens", false, "CreateToken Needs(Admin)"),
        ("DELETE", "/api/v1/tokens", false, "405 Method not allowed; this path answers GET, HEAD, POST [GET, HEAD, POST]"),
        ("DELETE", "/api/v1/tokens/ops", false, "RevokeToken(\"ops\") Needs(Admin)"),
        ("GET", "/api/v1/tokens/ops", false, "405 Method not allowed; this path answers DELETE [DELETE]"),
        ("GET", "/api/v1/alertas", false, "ListAlerts Needs(Read)"),
        ("POST", "/api/v1/alerts", false, "CreateAlert Needs(Admin)"),
        ("PUT", "/api/v1/alerts", false, "405 Method not allowed; this path answers GET, HEAD, POST [GET, HEAD, POST]"),
        ("GET", "/api/v1/alerts/4", false, "GetAlert(4) Needs(Read)"),
        ("PUT", "/api/v1/alerts/4", false, "UpdateAlert(4) Needs(Admin)"),
        ("DELETE", "/api/v1/alertas/4", false, "DeleteAlert(4) Needs(Admin)"),
        ("POST", "/api/v1/alerts/4", false, "405 Method not allowed; this path answers GET, HEAD, PUT, DELETE [GET, HEAD, PUT, DELETE]"),
        ("GET", "/api/v1/alerts/x", false, "422 Validation failed: id: must be a positive integer FieldError { field: \"id\", message: \"must be a positive integer\" }"),
        ("POST", "/api/v1/alerts/4/ack", false, "AcknowledgeAlert(4) Needs(Write)"),
        ("GET", "/api/v1/alerts/4/ack", false, "405 Method not allowed; this path answers POST [POST]"),
        ("POST", "/api/v1/alerts/x/ack", false, "422 Validation failed: id: must be a positive integer FieldError { field: \"id\", message: \"must be a positive integer\" }"),
        ("GET", "/api/v1/alerts/4/other", false, "404 No such alert route"),
        ("GET", "/api/v1/silencios", false, "ListSilences Needs(Read)"),
        ("POST", "/api/v1/silences", false, "CreateSilence Needs(Write)"),
        ("PUT", "/api/v1/silences", false, "405 Method not allowed; this path answers GET, HEAD, POST [GET, HEAD, POST]"),
        ("DELETE", "/api/v1/silences/2", false, "DeleteSilence(2) Needs(Write)"),
        ("GET", "/api/v1/silences/2", false, "405 Method not allowed; this path answers DELETE [DELETE]"),
        ("DELETE", "/api/v1/silences/x", false, "422 Validation failed: id: must be a positive integer FieldError { field: \"id\", message: \"must be a positive integer\" }"),
        ("GET", "/api/v1/silences/2/x", false, "404 No such silence route"),
        ("GET", "/api", false, "404 No route for /api"),
        ("GET", "/api/v1", false, "404 No route for /api/v1"),
        ("GET", "/api/v2/sensors", false, "404 No route for /api/v2/sensors"),
        ("GET", "/nope", false, "404 No route for /nope"),
        ("OPTIONS", "/api/v1/sensors/1", false, "405 Method not allowed; this path answers GET, HEAD, PUT, DELETE [GET, HEAD, PUT, DELETE]"),
    ];
}
