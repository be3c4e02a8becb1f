//! Token management over REST, for admins: list, create (the token is shown once),
//! revoke. Tokens are not sensor data and emit no events; they are read and written
//! through the store like everything else.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::rest::read_json;
use super::{json_response, ApiError, Body, State};
use crate::auth::tokens::{self, TokenError};
use crate::auth::Scope;

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> ApiError {
        match e {
            TokenError::InvalidName => ApiError::invalid_field("name", &e.to_string()),
            TokenError::NameTaken(_) => ApiError::conflict(e.to_string()),
            TokenError::NotFound(_) => ApiError::not_found(e.to_string()),
            TokenError::Random(_) | TokenError::Marker(_) | TokenError::Store(_) => {
                log::error!("token storage: {e}");
                ApiError::unavailable(e.to_string())
            }
        }
    }
}

pub async fn list(state: &State) -> Result<Response<Body>, ApiError> {
    let listed = tokens::list(&state.store).await?;
    Ok(json_response(StatusCode::OK, &listed))
}

/// `{"name": "kitchen-tablet", "scope": "write"}` → 201 with the token, shown this once.
pub async fn create(
    req: Request<Incoming>,
    state: &Arc<State>,
) -> Result<Response<Body>, ApiError> {
    let Value::Object(mut body) = read_json(req, state).await? else {
        return Err(ApiError::invalid_field("body", "must be a JSON object"));
    };
    let name = match body.remove("name") {
        Some(Value::String(name)) => name,
        _ => return Err(ApiError::invalid_field("name", "field required, a string")),
    };
    let scope: Scope = match body.remove("scope") {
        Some(Value::String(scope)) => scope
            .parse()
            .map_err(|e: String| ApiError::invalid_field("scope", &e))?,
        _ => {
            return Err(ApiError::invalid_field(
                "scope",
                "field required: read, write or admin",
            ))
        }
    };
    if let Some(unknown) = body.keys().next() {
        return Err(ApiError::invalid_field(unknown, "unknown field"));
    }
    let token = tokens::create(&state.store, &name, scope).await?;
    log::info!("token {name:?} created with scope {scope}");
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"name": name, "scope": scope, "token": token}),
    ))
}

pub async fn revoke(state: &State, name: String) -> Result<Response<Body>, ApiError> {
    let revoked = tokens::revoke(&state.store, &name, &state.data_dir).await;
    // This daemon forgets the tokens it knew whatever the marker's fate: the token is
    // gone from the table once the revocation got that far.
    state.auth.forget_known();
    revoked?;
    log::info!("token {name:?} revoked");
    Ok(json_response(
        StatusCode::OK,
        &json!({"name": name, "revoked": true}),
    ))
}
