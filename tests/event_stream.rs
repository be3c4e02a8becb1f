//! Server-Sent Events: the same events as the socket, resumable with `Last-Event-ID`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::events::*;
use common::{Daemon, PATIENCE};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a client waits to be sure nothing more arrives.
const QUIET: Duration = Duration::from_millis(300);

/// A raw Server-Sent Events client: decodes the chunked body as it arrives.
struct EventStream {
    stream: TcpStream,
    raw: Vec<u8>,
    text: String,
    ended: bool,
}

/// One event of the stream.
#[derive(Debug)]
struct SseEvent {
    id: Option<u64>,
    retry: Option<u64>,
    data: Option<Value>,
}

impl EventStream {
    /// Opens a stream as [`EventStream::open`] and reads its first frame, which must ask
    /// for a 2 s reconnection delay.
    async fn open_past_retry(addr: SocketAddr, path: &str, headers: &str) -> EventStream {
        let mut stream = EventStream::open(addr, path, headers).await;
        assert_eq!(stream.next().await.retry, Some(2000));
        stream
    }

    /// Opens a stream; asserts the response is a chunked `text/event-stream`.
    async fn open(addr: SocketAddr, path: &str, headers: &str) -> EventStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
                .await
                .expect("response head in time")
                .unwrap();
            assert!(n > 0, "connection closed before the response head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(head.contains("cache-control: no-cache"), "{head}");
        EventStream {
            stream,
            raw: raw[head_end..].to_vec(),
            text: String::new(),
            ended: false,
        }
    }

    /// Moves complete chunks from `raw` to `text`.
    fn dechunk(&mut self) {
        while let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            let chunk = self.raw[start..start + size].to_vec();
            self.text.push_str(std::str::from_utf8(&chunk).unwrap());
            self.raw.drain(..start + size + 2);
        }
    }

    /// The next block of lines up to a blank line, or `None` if nothing complete arrives
    /// within `wait` or the stream ended.
    async fn next_block(&mut self, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 8192];
        loop {
            self.dechunk();
            if let Some(end) = self.text.find("\n\n") {
                let block = self.text[..end].to_owned();
                self.text.drain(..end + 2);
                return Some(block);
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.ended = true;
                    return None;
                }
                Ok(Ok(n)) => self.raw.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The next event (comment-only blocks skipped).
    async fn next_within(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let block = self.next_block(left).await?;
            let mut event = SseEvent {
                id: None,
                retry: None,
                data: None,
            };
            let mut any = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                any = true;
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => event.id = Some(value.parse().unwrap()),
                    "retry" => event.retry = Some(value.parse().unwrap()),
                    "data" => event.data = Some(serde_json::from_str(value).unwrap()),
                    other => panic!("unexpected field {other:?} in {block:?}"),
                }
            }
            if any {
                return Some(event);
            }
        }
    }

    async fn next(&mut self) -> SseEvent {
        self.next_within(PATIENCE)
            .await
            .expect("an event on the stream in time")
    }

    /// Data events until one with `id >= until`; checks that each id is its data's seq.
    async fn events_until(&mut self, until: u64) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            let data = event.data.expect("an event with data");
            assert_eq!(event.id, Some(seq(&data)), "id is not the seq: {data}");
            events.push(data);
            if event.id >= Some(until) {
                return events;
            }
        }
    }
}

/// `GET /api/v1/events`: the same events as the socket, as `id: SEQ` / `data: ENVELOPE`;
/// `Last-Event-ID` and `?since` resume with exactly the events after it; filters and
/// snapshots apply; bad requests get JSON errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_delivers_and_resumes_exactly() {
    let (daemon, mut http) = Daemon::open("").await.with_http();
    let x = http.create_sensor("temperatura").await;
    let y = http.create_sensor("humedad").await;
    for i in 0..5 {
        http.reading(x, "temperatura", f64::from(i)).await;
    }
    assert_eq!(daemon.last_seq().await, 7);

    // Live.
    let mut live = EventStream::open(daemon.addr, "/api/v1/events?channel=readings", "").await;
    let first = live.next().await;
    assert_eq!(first.retry, Some(2000));
    assert!(first.data.is_none());
    let mut posted = Vec::new();
    for i in 0..3 {
        posted.push(http.reading(y, "humedad", f64::from(i)).await);
    }
    let got = live.events_until(10).await;
    assert_eq!(seqs(&got), [8, 9, 10]);
    assert_exactly_stored(daemon.dir(), "readings", 7, &got);
    for (event, reading) in got.iter().zip(&posted) {
        assert_eq!(&event["data"], reading);
    }

    // Resume with Last-Event-ID while more readings are being posted.
    let producer = post_in_background(daemon.addr, vec![x, y], 100);
    let mut resumed = EventStream::open_past_retry(
        daemon.addr,
        "/api/v1/events?channel=readings",
        "Last-Event-ID: 4\r\n",
    )
    .await;
    producer.await.unwrap();
    let marker = daemon.last_seq().await;
    let got = resumed.events_until(marker).await;
    assert_exactly_stored(daemon.dir(), "readings", 4, &got);
    assert_eq!(seq(&got[0]), 5);
    assert!(resumed.next_within(QUIET).await.is_none());
    // The live stream got the same events.
    let more = live.events_until(marker).await;
    assert_exactly_stored(daemon.dir(), "readings", 10, &more);

    // Resume with ?since, filtered to one sensor.
    let mut since = EventStream::open_past_retry(
        daemon.addr,
        &format!("/api/v1/events?channel=readings&since=6&sensor_id={y}"),
        "",
    )
    .await;
    let expected: Vec<Stored> = stored(daemon.dir(), "readings", 6, marker)
        .into_iter()
        .filter(|e| e.frame["data"]["sensor_id"] == y)
        .collect();
    let got = since.events_until(expected.last().unwrap().seq).await;
    assert_eq!(
        got,
        expected.into_iter().map(|e| e.frame).collect::<Vec<_>>()
    );
    assert!(since.next_within(QUIET).await.is_none());

    // A browser reconnecting to a URL with `since` and `snapshot` sends what it saw
    // last: it resumes from there, with no second snapshot and nothing seen again.
    let mut reconnected = EventStream::open_past_retry(
        daemon.addr,
        "/api/v1/events?channel=readings&since=6&snapshot=true",
        &format!("Last-Event-ID: {}\r\n", marker - 2),
    )
    .await;
    let got = reconnected.events_until(marker).await;
    assert_eq!(seqs(&got), [marker - 1, marker]);
    assert!(reconnected.next_within(QUIET).await.is_none());

    // A snapshot carries its seq as id.
    let mut snap = EventStream::open_past_retry(
        daemon.addr,
        &format!("/api/v1/events?channel=readings&snapshot=true&sensor_id={x}"),
        "",
    )
    .await;
    let snapshot = snap.next().await;
    let data = snapshot.data.unwrap();
    assert_eq!(data["type"], "snapshot");
    assert_eq!(snapshot.id, Some(marker));
    assert_eq!(data["seq"], marker);
    assert_eq!(data["readings"].as_array().unwrap().len(), 1);
    assert_eq!(data["readings"][0]["sensor_id"], x);
    let wanted = http.reading(x, "temperatura", 42.0).await;
    http.reading(y, "humedad", 42.0).await;
    let got = snap.events_until(marker + 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["data"], wanted);
    assert!(snap.next_within(QUIET).await.is_none());

    // Bad requests.
    let body = daemon
        .expect("GET", "/api/v1/events?channel=weather", None, 400)
        .await;
    assert_eq!(body["code"], "unknown_channel");
    assert!(body["detail"].as_str().unwrap().contains("weather"));
    let request = format!(
        "GET /api/v1/events?channel=readings HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nLast-Event-ID: abc\r\n\r\n",
        daemon.addr
    );
    let (status, body) = common::split_response(
        &common::raw_exchange(daemon.addr, request.into_bytes())
            .await
            .unwrap(),
    );
    assert_eq!(status, 422);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["code"], "invalid");
    assert_eq!(body["errors"][0]["field"], "Last-Event-ID");
    daemon.stop().await;
}

/// Events removed by retention before a resuming stream was sent them: a `resync` event
/// (`since_too_old`, no id) names where the log starts now, then the events from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_removed_during_a_replay_are_told_with_a_resync() {
    let burst = Burst::start(150_000).await;
    let mut stream = EventStream::open_past_retry(
        burst.daemon.addr,
        "/api/v1/events?channel=readings&since=0",
        "",
    )
    .await;
    // Once the replay has begun, while the client is not reading.
    let first = stream.next().await;
    let mut before = vec![first.id.expect("an event")];
    let floor = burst.keep_newest(1000);

    let resync = loop {
        let event = stream.next().await;
        let data = event.data.expect("an event with data");
        if event.id.is_none() {
            break data;
        }
        assert_eq!(event.id, Some(seq(&data)), "id is not the seq: {data}");
        before.push(seq(&data));
    };
    let after = seqs(&stream.events_until(burst.last()).await);
    burst.assert_told(&before, &resync, &after, floor);
    burst.daemon.stop().await;
}
