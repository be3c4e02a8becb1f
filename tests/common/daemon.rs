//! A real daemon on loopback, run in the test's own process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sensorgate::config::Config;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::http;
use super::socket::Client;
use super::{until, PATIENCE};

/// A DHT22 temperature sensor, the body most tests create a sensor with.
pub const SENSOR: &str = r#"{"tipo": "temperatura", "modelo": "DHT22"}"#;

/// A daemon started by a test. It owns its data directory unless the test handed it one;
/// [`Daemon::stop`] stops it the way SIGTERM does and checks that it ends cleanly, and
/// dropping it asks it to stop.
pub struct Daemon {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Hands the daemon a new config, as SIGHUP does.
    pub reload: tokio::sync::mpsc::Sender<Config>,
    /// The admin token the daemon created on first start, sent with every request made
    /// through [`Daemon::request`]; `None` under the `none` policy.
    pub token: Option<String>,
    config: Config,
    dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A test daemon's config: `text` (TOML), with data in `data_dir`.
/// Samples are committed as they come (the tests time their waits by the sample
/// interval), unless the test is about the commit window and sets it.
pub fn config(data_dir: &Path, text: &str) -> Config {
    let mut config = Config::parse(text, Path::new("test.toml")).expect("test config is valid");
    config.storage.data_dir = data_dir.to_owned();
    if !text.contains("commit_window_ms") {
        config.storage.commit_window_ms = 0;
    }
    config
}

/// Development mode, the `none` auth policy and rate limits out of the way, for tests that
/// post as fast as they like; tokens and limits have tests of their own.
pub const OPEN: &str = "[server]\ndev = true\n[auth]\npolicy = \"none\"\n\
                        [limits]\nwrites_per_second = 1000000.0\nwrite_burst = 1000000.0\n";

impl Daemon {
    /// Starts a daemon with `text` (TOML) as its config, in a data directory of its own.
    pub async fn with(text: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = Daemon::start(config(dir.path(), text)).await;
        daemon.dir = Some(dir);
        daemon
    }

    /// Starts a daemon with `text` (TOML) as its config in `dir`, which it then owns: the
    /// directory a stopped daemon handed back.
    pub async fn in_dir(dir: tempfile::TempDir, text: &str) -> Daemon {
        let mut daemon = Daemon::start(config(dir.path(), text)).await;
        daemon.dir = Some(dir);
        daemon
    }

    /// [`Daemon::with`], with [`OPEN`] before `text`.
    pub async fn open(text: &str) -> Daemon {
        Daemon::with(&format!("{OPEN}{text}")).await
    }

    /// Starts a daemon on `127.0.0.1:0` with the given config.
    pub async fn start(config: Config) -> Daemon {
        Daemon::start_answering(config, &[200]).await
    }

    /// Starts a daemon, ready once `/healthz` answers one of `ready` (503 for a daemon
    /// whose storage fails from the start).
    pub async fn start_answering(config: Config, ready: &[u16]) -> Daemon {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Daemon::serve(config, listener, ready).await
    }

    /// Starts a daemon with default settings in `dir` and `extra` config.
    pub async fn start_in(dir: &Path, extra: &str) -> Daemon {
        Daemon::start(config(dir, extra)).await
    }

    async fn serve(config: Config, listener: TcpListener, ready: &[u16]) -> Daemon {
        let addr = listener.local_addr().unwrap();
        let data_dir = config.storage.data_dir.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (reload, reloads) = tokio::sync::mpsc::channel(1);
        let run = config.clone();
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            sensorgate::app::run(run, listener, stopped, reloads)
                .await
                .expect("daemon runs");
        });
        let mut daemon = Daemon {
            addr,
            data_dir,
            reload,
            token: None,
            config,
            dir: None,
            stop: Some(stop),
            task: Some(task),
        };
        until("the daemon answers /healthz", || async {
            let status = daemon.try_request("GET", "/healthz", None).await.ok()?.0;
            ready.contains(&status).then_some(())
        })
        .await;
        daemon.token = std::fs::read_to_string(daemon.data_dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_owned());
        daemon
    }

    /// Stops the daemon and starts it again on the same data and address, with the same
    /// config.
    pub async fn restart(self) -> Daemon {
        let config = self.config.clone();
        self.restart_on(config).await
    }

    /// Stops the daemon and starts it again on the same data and address with `text` as
    /// its config.
    pub async fn restart_with(self, text: &str) -> Daemon {
        let config = config(&self.data_dir, text);
        self.restart_on(config).await
    }

    async fn restart_on(mut self, config: Config) -> Daemon {
        let addr = self.addr;
        let dir = self.dir.take();
        self.stop().await;
        // The old listener is closed; its port may linger a moment in the kernel.
        let listener = until("the daemon's port is free again", || async {
            TcpListener::bind(addr).await.ok()
        })
        .await;
        let mut daemon = Daemon::serve(config, listener, &[200]).await;
        daemon.dir = dir;
        daemon
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the daemon the way SIGTERM does and waits for it; returns the data directory
    /// it owned, if any, for the test to look into afterwards.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("daemon stops in time")
                .expect("daemon task ends cleanly");
        }
        self.dir.take()
    }

    /// The daemon and a keep-alive HTTP client of it.
    pub fn with_http(self) -> (Daemon, http::Client) {
        let http = self.http();
        (self, http)
    }

    /// A keep-alive HTTP client of the daemon, with its admin token.
    pub fn http(&self) -> http::Client {
        http::Client::new(self.addr).with_token(self.token.clone())
    }

    /// One HTTP request; returns status and the body parsed as JSON (Null if empty or not JSON).
    pub async fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, body) = self.try_request(method, path, body).await.expect("request");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// `GET path`, as [`Daemon::request`].
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None).await
    }

    /// `POST path` with a JSON `body`, as [`Daemon::request`].
    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.request("POST", path, Some(body)).await
    }

    /// `PUT path` with a JSON `body`, as [`Daemon::request`].
    pub async fn put(&self, path: &str, body: &str) -> (u16, Value) {
        self.request("PUT", path, Some(body)).await
    }

    /// `DELETE path`, as [`Daemon::request`].
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request("DELETE", path, None).await
    }

    /// One HTTP request that must be answered with `status`; returns the body as JSON.
    pub async fn expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> Value {
        let (got, answer) = self.request(method, path, body).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        answer
    }

    /// A request on a connection of its own, closed after the answer; returns status and
    /// raw body bytes.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let response = self
            .as_token(self.token.as_deref())
            .send(method, path, body)
            .await?;
        Ok((response.status, response.body))
    }

    /// The API as a client with `token` (or none) sees it, whatever the daemon's own.
    pub fn as_token<'a>(&'a self, token: Option<&'a str>) -> Caller<'a> {
        Caller {
            addr: self.addr,
            token,
        }
    }

    /// Creates a sensor from `body` (JSON); returns it as created.
    pub async fn create_sensor(&self, body: &str) -> Value {
        let (status, sensor) = self.post("/api/v1/sensores/", body).await;
        assert_eq!(status, 201, "{sensor}");
        sensor
    }

    /// Creates a DHT22 sensor of `tipo`; returns its id.
    pub async fn sensor(&self, tipo: &str) -> i64 {
        self.http().create_sensor(tipo).await
    }

    /// Posts a reading in the unit the daemon knows for `tipo`; returns the stored reading.
    pub async fn reading(&self, sensor_id: i64, tipo: &str, valor: f64) -> Value {
        self.http().reading(sensor_id, tipo, valor).await
    }

    /// Opens a WebSocket at `path_and_query` (e.g. `/api/v1/ws?channel=sensors`).
    pub async fn websocket(&self, path_and_query: &str) -> Client {
        Client::connect(self.addr, path_and_query).await
    }

    /// A WebSocket at `path_and_query` that has read its greeting.
    pub async fn subscribe(&self, path_and_query: &str) -> Client {
        self.websocket(path_and_query).await.greeted().await
    }

    /// Broadcasts a `test_event` on `channel`; returns its `seq`.
    pub async fn marker(&self, channel: &str) -> u64 {
        let body = format!(r#"{{"channel": "{channel}", "data": "marker"}}"#);
        let (status, sent) = self.post("/api/v1/ws/test-event", &body).await;
        assert_eq!(status, 200, "{sent}");
        sent["seq"].as_u64().unwrap()
    }

    /// The value of one sample (`name{labels}`) in `/metrics`, if it is there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let wanted = format!("{series} ");
        self.metrics().await.lines().find_map(|line| {
            let value = line.strip_prefix(&wanted)?;
            Some(
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("{line}: not a number")),
            )
        })
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let (status, body) = self
            .try_request("GET", "/metrics", None)
            .await
            .expect("metrics");
        assert_eq!(status, 200);
        String::from_utf8_lossy(&body).into_owned()
    }

    /// The store's last `seq`, from `/healthz`.
    pub async fn last_seq(&self) -> u64 {
        self.storage_figure("last_seq").await
    }

    /// Waits until the store's last `seq` is past `seq`: `what` has been stored.
    pub async fn wait_past(&self, seq: u64, what: &str) {
        until(what, || async {
            (self.last_seq().await > seq).then_some(())
        })
        .await;
    }

    /// Transactions the writer has committed, from `/healthz`.
    pub async fn commits(&self) -> u64 {
        self.storage_figure("commits").await
    }

    async fn storage_figure(&self, name: &str) -> u64 {
        self.get("/healthz").await.1["storage"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no storage.{name} in /healthz"))
    }

    /// The daemon's database, opened beside it.
    pub fn database(&self) -> rusqlite::Connection {
        super::database(&self.data_dir)
    }
}

/// A client of the daemon with a token of its choice; each request on a connection of its
/// own, closed after the answer.
pub struct Caller<'a> {
    addr: SocketAddr,
    token: Option<&'a str>,
}

impl Caller<'_> {
    /// One request; returns status and the body parsed as JSON (Null if empty or not JSON).
    pub async fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let response = self.send(method, path, body).await.expect("request");
        (response.status, response.json())
    }

    /// One request that must be answered with `status`; returns the body as JSON.
    pub async fn expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> Value {
        let (got, answer) = self.request(method, path, body).await;
        assert_eq!(
            got, status,
            "{method} {path} with {:?}: {answer}",
            self.token
        );
        answer
    }

    /// One request; returns the whole response.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<http::Response> {
        let mut client = http::Client::new(self.addr).with_token(self.token.map(str::to_owned));
        let exchange = client.request(
            method,
            path,
            &[("Connection", "close")],
            Some(body.unwrap_or("").as_bytes()),
        );
        tokio::time::timeout(PATIENCE, exchange)
            .await
            .map_err(|_| std::io::Error::other("response timed out"))?
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// How long [`until`] waits between two looks.
pub const POLL: Duration = Duration::from_millis(20);
