//! The one place where errors become the wire error shape:
//! `{"detail": "...", "code": "...", "errors": [{"field", "message"}]}`.

use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::{json_response, Body};
use crate::auth::AuthError;
use crate::model::FieldError;
use crate::store::StoreError;

/// An answer other than success.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub retry_after: Option<u64>,
    /// Ask for a bearer token (`WWW-Authenticate`), on 401.
    pub challenge: bool,
    /// The methods the path does answer (`Allow`), on 405.
    pub allow: Option<&'static str>,
    /// The answer comes before the request was read to the end, so the connection
    /// cannot carry another request: say `Connection: close`.
    pub ends_connection: bool,
}

#[derive(Serialize)]
struct WireError<'a> {
    detail: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [FieldError],
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
            challenge: false,
            allow: None,
            ends_connection: false,
        }
    }

    /// The same error, answered as the last on its connection.
    pub fn ending_connection(self) -> ApiError {
        ApiError {
            ends_connection: true,
            ..self
        }
    }

    /// 400: the request cannot be parsed.
    pub fn malformed(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed", detail)
    }

    /// 400 for a WebSocket channel that does not exist.
    pub fn unknown_channel(name: &str) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_channel",
            format!("Unknown channel '{name}'; expected sensors, readings or general"),
        )
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// 405, with the methods the path answers, as `GET, HEAD`.
    pub fn method_not_allowed(allow: &'static str) -> ApiError {
        ApiError {
            allow: Some(allow),
            ..ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("Method not allowed; this path answers {allow}"),
            )
        }
    }

    /// 413; the rest of the body is never read.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("Request body larger than {limit} bytes"),
        )
        .ending_connection()
    }

    /// 408: the body did not arrive in time; the rest of it is never read.
    pub fn body_timeout(limit: std::time::Duration) -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("Request body not received within {} s", limit.as_secs()),
        )
        .ending_connection()
    }

    /// 422, naming every bad field.
    pub fn invalid(errors: Vec<FieldError>) -> ApiError {
        let summary: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        ApiError {
            errors,
            ..ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("Validation failed: {}", summary.join("; ")),
            )
        }
    }

    /// 422 for a single field.
    pub fn invalid_field(field: &str, message: &str) -> ApiError {
        ApiError::invalid(vec![FieldError::new(field, message)])
    }

    /// 409.
    pub fn conflict(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// 414.
    pub fn uri_too_long(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("Request URI longer than {limit} bytes"),
        )
    }

    /// 429, with how long to wait.
    pub fn rate_limited(wait: std::time::Duration) -> ApiError {
        ApiError {
            retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests; retry after the time in Retry-After",
            )
        }
    }

    /// 403 for a browser page from a foreign site.
    pub fn forbidden_origin(origin: &str) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            format!("Pages from {origin} may not open this gateway's socket"),
        )
    }

    /// 403 for a request naming a host that is not this gateway (DNS rebinding).
    pub fn host_not_allowed(host: &str) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            format!(
                "Host {host:?} is not a name or address of this gateway; if it is one, \
                 add it to auth.allowed_hosts in the config"
            ),
        )
    }

    /// 429 for a client behind a trusted proxy with too many streams open.
    pub fn too_many_connections(max: usize) -> ApiError {
        ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                format!(
                    "This client has {max} connections open already (limits.max_connections_per_address)"
                ),
            )
        }
    }

    /// 503: the daemon is stopping or storage is unavailable.
    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(5),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
        }
    }

    /// The response carrying this error.
    pub fn into_response(self) -> Response<Body> {
        let mut response = json_response(
            self.status,
            &WireError {
                detail: &self.detail,
                code: self.code,
                errors: &self.errors,
            },
        );
        if self.challenge {
            response.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(allow) = self.allow {
            response
                .headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.ends_connection {
            response
                .headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Missing | AuthError::Invalid => ApiError {
                challenge: true,
                ..ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
            },
            AuthError::Forbidden { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            AuthError::Unavailable(store) => ApiError::from(store),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound { entity, id } => {
                ApiError::not_found(format!("{entity} {id} not found"))
            }
            StoreError::Closed => ApiError::unavailable("Shutting down"),
            // Logged with what to do where it was found; waiting will not help.
            StoreError::Damaged(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_damaged",
                "The gateway's database is damaged; writes are refused until an operator \
                 replaces it (the daemon's log and /healthz say how)",
            ),
            other => {
                log::error!("storage: {other}");
                ApiError::unavailable(format!("Storage unavailable: {other}"))
            }
        }
    }
}

impl From<crate::alerts::AlertError> for ApiError {
    fn from(e: crate::alerts::AlertError) -> ApiError {
        use crate::alerts::AlertError;
        match e {
            AlertError::NotFound(detail) => ApiError::not_found(detail),
            AlertError::Invalid(errors) => ApiError::invalid(errors),
            AlertError::Conflict(detail) => ApiError::conflict(detail),
            AlertError::Store(store) => ApiError::from(store),
            AlertError::Stopped => ApiError::unavailable("Shutting down"),
        }
    }
}
