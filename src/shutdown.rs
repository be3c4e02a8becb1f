//! Shutdown as a type.
//!
//! Semantics: once [`Trigger::fire`] is called, every [`Shutdown`] handle resolves; the
//! accept loop stops taking connections, HTTP connections finish their request in flight
//! and close, WebSocket sessions send a Close frame (1001) and end, sources stop. Each of
//! those holds a [`DrainGuard`]; [`Drain::wait`] returns when the last one is gone or the
//! deadline passes, and only then is the store writer told to commit what is queued and
//! stop.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Fires the shutdown signal.
pub struct Trigger(watch::Sender<bool>);

/// A handle that resolves when shutdown starts. Cheap to clone.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Trigger {
    /// A new, unfired signal and its first handle.
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger(tx), Shutdown(rx))
    }

    /// Starts shutdown; every handle resolves.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Waits until shutdown starts (at once if it already has).
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped, which also means shut down.
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    /// Whether shutdown has started.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }
}

/// Held by every task that must finish before storage closes.
#[derive(Clone)]
pub struct DrainGuard {
    /// Never sent on: the drain learns that every guard is gone when the channel closes.
    _held: mpsc::Sender<()>,
}

/// Waits for every [`DrainGuard`] to be dropped.
pub struct Drain(mpsc::Receiver<()>);

impl Drain {
    /// A drain and its first guard.
    pub fn new() -> (Drain, DrainGuard) {
        let (tx, rx) = mpsc::channel(1);
        (Drain(rx), DrainGuard { _held: tx })
    }

    /// Returns `true` when all guards were dropped before `deadline`.
    pub async fn wait(mut self, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, self.0.recv()).await.is_ok()
    }
}
