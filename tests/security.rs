//! Tokens, scopes, the policy, the secure socket, the origin check, rate limits and hard
//! limits, against a running daemon.

mod common;

use std::ffi::OsStr;
use std::time::Duration;

use common::{
    insert_reading_row, raw_exchange_first, sensorgate_beside_the_daemon, split_response, until,
    Daemon, Received, SENSOR,
};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Runs `sensorgate token ...` on the daemon's data directory, as an operator would while
/// it runs: the command asks the daemon, so it waits on a blocking thread while the
/// daemon of the test answers.
async fn token_cli(daemon: &Daemon, args: &[&str]) -> (bool, String, String) {
    let args = std::iter::once(OsStr::new("token"))
        .chain(args.iter().map(OsStr::new))
        .chain(["--data-dir".as_ref(), daemon.dir().as_os_str()]);
    let run = sensorgate_beside_the_daemon(args).await;
    (run.ok, run.stdout.trim().to_owned(), run.stderr)
}

async fn create_token(daemon: &Daemon, name: &str, scope: &str) -> String {
    let (ok, token, err) = token_cli(daemon, &["create", "--name", name, "--scope", scope]).await;
    assert!(ok, "{err}");
    assert!(token.starts_with("sg_"), "{token}");
    token
}

#[tokio::test]
async fn first_start_creates_an_admin_token_readable_only_by_the_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let daemon = Daemon::with("").await;
    let file = daemon.dir().join("admin.token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let admin = daemon.token.clone().unwrap();
    daemon
        .as_token(Some(&admin))
        .expect("GET", "/api/v1/tokens", None, 200)
        .await;
    // The database holds only a hash.
    let stored: Vec<u8> = daemon
        .database()
        .query_row("SELECT hash FROM tokens WHERE name = 'admin'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored.len(), 32);
    assert!(!String::from_utf8_lossy(&stored).contains(&admin[3..]));
    // A restart does not make another.
    let daemon = daemon.restart().await;
    assert_eq!(daemon.token.as_deref(), Some(admin.as_str()));
    daemon.stop().await;
}

#[tokio::test]
async fn scopes_decide_what_each_token_may_do_under_the_default_policy() {
    let daemon = Daemon::with("").await;
    let read = create_token(&daemon, "wall-tablet", "read").await;
    let write = create_token(&daemon, "kitchen", "write").await;
    let admin = daemon.token.clone().unwrap();
    let sensor = daemon.create_sensor(SENSOR).await;
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
            let (status, answer) = daemon.as_token(*token).request(method, path, *body).await;
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
    let daemon = Daemon::with("[auth]\npolicy = \"all\"\n").await;
    let read = create_token(&daemon, "reader", "read").await;
    let (anonymous, reader) = (daemon.as_token(None), daemon.as_token(Some(&read)));
    anonymous
        .expect("GET", "/api/v1/sensores/", None, 401)
        .await;
    reader.expect("GET", "/api/v1/sensores/", None, 200).await;
    assert_eq!(
        daemon
            .as_token(None)
            .request("GET", "/healthz", None)
            .await
            .0,
        200,
        "health stays open"
    );
    assert_eq!(
        daemon.as_token(None).request("GET", "/", None).await.0,
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
    let daemon = Daemon::with("").await;
    let token = create_token(&daemon, "kitchen-tablet", "write").await;
    daemon
        .as_token(Some(&token))
        .expect("POST", "/api/v1/sensores/", Some(SENSOR), 201)
        .await;
    // The last use is written behind the request that made it.
    let (listed, line) = until("the last use recorded", || async {
        let (ok, listed, _) = token_cli(&daemon, &["list"]).await;
        assert!(ok);
        let line = listed
            .lines()
            .find(|l| l.starts_with("kitchen-tablet"))
            .expect("listed")
            .to_owned();
        (!line.contains("never")).then_some((listed, line))
    })
    .await;
    assert!(line.contains("write"), "{line}");
    assert!(!listed.contains(&token), "the secret is never listed");
    let (ok, _, err) = token_cli(
        &daemon,
        &["create", "--name", "kitchen-tablet", "--scope", "read"],
    )
    .await;
    assert!(!ok && err.contains("exists already"), "{err}");

    let (ok, _, _) = token_cli(&daemon, &["revoke", "kitchen-tablet"]).await;
    assert!(ok);
    let (status, answer) = daemon
        .as_token(Some(&token))
        .request("POST", "/api/v1/sensores/", Some(SENSOR))
        .await;
    assert_eq!(status, 401, "{answer}");
    let (ok, _, err) = token_cli(&daemon, &["revoke", "kitchen-tablet"]).await;
    assert!(!ok && err.contains("no token named"), "{err}");
    daemon.stop().await;
}

#[tokio::test]
async fn tokens_are_managed_over_rest_by_admins() {
    let daemon = Daemon::with("").await;
    let (status, made) = daemon
        .post("/api/v1/tokens", r#"{"name": "phone", "scope": "read"}"#)
        .await;
    assert_eq!(status, 201, "{made}");
    let phone = made["token"].as_str().unwrap().to_owned();
    daemon
        .as_token(Some(&phone))
        .expect("GET", "/api/v1/tokens", None, 403)
        .await;
    // A name taken, a scope that does not exist.
    for (made, status) in [
        (r#"{"name": "phone", "scope": "read"}"#, 409),
        (r#"{"name": "x", "scope": "root"}"#, 422),
    ] {
        daemon
            .expect("POST", "/api/v1/tokens", Some(made), status)
            .await;
    }
    let (_, listed) = daemon.get("/api/v1/tokens").await;
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.get("token").is_none() && t.get("hash").is_none()));
    let phone_token = "/api/v1/tokens/phone";
    daemon.expect("DELETE", phone_token, None, 200).await;
    let revoked = daemon.as_token(Some(&phone));
    revoked.expect("GET", "/api/v1/sensores/", None, 401).await;
    daemon.expect("DELETE", phone_token, None, 404).await;
    daemon.stop().await;
}

#[tokio::test]
async fn secure_socket_needs_a_token_by_header_query_or_first_message() {
    let daemon = Daemon::with("").await;
    let read = create_token(&daemon, "reader", "read").await;
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
    let daemon = Daemon::with("[auth]\nallowed_origins = [\"https://dash.example\"]\n").await;
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
    let daemon = Daemon::with("[limits]\nwrites_per_second = 2.0\nwrite_burst = 3.0\n").await;
    for _ in 0..3 {
        daemon
            .expect("POST", "/api/v1/sensores/", Some(SENSOR), 201)
            .await;
    }
    let raw = common::raw_exchange(
        daemon.addr,
        format!(
            "POST /api/v1/sensores/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{SENSOR}",
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
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await
    .unwrap();
    String::from_utf8_lossy(&split_response(&raw).1).into_owned()
}

#[tokio::test]
async fn socket_message_flood_is_closed_with_4029() {
    let daemon =
        Daemon::with("[limits]\nsocket_messages_per_second = 1.0\nsocket_message_burst = 3.0\n")
            .await;
    let mut flooder = daemon.subscribe("/api/v1/ws?channel=general").await;
    let mut calm = daemon.subscribe("/api/v1/ws?channel=general").await;
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
    let daemon = Daemon::with("[server]\nheader_read_timeout_s = 1\n[limits]\nmax_connections_per_address = 4\nmax_uri_bytes = 512\nmax_headers = 16\n",
    )
    .await;
    // URI too long.
    let long = format!("/api/v1/sensores/?tipo={}", "x".repeat(600));
    daemon.expect("GET", &long, None, 414).await;
    // Too many headers.
    let headers: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request =
        format!("GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n");
    let raw = common::raw_exchange(daemon.addr, request.into_bytes())
        .await
        .unwrap();
    assert_eq!(split_response(&raw).0, 431);
    // A slow client sending headers forever is cut off.
    let mut slow = TcpStream::connect(daemon.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
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
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        held.push(s);
    }
    let mut fifth = TcpStream::connect(daemon.addr).await.unwrap();
    let _ = fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let n = tokio::time::timeout(Duration::from_secs(5), fifth.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the fifth connection got an answer");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // WebSocket message too large.
    let mut client = daemon.subscribe("/api/v1/ws").await;
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
    daemon
        .expect("POST", "/api/v1/sensores/", Some(SENSOR), 201)
        .await;
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
    let daemon = Daemon::with("[limits]\nmax_connections_per_address = 2\n").await;
    let first = daemon.subscribe("/api/v1/ws").await;
    let _second = daemon.subscribe("/api/v1/ws").await;
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

/// Names, units and places are shown on dashboards, written to logs and exported to
/// spreadsheets: control and bidirectional formatting characters are refused in every
/// text field, and exported text a spreadsheet would run as a formula stays text.
#[tokio::test]
async fn control_characters_are_refused_and_csv_cells_never_run_as_formulas() {
    let daemon = Daemon::with("").await;
    for (field, text) in [
        ("nombre", "invoice\u{202E}fdp.exe"),
        ("ubicacion", "shed\u{0}"),
        ("tipo", "temp\r\nINFO forged log line"),
        ("modelo", "\u{1b}[2J"),
    ] {
        let mut body = json!({"tipo": "temperatura", "modelo": "DHT22"});
        body[field] = json!(text);
        let (status, answer) = daemon.post("/api/v1/sensores/", &body.to_string()).await;
        assert_eq!(status, 422, "{field}: {answer}");
        assert_eq!(answer["errors"][0]["field"], field, "{answer}");
    }
    let sensor = daemon.create_sensor(SENSOR).await;
    let id = sensor["id"].as_i64().unwrap();
    let body = json!({"ubicacion": "shed\u{85}"}).to_string();
    let path = format!("/api/v1/sensores/{id}");
    let answer = daemon.expect("PUT", &path, Some(&body), 422).await;
    assert_eq!(answer["errors"][0]["field"], "ubicacion");
    assert_eq!(
        daemon.get(&format!("/api/v1/sensores/{id}")).await.1["ubicacion"],
        Value::Null,
        "a refused update changes nothing"
    );
    let (status, answer) = daemon
        .post(
            "/api/v1/lecturas/",
            &json!({"sensor_id": id, "tipo": "temperatura", "valor": 1, "unidad": "\u{2067}C"})
                .to_string(),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["errors"][0]["field"], "unidad");

    let (status, _) = daemon
        .post(
            "/api/v1/lecturas/",
            &json!({"sensor_id": id, "tipo": "=HYPERLINK(\"http://evil.example\",\"ok\")",
                    "valor": -3.5, "unidad": "@SUM(A1)"})
            .to_string(),
        )
        .await;
    assert_eq!(status, 201);
    let raw = common::raw_exchange(
        daemon.addr,
        format!(
            "GET /api/v1/lecturas/export?sensor_id={id} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            daemon.addr
        )
        .into_bytes(),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.contains(",\"'=HYPERLINK(\"\"http://evil.example\"\",\"\"ok\"\")\",-3.5,'@SUM(A1),"),
        "{text}"
    );
    daemon.stop().await;
}

/// What `/metrics` says is the latest value of sensor `id`'s `tipo`.
async fn last_value(daemon: &Daemon, id: i64, tipo: &str) -> Option<String> {
    let text = metrics_text(daemon).await;
    let prefix = format!("sensorgate_last_value{{sensor_id=\"{id}\",tipo=\"{tipo}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
}

/// A reading from a client whose clock says year 9999 is refused while the gateway's
/// clock is trusted; one that is in the database anyway (stored by an older build, or
/// while the clock was not trusted) stays the latest value only until the next reading.
#[tokio::test]
async fn readings_from_the_far_future_are_refused_and_cannot_pin_the_latest_value() {
    let config = "[sampling]\ntrust_clock = \"always\"\n";
    let daemon = Daemon::with(config).await;
    let sensor = daemon.create_sensor(SENSOR).await;
    let id = sensor["id"].as_i64().unwrap();
    let reading = |valor: f64, timestamp: String| {
        json!({"sensor_id": id, "tipo": "temperatura", "valor": valor, "unidad": "°C",
               "timestamp": timestamp})
        .to_string()
    };
    let (status, answer) = daemon
        .post(
            "/api/v1/lecturas/",
            &reading(99.0, "9999-12-31T23:59:59Z".into()),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["errors"][0]["field"], "timestamp");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("storage.max_future_s"),
        "{answer}"
    );
    let soon = sensorgate::model::format_time(sensorgate::model::now_micros() + 60_000_000);
    assert_eq!(
        daemon
            .post("/api/v1/lecturas/", &reading(20.0, soon))
            .await
            .0,
        201,
        "a client clock a minute ahead is within the bound"
    );
    let dir = daemon.stop().await.unwrap();

    // A reading of year 9999 that got in before the bound existed.
    let conn = rusqlite::Connection::open(dir.path().join("sensorgate.db")).unwrap();
    let far = insert_reading_row(&conn, id, 253402300799000000, "temperatura", 99.0, "°C");
    conn.execute(
        "UPDATE latest_readings SET reading_id = ?2, ts = 253402300799000000 \
         WHERE sensor_id = ?1",
        [id, far],
    )
    .unwrap();
    drop(conn);

    let daemon = Daemon::in_dir(dir, config).await;
    assert_eq!(
        last_value(&daemon, id, "temperatura").await.as_deref(),
        Some("99")
    );
    let now = sensorgate::model::format_time(sensorgate::model::now_micros());
    daemon
        .expect("POST", "/api/v1/lecturas/", Some(&reading(21.5, now)), 201)
        .await;
    assert_eq!(
        last_value(&daemon, id, "temperatura").await.as_deref(),
        Some("21.5"),
        "the reading of year 9999 no longer counts as the latest"
    );
    let mut client = daemon
        .subscribe("/api/v1/ws?channel=readings&snapshot=true")
        .await;
    let snapshot = client.json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    assert_eq!(snapshot["readings"][0]["valor"], 21.5, "{snapshot}");
    daemon.stop().await;
}

/// Opens `/api/v1/events` with `?token=` and returns the connection once the stream has
/// started; the request asks for the connection to close when the stream ends.
async fn event_stream(daemon: &Daemon, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /api/v1/events?channel=sensors&token={token} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                daemon.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&head).contains("retry: 2000") {
        let n = tokio::time::timeout(common::PATIENCE, stream.read(&mut buf))
            .await
            .expect("the stream starts")
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
    stream
}

/// Waits for an event stream to end; returns what it sent until then.
async fn stream_end(mut stream: TcpStream) -> String {
    let mut rest = Vec::new();
    tokio::time::timeout(common::PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("the event stream ends")
        .unwrap();
    String::from_utf8_lossy(&rest).into_owned()
}

/// Streams opened with a token end when the token is revoked, from the command line (in
/// another process) or over REST; streams opened without one, or with another token, go
/// on.
#[tokio::test]
async fn revoking_a_token_closes_the_streams_opened_with_it() {
    let daemon = Daemon::with("").await;
    let wall = create_token(&daemon, "wall", "read").await;
    let phone = create_token(&daemon, "phone", "read").await;
    let other = create_token(&daemon, "other", "read").await;
    let secure = daemon
        .subscribe(&format!("/api/v1/ws/secure?channel=sensors&token={wall}"))
        .await;
    let plain = daemon
        .subscribe(&format!("/api/v1/ws?channel=sensors&token={wall}"))
        .await;
    let mut by_message = daemon.websocket("/api/v1/ws/secure?channel=sensors").await;
    by_message
        .send_text(&json!({"type": "auth", "id": 1, "token": wall}).to_string())
        .await;
    assert_eq!(by_message.json().await["ok"], true);
    let by_message = by_message.greeted().await;
    let events = event_stream(&daemon, &wall).await;
    let mut untouched = daemon
        .subscribe(&format!("/api/v1/ws/secure?channel=sensors&token={other}"))
        .await;
    let mut anonymous = daemon.subscribe("/api/v1/ws?channel=sensors").await;

    let (ok, _, err) = token_cli(&daemon, &["revoke", "wall"]).await;
    assert!(ok, "{err}");
    for mut client in [secure, plain, by_message] {
        match client.next().await {
            Received::Closed(Some(4401), reason) => assert!(reason.contains("revoked"), "{reason}"),
            other => panic!("expected a close with 4401, got {other:?}"),
        }
    }
    let rest = stream_end(events).await;
    assert!(rest.contains("revoked"), "{rest}");

    // Over REST, too; the phone's socket is closed, the others go on.
    let mut phone_socket = daemon
        .subscribe(&format!("/api/v1/ws?channel=sensors&token={phone}"))
        .await;
    daemon
        .expect("DELETE", "/api/v1/tokens/phone", None, 200)
        .await;
    assert!(matches!(
        phone_socket.next().await,
        Received::Closed(Some(4401), _)
    ));
    daemon.post("/api/v1/sensores/", SENSOR).await;
    assert_eq!(untouched.json().await["event_type"], "created");
    assert_eq!(anonymous.json().await["event_type"], "created");
    daemon.stop().await;
}

/// A raw request with the given `Host` and extra header lines; status and JSON body.
async fn with_host(daemon: &Daemon, host: &str, path: &str, headers: &str) -> (u16, Value) {
    let close = if headers.contains("Connection:") {
        ""
    } else {
        "Connection: close\r\n"
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{close}{headers}\r\n");
    let raw = raw_exchange_first(daemon.addr, request.into_bytes()).await;
    let (status, body) = split_response(&raw);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// DNS rebinding: a page on a name its owner points at the gateway sends the gateway's
/// browser requests with that name in `Host` and the page's origin, which match. Only
/// the gateway's own names and addresses, and configured ones, are answered.
#[tokio::test]
async fn requests_that_name_another_host_are_refused() {
    let daemon = Daemon::with("").await;
    let port = daemon.addr.port();
    let rebinding = "Origin: http://evil.example\r\n";
    for (path, extra) in [
        ("/api/v1/ws?channel=sensors", UPGRADE),
        ("/api/v1/sensores/", ""),
        ("/api/v1/events", ""),
        ("/", ""),
    ] {
        let (status, answer) = with_host(
            &daemon,
            "evil.example",
            path,
            &format!("{rebinding}{extra}"),
        )
        .await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert_eq!(answer["code"], "host_not_allowed", "{answer}");
        assert!(
            answer["detail"]
                .as_str()
                .unwrap()
                .contains("auth.allowed_hosts"),
            "{answer}"
        );
    }
    let (status, _) = with_host(&daemon, &format!("evil.example:{port}"), "/healthz", "").await;
    assert_eq!(status, 403);
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "LOCALHOST".to_owned(),
    ] {
        assert_eq!(
            with_host(&daemon, &host, "/api/v1/sensores/", "").await.0,
            200,
            "{host}"
        );
    }
    let (status, _) = with_host(
        &daemon,
        &format!("localhost:{port}"),
        "/api/v1/ws?channel=sensors",
        &format!("Origin: http://localhost:{port}\r\n{UPGRADE}"),
    )
    .await;
    assert_eq!(status, 101);
    let daemon = daemon
        .restart_with("[auth]\nallowed_hosts = [\"sensors.farm.example\"]\n")
        .await;
    let (status, _) = with_host(
        &daemon,
        "sensors.farm.example",
        "/api/v1/ws?channel=sensors",
        &format!("Origin: http://sensors.farm.example\r\n{UPGRADE}"),
    )
    .await;
    assert_eq!(status, 101, "a configured name");
    assert_eq!(
        with_host(&daemon, "evil.example", "/api/v1/sensores/", "")
            .await
            .0,
        403
    );
    let text = metrics_text(&daemon).await;
    assert!(
        text.contains("sensorgate_limit_hits_total{limit=\"host_not_allowed\"} 1"),
        "{text}"
    );
    daemon.stop().await;
}

/// Opens a socket as a trusted proxy would for `client`.
async fn socket_for(
    daemon: &Daemon,
    path: &str,
    client: &str,
) -> Result<common::Client, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{}{path}", daemon.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("X-Forwarded-For", client.parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(common::Client { socket })
}

/// Behind a TLS proxy every connection comes from the proxy: the per-address limits
/// follow the client the proxy forwards for, and writes with a token are limited per
/// token, so one flooding client does not get its neighbours refused or closed.
#[tokio::test]
async fn behind_a_trusted_proxy_each_client_has_its_own_limits() {
    let daemon = Daemon::with("[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n[limits]\nsocket_messages_per_second = 1.0\nsocket_message_burst = 3.0\nmax_connections_per_address = 2\nwrites_per_second = 1.0\nwrite_burst = 2.0\n",
    )
    .await;
    let path = "/api/v1/ws?channel=general";
    let mut flooder = socket_for(&daemon, path, "192.0.2.1")
        .await
        .unwrap()
        .greeted()
        .await;
    let mut neighbour = socket_for(&daemon, path, "192.0.2.2")
        .await
        .unwrap()
        .greeted()
        .await;
    for i in 0..4 {
        flooder
            .send_text(&format!(r#"{{"type": "ping", "id": {i}}}"#))
            .await;
    }
    for _ in 0..3 {
        assert_eq!(flooder.json().await["type"], "pong");
    }
    assert!(matches!(
        flooder.next().await,
        Received::Closed(Some(4029), _)
    ));
    neighbour.send_text(r#"{"type": "ping", "id": 1}"#).await;
    assert_eq!(
        neighbour.json().await["type"],
        "pong",
        "the neighbour goes on"
    );

    // Connections: two streams per client, whoever else is behind the proxy.
    let _a = socket_for(&daemon, path, "198.51.100.7").await.unwrap();
    let _b = socket_for(&daemon, path, "198.51.100.7").await.unwrap();
    match socket_for(&daemon, path, "198.51.100.7").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429)
        }
        Err(other) => panic!("expected 429, got {other}"),
        Ok(_) => panic!("a third stream for one client got in"),
    }
    assert!(socket_for(&daemon, path, "198.51.100.8").await.is_ok());

    // Writes with a token spend the token's budget, not the address's.
    let first = create_token(&daemon, "first", "write").await;
    let second = create_token(&daemon, "second", "write").await;
    for _ in 0..2 {
        daemon
            .as_token(Some(&first))
            .expect("POST", "/api/v1/sensores/", Some(SENSOR), 201)
            .await;
    }
    daemon
        .as_token(Some(&first))
        .expect("POST", "/api/v1/sensores/", Some(SENSOR), 429)
        .await;
    let status = daemon
        .as_token(Some(&second))
        .request("POST", "/api/v1/sensores/", Some(SENSOR))
        .await
        .0;
    assert_eq!(status, 201, "another token from the same address");
    daemon.stop().await;
}
