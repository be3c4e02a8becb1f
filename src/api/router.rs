//! Maps method and path to a handler. Paths are matched with or without a trailing
//! slash, as the original service's clients use both.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};

use super::realtime::{sse, ws};
use super::{rest, ApiError, Body, State};

pub async fn route(req: Request<Incoming>, state: Arc<State>, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let result = match segments.as_slice() {
        [] => only(&req, Method::GET).map(|()| rest::index()),
        ["sensorgate.js"] => only(&req, Method::GET).map(|()| rest::client_module()),
        ["assets", name] => only(&req, Method::GET).and_then(|()| rest::dashboard_asset(name)),
        ["healthz"] => match only(&req, Method::GET) {
            Ok(()) => Ok(rest::health(&state).await),
            Err(e) => Err(e),
        },
        ["api", "v1", rest @ ..] => api(req, rest, &state, peer).await,
        _ => Err(not_found(&path)),
    };
    result.unwrap_or_else(ApiError::into_response)
}

async fn api(
    req: Request<Incoming>,
    rest_of_path: &[&str],
    state: &Arc<State>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    match rest_of_path {
        ["openapi.json"] => only(&req, Method::GET).map(|()| rest::openapi()),
        ["sensores" | "sensors", tail @ ..] => sensors(req, tail, state).await,
        ["test-sensors", tail @ ..] if state.server.dev => sensors(req, tail, state).await,
        ["lecturas" | "readings"] => match method {
            Method::GET => rest::list_readings(&req, state).await,
            Method::POST => rest::create_reading(req, state).await,
            _ => Err(ApiError::method_not_allowed()),
        },
        ["ws"] => {
            only(&req, Method::GET)?;
            ws::upgrade(req, state.clone(), peer)
        }
        ["events"] => {
            only(&req, Method::GET)?;
            sse::stream(&req, state.clone())
        }
        ["ws", "stats"] => only(&req, Method::GET).map(|()| rest::ws_stats(state)),
        ["ws", "stats", channel] => {
            only(&req, Method::GET)?;
            rest::ws_channel_stats(state, channel)
        }
        ["ws", "test-event"] => {
            only(&req, Method::POST)?;
            rest::test_event(req, state).await
        }
        _ => Err(not_found(req.uri().path())),
    }
}

async fn sensors(
    req: Request<Incoming>,
    tail: &[&str],
    state: &Arc<State>,
) -> Result<Response<Body>, ApiError> {
    match (req.method().clone(), tail) {
        (Method::GET, []) => rest::list_sensors(&req, state).await,
        (Method::POST, []) => rest::create_sensor(req, state).await,
        (Method::GET, [id]) => rest::get_sensor(state, parse_id(id)?).await,
        (Method::PUT, [id]) => rest::update_sensor(req, state, parse_id(id)?).await,
        (Method::DELETE, [id]) => rest::delete_sensor(state, parse_id(id)?).await,
        (_, [] | [_]) => Err(ApiError::method_not_allowed()),
        _ => Err(not_found(req.uri().path())),
    }
}

fn only(req: &Request<Incoming>, method: Method) -> Result<(), ApiError> {
    if req.method() == method || (method == Method::GET && req.method() == Method::HEAD) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed())
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
