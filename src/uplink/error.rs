//! Why the uplink could not start.

use std::fmt;

use crate::store::StoreError;

/// Why the uplink could not start.
#[derive(Debug)]
pub enum UplinkError {
    /// The cursor could not be read or saved.
    Store(StoreError),
    /// A setting is unusable (validated configs never have one).
    Config(String),
    /// The TLS settings could not be applied.
    Tls(String),
}

impl fmt::Display for UplinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UplinkError::Store(e) => write!(f, "uplink cursor: {e}"),
            UplinkError::Config(e) => write!(f, "uplink settings: {e}"),
            UplinkError::Tls(e) => write!(f, "uplink TLS: {e}"),
        }
    }
}

impl std::error::Error for UplinkError {}

impl From<StoreError> for UplinkError {
    fn from(e: StoreError) -> Self {
        UplinkError::Store(e)
    }
}
