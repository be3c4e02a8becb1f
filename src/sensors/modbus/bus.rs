//! The bus owner: one thread per serial port or TCP connection, owning it alone and
//! serving the requests of every sensor on it one at a time, in the order they come.
//!
//! An RS-485 line is half-duplex: a second request sent before the first is answered
//! garbles both. Sensors therefore never touch the port; each hands its whole sampling
//! (every request for its unit) to the bus as one job and waits for the answers. A job
//! never takes longer than its requests x tries x timeout, so a device that stops
//! answering delays the others by that much, never indefinitely.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_serial::{SerialPort, SerialPortBuilderExt};

use super::registers::{Answer, Function, Request};
use super::{Line, Link, Parity};
use crate::backoff::Backoff;
use crate::sensors::SensorError;

/// One sampling of one sensor: every request for its unit, with its timing.
pub struct Job {
    pub unit: u8,
    pub requests: Vec<Request>,
    pub timeout: Duration,
    /// Further tries of a request that timed out or came back garbled.
    pub retries: u8,
    /// Quiet time before each request, on top of the line's inter-frame gap.
    pub pause_between: Duration,
    pub reply: SyncSender<Result<Vec<Answer>, SensorError>>,
}

/// What a sensor holds of its bus: where to send jobs and whether the port is there.
pub struct BusHandle {
    jobs: SyncSender<Job>,
    connected: Arc<AtomicBool>,
    link: Link,
}

impl BusHandle {
    /// Queues a job; refused only when the queue is full, which one job per sensor
    /// never makes it.
    pub fn submit(&self, job: Job) -> Result<(), SensorError> {
        self.jobs
            .try_send(job)
            .map_err(|_| SensorError::Io("modbus bus queue full or bus stopped".into()))
    }

    /// Whether the port is open (or the TCP connection up).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Jobs a bus holds at most: far more than sensors on one bus.
const QUEUE: usize = 256;

/// Counters of one bus, kept for the life of the process so that `/metrics` counters
/// only grow, even when the bus is closed and opened again.
#[derive(Default)]
pub struct BusStats {
    requests: AtomicU64,
    busy_micros: AtomicU64,
    connected: AtomicBool,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl BusStats {
    fn error(&self, kind: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default() += 1;
    }
}

/// A snapshot of one bus's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct BusLoad {
    /// The port path, or `tcp://host:port`.
    pub bus: String,
    pub requests: u64,
    /// Time the bus spent waiting for answers.
    pub busy_seconds: f64,
    pub connected: bool,
    /// Failed requests by kind.
    pub errors: BTreeMap<&'static str, u64>,
}

struct Registered {
    handle: Weak<BusHandle>,
    stats: Arc<BusStats>,
}

/// Every bus of the process by port, so that sensors naming the same port share one.
static BUSES: Mutex<Option<HashMap<String, Registered>>> = Mutex::new(None);

/// The load of every bus this process has opened, by name.
pub fn loads() -> Vec<BusLoad> {
    let buses = BUSES.lock().unwrap_or_else(|e| e.into_inner());
    let mut loads: Vec<BusLoad> = buses
        .iter()
        .flatten()
        .map(|(name, r)| BusLoad {
            bus: name.clone(),
            requests: r.stats.requests.load(Ordering::Relaxed),
            busy_seconds: r.stats.busy_micros.load(Ordering::Relaxed) as f64 / 1e6,
            connected: r.stats.connected.load(Ordering::Relaxed),
            errors: r
                .stats
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        })
        .collect();
    loads.sort_by(|a, b| a.bus.cmp(&b.bus));
    loads
}

/// The bus of `link`, started if no sensor uses it yet. Sensors that name the same port
/// with other line settings are refused: one port has one speed.
pub fn bus_for(link: &Link) -> Result<Arc<BusHandle>, String> {
    let name = link.name();
    let mut buses = BUSES.lock().unwrap_or_else(|e| e.into_inner());
    let buses = buses.get_or_insert_with(HashMap::new);
    if let Some(handle) = buses.get(&name).and_then(|r| r.handle.upgrade()) {
        if handle.link != *link {
            return Err(format!(
                "{name} is already used with other settings ({}); every sensor on a bus needs the same ones",
                handle.link.describe()
            ));
        }
        return Ok(handle);
    }
    let stats = buses
        .get(&name)
        .map(|r| r.stats.clone())
        .unwrap_or_default();
    let (jobs, queue) = mpsc::sync_channel(QUEUE);
    let connected = Arc::new(AtomicBool::new(false));
    let owner = Owner {
        link: link.clone(),
        connection: None,
        connected: connected.clone(),
        stats: stats.clone(),
        last_frame: None,
        retry_at: None,
        backoff: RECONNECT,
        lost_because: String::new(),
    };
    std::thread::Builder::new()
        .name(format!(
            "modbus-{}",
            name.rsplit('/').next().unwrap_or("bus")
        ))
        .spawn(move || owner.run(queue))
        .map_err(|e| format!("cannot start the thread of bus {name}: {e}"))?;
    let handle = Arc::new(BusHandle {
        jobs,
        connected,
        link: link.clone(),
    });
    buses.insert(
        name,
        Registered {
            handle: Arc::downgrade(&handle),
            stats,
        },
    );
    Ok(handle)
}

/// A replugged USB adapter is usually back within a second; one gone for good costs an
/// open every 30 s (as the serial source does).
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// Counts the bytes read from a serial port since the last request, so that a request
/// that timed out can tell silence (timeout) from an answer that never decoded (a bad CRC
/// or a broken frame: tokio-modbus skips such bytes and goes on waiting).
struct Tap<T> {
    inner: T,
    received: Arc<AtomicUsize>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.received.fetch_add(read, Ordering::Relaxed);
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Tap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

pub(super) struct Connection {
    pub(super) context: Context,
    /// Bytes received since the last request; `None` over TCP, where framing errors
    /// surface as errors.
    pub(super) received: Option<Arc<AtomicUsize>>,
}

/// The thread that owns one port.
struct Owner {
    link: Link,
    connection: Option<Connection>,
    connected: Arc<AtomicBool>,
    stats: Arc<BusStats>,
    /// When the last answer (or timeout) ended: the line must stay quiet for the
    /// inter-frame gap after it.
    last_frame: Option<Instant>,
    /// While the port is away: when to try opening it again.
    retry_at: Option<Instant>,
    backoff: Backoff,
    lost_because: String,
}

/// How one request ended.
enum Failure {
    /// Answered with an exception: not retried, the device will say the same again.
    Exception(ExceptionCode),
    /// Silence or a garbled answer: tried again, on a fresh connection.
    Retry(SensorError),
    /// The port or connection is gone.
    Lost(String),
}

impl Owner {
    fn run(mut self, queue: Receiver<Job>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                log::error!("modbus {}: cannot start: {e}", self.link.name());
                return;
            }
        };
        // Ends when every sensor of the bus has dropped its handle.
        while let Ok(job) = queue.recv() {
            let outcome = runtime.block_on(self.serve(&job));
            let _ = job.reply.send(outcome);
        }
        self.set_connected(false);
        log::info!("modbus {}: no sensor left, closed", self.link.name());
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        self.stats.connected.store(connected, Ordering::Relaxed);
    }

    async fn serve(&mut self, job: &Job) -> Result<Vec<Answer>, SensorError> {
        let mut answers = Vec::with_capacity(job.requests.len());
        for request in &job.requests {
            let mut tries = 0;
            let values = loop {
                tries += 1;
                match self.attempt(job, request).await {
                    Ok(values) => break values,
                    Err(Failure::Exception(code)) => {
                        let error = exception_error(code, request);
                        self.stats.error(error.kind());
                        return Err(error);
                    }
                    Err(Failure::Lost(why)) => return Err(SensorError::PortLost(why)),
                    Err(Failure::Retry(error)) => {
                        self.stats.error(error.kind());
                        // A late answer must not be taken for the next one: start over
                        // on a fresh port or connection.
                        self.connection = None;
                        if tries > usize::from(job.retries) {
                            return Err(error);
                        }
                    }
                }
            };
            answers.push(Answer {
                request: *request,
                values,
            });
        }
        Ok(answers)
    }

    /// Opens the port when needed, waits for a quiet line, sends one request and waits
    /// for its answer.
    async fn attempt(&mut self, job: &Job, request: &Request) -> Result<Vec<u16>, Failure> {
        if self.connection.is_none() {
            self.connect().await?;
        }
        let gap = self.link.inter_frame_gap().max(job.pause_between);
        if let Some(last) = self.last_frame {
            tokio::time::sleep_until(last + gap).await;
        }
        let Some(connection) = self.connection.as_mut() else {
            return Err(Failure::Lost(self.lost_because.clone()));
        };
        connection.context.set_slave(Slave(job.unit));
        if let Some(received) = &connection.received {
            received.store(0, Ordering::Relaxed);
        }
        let started = Instant::now();
        let outcome =
            tokio::time::timeout(job.timeout, call(&mut connection.context, request)).await;
        let now = Instant::now();
        self.last_frame = Some(now);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats
            .busy_micros
            .fetch_add((now - started).as_micros() as u64, Ordering::Relaxed);
        match outcome {
            Ok(Ok(Ok(values))) if values.len() >= usize::from(request.count) => Ok(values),
            Ok(Ok(Ok(values))) => Err(Failure::Retry(SensorError::Malformed(format!(
                "{} values answered for {} asked",
                values.len(),
                request.count
            )))),
            Ok(Ok(Err(code))) => Err(Failure::Exception(code)),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                Err(Failure::Retry(SensorError::Malformed(e.to_string())))
            }
            Ok(Err(tokio_modbus::Error::Transport(e)))
                if e.kind() == io::ErrorKind::InvalidData =>
            {
                // tokio-modbus gave up resynchronising on garbage.
                Err(Failure::Retry(SensorError::Checksum))
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                self.lose(format!("{}: {e}", self.link.name()));
                Err(Failure::Lost(self.lost_because.clone()))
            }
            Err(_) => {
                let garbled = connection
                    .received
                    .as_ref()
                    .is_some_and(|r| r.load(Ordering::Relaxed) > 0);
                Err(Failure::Retry(if garbled {
                    SensorError::Checksum
                } else {
                    SensorError::Timeout
                }))
            }
        }
    }

    /// The port or connection is gone: counted once per loss, not per job refused while
    /// it stays away.
    fn lose(&mut self, why: String) {
        if self.retry_at.is_none() {
            self.stats.error("port_lost");
        }
        self.connection = None;
        self.set_connected(false);
        self.retry_at = Some(Instant::now() + self.backoff.next_delay());
        self.lost_because = why;
    }

    async fn connect(&mut self) -> Result<(), Failure> {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(Failure::Lost(self.lost_because.clone()));
        }
        match open(&self.link).await {
            Ok(connection) => {
                if !self.connected.load(Ordering::Relaxed) {
                    log::info!("modbus {}: open", self.link.name());
                }
                self.connection = Some(connection);
                self.set_connected(true);
                self.retry_at = None;
                self.backoff.reset();
                self.last_frame = None;
                tokio::time::sleep(self.link.pause_after_connect).await;
                Ok(())
            }
            Err(e) => {
                self.lose(format!("{}: {e}", self.link.name()));
                Err(Failure::Lost(self.lost_because.clone()))
            }
        }
    }
}

/// Opens the serial line or TCP connection of a bus.
pub(super) async fn open(link: &Link) -> io::Result<Connection> {
    match &link.line {
        Line::Serial {
            path,
            baud,
            parity,
            data_bits,
            stop_bits,
        } => open_serial(path, *baud, *parity, *data_bits, *stop_bits),
        Line::Tcp { address } => open_tcp(address, Duration::from_secs(3)).await,
    }
}

fn open_serial(
    path: &str,
    baud: u32,
    parity: Parity,
    data_bits: u8,
    stop_bits: u8,
) -> io::Result<Connection> {
    let builder = tokio_serial::new(path, baud)
        .parity(match parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .data_bits(match data_bits {
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        })
        .stop_bits(match stop_bits {
            2 => tokio_serial::StopBits::Two,
            _ => tokio_serial::StopBits::One,
        });
    let port = builder.open_native_async().map_err(io::Error::from)?;
    // Whatever arrived while nobody listened belongs to no request of ours.
    let _ = port.clear(tokio_serial::ClearBuffer::All);
    let received = Arc::new(AtomicUsize::new(0));
    let tap = Tap {
        inner: port,
        received: received.clone(),
    };
    Ok(Connection {
        context: tokio_modbus::client::rtu::attach_slave(tap, Slave(1)),
        received: Some(received),
    })
}

async fn open_tcp(address: &str, within: Duration) -> io::Result<Connection> {
    let stream = tokio::time::timeout(within, tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(Connection {
        context: tokio_modbus::client::tcp::attach_slave(stream, Slave(1)),
        received: None,
    })
}

pub(super) async fn call(
    context: &mut Context,
    request: &Request,
) -> tokio_modbus::Result<Vec<u16>> {
    let bits = |r: tokio_modbus::Result<Vec<bool>>| {
        r.map(|r| r.map(|bits| bits.into_iter().map(u16::from).collect()))
    };
    match request.function {
        Function::Holding => {
            context
                .read_holding_registers(request.address, request.count)
                .await
        }
        Function::Input => {
            context
                .read_input_registers(request.address, request.count)
                .await
        }
        Function::Coil => bits(context.read_coils(request.address, request.count).await),
        Function::Discrete => bits(
            context
                .read_discrete_inputs(request.address, request.count)
                .await,
        ),
    }
}

/// The exception as a failure with its name, for `salud`.
fn exception_error(code: ExceptionCode, request: &Request) -> SensorError {
    SensorError::Exception {
        code: u8::from(code),
        detail: format!(
            "{:?} {} to {}",
            request.function,
            request.address,
            u32::from(request.address) + u32::from(request.count) - 1
        ),
    }
}
