//! REST handlers of alert rules, acknowledgements and silences: read the body, ask the
//! alert watcher, shape the answer. The watcher writes, through the store writer.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::rest::read_json;
use super::{json_response, ApiError, Body, State};
use crate::alerts::Alerts;

fn watcher(state: &State) -> Result<&Alerts, ApiError> {
    state
        .alerts
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("Alerts are not running (see the daemon's log)"))
}

pub async fn list(state: &State) -> Result<Response<Body>, ApiError> {
    let rules = watcher(state)?.list().await?;
    Ok(json_response(StatusCode::OK, &rules))
}

pub async fn get(state: &State, id: i64) -> Result<Response<Body>, ApiError> {
    let rule = watcher(state)?.get(id).await?;
    Ok(json_response(StatusCode::OK, &rule))
}

pub async fn create(req: Request<Incoming>, state: &State) -> Result<Response<Body>, ApiError> {
    let alerts = watcher(state)?;
    let rule = alerts.create(read_json(req, state).await?).await?;
    Ok(json_response(StatusCode::CREATED, &rule))
}

pub async fn update(
    req: Request<Incoming>,
    state: &State,
    id: i64,
) -> Result<Response<Body>, ApiError> {
    let alerts = watcher(state)?;
    let rule = alerts.update(id, read_json(req, state).await?).await?;
    Ok(json_response(StatusCode::OK, &rule))
}

pub async fn delete(state: &State, id: i64) -> Result<Response<Body>, ApiError> {
    let rule = watcher(state)?.delete(id).await?;
    Ok(json_response(StatusCode::OK, &rule))
}

pub async fn acknowledge(
    req: Request<Incoming>,
    state: &State,
    id: i64,
) -> Result<Response<Body>, ApiError> {
    let alerts = watcher(state)?;
    let rule = alerts.acknowledge(id, read_json(req, state).await?).await?;
    Ok(json_response(StatusCode::OK, &rule))
}

pub async fn silences(state: &State) -> Result<Response<Body>, ApiError> {
    let silences = watcher(state)?.silences().await?;
    Ok(json_response(StatusCode::OK, &silences))
}

pub async fn silence(req: Request<Incoming>, state: &State) -> Result<Response<Body>, ApiError> {
    let alerts = watcher(state)?;
    let silence = alerts.silence(read_json(req, state).await?).await?;
    Ok(json_response(StatusCode::CREATED, &silence))
}

pub async fn unsilence(state: &State, id: i64) -> Result<Response<Body>, ApiError> {
    let silence = watcher(state)?.unsilence(id).await?;
    Ok(json_response(StatusCode::OK, &silence))
}
