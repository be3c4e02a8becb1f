//! Maps method and path to a route, and applies in one place what every route needs:
//! the URI limit, the token check for the route's access level, and the write rate
//! limit. Paths are matched with or without a trailing slash, as the original
//! service's clients use both.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper::body::{Body as _, Incoming};
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request, Response};
use tokio::time::Instant;

use super::limits::{Key, Slot};
use super::metrics::Limit;
use super::query::Query;
use super::realtime::{sse, ws};
use super::{alerts, export, rest, tokens, Admission, ApiError, Body, State};
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
        let (route, guard) = resolve(&req, state.server.dev)?;
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

/// Who a request is from: the TCP peer and the client it is for (the same unless the
/// peer is a trusted proxy).
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub peer: SocketAddr,
    pub address: IpAddr,
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

fn resolve(req: &Request<Incoming>, dev: bool) -> Result<(Route, Guard), ApiError> {
    use Access::{Admin, Read, Write};
    let path = req.uri().path();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method();
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    let (route, guard) = match segments.as_slice() {
        [] if get => (Route::Index, Guard::Open),
        ["sensorgate.js"] if get => (Route::ClientModule, Guard::Open),
        ["assets", name] if get => (Route::Asset((*name).to_owned()), Guard::Open),
        ["healthz"] if get => (Route::Health, Guard::Open),
        ["metrics"] if get => (Route::Metrics, Guard::Needs(Read)),
        ["api", "v1", rest @ ..] => match rest {
            ["openapi.json"] if get => (Route::OpenApi, Guard::Open),
            ["sensores" | "sensors", tail @ ..] => {
                (sensor_route(method, tail)?, sensor_guard(method))
            }
            ["test-sensors", tail @ ..] if dev => (sensor_route(method, tail)?, Guard::Open),
            ["lecturas" | "readings"] if get => (Route::ListReadings, Guard::Needs(Read)),
            ["lecturas" | "readings"] if post => (Route::CreateReading, Guard::Needs(Write)),
            ["lecturas", "agregadas"] | ["readings", "aggregated"] if get => {
                (Route::AggregatedReadings, Guard::Needs(Read))
            }
            ["lecturas" | "readings", "export"] if get => {
                (Route::ExportReadings, Guard::Needs(Read))
            }
            ["lecturas" | "readings", id]
                if !matches!(*id, "agregadas" | "aggregated" | "export") =>
            {
                (reading_route(method, id)?, sensor_guard(method))
            }
            ["ws"] if get => (Route::Socket, Guard::Needs(Read)),
            ["ws", "secure"] if get => (Route::SecureSocket, Guard::Needs(Access::Secure)),
            ["events"] if get => (Route::Events, Guard::Needs(Read)),
            ["ws", "stats"] if get => (Route::SocketStats, Guard::Needs(Read)),
            ["ws", "stats", channel] if get => (
                Route::ChannelStats((*channel).to_owned()),
                Guard::Needs(Read),
            ),
            ["ws", "test-event"] if post => (Route::TestEvent, Guard::Needs(Admin)),
            ["tokens"] if get => (Route::ListTokens, Guard::Needs(Admin)),
            ["tokens"] if post => (Route::CreateToken, Guard::Needs(Admin)),
            ["tokens", name] if method == Method::DELETE => {
                (Route::RevokeToken((*name).to_owned()), Guard::Needs(Admin))
            }
            ["alertas" | "alerts", tail @ ..] => alert_route(method, tail)?,
            ["silencios" | "silences", tail @ ..] => silence_route(method, tail)?,
            _ => return Err(wrong_method_or_not_found(&segments, path)),
        },
        _ => return Err(wrong_method_or_not_found(&segments, path)),
    };
    Ok((route, guard))
}

const READ_METHODS: &str = "GET, HEAD";
const COLLECTION_METHODS: &str = "GET, HEAD, POST";
const ITEM_METHODS: &str = "GET, HEAD, PUT, DELETE";

/// 405 with `Allow` for a known path asked with the wrong method, 404 otherwise.
fn wrong_method_or_not_found(segments: &[&str], path: &str) -> ApiError {
    let allow = match segments {
        [] | ["sensorgate.js" | "healthz" | "metrics"] | ["assets", _] => READ_METHODS,
        ["api", "v1", rest @ ..] => match rest {
            ["lecturas" | "readings"] | ["tokens"] => COLLECTION_METHODS,
            ["ws", "test-event"] => "POST",
            ["tokens", _] => "DELETE",
            ["openapi.json" | "ws" | "events"]
            | ["lecturas", "agregadas"]
            | ["readings", "aggregated"]
            | ["lecturas" | "readings", "export"]
            | ["ws", "secure" | "stats"]
            | ["ws", "stats", _] => READ_METHODS,
            _ => return not_found(path),
        },
        _ => return not_found(path),
    };
    ApiError::method_not_allowed(allow)
}

fn sensor_route(method: &Method, tail: &[&str]) -> Result<Route, ApiError> {
    Ok(match (method.clone(), tail) {
        (Method::GET | Method::HEAD, []) => Route::ListSensors,
        (Method::POST, []) => Route::CreateSensor,
        (Method::GET | Method::HEAD, [id]) => Route::GetSensor(parse_id(id)?),
        (Method::PUT, [id]) => Route::UpdateSensor(parse_id(id)?),
        (Method::DELETE, [id]) => Route::DeleteSensor(parse_id(id)?),
        (Method::GET | Method::HEAD, [id, "calibracion"]) => {
            Route::CalibrationHistory(parse_id(id)?)
        }
        (_, [_, "calibracion"]) => return Err(ApiError::method_not_allowed(READ_METHODS)),
        (_, []) => return Err(ApiError::method_not_allowed(COLLECTION_METHODS)),
        (_, [_]) => return Err(ApiError::method_not_allowed(ITEM_METHODS)),
        _ => return Err(ApiError::not_found("No such sensor route")),
    })
}

/// Alert rules: read with read access, changed by an admin; a firing alert is
/// acknowledged with write access, as operators have.
fn alert_route(method: &Method, tail: &[&str]) -> Result<(Route, Guard), ApiError> {
    use Access::{Admin, Read, Write};
    Ok(match (method.clone(), tail) {
        (Method::GET | Method::HEAD, []) => (Route::ListAlerts, Guard::Needs(Read)),
        (Method::POST, []) => (Route::CreateAlert, Guard::Needs(Admin)),
        (Method::GET | Method::HEAD, [id]) => (Route::GetAlert(parse_id(id)?), Guard::Needs(Read)),
        (Method::PUT, [id]) => (Route::UpdateAlert(parse_id(id)?), Guard::Needs(Admin)),
        (Method::DELETE, [id]) => (Route::DeleteAlert(parse_id(id)?), Guard::Needs(Admin)),
        (Method::POST, [id, "ack"]) => {
            (Route::AcknowledgeAlert(parse_id(id)?), Guard::Needs(Write))
        }
        (_, []) => return Err(ApiError::method_not_allowed(COLLECTION_METHODS)),
        (_, [_]) => return Err(ApiError::method_not_allowed(ITEM_METHODS)),
        (_, [_, "ack"]) => return Err(ApiError::method_not_allowed("POST")),
        _ => return Err(ApiError::not_found("No such alert route")),
    })
}

/// Silences: listed with read access, set and lifted with write access.
fn silence_route(method: &Method, tail: &[&str]) -> Result<(Route, Guard), ApiError> {
    use Access::{Read, Write};
    Ok(match (method.clone(), tail) {
        (Method::GET | Method::HEAD, []) => (Route::ListSilences, Guard::Needs(Read)),
        (Method::POST, []) => (Route::CreateSilence, Guard::Needs(Write)),
        (Method::DELETE, [id]) => (Route::DeleteSilence(parse_id(id)?), Guard::Needs(Write)),
        (_, []) => return Err(ApiError::method_not_allowed(COLLECTION_METHODS)),
        (_, [_]) => return Err(ApiError::method_not_allowed("DELETE")),
        _ => return Err(ApiError::not_found("No such silence route")),
    })
}

/// One reading: read like the list, changed and deleted with the access a new reading
/// needs.
fn reading_route(method: &Method, id: &str) -> Result<Route, ApiError> {
    Ok(match method.clone() {
        Method::GET | Method::HEAD => Route::GetReading(parse_id(id)?),
        Method::PUT => Route::UpdateReading(parse_id(id)?),
        Method::DELETE => Route::DeleteReading(parse_id(id)?),
        _ => return Err(ApiError::method_not_allowed(ITEM_METHODS)),
    })
}

/// Reads need read access, every other method write access.
fn sensor_guard(method: &Method) -> Guard {
    if method == Method::GET || method == Method::HEAD {
        Guard::Needs(Access::Read)
    } else {
        Guard::Needs(Access::Write)
    }
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

/// What a stream holds for as long as it lives: its connection's places under the
/// limits, and the client's place when it came through a trusted proxy.
pub struct StreamAdmission {
    _connection: Arc<Admission>,
    _client: Option<Slot>,
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
