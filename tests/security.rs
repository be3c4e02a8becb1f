//! Tokens, scopes, the policy, the secure socket, the origin check, rate limits and hard
//! limits, against a running daemon.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{raw_exchange_first, split_response, temp_dir, Daemon, Received};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_sensorgate");
const SENSOR: &str = r#"{"tipo": "temperatura", "modelo": "DHT22"}"#;

/// A request with the given token (or none), whatever the daemon's own.
async fn as_token(
    daemon: &Daemon,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        daemon.addr,
        body.len()
    );
    let raw = common::raw_exchange(daemon.addr, head.into_bytes())
        .await
        .unwrap();
    let (status, body) = split_response(&raw);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Runs `sensorgate token ...` on the daemon's data directory, as an operator would while
/// it runs.
fn token_cli(daemon: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("token")
        .args(args)
        .arg("--data-dir")
        .arg(&daemon.data_dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn create_token(daemon: &Daemon, name: &str, scope: &str) -> String {
    let (ok, token, err) = token_cli(daemon, &["create", "--name", name, "--scope", scope]);
    assert!(ok, "{err}");
    assert!(token.starts_with("sg_"), "{token}");
    token
}

#[tokio::test]
async fn first_start_creates_an_admin_token_readable_only_by_the_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), "").await;
    let file = dir.path().join("admin.token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let admin = daemon.token.clone().unwrap();
    assert_eq!(
        as_token(&daemon, Some(&admin), "GET", "/api/v1/tokens", None)
            .await
            .0,
        200
    );
    // The database holds only a hash.
    let db = rusqlite::Connection::open(dir.path().join("sensorgate.db")).unwrap();
    let stored: Vec<u8> = db
        .query_row("SELECT hash FROM tokens WHERE name = 'admin'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored.len(), 32);
    assert!(!String::from_utf8_lossy(&stored).contains(&admin[3..]));
    daemon.stop().await;
    // A restart does not make another.
    let daemon = Daemon::start_in(dir.path(), "").await;
    assert_eq!(daemon.token.as_deref(), Some(admin.as_str()));
    daemon.stop().await;
}

#[tokio::test]
async fn scopes_decide_what_each_token_may_do_under_the_default_policy() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), "").await;
    let read = create_token(&daemon, "wall-tablet", "read");
    let write = create_token(&daemon, "kitchen", "write");
    let admin = daemon.token.clone().unwrap();
    let (_, sensor) = daemon.post("/api/v1/sensores/", SENSOR).await;
    let id = sensor["id"].as_i64().unwrap();
    let reading = format!(r#"{{"sensor_id": {id}, "tipo": "temperatura", "valor": 20}}"#);
    let put_path = format!("/api/v1/sensores/{id}");

    // (method, path, body, needed: 0 open, 1 read... here reads are open, 2 write, 3 admin)
    let routes: Vec<(&str, &str, Option<&str>, u8, u16)> = vec![
        ("GET", "/api/v1/sensores/", None, 0, 200),
        ("GET", "/api/v1/lecturas/", None, 0, 200),
        ("GET", "/api/v1/ws/stats", None, 0, 200),
        ("GET", "/metrics", None, 0, 200),
        ("POST", "/api/v1/sensores/", Some(SENSOR), 2, 201),
        ("PUT", &put_path, Some(r#"{"ubicacion": "Nave"}"#), 2, 200),
        ("POST", "/api/v1/lecturas/", Some(&reading), 2, 201),
        ("POST", "/api/v1/ws/test-event", Some("{}"), 3, 200),
        ("GET", "/api/v1/tokens", None, 3, 200),
    ];
    let tokens = [
        (None, 0u8),
        (Some("sg_0000"), 0),
        (Some(read.as_str()), 1),
        (Some(write.as_str()), 2),
        (Some(admin.as_str()), 3),
    ];
    for (method, path, body, needed, ok) in &routes {
        for (token, level) in &tokens {
            let (status, answer) = as_token(&daemon, *token, method, path, *body).await;
            let expected = match (token, needed) {
                (Some("sg_0000"), _) => 401,
                (_, 0) => *ok,
                (None, _) => 401,
                (_, n) if level >= n => *ok,
                _ => 403,
            };
            assert_eq!(status, expected, "{method} {path} with {token:?}: {answer}");
            match status {
                401 => assert_eq!(answer["code"], "unauthorized"),
                403 => {
                    assert_eq!(answer["code"], "forbidden");
                    let article = if *needed == 3 { "an admin" } else { "a write" };
                    let detail = answer["detail"].as_str().unwrap();
                    assert!(
                        detail.contains(&format!("needs {article} token")),
                        "{detail}"
                    );
                }
                _ => {}
            }
        }
    }
    daemon.stop().await;
}

#[tokio::test]
async fn policy_all_closes_reads_and_the_socket() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), "[auth]\npolicy = \"all\"\n").await;
    let read = create_token(&daemon, "reader", "read");
    assert_eq!(
        as_token(&daemon, None, "GET", "/api/v1/sensores/", None)
            .await
            .0,
        401
    );
    assert_eq!(
        as_token(&daemon, Some(&read), "GET", "/api/v1/sensores/", None)
            .await
            .0,
        200
    );
    assert_eq!(
        as_token(&daemon, None, "GET", "/healthz", None).await.0,
        200,
        "health stays open"
    );
    assert_eq!(
        as_token(&daemon, None, "GET", "/", None).await.0,
        200,
        "the page stays open"
    );
    let url = format!("ws://{}/api/v1/ws?channel=general", daemon.addr);
    assert!(
        tokio_tungstenite::connect_async(&url).await.is_err(),
        "no token, no socket"
    );
    let with_token = format!("{url}&token={read}");
    let (socket, _) = tokio_tungstenite::connect_async(with_token).await.unwrap();
    common::Client { socket }.greeted().await;
    daemon.stop().await;
}

#[test]
fn policy_none_needs_development_mode() {
    let path = std::path::Path::new("x.toml");
    let err = sensorgate::config::Config::parse("[auth]\npolicy = \"none\"\n", path).unwrap_err();
    assert!(err.to_string().contains("auth.policy"), "{err}");
    assert!(sensorgate::config::Config::parse(
        "[server]\ndev = true\n[auth]\npolicy = \"none\"\n",
        path
    )
    .is_ok());
}

#[tokio::test]
async fn command_line_tokens_work_at_once_and_revocation_is_immediate() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), "").await;
    let token = create_token(&daemon, "kitchen-tablet", "write");
    assert_eq!(
        as_token(
            &daemon,
            Some(&token),
            "POST",
            "/api/v1/sensores/",
            Some(SENSOR)
        )
        .await
        .0,
        201
    );
    let (ok, listed, _) = token_cli(&daemon, &["list"]);
    assert!(ok);
    let line = listed
        .lines()
        .find(|l| l.starts_with("kitchen-tablet"))
        .expect("listed");
    assert!(line.contains("write"), "{line}");
    assert!(!line.contains("never"), "last use is recorded: {line}");
    assert!(!listed.contains(&token), "the secret is never listed");
    let (ok, _, err) = token_cli(
        &daemon,
        &["create", "--name", "kitchen-tablet", "--scope", "read"],
    );
    assert!(!ok && err.contains("exists already"), "{err}");

    let (ok, _, _) = token_cli(&daemon, &["revoke", "kitchen-tablet"]);
    assert!(ok);
    let (status, answer) = as_token(
        &daemon,
        Some(&token),
        "POST",
        "/api/v1/sensores/",
        Some(SENSOR),
    )
    .await;
    assert_eq!(status, 401, "{answer}");
    let (ok, _, err) = token_cli(&daemon, &["revoke", "kitchen-tablet"]);
    assert!(!ok && err.contains("no token named"), "{err}");
    daemon.stop().await;
}

#[tokio::test]
async fn tokens_are_managed_over_rest_by_admins() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), "").await;
    let (status, made) = daemon
        .post("/api/v1/tokens", r#"{"name": "phone", "scope": "read"}"#)
        .await;
    assert_eq!(status, 201, "{made}");
    let phone = made["token"].as_str().unwrap().to_owned();
    assert_eq!(
        as_token(&daemon, Some(&phone), "GET", "/api/v1/tokens", None)
            .await
            .0,
        403
    );
    assert_eq!(
        daemon
            .post("/api/v1/tokens", r#"{"name": "phone", "scope": "read"}"#)
            .await
            .0,
        409
    );
    assert_eq!(
        daemon
            .post("/api/v1/tokens", r#"{"name": "x", "scope": "root"}"#)
            .await
            .0,
        422
    );
    let (_, listed) = daemon.get("/api/v1/tokens").await;
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.get("token").is_none() && t.get("hash").is_none()));
    assert_eq!(daemon.delete("/api/v1/tokens/phone").await.0, 200);
    assert_eq!(
        as_token(&daemon, Some(&phone), "GET", "/api/v1/sensores/", None)
            .await
            .0,
        401
    );
    assert_eq!(daemon.delete("/api/v1/tokens/phone").await.0, 404);
    daemon.stop().await;
}

#[tokio::test]
async fn secure_socket_needs_a_token_by_header_query_or_first_message() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), "").await;
    let read = create_token(&daemon, "reader", "read");
    let base = format!("ws://{}/api/v1/ws/secure?channel=sensors", daemon.addr);

    // ?token= on the URL.
    let (socket, _) = tokio_tungstenite::connect_async(format!("{base}&token={read}"))
        .await
        .unwrap();
    common::Client { socket }.greeted().await;
    // Authorization header.
    let mut request = base.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {read}").parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    common::Client { socket }.greeted().await;
    // A wrong token on the URL is refused before the upgrade.
    assert!(
        tokio_tungstenite::connect_async(format!("{base}&token=sg_nope"))
            .await
            .is_err()
    );

    // The first message.
    let (socket, _) = tokio_tungstenite::connect_async(&base).await.unwrap();
    let mut client = common::Client { socket };
    client
        .send_text(&json!({"type": "auth", "id": 1, "token": read}).to_string())
        .await;
    let answer = client.json().await;
    assert_eq!(answer["type"], "auth_result");
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["scope"], "read");
    assert_eq!(answer["id"], 1);
    let mut client = client.greeted().await;
    daemon.post("/api/v1/sensores/", SENSOR).await;
    assert_eq!(client.json().await["event_type"], "created");

    // A bad first message, and no message at all, close with 4401.
    let (socket, _) = tokio_tungstenite::connect_async(&base).await.unwrap();
    let mut bad = common::Client { socket };
    bad.send_text(r#"{"type": "auth", "token": "sg_wrong"}"#)
        .await;
    assert!(matches!(bad.next().await, Received::Closed(Some(4401), _)));
    let (socket, _) = tokio_tungstenite::connect_async(&base).await.unwrap();
    let mut silent = common::Client { socket };
    let started = tokio::time::Instant::now();
    assert!(matches!(
        silent.next().await,
        Received::Closed(Some(4401), _)
    ));
    assert!(started.elapsed() >= Duration::from_secs(4));
    daemon.stop().await;
}

#[tokio::test]
async fn cross_origin_pages_cannot_open_the_socket() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(
        dir.path(),
        "[auth]\nallowed_origins = [\"https://dash.example\"]\n",
    )
    .await;
    let url = format!("ws://{}/api/v1/ws", daemon.addr);
    let attempt = |origin: String| {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    match attempt("http://evil.example".into()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], "forbidden_origin");
        }
        other => panic!("a foreign origin was let in: {other:?}"),
    }
    assert!(
        attempt(format!("http://{}", daemon.addr)).await.is_ok(),
        "same host"
    );
    assert!(
        attempt("https://dash.example".into()).await.is_ok(),
        "listed"
    );
    assert!(
        tokio_tungstenite::connect_async(&url).await.is_ok(),
        "no Origin: not a browser"
    );
    // The event stream too.
    let request = format!(
        "GET /api/v1/events HTTP/1.1\r\nHost: {}\r\nOrigin: http://evil.example\r\n\r\n",
        daemon.addr
    );
    let raw = raw_exchange_first(daemon.addr, request.into_bytes()).await;
    assert_eq!(split_response(&raw).0, 403);
    daemon.stop().await;
}

#[tokio::test]
async fn write_rate_limit_trips_per_address_and_recovers() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(
        dir.path(),
        "[limits]\nwrites_per_second = 2.0\nwrite_burst = 3.0\n",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(daemon.post("/api/v1/sensores/", SENSOR).await.0, 201);
    }
    let raw = common::raw_exchange(
        daemon.addr,
        format!(
            "POST /api/v1/sensores/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{SENSOR}",
            daemon.token.as_deref().unwrap(),
            SENSOR.len()
        )
        .into_bytes(),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&raw).to_lowercase();
    assert!(text.starts_with("http/1.1 429"), "{text}");
    assert!(text.contains("retry-after: 1"), "{text}");
    assert!(text.contains("\"code\":\"rate_limited\""), "{text}");
    // Reads are not limited, and nothing was stored by the refused write.
    let (status, sensors) = daemon.get("/api/v1/sensores/").await;
    assert_eq!((status, sensors.as_array().unwrap().len()), (200, 3));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        daemon.post("/api/v1/sensores/", SENSOR).await.0,
        201,
        "refilled"
    );
    let text = metrics_text(&daemon).await;
    assert!(
        text.contains("sensorgate_limit_hits_total{limit=\"write_rate\"} 1"),
        "{text}"
    );
    daemon.stop().await;
}

async fn metrics_text(daemon: &Daemon) -> String {
    let raw = common::raw_exchange(
        daemon.addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await
    .unwrap();
    String::from_utf8_lossy(&split_response(&raw).1).into_owned()
}

#[tokio::test]
async fn socket_message_flood_is_closed_with_4029() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(
        dir.path(),
        "[limits]\nsocket_messages_per_second = 1.0\nsocket_message_burst = 3.0\n",
    )
    .await;
    let mut flooder = daemon
        .websocket("/api/v1/ws?channel=general")
        .await
        .greeted()
        .await;
    let mut calm = daemon
        .websocket("/api/v1/ws?channel=general")
        .await
        .greeted()
        .await;
    for i in 0..3 {
        flooder
            .send_text(&format!(r#"{{"type": "ping", "id": {i}}}"#))
            .await;
        assert_eq!(flooder.json().await["type"], "pong");
    }
    flooder.send_text(r#"{"type": "ping", "id": 9}"#).await;
    assert!(matches!(
        flooder.next().await,
        Received::Closed(Some(4029), _)
    ));
    // Others from the same address share its budget; a second later it has refilled.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    calm.send_text(r#"{"type": "ping", "id": 1}"#).await;
    assert_eq!(calm.json().await["type"], "pong");
    assert!(metrics_text(&daemon)
        .await
        .contains("limit=\"socket_message_rate\"} 1"));
    daemon.stop().await;
}

#[tokio::test]
async fn hard_limits_refuse_clearly_and_others_are_still_served() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(
        dir.path(),
        "[server]\nheader_read_timeout_s = 1\n[limits]\nmax_connections_per_address = 4\nmax_uri_bytes = 512\nmax_headers = 16\n",
    )
    .await;
    // URI too long.
    let long = format!("/api/v1/sensores/?tipo={}", "x".repeat(600));
    assert_eq!(daemon.get(&long).await.0, 414);
    // Too many headers.
    let headers: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let raw = common::raw_exchange(
        daemon.addr,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n")
            .into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(split_response(&raw).0, 431);
    // A slow client sending headers forever is cut off.
    let mut slow = TcpStream::connect(daemon.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the slow client was not cut off"
    );
    // Connections per address: four held open, the fifth is closed at once.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(daemon.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        held.push(s);
    }
    let mut fifth = TcpStream::connect(daemon.addr).await.unwrap();
    let _ = fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let n = tokio::time::timeout(Duration::from_secs(5), fifth.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the fifth connection got an answer");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // WebSocket message too large.
    let mut client = daemon.websocket("/api/v1/ws").await.greeted().await;
    client
        .socket
        .send(Message::text(format!(
            r#"{{"type": "ping", "pad": "{}"}}"#,
            "x".repeat(20_000)
        )))
        .await
        .unwrap();
    assert!(matches!(
        client.next().await,
        Received::Closed(Some(1009), _)
    ));
    // Still serving.
    assert_eq!(daemon.post("/api/v1/sensores/", SENSOR).await.0, 201);
    let text = metrics_text(&daemon).await;
    for limit in [
        "uri_length",
        "header_size",
        "header_timeout",
        "connections_per_address",
        "socket_message_size",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("sensorgate_limit_hits_total{{limit=\"{limit}\"}}")))
            .unwrap_or_else(|| panic!("no counter for {limit}"));
        assert!(!line.ends_with(" 0"), "{line}");
    }
    daemon.stop().await;
}

/// A WebSocket keeps its connection's place under the limits for as long as it lives,
/// though hyper stops tracking it once upgraded.
#[tokio::test]
async fn websockets_count_against_the_connection_limits() {
    let dir = temp_dir();
    let daemon = Daemon::start_in(dir.path(), "[limits]\nmax_connections_per_address = 2\n").await;
    let first = daemon.websocket("/api/v1/ws").await.greeted().await;
    let _second = daemon.websocket("/api/v1/ws").await.greeted().await;
    let url = format!("ws://{}/api/v1/ws", daemon.addr);
    assert!(
        tokio_tungstenite::connect_async(&url).await.is_err(),
        "a third socket got in"
    );
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio_tungstenite::connect_async(&url).await.is_ok(),
        "the place was given back"
    );
    daemon.stop().await;
}
