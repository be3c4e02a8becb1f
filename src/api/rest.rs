//! REST handlers: parse and validate, call the store, shape the answer. None of them
//! writes anything itself; every change goes through the store writer, which emits the
//! matching event.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH,
    CONTENT_TYPE, ETAG, IF_NONE_MATCH, VARY,
};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::metrics::{self, Limit};
use super::query::Query;
use super::{full, json_response, ApiError, Body, State};
use crate::events::Channel;
use crate::model::{
    format_time, now_micros, FieldError, Micros, NewReading, NewSensor, ReadingPatch, Sensor,
    SensorPatch,
};
use crate::sensors;
use crate::store::{
    AggregateQuery, Bucket, Emission, EmissionKind, ReadingFilter, ReadingOrder, SensorFilter,
    SCHEMA_VERSION,
};

static OPENAPI: Embedded = Embedded::new(
    "openapi.json",
    include_str!("../../assets/openapi.json"),
    "application/json",
);
static INDEX: Embedded = Embedded::new(
    "index.html",
    include_str!("../../assets/index.html"),
    "text/html; charset=utf-8",
);
static CLIENT: Embedded = Embedded::new(
    "sensorgate.js",
    include_str!("../../assets/sensorgate.js"),
    JS,
);

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The dashboard's scripts and styles, and the chart library it vendors with its licence,
/// served at `/assets/{name}`: compiled in, so the gateway needs neither internet access
/// nor files beside the binary.
static ASSETS: [Embedded; 5] = [
    Embedded::new("app.js", include_str!("../../assets/app.js"), JS),
    Embedded::new("app.css", include_str!("../../assets/app.css"), CSS),
    Embedded::new(
        "uPlot.iife.min.js",
        include_str!("../../assets/vendor/uPlot.iife.min.js"),
        JS,
    ),
    Embedded::new(
        "uPlot.min.css",
        include_str!("../../assets/vendor/uPlot.min.css"),
        CSS,
    ),
    Embedded::new(
        "uPlot.LICENSE",
        include_str!("../../assets/vendor/uPlot.LICENSE"),
        "text/plain; charset=utf-8",
    ),
];

/// A file compiled into the binary, served as it is or gzip-compressed.
struct Embedded {
    name: &'static str,
    body: &'static str,
    content_type: &'static str,
    /// Made at the first request for the file, then kept: compressing costs a few
    /// milliseconds once, not at every request.
    prepared: OnceLock<Prepared>,
}

/// An embedded file's compressed form and entity tags.
struct Prepared {
    /// `None` where compression does not make the file smaller.
    gzip: Option<Bytes>,
    /// A strong tag per form: `"<hash>"` and `"<hash>-gzip"`, the hash that of the file.
    etag: HeaderValue,
    gzip_etag: HeaderValue,
}

impl Embedded {
    const fn new(name: &'static str, body: &'static str, content_type: &'static str) -> Self {
        Embedded {
            name,
            body,
            content_type,
            prepared: OnceLock::new(),
        }
    }

    fn prepared(&self) -> &Prepared {
        self.prepared.get_or_init(|| {
            use sha2::Digest;
            use std::io::Write;
            let hash = sha2::Sha256::digest(self.body.as_bytes());
            let hex: String = hash[..12].iter().map(|b| format!("{b:02x}")).collect();
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            let gzip = encoder
                .write_all(self.body.as_bytes())
                .and_then(|()| encoder.finish())
                .map_err(|e| log::warn!("compressing {} failed: {e}", self.name))
                .ok()
                .filter(|gzip| gzip.len() < self.body.len())
                .map(Bytes::from);
            let tag = |text: String| HeaderValue::try_from(text).expect("hex is a header value");
            Prepared {
                gzip,
                etag: tag(format!("\"{hex}\"")),
                gzip_etag: tag(format!("\"{hex}-gzip\"")),
            }
        })
    }

    /// The file for a request with `headers`: gzip-compressed when the client accepts
    /// it, 304 when the client's copy (`If-None-Match`) is current. `no-cache` makes
    /// browsers ask again at each load, as the URLs stay the same across upgrades of the
    /// daemon; the tag makes the answer a few bytes while the file is unchanged.
    fn response(&'static self, headers: &HeaderMap) -> Response<Body> {
        let prepared = self.prepared();
        let gzip = prepared.gzip.as_ref().filter(|_| accepts_gzip(headers));
        let etag = match gzip {
            Some(_) => &prepared.gzip_etag,
            None => &prepared.etag,
        };
        let current = headers
            .get_all(IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|tag| tag.trim().trim_start_matches("W/").as_bytes())
            .any(|tag| tag == b"*" || prepared.etag == tag || prepared.gzip_etag == tag);
        let mut response = if current {
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        } else {
            match gzip {
                Some(gzip) => {
                    let mut response = Response::new(full(gzip.clone()));
                    response
                        .headers_mut()
                        .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                    response
                }
                None => Response::new(full(self.body)),
            }
        };
        let out = response.headers_mut();
        out.insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        out.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        out.insert(ETAG, etag.clone());
        out.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        response
    }
}

/// Whether `Accept-Encoding` lists gzip (or `*`) with a weight above 0.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let weight = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (name.eq_ignore_ascii_case("gzip") || name == "*") && weight > 0.0
        })
}

/// Reads a JSON body of at most the configured size. Nothing is parsed past the limit.
pub async fn read_json(req: Request<Incoming>, state: &State) -> Result<Value, ApiError> {
    let limit = state.server.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        state.counters.hit(Limit::BodySize);
        return Err(ApiError::too_large(limit));
    }
    let deadline = Duration::from_secs(state.server.body_read_timeout_s);
    let collected = tokio::time::timeout(deadline, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| {
            state.counters.hit(Limit::BodyTimeout);
            ApiError::body_timeout(deadline)
        })?;
    let bytes = collected
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                state.counters.hit(Limit::BodySize);
                ApiError::too_large(limit)
            } else {
                ApiError::malformed(format!("Could not read the request body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ApiError::malformed(format!("Malformed JSON: {e}")))
}

fn query(req: &Request<Incoming>) -> Query {
    Query::parse(req.uri().query())
}

/// Parses an optional number parameter within bounds, naming it when it is bad.
fn number_param(query: &Query, name: &str, default: u32, max: u32) -> Result<u32, FieldError> {
    match query.get(name) {
        None => Ok(default),
        Some(text) => match text.parse::<u32>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(FieldError::new(
                name,
                format!("must be an integer from 0 to {max}"),
            )),
        },
    }
}

/// Collects query errors into one 422.
fn checked<T>(errors: &mut Vec<FieldError>, result: Result<T, FieldError>) -> Option<T> {
    result.map_err(|e| errors.push(e)).ok()
}

/// The dashboard's page.
pub fn index(headers: &HeaderMap) -> Response<Body> {
    INDEX.response(headers)
}

/// One of the dashboard's files, by name.
pub fn dashboard_asset(name: &str, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
    ASSETS
        .iter()
        .find(|file| file.name == name)
        .map(|file| file.response(headers))
        .ok_or_else(|| ApiError::not_found(format!("No asset {name}")))
}

/// The reconnecting reference client, for dashboards.
pub fn client_module(headers: &HeaderMap) -> Response<Body> {
    CLIENT.response(headers)
}

/// Prometheus text exposition.
pub async fn metrics(state: &State) -> Response<Body> {
    // The last values come from a snapshot; without one the rest is still worth serving.
    let snapshot = state.store.snapshot().await.ok();
    let mut text = metrics::render(
        &state.counters,
        &state.hub,
        &state.health,
        &state.store,
        state.uplink.as_deref(),
        snapshot.as_ref(),
    );
    if let Some(alerts) = &state.alerts {
        metrics::render_alerts(&mut text, alerts.stats());
    }
    let mut response = Response::new(full(text));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// The OpenAPI document.
pub fn openapi(headers: &HeaderMap) -> Response<Body> {
    OPENAPI.response(headers)
}

/// Liveness and storage status. 503 while storage is failing, so a supervisor or load
/// balancer sees it.
pub async fn health(state: &State) -> Response<Body> {
    let writer = state.store.health();
    let counts = state.store.counts().await;
    let failure = writer.failure();
    let (ok, storage) = match &counts {
        Ok(c) => (
            failure.is_none(),
            json!({
                "ok": failure.is_none(),
                "last_error": failure.as_ref().map(|f| &f.error),
                "failing_since": failure.as_ref().map(|f| format_time(f.since)),
                "damaged": writer.damage().is_some(),
                "commits": writer.commits(),
                "schema_version": SCHEMA_VERSION,
                "sensors": c.sensors,
                "last_seq": c.last_seq,
                "oldest_seq": c.oldest_seq,
                "written_bytes_per_day": writer.storage.bytes_per_day(),
                "write_budget_bytes_per_day": writer.storage.budget_bytes_per_day(),
                "commit_window_ms": writer.storage.commit_window_ms(),
                "free_bytes": writer.storage.free_bytes(),
                "free_floor_bytes": writer.storage.floor_bytes(),
                "days_to_floor": writer.storage.days_to_floor(),
                "pruned_readings": writer.storage.pruned_readings(),
            }),
        ),
        Err(e) => (
            false,
            json!({
                "ok": false,
                "last_error": failure.map_or_else(|| e.to_string(), |f| f.error),
                "damaged": writer.damage().is_some(),
            }),
        ),
    };
    let body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "storage": storage,
        "websocket_clients": state.hub.stats().total_connections,
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body)
}

pub async fn list_sensors(
    req: &Request<Incoming>,
    state: &State,
) -> Result<Response<Body>, ApiError> {
    let q = query(req);
    let mut errors = Vec::new();
    let activo = match q.get("activo") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => {
            errors.push(FieldError::new("activo", "must be true or false"));
            None
        }
    };
    let limit = checked(&mut errors, number_param(&q, "limit", 100, 1000));
    let offset = checked(&mut errors, number_param(&q, "offset", 0, u32::MAX));
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let filter = SensorFilter {
        tipo: q.get("tipo").map(str::to_owned),
        activo,
        limit: limit.unwrap_or_default(),
        offset: offset.unwrap_or_default(),
    };
    let sensors = state.store.sensors(filter).await?;
    let shown: Vec<Value> = sensors.iter().map(|s| with_health(state, s)).collect();
    Ok(json_response(StatusCode::OK, &shown))
}

/// A sensor with its health (`salud`, null when it is not sampled), so that a client
/// can tell a fresh value from a stale one.
fn with_health(state: &State, sensor: &Sensor) -> Value {
    let mut shown = serde_json::to_value(sensor).expect("sensors always serialise");
    shown["salud"] = json!(state.health.get(sensor.id));
    shown
}

pub async fn create_sensor(
    req: Request<Incoming>,
    state: &State,
) -> Result<Response<Body>, ApiError> {
    let new = NewSensor::from_json(read_json(req, state).await?, sensors::check_source)
        .map_err(ApiError::invalid)?;
    let unknown = new
        .calibracion
        .unknown_tipos(&new.tipo, new.fuente.as_ref(), "calibracion");
    if !unknown.is_empty() {
        return Err(ApiError::invalid(unknown));
    }
    let sensor = state.store.create_sensor(new).await?;
    Ok(json_response(StatusCode::CREATED, &sensor))
}

pub async fn get_sensor(state: &State, id: i64) -> Result<Response<Body>, ApiError> {
    match state.store.sensor(id).await? {
        Some(sensor) => Ok(json_response(StatusCode::OK, &with_health(state, &sensor))),
        None => Err(ApiError::not_found(format!("Sensor {id} not found"))),
    }
}

pub async fn update_sensor(
    req: Request<Incoming>,
    state: &State,
    id: i64,
) -> Result<Response<Body>, ApiError> {
    let patch = SensorPatch::from_json(read_json(req, state).await?, sensors::check_source)
        .map_err(ApiError::invalid)?;
    if patch.calibracion.is_some() {
        // Which tipos a sensor measures depends on its tipo and source as they will be
        // after the update.
        let Some(mut after) = state.store.sensor(id).await? else {
            return Err(ApiError::not_found(format!("Sensor {id} not found")));
        };
        patch.apply(&mut after);
        let unknown =
            after
                .calibracion
                .unknown_tipos(&after.tipo, after.fuente.as_ref(), "calibracion");
        if !unknown.is_empty() {
            return Err(ApiError::invalid(unknown));
        }
    }
    let sensor = state.store.update_sensor(id, patch).await?;
    Ok(json_response(StatusCode::OK, &sensor))
}

/// A sensor's calibration and every one it had before, each with when it took effect,
/// so that a stored reading can be traced to the calibration that corrected it. Kept
/// after the sensor is deleted, as its readings are.
pub async fn calibration_history(state: &State, id: i64) -> Result<Response<Body>, ApiError> {
    let sensor = state.store.sensor(id).await?;
    let history = state.store.calibration_history(id).await?;
    if sensor.is_none() && history.is_empty() {
        return Err(ApiError::not_found(format!("Sensor {id} not found")));
    }
    let body = json!({
        "sensor_id": id,
        "calibracion": sensor.map(|s| s.calibracion),
        "historial": history,
    });
    Ok(json_response(StatusCode::OK, &body))
}

pub async fn delete_sensor(state: &State, id: i64) -> Result<Response<Body>, ApiError> {
    let sensor = state.store.delete_sensor(id).await?;
    Ok(json_response(StatusCode::OK, &sensor))
}

/// The readings a query asks for: `sensor_id`, `tipo`, and `desde` (inclusive) to
/// `hasta` (exclusive); newest first and 100 at most unless the caller says otherwise.
pub fn reading_range(q: &Query, errors: &mut Vec<FieldError>) -> ReadingFilter {
    ReadingFilter {
        sensor_id: q.parsed("sensor_id", "must be an integer", errors),
        tipo: q.get("tipo").map(str::to_owned),
        from: q.time("desde", errors),
        to: q.time("hasta", errors),
        limit: 100,
        order: ReadingOrder::Desc,
        after: None,
    }
}

pub async fn list_readings(
    req: &Request<Incoming>,
    state: &State,
) -> Result<Response<Body>, ApiError> {
    let q = query(req);
    let mut errors = Vec::new();
    let mut filter = reading_range(&q, &mut errors);
    match q.get("order") {
        None | Some("desc") => {}
        Some("asc") => filter.order = ReadingOrder::Asc,
        Some(_) => errors.push(FieldError::new("order", "must be asc or desc")),
    }
    if let Some(limit) = checked(&mut errors, number_param(&q, "limit", 100, 10_000)) {
        filter.limit = limit;
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let readings = state.store.readings(filter).await?;
    Ok(json_response(StatusCode::OK, &readings))
}

/// History answered from roll-ups: min, max, avg and count per minute, hour or day, so a
/// month of a 1 Hz sensor costs ~720 rows, not 2.6 million.
pub async fn aggregated_readings(
    req: &Request<Incoming>,
    state: &State,
) -> Result<Response<Body>, ApiError> {
    let q = query(req);
    let mut errors = Vec::new();
    let range = reading_range(&q, &mut errors);
    if q.get("sensor_id").is_none() {
        errors.push(FieldError::new("sensor_id", "field required"));
    }
    let bucket = match q.get("bucket") {
        None => Some(Bucket::Hour),
        Some(text) => Bucket::parse(text).or_else(|| {
            errors.push(FieldError::new("bucket", "must be minute, hour or day"));
            None
        }),
    };
    let now = now_micros();
    let from = range.from.unwrap_or(now - 86_400_000_000);
    let to = range.to.unwrap_or(now);
    let limit = checked(&mut errors, number_param(&q, "limit", 10_000, 10_000));
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let aggregates = state
        .store
        .aggregates(AggregateQuery {
            sensor_id: range.sensor_id.unwrap_or_default(),
            tipo: range.tipo,
            bucket: bucket.unwrap_or(Bucket::Hour),
            from,
            to,
            limit: limit.unwrap_or_default(),
        })
        .await?;
    Ok(json_response(StatusCode::OK, &aggregates))
}

pub async fn create_reading(
    req: Request<Incoming>,
    state: &State,
) -> Result<Response<Body>, ApiError> {
    let mut new = NewReading::from_json(read_json(req, state).await?).map_err(ApiError::invalid)?;
    if let Some(taken_at) = new.timestamp {
        check_not_ahead(state, taken_at)?;
    }
    if new.timestamp.is_none() {
        // Stamped here, with the gateway's clock: flagged if that is not trusted yet.
        new.timestamp = Some(now_micros());
        new.hora_dudosa = !state.clock.trusted();
    }
    let reading = state.store.insert_reading(new).await?;
    Ok(json_response(StatusCode::CREATED, &reading))
}

pub async fn get_reading(state: &State, id: i64) -> Result<Response<Body>, ApiError> {
    match state.store.reading(id).await? {
        Some(reading) => Ok(json_response(StatusCode::OK, &reading)),
        None => Err(ApiError::not_found(format!("Reading {id} not found"))),
    }
}

pub async fn update_reading(
    req: Request<Incoming>,
    state: &State,
    id: i64,
) -> Result<Response<Body>, ApiError> {
    let patch = ReadingPatch::from_json(read_json(req, state).await?).map_err(ApiError::invalid)?;
    if let Some(taken_at) = patch.timestamp {
        check_not_ahead(state, taken_at)?;
    }
    let reading = state.store.update_reading(id, patch).await?;
    Ok(json_response(StatusCode::OK, &reading))
}

pub async fn delete_reading(state: &State, id: i64) -> Result<Response<Body>, ApiError> {
    let reading = state.store.delete_reading(id).await?;
    Ok(json_response(StatusCode::OK, &reading))
}

/// Refuses a sample time further ahead of the gateway's clock than the configured bound,
/// while that clock is trusted: a client clock set to year 9999 must not make its
/// reading the newest forever. With an untrusted clock the gateway cannot tell.
pub fn check_not_ahead(state: &State, taken_at: Micros) -> Result<(), ApiError> {
    let bound = state.max_future_s;
    let horizon = now_micros().saturating_add((bound as Micros).saturating_mul(1_000_000));
    if taken_at > horizon && state.clock.trusted() {
        return Err(ApiError::invalid_field(
            "timestamp",
            &format!(
                "is more than {bound} s ahead of the gateway's clock ({}); fix the client's \
                 clock, or raise storage.max_future_s",
                format_time(now_micros())
            ),
        ));
    }
    Ok(())
}

pub fn ws_stats(state: &State) -> Response<Body> {
    json_response(StatusCode::OK, &state.hub.stats())
}

pub fn ws_channel_stats(state: &State, channel: &str) -> Result<Response<Body>, ApiError> {
    let channel: Channel = channel
        .parse()
        .map_err(|_| ApiError::not_found(format!("Unknown channel '{channel}'")))?;
    let mut body =
        serde_json::to_value(state.hub.channel_stats(channel)).expect("stats always serialise");
    body["channel"] = json!(channel.as_str());
    Ok(json_response(StatusCode::OK, &body))
}

/// Broadcasts `{"channel": ..., "data": ...}` as a `test_event`; stored and numbered like
/// every event, so resuming clients see it too.
pub async fn test_event(
    req: Request<Incoming>,
    state: &Arc<State>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(req, state).await?;
    let Value::Object(mut fields) = body else {
        return Err(ApiError::invalid_field("body", "must be a JSON object"));
    };
    let channel = match fields.remove("channel") {
        None => Channel::General,
        Some(Value::String(name)) => name.parse().map_err(|_| {
            ApiError::invalid_field("channel", "must be sensors, readings or general")
        })?,
        Some(_) => return Err(ApiError::invalid_field("channel", "must be a string")),
    };
    let data = fields.remove("data").unwrap_or(Value::Null);
    if let Some(unknown) = fields.keys().next() {
        return Err(ApiError::invalid_field(unknown, "unknown field"));
    }
    let seq = state
        .store
        .emit(Emission {
            channel,
            kind: EmissionKind::Test,
            sensor_id: None,
            data,
        })
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "sent", "channel": channel.as_str(), "seq": seq}),
    ))
}
