//! The courier: delivers queued webhook notifications, each rule's in the order they were
//! queued, with a timeout per attempt, retries with exponential back-off and the rule's
//! rate limit. A notification leaves the outbox (through the writer) only once its
//! receiver answered 2xx, so a restart or power cut loses none.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::AlertStats;
use crate::backoff::Backoff;
use crate::shutdown::Shutdown;
use crate::store::alerts::{AlertOp, AlertWrite, OutboxRow};
use crate::store::Store;

/// Longest one delivery attempt may take, connection included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits after failed attempts: doubling from half a second to five minutes.
const RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(300));

/// The window of the per-rule rate limit.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// How often the outbox is looked at without being woken, in case a wake-up was missed.
const IDLE_LOOK: Duration = Duration::from_secs(30);

/// Where delivery of one rule's notifications stands.
struct Lane {
    /// No attempt before this (after a failure).
    retry_at: Option<Instant>,
    /// Waits after failures, from the first since the last delivery.
    backoff: Backoff,
    /// Deliveries in the last [`RATE_WINDOW`].
    delivered: VecDeque<Instant>,
}

impl Lane {
    fn new() -> Lane {
        Lane {
            retry_at: None,
            backoff: RETRY,
            delivered: VecDeque::new(),
        }
    }
}

/// Delivers notifications until shutdown. `wake` is notified when new ones are queued.
pub(super) async fn deliver(
    store: Store,
    wake: Arc<Notify>,
    stats: Arc<AlertStats>,
    mut shutdown: Shutdown,
) {
    let mut lanes: HashMap<i64, Lane> = HashMap::new();
    loop {
        let mut next_look = Instant::now() + IDLE_LOOK;
        let heads = match store.alert_outbox_heads().await {
            Ok(heads) => heads,
            Err(e) => {
                log::warn!("webhook notifications: cannot read the outbox: {e}");
                Vec::new()
            }
        };
        let mut delivered_any = false;
        for head in heads {
            if shutdown.is_fired() {
                return;
            }
            let lane = lanes.entry(head.rule_id).or_insert_with(Lane::new);
            let now = Instant::now();
            if let Some(at) = lane.retry_at.filter(|at| *at > now) {
                next_look = next_look.min(at);
                continue;
            }
            while lane
                .delivered
                .front()
                .is_some_and(|at| now.duration_since(*at) >= RATE_WINDOW)
            {
                lane.delivered.pop_front();
            }
            if lane.delivered.len() >= head.per_minute.max(1) as usize {
                if let Some(first) = lane.delivered.front() {
                    next_look = next_look.min(*first + RATE_WINDOW);
                }
                continue;
            }
            // A stop does not wait for a slow receiver: the notification stays queued.
            let outcome = tokio::select! {
                outcome = attempt(&head) => outcome,
                _ = shutdown.recv() => return,
            };
            match outcome {
                Ok(()) => {
                    let done = AlertWrite {
                        ops: vec![AlertOp::Delivered(head.id)],
                        emissions: Vec::new(),
                    };
                    if let Err(e) = store.alert_write(done).await {
                        log::warn!(
                            "webhook notification {} delivered but not marked: {e}",
                            head.id
                        );
                    }
                    lane.retry_at = None;
                    lane.backoff.reset();
                    lane.delivered.push_back(Instant::now());
                    delivered_any = true;
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    let wait = lane.backoff.next_delay();
                    log::warn!(
                        "webhook of alert rule {} ({}): {why}; retrying in {:.1} s",
                        head.rule_id,
                        head.url,
                        wait.as_secs_f64()
                    );
                    lane.retry_at = Some(Instant::now() + wait);
                    next_look = next_look.min(Instant::now() + wait);
                }
            }
        }
        if delivered_any {
            // The next notification of each rule that delivered is due at once.
            continue;
        }
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(next_look) => {}
        }
    }
}

/// One delivery attempt: a JSON POST that must be answered 2xx within
/// [`ATTEMPT_TIMEOUT`].
async fn attempt(row: &OutboxRow) -> Result<(), String> {
    tokio::time::timeout(ATTEMPT_TIMEOUT, post(&row.url, row.body.clone()))
        .await
        .map_err(|_| format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()))?
}

async fn post(url: &str, body: String) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let host = uri.host().ok_or("URL without a host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let stream = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    // Ends when the request is answered and `sender` is dropped.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::post(path)
        .header(HOST, authority)
        .header(CONTENT_TYPE, "application/json")
        .header(
            USER_AGENT,
            concat!("sensorgate/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", response.status()))
    }
}
