//! Events: what clients are told, in the original service's envelope, plus the `seq`
//! that makes resuming possible.
//!
//! An event is built and serialised exactly once, by the store writer right after it has
//! written what the event describes; the frame text is stored with it and the same bytes
//! go to every subscriber.

mod envelope;
mod hub;

pub(crate) use envelope::{
    reading_change_frame, reading_frame, sensor_frame, system_frame, test_frame,
};
pub use hub::{ChannelStats, Hub, HubStats, QueueCounters, Registration};

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde_json::Value;

use crate::model::{Reading, Sensor};

/// A topic clients subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Sensors created, updated, deleted.
    Sensors,
    /// Every stored reading.
    Readings,
    /// System events (sensor health, storage) and test events.
    General,
}

impl Channel {
    /// Every channel, in the order stats list them.
    pub const ALL: [Channel; 3] = [Channel::Sensors, Channel::Readings, Channel::General];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sensors => "sensors",
            Channel::Readings => "readings",
            Channel::General => "general",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name is not one of [`Channel::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownChannel(pub String);

impl FromStr for Channel {
    type Err = UnknownChannel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sensors" => Ok(Channel::Sensors),
            "readings" => Ok(Channel::Readings),
            "general" => Ok(Channel::General),
            other => Err(UnknownChannel(other.to_owned())),
        }
    }
}

/// What an event says, as values. Parts of the daemon that follow events read this,
/// never the frame: the frame is for clients.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A sensor created, updated (as it is now) or deleted (as it was).
    Sensor(Sensor),
    /// A reading created, updated (as it is now) or deleted (as it was).
    Reading(Reading),
    /// A system or test event: its `data`.
    Data(Value),
}

/// One emitted event: its place in the sequence, what subscriptions filter on, what it
/// says, and the frame every subscriber receives.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: u64,
    pub channel: Channel,
    /// `created`, `updated`, `deleted`, or the kind of a system or test event.
    pub event_type: String,
    /// The sensor the event is about (the reading's sensor for readings).
    pub sensor_id: Option<i64>,
    pub tipo: Option<String>,
    /// What the frame says, for the daemon's own parts.
    pub body: Body,
    /// The serialised JSON envelope, shared by every subscriber without copying.
    pub frame: Frame,
}

/// An event's frame: the JSON text every subscriber is sent, made once and shared. Any
/// transport takes it as bytes; nothing here knows which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    /// The frame as text.
    pub fn as_str(&self) -> &str {
        // Always UTF-8: a frame is only made from text.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The frame as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A handle on the same bytes, for a transport that sends them as they are.
    pub fn shared(&self) -> Bytes {
        self.0.clone()
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame(Bytes::from(text))
    }
}

impl From<&'static str> for Frame {
    fn from(text: &'static str) -> Frame {
        Frame(Bytes::from_static(text.as_bytes()))
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
