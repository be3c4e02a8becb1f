//! Load generator: drives the release `sensorgate` binary over loopback and prints one
//! markdown table of figures next to the targets in `PERFORMANCE.md`.
//!
//! ```text
//! cargo bench --bench load                      # every scenario, about two minutes
//! cargo bench --bench load -- rest latency      # only these
//! LOAD_SCENARIOS="fanout ingest" cargo bench --bench load
//! ```
//!
//! Scenarios: `rest`, `latency`, `fanout`, `ingest`, `startup`, `memory`,
//! `resume-storm`, `size`. History
//! queries are measured by the storage benchmark (`benches/storage.rs`), through the
//! writer. Sizes can be changed with `LOAD_REST_N`, `LOAD_FANOUT_SECS`,
//! `LOAD_INGEST_SENSORS`, `LOAD_INGEST_BATCH` (samples per sim read), `LOAD_INGEST_SECS`
//! `LOAD_STARTUP_READINGS` (the database a restart is timed on), `LOAD_STORM_CLIENTS`
//! and `LOAD_STORM_EVENTS` (how many clients resume at once, from how many stored
//! events; the default, 250 from a million, moves 250 million frames and takes minutes);
//! `LOAD_DAEMON=PATH`
//! drives another build of the daemon (one with symbols, for a profiler) instead of the
//! one cargo built; `LOAD_SYNCHRONOUS=normal` runs it with `storage.synchronous =
//! "normal"` instead of the default `full`.
//!
//! Each scenario starts its own daemon (`--config` with port 0 and a temporary data
//! directory), so figures do not depend on which scenarios ran before. The daemon and this
//! generator share the machine's cores: the figures are those of the whole loop, client
//! work included. Progress goes to stderr, the table to stdout.
//!
//! Run without `--bench` (as `cargo test --benches` does) it makes a smoke pass with tiny
//! sizes against whichever daemon build cargo made: it checks that every scenario still
//! works end to end, and its figures mean nothing. No figure ever fails a run; only a
//! daemon that cannot be started or driven does.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

const SCENARIOS: [&str; 8] = [
    "rest",
    "latency",
    "fanout",
    "ingest",
    "startup",
    "memory",
    "resume-storm",
    "size",
];

/// How big each scenario is.
struct Sizes {
    rest_creates: usize,
    rest_clients: usize,
    /// (clients, sequential creates) per latency stage; the last stage is the one the
    /// memory scenario measures.
    latency_stages: Vec<(usize, usize)>,
    fanout_clients: usize,
    fanout_creators: Vec<usize>,
    fanout_window: Duration,
    ingest_sensors: usize,
    /// Samples each sim read yields (`samples_per_read`): a few sensors offer any rate.
    ingest_samples_per_read: usize,
    ingest_warmup: Duration,
    ingest_window: Duration,
    /// Readings stored before the restart whose start-up is timed.
    startup_readings: u64,
    /// Clients that resume from `since=0` at once, and the events stored before.
    storm_clients: usize,
    storm_events: u64,
    idle_wait: Duration,
}

impl Sizes {
    fn bench() -> Sizes {
        Sizes {
            rest_creates: env_number("LOAD_REST_N", 20_000),
            rest_clients: 16,
            latency_stages: vec![(1, 200), (100, 200), (1000, 50)],
            fanout_clients: 100,
            fanout_creators: vec![4, 64],
            fanout_window: Duration::from_secs(env_number("LOAD_FANOUT_SECS", 5) as u64),
            ingest_sensors: env_number("LOAD_INGEST_SENSORS", 40),
            ingest_samples_per_read: env_number("LOAD_INGEST_BATCH", 200),
            ingest_warmup: Duration::from_secs(2),
            ingest_window: Duration::from_secs(env_number("LOAD_INGEST_SECS", 5) as u64),
            startup_readings: env_number("LOAD_STARTUP_READINGS", 1_000_000) as u64,
            storm_clients: env_number("LOAD_STORM_CLIENTS", 250),
            storm_events: env_number("LOAD_STORM_EVENTS", 1_000_000) as u64,
            idle_wait: Duration::from_secs(3),
        }
    }

    fn smoke() -> Sizes {
        Sizes {
            rest_creates: 100,
            rest_clients: 4,
            latency_stages: vec![(1, 5), (4, 5), (16, 5)],
            fanout_clients: 4,
            fanout_creators: vec![1, 2],
            fanout_window: Duration::from_millis(500),
            ingest_sensors: 4,
            ingest_samples_per_read: 5,
            ingest_warmup: Duration::from_millis(300),
            ingest_window: Duration::from_millis(700),
            startup_readings: 2_000,
            storm_clients: 8,
            storm_events: 2_000,
            idle_wait: Duration::from_millis(300),
        }
    }
}

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            eprintln!("{name}={text:?} is not a number; using {default}");
            default
        }),
        Err(_) => default,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let bench = args.iter().any(|a| a == "--bench");
    let mut wanted: Vec<String> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .cloned()
        .collect();
    if let Ok(list) = std::env::var("LOAD_SCENARIOS") {
        wanted.extend(
            list.split([',', ' '])
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
    }
    if let Some(unknown) = wanted.iter().find(|w| !SCENARIOS.contains(&w.as_str())) {
        eprintln!(
            "unknown scenario {unknown:?}; known: {}",
            SCENARIOS.join(", ")
        );
        return ExitCode::from(2);
    }
    let selected: Vec<&str> = SCENARIOS
        .into_iter()
        .filter(|s| wanted.is_empty() || wanted.iter().any(|w| w == s))
        .collect();
    let sizes = if bench {
        Sizes::bench()
    } else {
        eprintln!("smoke pass (no --bench): tiny sizes, the figures are not benchmarks");
        Sizes::smoke()
    };
    match raise_fd_limit() {
        Ok(limit) => eprintln!("file descriptors: {limit}"),
        Err(e) => eprintln!("could not raise the file-descriptor limit: {e}"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Other work on the machine shares the cores with the daemon and the generator.
    eprintln!("load average before: {}", load_average());
    let (rows, failed) = runtime.block_on(run(&selected, &sizes));
    eprintln!("load average after: {}", load_average());
    print!("{}", table(&rows));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Runs the selected scenarios in order; a scenario that fails gets a row saying so and
/// the others still run.
async fn run(selected: &[&str], sizes: &Sizes) -> (Vec<Row>, bool) {
    let mut rows = Vec::new();
    let mut failed = false;
    let has = |name: &str| selected.contains(&name);
    let mut record = |name: &str, result: Result<Vec<Row>, Error>| match result {
        Ok(mut new) => rows.append(&mut new),
        Err(e) => {
            eprintln!("{name}: failed: {e}");
            failed = true;
            let first_line = e.to_string().lines().next().unwrap_or_default().to_owned();
            rows.push(Row::new(
                name,
                format!("failed: {first_line} (details on stderr)"),
                "—",
            ));
        }
    };
    if has("rest") {
        record("rest", rest_creates(sizes).await);
    }
    if has("latency") || has("memory") {
        record(
            "latency",
            latency_and_memory(sizes, has("latency"), has("memory")).await,
        );
    }
    if has("fanout") {
        record("fanout", fan_out(sizes).await);
    }
    if has("ingest") {
        record("ingest", ingest(sizes).await);
    }
    if has("startup") {
        record("startup", startup(sizes).await);
    }
    if has("resume-storm") {
        record("resume-storm", resume_storm(sizes).await);
    }
    if has("size") {
        record("size", binary_size());
    }
    (rows, failed)
}

// ---------------------------------------------------------------------------------------
// Output

/// One line of the result table.
struct Row {
    scenario: String,
    figure: String,
    target: String,
}

impl Row {
    fn new(scenario: &str, figure: String, target: &str) -> Row {
        Row {
            scenario: scenario.to_owned(),
            figure,
            target: target.to_owned(),
        }
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from("| scenario | figure | target |\n| --- | --- | --- |\n");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            row.scenario, row.figure, row.target
        );
    }
    out
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.3} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Latency distribution of one measurement.
struct Summary {
    count: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Summary {
    /// Nearest-rank percentiles; `None` for no samples.
    fn of(mut samples: Vec<Duration>) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Some(Summary {
            count: samples.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
        })
    }
}

// ---------------------------------------------------------------------------------------
// The daemon under test

/// A running `sensorgate` child with its own config and data directory. Dropping it
/// kills the child if [`Daemon::stop`] was not called.
struct Daemon {
    child: Child,
    /// From spawn until the daemon logged that its sensors are started.
    startup: Duration,
    addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    /// Its config and data; `None` once [`Daemon::restart`] has handed them on.
    dir: Option<tempfile::TempDir>,
}

/// How long a daemon may take to start its sensors and serve.
const STARTUP_LIMIT: Duration = Duration::from_secs(90);

/// The config file and the data directory inside a daemon's directory.
const CONFIG: &str = "config.toml";
const DATA: &str = "data";

/// Log lines kept for error reports.
const LOG_TAIL: usize = 40;

impl Daemon {
    /// Starts the daemon with `sensors` (TOML `[[sensor]]` tables, after any more keys of
    /// the `[storage]` table, which it follows) and waits until it listens and has started
    /// its sensors.
    fn launch(sensors: &str) -> Result<Daemon, Error> {
        let dir = tempfile::tempdir()?;
        Daemon::configure(dir.path(), sensors)?;
        Daemon::spawn(dir)
    }

    /// Writes the config of a daemon in `dir` with `sensors`.
    fn configure(dir: &std::path::Path, sensors: &str) -> Result<(), Error> {
        let data = dir.join(DATA);
        // The WebSocket scenarios hold up to 1000 clients plus the REST connections; the
        // default limit of 256 is meant for a gateway, not for this.
        // Rate limits are for a LAN, not for a load test; writes still present a token,
        // as a real client's do, and pay for its check.
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 4096\n\n\
             [limits]\nmax_connections_per_address = 4096\n\
             writes_per_second = 1000000000.0\nwrite_burst = 1000000000.0\n\n\
             [storage]\ndata_dir = {data:?}\nsynchronous = {synchronous:?}\n\n{sensors}",
            data = data.to_string_lossy(),
            synchronous = std::env::var("LOAD_SYNCHRONOUS").unwrap_or_else(|_| "full".into()),
        );
        std::fs::write(dir.join(CONFIG), config)?;
        Ok(())
    }

    /// Starts the daemon on the config and data in `dir` and waits until it listens and
    /// has started its sensors.
    fn spawn(dir: tempfile::TempDir) -> Result<Daemon, Error> {
        let data = dir.path().join(DATA);
        let mut child = Command::new(daemon_binary())
            .arg("--config")
            .arg(dir.path().join(CONFIG))
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        let (lines, events) = std_mpsc::channel();
        let tail = log.clone();
        // Keep reading stderr for the daemon's whole life: a full pipe would block its logging.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening on http://") || line.contains("ready:") {
                    let _ = lines.send(line.clone());
                }
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let mut daemon = Daemon {
            child,
            startup: Duration::ZERO,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            dir: Some(dir),
        };
        let spawned = Instant::now();
        let deadline = spawned + STARTUP_LIMIT;
        let mut ready = false;
        while !ready {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = events.recv_timeout(left).map_err(|_| {
                format!(
                    "daemon not ready within {} s; its log ends:\n{}",
                    STARTUP_LIMIT.as_secs(),
                    daemon.log_tail()
                )
            })?;
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr = rest.trim_end().trim_end_matches('/');
                daemon.addr = addr
                    .parse()
                    .map_err(|e| format!("bad address {addr:?}: {e}"))?;
            } else if line.contains("ready:") {
                ready = true;
            }
        }
        daemon.startup = spawned.elapsed();
        if daemon.addr.port() == 0 {
            return Err("daemon became ready without saying where it listens".into());
        }
        // The daemon made its first admin token before it said it was ready.
        let token = std::fs::read_to_string(data.join("admin.token"))
            .map_err(|e| format!("no admin token in the data directory: {e}"))?;
        *TOKEN.write().unwrap_or_else(|e| e.into_inner()) = Some(token.trim().to_owned());
        eprintln!("  daemon pid {} on {}", daemon.pid(), daemon.addr);
        Ok(daemon)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let tail = self.log.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Resident set in KiB, from `/proc/PID/status`.
    fn rss_kib(&self) -> Result<u64, Error> {
        self.status_kib("VmRSS")
    }

    /// A figure in KiB of the daemon's `/proc/PID/status`.
    fn status_kib(&self, field: &str) -> Result<u64, Error> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {field} in /proc/PID/status").into())
    }

    /// User plus system CPU time the daemon used so far.
    fn cpu_time(&self) -> Result<Duration, Error> {
        process_cpu_time(&self.pid().to_string())
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn stop(mut self) -> Result<ExitStatus, Error> {
        self.halt()
    }

    /// Stops the daemon cleanly and starts it again on the same config and data; the
    /// returned daemon's `startup` is that of the second start.
    fn restart(self) -> Result<Daemon, Error> {
        self.restart_with(None)
    }

    /// [`Daemon::restart`], with `sensors` configured instead if given.
    fn restart_with(mut self, sensors: Option<&str>) -> Result<Daemon, Error> {
        self.halt()?;
        let dir = self
            .dir
            .take()
            .ok_or("the data directory was handed on already")?;
        if let Some(sensors) = sensors {
            Daemon::configure(dir.path(), sensors)?;
        }
        Daemon::spawn(dir)
    }

    /// Peak resident set since the process started, in KiB (`VmHWM`).
    fn peak_rss_kib(&self) -> Result<u64, Error> {
        self.status_kib("VmHWM")
    }

    fn halt(&mut self) -> Result<ExitStatus, Error> {
        let pid = self.pid().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !sent.success() {
            return Err(format!("kill -TERM {pid} failed").into());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    return Err(format!("daemon exited with {status}:\n{}", self.log_tail()).into());
                }
                eprintln!("  daemon pid {pid} stopped ({status})");
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(format!("daemon pid {pid} did not stop within 20 s of SIGTERM").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The daemon to drive: the one cargo built for this bench, or `LOAD_DAEMON` (another
/// build of it, e.g. one with symbols for a profiler).
fn daemon_binary() -> std::path::PathBuf {
    std::env::var_os("LOAD_DAEMON")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_sensorgate").into())
}

/// Starts a daemon from async code: waiting for it blocks this worker, not the others.
fn start(sensors: &str) -> Result<Daemon, Error> {
    tokio::task::block_in_place(|| Daemon::launch(sensors))
}

/// Stops a daemon from async code; see [`start`].
fn stop(daemon: Daemon) -> Result<ExitStatus, Error> {
    tokio::task::block_in_place(|| daemon.stop())
}

/// User plus system CPU time of a process (`self` for this one), from `/proc/PID/stat`.
fn process_cpu_time(pid: &str) -> Result<Duration, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime 14 and stime 15.
    let after = stat.rsplit_once(')').ok_or("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).ok_or("short stat")?.parse::<u64>()?
        + fields.get(12).ok_or("short stat")?.parse::<u64>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// CPU used by the daemon and by this generator over a stretch of wall time, in percent
/// of one core each.
struct CpuShare {
    daemon: Duration,
    generator: Duration,
    wall: Instant,
}

impl CpuShare {
    fn start(daemon: &Daemon) -> Result<CpuShare, Error> {
        Ok(CpuShare {
            daemon: daemon.cpu_time()?,
            generator: process_cpu_time("self")?,
            wall: Instant::now(),
        })
    }

    /// "daemon CPU 120 %, generator 75 %" since `start`.
    fn describe(&self, daemon: &Daemon) -> Result<String, Error> {
        let wall = self.wall.elapsed().as_secs_f64();
        let share = |used: Duration| 100.0 * used.as_secs_f64() / wall;
        Ok(format!(
            "daemon CPU {:.0} %, generator {:.0} %",
            share(daemon.cpu_time()? - self.daemon),
            share(process_cpu_time("self")? - self.generator)
        ))
    }
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Raises the soft limit on open files to the hard limit: 1000 WebSocket clients need a
/// descriptor each here and in the daemon, which inherits the limit.
fn raise_fd_limit() -> Result<libc::rlim_t, std::io::Error> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the struct passed by reference.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
}

/// The two simulated sensors of the demo config, as a gateway would run them.
const DEMO_SENSORS: &str = r#"
[[sensor]]
name = "invernadero"
tipo = "temperatura"
modelo = "DHT22"
ubicacion = "Invernadero norte"
interval_s = 2
source = { kind = "sim", profile = "dht22", base_temperature = 22.0, base_humidity = 55.0, failure_rate = 0.05 }

[[sensor]]
name = "nevera-lab"
tipo = "temperatura"
modelo = "DS18B20"
ubicacion = "Laboratorio"
interval_s = 5
source = { kind = "sim", profile = "ds18b20", base_temperature = 4.0, failure_rate = 0.02 }
"#;

// ---------------------------------------------------------------------------------------
// HTTP: the tests' client, with the admin token of the daemon under test.

#[path = "../tests/common/http.rs"]
mod http;

/// The token every request carries: the admin token of the daemon under test, set once
/// it has started (each scenario starts a daemon of its own).
static TOKEN: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// A keep-alive client of `addr` that sends the token of the daemon under test.
fn http_client(addr: SocketAddr) -> http::Client {
    let token = TOKEN.read().unwrap_or_else(|e| e.into_inner()).clone();
    http::Client::new(addr).with_token(token)
}

fn create_body(nombre: &str) -> Vec<u8> {
    format!(r#"{{"tipo":"temperatura","modelo":"DHT22","nombre":"{nombre}"}}"#).into_bytes()
}

const SENSORS_PATH: &str = "/api/v1/sensores/";

/// `GET path` as JSON.
async fn get_json(client: &mut http::Client, path: &str) -> Result<serde_json::Value, Error> {
    let response = client.get(path).await?;
    if response.status != 200 {
        return Err(format!("GET {path}: status {}", response.status).into());
    }
    Ok(serde_json::from_slice(&response.body)?)
}

// ---------------------------------------------------------------------------------------
// WebSocket clients

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Small buffers, as the daemon uses, so that a thousand clients in this process do not
/// spend the shared cores zero-filling 128 KiB read buffers.
fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Connects to `channel` and reads the greeting (connection, then stats). Once the
/// greeting is in, the session is subscribed: every later event reaches it.
async fn subscribe(addr: SocketAddr, channel: &str) -> Result<Socket, Error> {
    let url = format!("ws://{addr}/api/v1/ws?channel={channel}");
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(url, Some(socket_config()), true).await?;
    for expected in ["connection", "stats"] {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .map_err(|_| format!("no {expected} message within 10 s"))?
            .ok_or("socket closed during the greeting")??;
        let text = message.into_text()?;
        if !text.as_str().contains(&format!(r#""type":"{expected}""#)) {
            return Err(format!("expected a {expected} message, got {}", text.as_str()).into());
        }
    }
    Ok(socket)
}

/// Connects `count` clients to `channel`, at most 64 handshakes at a time.
async fn subscribe_many(
    addr: SocketAddr,
    channel: &str,
    count: usize,
) -> Result<Vec<Socket>, Error> {
    let sockets: Vec<Result<Socket, Error>> = futures_util::stream::iter(0..count)
        .map(|_| subscribe(addr, channel))
        .buffer_unordered(64)
        .collect()
        .await;
    sockets.into_iter().collect()
}

/// The number at the end of a sensor's `nombre` in an event frame, if the name starts
/// with the prefix in `needle` (`"nombre":"PREFIX`).
fn nombre_index(frame: &str, needle: &str) -> Option<usize> {
    let start = frame.find(needle)? + needle.len();
    let rest = &frame[start..];
    rest[..rest.find('"')?].parse().ok()
}

// ---------------------------------------------------------------------------------------
// 1. REST creates

async fn rest_creates(sizes: &Sizes) -> Result<Vec<Row>, Error> {
    let total = sizes.rest_creates;
    let clients = sizes.rest_clients;
    eprintln!("rest: {total} creates by {clients} keep-alive clients");
    let daemon = start(DEMO_SENSORS)?;
    let addr = daemon.addr;
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut workers = JoinSet::new();
    let mut connections = Vec::new();
    for _ in 0..clients {
        let mut client = http_client(addr);
        client.connect().await?;
        connections.push(client);
    }
    let cpu = CpuShare::start(&daemon)?;
    let started = Instant::now();
    for mut client in connections {
        let next = next.clone();
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(total / clients + 1);
            let mut errors = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    break;
                }
                let body = create_body(&format!("rest-{i}"));
                let sent = Instant::now();
                match client.post_json(SENSORS_PATH, &body).await {
                    Ok(r) if r.status == 201 => latencies.push(sent.elapsed()),
                    Ok(_) | Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (mut l, e) = done?;
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = started.elapsed();
    let cpu = cpu.describe(&daemon)?;
    stop(daemon)?;
    let ok = latencies.len();
    let summary = Summary::of(latencies).ok_or("no request succeeded")?;
    let rate = ok as f64 / elapsed.as_secs_f64();
    let cut = if ok as u64 + errors < total as u64 {
        " (stopped at the 60 s bound)"
    } else {
        ""
    };
    let name = format!("REST creates, C={clients}, N={}", thousands(total as u64));
    Ok(vec![
        Row::new(
            &name,
            format!("{} req/s{cut}; {cpu}", thousands(rate as u64)),
            "≥ 17,000 req/s",
        ),
        Row::new(
            &name,
            format!(
                "p50 {}, p99 {}, max {}, {errors} errors",
                ms(summary.p50),
                ms(summary.p99),
                ms(summary.max)
            ),
            "p99 ≤ 4 ms, 0 errors",
        ),
    ])
}

// ---------------------------------------------------------------------------------------
// 2. Event latency, and 5. memory around the largest stage

/// Clients of one stage, each reporting when an event reached it. Dropping it
/// disconnects them.
struct Listeners {
    _tasks: JoinSet<()>,
}

/// (client, event index, when it arrived)
type Delivery = (usize, usize, Instant);

fn listen_for_names(
    sockets: Vec<Socket>,
    prefix: &str,
) -> (Listeners, mpsc::UnboundedReceiver<Delivery>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let needle: Arc<str> = format!(r#""nombre":"{prefix}"#).into();
    let mut tasks = JoinSet::new();
    for (client, mut socket) in sockets.into_iter().enumerate() {
        let tx = tx.clone();
        let needle = needle.clone();
        tasks.spawn(async move {
            while let Some(message) = socket.next().await {
                let at = Instant::now();
                match message {
                    Ok(Message::Text(text)) => {
                        if let Some(i) = nombre_index(text.as_str(), &needle) {
                            let _ = tx.send((client, i, at));
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
    }
    (Listeners { _tasks: tasks }, rx)
}

struct LatencyResult {
    summary: Option<Summary>,
    missing: usize,
}

/// Deliveries of one stage: at most one per client and event.
struct Tally {
    clients: usize,
    creates: usize,
    seen: Vec<bool>,
    latencies: Vec<Duration>,
}

impl Tally {
    /// Records a delivery; false for a duplicate or an unknown event.
    fn record(&mut self, (client, event, at): Delivery, sent_at: &[Instant]) -> bool {
        if client >= self.clients || event >= sent_at.len() {
            return false;
        }
        let slot = &mut self.seen[client * self.creates + event];
        if *slot {
            return false;
        }
        *slot = true;
        self.latencies.push(at - sent_at[event]);
        true
    }

    fn missing(&self) -> usize {
        self.clients * self.creates - self.latencies.len()
    }
}

/// `creates` sequential creates, each with a unique name; waits for every client to see
/// one (or 2 s) before the next, so each figure is one event's latency, not a queue's.
async fn latency_stage(
    addr: SocketAddr,
    sockets: Vec<Socket>,
    creates: usize,
    prefix: &str,
) -> Result<(LatencyResult, Listeners), Error> {
    let clients = sockets.len();
    let (listeners, mut deliveries) = listen_for_names(sockets, prefix);
    let mut client = http_client(addr);
    client.connect().await?;
    let mut sent_at = Vec::with_capacity(creates);
    let mut tally = Tally {
        clients,
        creates,
        seen: vec![false; clients * creates],
        latencies: Vec::with_capacity(clients * creates),
    };
    for i in 0..creates {
        let body = create_body(&format!("{prefix}{i}"));
        sent_at.push(Instant::now());
        let response = client.post_json(SENSORS_PATH, &body).await?;
        if response.status != 201 {
            return Err(format!("create answered {}", response.status).into());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut got = 0;
        while got < clients {
            match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                Ok(Some(delivery)) => {
                    if tally.record(delivery, &sent_at) && delivery.1 == i {
                        got += 1;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
    // Late arrivals still count as delivered, with their latency.
    let grace = tokio::time::Instant::now() + Duration::from_secs(1);
    while tally.missing() > 0 {
        match tokio::time::timeout_at(grace, deliveries.recv()).await {
            Ok(Some(delivery)) => {
                tally.record(delivery, &sent_at);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let missing = tally.missing();
    Ok((
        LatencyResult {
            summary: Summary::of(tally.latencies),
            missing,
        },
        listeners,
    ))
}

async fn latency_and_memory(sizes: &Sizes, latency: bool, memory: bool) -> Result<Vec<Row>, Error> {
    eprintln!("latency/memory: stages {:?}", sizes.latency_stages);
    let daemon = start(DEMO_SENSORS)?;
    let addr = daemon.addr;
    let mut rows = Vec::new();
    if memory {
        tokio::time::sleep(sizes.idle_wait).await;
        rows.push(Row::new(
            "Memory, idle with the demo's 2 sim sensors",
            format!(
                "RSS {} after {} s",
                mib(daemon.rss_kib()?),
                sizes.idle_wait.as_secs_f64()
            ),
            "≤ 10 MiB",
        ));
    }
    let last = sizes.latency_stages.len() - 1;
    for (stage, &(clients, creates)) in sizes.latency_stages.iter().enumerate() {
        // Memory is measured around the largest stage only; latency needs them all.
        if !latency && stage != last {
            continue;
        }
        let sockets = subscribe_many(addr, "sensors", clients).await?;
        let connected_rss = daemon.rss_kib()?;
        let prefix = format!("lat{clients}-");
        let (result, listeners) = latency_stage(addr, sockets, creates, &prefix).await?;
        if latency {
            let target = match stage {
                0 => "p50 ≤ 0.2 ms, p99 ≤ 0.5 ms, 0 missing",
                1 => "p99 ≤ 3 ms, 0 missing",
                _ => "p50 ≤ 9 ms, p99 ≤ 25 ms, 0 missing",
            };
            let figure = match &result.summary {
                Some(s) => format!(
                    "p50 {}, p99 {}, max {} over {} deliveries; {} missing",
                    ms(s.p50),
                    ms(s.p99),
                    ms(s.max),
                    thousands(s.count as u64),
                    result.missing
                ),
                None => format!("no deliveries; {} missing", result.missing),
            };
            rows.push(Row::new(
                &format!("Event latency, K={clients}, M={creates}"),
                figure,
                target,
            ));
        }
        if memory && stage == last {
            let after_rss = daemon.rss_kib()?;
            rows.push(Row::new(
                &format!("Memory, {clients} clients connected"),
                format!("RSS {}", mib(connected_rss)),
                "≤ 25 MiB",
            ));
            rows.push(Row::new(
                &format!("Memory, after {creates} events to {clients} clients, still connected"),
                format!("RSS {}", mib(after_rss)),
                "≤ 25 MiB",
            ));
        }
        drop(listeners);
    }
    stop(daemon)?;
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// 3. Fan-out

async fn fan_out(sizes: &Sizes) -> Result<Vec<Row>, Error> {
    let clients = sizes.fanout_clients;
    let window = sizes.fanout_window;
    eprintln!(
        "fanout: {clients} clients, creators {:?}, {window:?} each",
        sizes.fanout_creators
    );
    let daemon = start(DEMO_SENSORS)?;
    let addr = daemon.addr;
    let mut rows = Vec::new();
    for &creators in &sizes.fanout_creators {
        let sockets = subscribe_many(addr, "sensors", clients).await?;
        let delivered = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let mut listeners = JoinSet::new();
        for mut socket in sockets {
            let delivered = delivered.clone();
            let closed = closed.clone();
            listeners.spawn(async move {
                while let Some(message) = socket.next().await {
                    match message {
                        Ok(Message::Text(text))
                            if text.as_str().starts_with(r#"{"type":"entity_event""#) =>
                        {
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                closed.fetch_add(1, Ordering::Relaxed);
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let created = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut connections = Vec::new();
        for _ in 0..creators {
            let mut client = http_client(addr);
            client.connect().await?;
            connections.push(client);
        }
        let mut workers = JoinSet::new();
        let cpu = CpuShare::start(&daemon)?;
        let started = Instant::now();
        let delivered_before = delivered.load(Ordering::Relaxed);
        for (w, mut client) in connections.into_iter().enumerate() {
            let (stop, created, failed) = (stop.clone(), created.clone(), failed.clone());
            workers.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let body = create_body(&format!("fan{creators}-{w}-{n}"));
                    n += 1;
                    match client.post_json(SENSORS_PATH, &body).await {
                        Ok(r) if r.status == 201 => created.fetch_add(1, Ordering::Relaxed),
                        Ok(_) | Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        tokio::time::sleep(window).await;
        let delivered_in_window = delivered.load(Ordering::Relaxed) - delivered_before;
        let elapsed = started.elapsed();
        let cpu = cpu.describe(&daemon)?;
        stop.store(true, Ordering::Relaxed);
        while workers.join_next().await.is_some() {}
        let created = created.load(Ordering::Relaxed);
        // Let the tail arrive, to see whether anything was lost.
        let expected = created * clients as u64;
        let drain = Instant::now() + Duration::from_secs(5);
        while delivered.load(Ordering::Relaxed) - delivered_before < expected
            && Instant::now() < drain
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lost = expected.saturating_sub(delivered.load(Ordering::Relaxed) - delivered_before);
        let disconnected = closed.load(Ordering::Relaxed);
        drop(listeners);
        let secs = elapsed.as_secs_f64();
        let target = if creators <= 4 {
            "≥ 200,000 deliveries/s"
        } else {
            "≥ 500,000 deliveries/s"
        };
        rows.push(Row::new(
            &format!("Fan-out, K={clients}, {creators} creators, {} s", window.as_secs_f64()),
            format!(
                "{} deliveries/s ({} creates/s, {} failed); {} undelivered, {} clients dropped; {cpu}",
                thousands((delivered_in_window as f64 / secs) as u64),
                thousands((created as f64 / secs) as u64),
                failed.load(Ordering::Relaxed),
                thousands(lost),
                disconnected,
            ),
            target,
        ));
    }
    stop(daemon)?;
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// 4. Ingest

/// The smallest `interval_s` the config accepts (see `Config::validate`).
const MIN_INTERVAL_S: f64 = 0.05;

/// `count` simulated DHT22s at the fastest interval, each read yielding `per_read`
/// samples.
fn ingest_sensors(count: usize, per_read: usize) -> String {
    ingest_sensors_stopping(count, per_read, None)
}

/// Readings in each sample of the sim sensors' DHT22 profile: temperature and humidity.
const READINGS_PER_SAMPLE: usize = 2;

/// [`ingest_sensors`] that stop after `reads` reads each, when given (their next read
/// hangs): a database filled to a size, not past it.
fn ingest_sensors_stopping(count: usize, per_read: usize, reads: Option<u64>) -> String {
    let stop = reads
        .map(|n| format!("hang_after_reads = {n}, "))
        .unwrap_or_default();
    let mut sensors = String::new();
    for i in 0..count {
        let _ = write!(
            sensors,
            "[[sensor]]\nname = \"ingest-{i}\"\ntipo = \"temperatura\"\nmodelo = \"DHT22\"\n\
             interval_s = {MIN_INTERVAL_S}\nsource = {{ kind = \"sim\", profile = \"dht22\", failure_rate = 0.0, \
             {stop}samples_per_read = {per_read}, seed = {} }}\n\n",
            i + 1
        );
    }
    sensors
}

async fn ingest(sizes: &Sizes) -> Result<Vec<Row>, Error> {
    let count = sizes.ingest_sensors;
    let per_read = sizes.ingest_samples_per_read;
    eprintln!("ingest: {count} sim sensors every {MIN_INTERVAL_S} s, {per_read} samples a read");
    let daemon = start(&ingest_sensors(count, per_read))?;
    tokio::time::sleep(sizes.ingest_warmup).await;
    let alone = ingest_window(&daemon, sizes.ingest_window).await?;
    // The same load with clients that want only `sensors` events: they should cost the
    // daemon nothing while no sensor changes.
    let watchers = sizes.fanout_clients;
    let sockets = subscribe_many(daemon.addr, "sensors", watchers).await?;
    let closed = Arc::new(AtomicU64::new(0));
    let last_code = Arc::new(AtomicU64::new(0));
    let mut listeners = JoinSet::new();
    for mut socket in sockets {
        let (closed, last_code) = (closed.clone(), last_code.clone());
        listeners.spawn(async move {
            while let Some(message) = socket.next().await {
                match message {
                    Ok(Message::Close(frame)) => {
                        let code = frame.map_or(0, |f| u16::from(f.code));
                        last_code.store(u64::from(code), Ordering::Relaxed);
                        break;
                    }
                    Err(_) => break,
                    Ok(_) => {}
                }
            }
            closed.fetch_add(1, Ordering::Relaxed);
        });
    }
    let watched = ingest_window(&daemon, sizes.ingest_window).await?;
    let dropped = match closed.load(Ordering::Relaxed) {
        0 => "none".to_owned(),
        n => format!("{n} (close code {})", last_code.load(Ordering::Relaxed)),
    };
    drop(listeners);
    let startup = daemon.startup;
    stop(daemon)?;
    // Each sample of the dht22 profile is two readings (temperature, humidity).
    let offered = count as f64 * per_read as f64 / MIN_INTERVAL_S * 2.0;
    let name = format!(
        "Ingest, {count} sim sensors every {MIN_INTERVAL_S} s, {per_read} samples a read, {} s window",
        sizes.ingest_window.as_secs_f64()
    );
    Ok(vec![
        Row::new(
            &name,
            format!(
                "{} readings/s stored (seq delta), {} emitted on `readings`, of {} offered; {}; sensors started in {:.1} s",
                thousands(alone.stored as u64),
                thousands(alone.emitted as u64),
                thousands(offered as u64),
                alone.cpu,
                startup.as_secs_f64()
            ),
            "≥ 250,000 samples/s",
        ),
        Row::new(
            &format!("{name}, {watchers} clients on `sensors`"),
            format!(
                "{} readings/s stored; {}; clients dropped: {dropped}",
                thousands(watched.stored as u64),
                watched.cpu
            ),
            "—",
        ),
    ])
}

/// Storage and emission rates over one window of the ingest scenario.
struct IngestRates {
    /// Readings stored per second: each stored reading is one event, so the `seq` delta.
    stored: f64,
    /// Events per second the hub published on `readings`.
    emitted: f64,
    cpu: String,
}

/// Each end of the window gets a connection of its own: the daemon closes one left idle
/// longer than its `header_read_timeout_s` (10 s), shorter than a long window.
async fn ingest_window(daemon: &Daemon, window: Duration) -> Result<IngestRates, Error> {
    let cpu = CpuShare::start(daemon)?;
    let (seq0, emitted0, t0) = ingest_probe(&mut http_client(daemon.addr)).await?;
    tokio::time::sleep(window).await;
    let (seq1, emitted1, t1) = ingest_probe(&mut http_client(daemon.addr)).await?;
    let secs = (t1 - t0).as_secs_f64();
    Ok(IngestRates {
        stored: (seq1 - seq0) as f64 / secs,
        emitted: (emitted1 - emitted0) as f64 / secs,
        cpu: cpu.describe(daemon)?,
    })
}

/// The last stored `seq` and the events emitted on `readings`, and when they were read.
async fn ingest_probe(client: &mut http::Client) -> Result<(u64, u64, Instant), Error> {
    let health = get_json(client, "/healthz").await?;
    let stats = get_json(client, "/api/v1/ws/stats/readings").await?;
    let seq = health["storage"]["last_seq"]
        .as_u64()
        .ok_or("no storage.last_seq")?;
    let emitted = stats["events_emitted"]
        .as_u64()
        .ok_or("no events_emitted")?;
    Ok((seq, emitted, Instant::now()))
}

// ---------------------------------------------------------------------------------------
// Start-up

/// Fills a database through the daemon's own ingest, stops it cleanly and times its
/// next start: from spawning the process until it logs that it is ready (storage open,
/// configured sensors synced and sampled, listening).
async fn startup(sizes: &Sizes) -> Result<Vec<Row>, Error> {
    let wanted = sizes.startup_readings;
    let (count, per_read) = (sizes.ingest_sensors, sizes.ingest_samples_per_read);
    eprintln!("startup: filling a database with {wanted} readings, then restarting");
    let daemon = start(&ingest_sensors(count, per_read))?;
    let stored = fill(&daemon, wanted).await?;
    let daemon = tokio::task::block_in_place(|| daemon.restart())?;
    let startup = daemon.startup;
    stop(daemon)?;
    Ok(vec![Row::new(
        &format!(
            "Start-up to ready, {} events stored (nearly all readings), {count} sensors configured",
            thousands(stored)
        ),
        format!("{:.0} ms", startup.as_secs_f64() * 1e3),
        "≤ 100 ms",
    )])
}

/// Waits until the daemon's own ingest has stored `wanted` events; returns how many.
async fn fill(daemon: &Daemon, wanted: u64) -> Result<u64, Error> {
    let mut client = http_client(daemon.addr);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (seq, _, _) = ingest_probe(&mut client).await?;
        if seq >= wanted {
            return Ok(seq);
        }
        if Instant::now() >= deadline {
            return Err(format!("only {seq} readings stored after 600 s").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Resume storm

/// Every channel: a client on all of them sees every `seq` once, in order.
const ALL_CHANNELS: &str = "sensors,readings,general";

/// A room of dashboards reconnecting after an outage: a database of stored events, then
/// many clients resuming from `since=0` at once, while one live client times the events
/// of a sensor created every 50 ms. Memory is sampled throughout, and measured again with
/// every client caught up and still connected, and once they have left; every resuming
/// client must see every event exactly once, in order.
async fn resume_storm(sizes: &Sizes) -> Result<Vec<Row>, Error> {
    let (clients, wanted) = (sizes.storm_clients, sizes.storm_events);
    eprintln!("resume-storm: {clients} clients resuming from since=0 over {wanted} events");
    // Sensors that stop once they have given what was asked, as ingest outruns any
    // polling, and room for all of it and what the storm adds: a database past
    // `storage.max_events` (a million by default) would be pruned under the storm, and
    // its clients moved past what was pruned.
    let storage = format!("max_events = {}\n\n", 2 * wanted);
    let (count, per_read) = (sizes.ingest_sensors, sizes.ingest_samples_per_read);
    let reads = wanted.div_ceil((count * per_read * READINGS_PER_SAMPLE) as u64);
    let sensors = ingest_sensors_stopping(count, per_read, Some(reads));
    let daemon = start(&format!("{storage}{sensors}"))?;
    fill(&daemon, wanted).await?;
    // The same data with its sensors switched off: the storm meets a quiet daemon.
    let mut client = http_client(daemon.addr);
    let sensors = get_json(&mut client, "/api/v1/sensores/?limit=1000").await?;
    for sensor in sensors.as_array().ok_or("the sensor list is not a list")? {
        let path = format!("{SENSORS_PATH}{}", sensor["id"]);
        let response = client.put_json(&path, br#"{"activo": false}"#).await?;
        if response.status != 200 {
            return Err(format!("PUT {path} answered {}", response.status).into());
        }
    }
    drop(client);
    let daemon = tokio::task::block_in_place(|| daemon.restart_with(Some(&storage)))?;
    let addr = daemon.addr;
    tokio::time::sleep(sizes.idle_wait).await;
    let idle = daemon.rss_kib()?;
    let mut client = http_client(addr);
    let stored = get_json(&mut client, "/healthz").await?["storage"]["last_seq"]
        .as_u64()
        .ok_or("no storage.last_seq")?;

    let live = subscribe(addr, "sensors").await?;
    let (listeners, mut deliveries) = listen_for_names(vec![live], "storm-");
    let positions: Arc<Vec<AtomicU64>> =
        Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let started = Instant::now();
    let mut resuming = JoinSet::new();
    for client in 0..clients {
        let (positions, target) = (positions.clone(), target.clone());
        resuming.spawn(async move {
            let url = format!("ws://{addr}/api/v1/ws?channel={ALL_CHANNELS}&since=0");
            let (mut socket, _) =
                tokio_tungstenite::connect_async_with_config(url, Some(socket_config()), true)
                    .await?;
            let mut last = 0u64;
            let mut heard = Instant::now();
            // The target is set once the creates stop: look at it at least every 100 ms.
            while last < target.load(Ordering::Relaxed) {
                let Ok(message) =
                    tokio::time::timeout(Duration::from_millis(100), socket.next()).await
                else {
                    if heard.elapsed() > Duration::from_secs(60) {
                        return Err(
                            format!("client {client}: nothing for 60 s after seq {last}").into(),
                        );
                    }
                    continue;
                };
                heard = Instant::now();
                let Some(message) = message else {
                    return Err(format!("client {client}: closed after seq {last}").into());
                };
                let Message::Text(text) = message? else {
                    continue;
                };
                let Some(seq) = event_seq(text.as_str()) else {
                    continue;
                };
                if seq != last + 1 {
                    return Err(format!("client {client}: seq {seq} after {last}").into());
                }
                last = seq;
                positions[client].store(seq, Ordering::Relaxed);
            }
            // Still connected, live, until memory is measured.
            Ok::<_, Error>((started.elapsed(), socket))
        });
    }

    // Creates every 50 ms until every resuming client has caught up with what was
    // stored before the storm; memory sampled as it goes.
    let mut sent_at = Vec::new();
    let mut peak_sampled = idle;
    let caught_up = |positions: &[AtomicU64]| {
        positions
            .iter()
            .all(|p| p.load(Ordering::Relaxed) >= stored)
    };
    while !caught_up(&positions) {
        if started.elapsed() > Duration::from_secs(1800) {
            return Err("the resuming clients had not caught up after 30 minutes".into());
        }
        if let Some(ended) = resuming.try_join_next() {
            ended??;
            return Err("a resuming client ended before the others caught up".into());
        }
        let body = create_body(&format!("storm-{}", sent_at.len()));
        sent_at.push(Instant::now());
        let response = client.post_json(SENSORS_PATH, &body).await?;
        if response.status != 201 {
            return Err(format!("create answered {}", response.status).into());
        }
        peak_sampled = peak_sampled.max(daemon.rss_kib()?);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = get_json(&mut client, "/healthz").await?["storage"]["last_seq"]
        .as_u64()
        .ok_or("no storage.last_seq")?;
    target.store(last, Ordering::Relaxed);
    let mut slowest = Duration::ZERO;
    let mut live = Vec::new();
    while let Some(done) = resuming.join_next().await {
        let (took, socket) = done??;
        slowest = slowest.max(took);
        live.push(socket);
    }
    let peak = daemon.peak_rss_kib()?;
    // The daemon gives freed memory back to the system every 10 s.
    let settle = sizes.idle_wait + Duration::from_secs(10);
    tokio::time::sleep(settle).await;
    let settled = daemon.rss_kib()?;
    drop(live);
    tokio::time::sleep(settle).await;
    let left = daemon.rss_kib()?;

    let mut latencies = Vec::new();
    while let Ok((_, event, at)) = deliveries.try_recv() {
        latencies.push(at - sent_at[event]);
    }
    let missing = sent_at.len() - latencies.len();
    drop(listeners);
    stop(daemon)?;
    let latency = Summary::of(latencies).ok_or("the live client got no event")?;
    let name = format!(
        "Resume storm, {clients} clients from since=0 over {} events",
        thousands(stored)
    );
    Ok(vec![
        Row::new(
            &name,
            format!(
                "peak RSS {} (sampled {}), idle before {}, {} after with the {clients} clients live, {} once they left, every client caught up in {:.1} s, each got all {} events once, in order",
                mib(peak),
                mib(peak_sampled),
                mib(idle),
                mib(settled),
                mib(left),
                slowest.as_secs_f64(),
                thousands(last),
            ),
            "peak ≤ 64 MiB, after ≤ 1.5 × idle",
        ),
        Row::new(
            &name,
            format!(
                "live client: p50 {}, p99 {}, max {} over {} events; {missing} missing",
                ms(latency.p50),
                ms(latency.p99),
                ms(latency.max),
                sent_at.len()
            ),
            "p99 ≤ 50 ms",
        ),
    ])
}

/// The `seq` of an entity or system event frame (its last field), `None` for anything
/// else (greetings, answers).
fn event_seq(frame: &str) -> Option<u64> {
    let at = frame.rfind(r#""seq":"#)? + r#""seq":"#.len();
    frame[at..].trim_end_matches('}').parse().ok()
}

// ---------------------------------------------------------------------------------------
// 7. Size

fn binary_size() -> Result<Vec<Row>, Error> {
    let path = daemon_binary();
    let bytes = std::fs::metadata(&path)?.len();
    // The bench profile inherits the release profile, which strips; a smoke pass under
    // `cargo test` sizes the debug build instead.
    let what = if path.components().any(|c| c.as_os_str() == "release") {
        "Size of the release binary (stripped)"
    } else {
        "Size of the debug binary (smoke pass)"
    };
    Ok(vec![Row::new(
        what,
        format!("{} ({} bytes)", mib(bytes / 1024), thousands(bytes)),
        "—",
    )])
}
