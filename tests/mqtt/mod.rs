//! MQTT for the uplink tests: a broker (a small in-process one, or the one named by
//! `SENSORGATE_TEST_BROKER=host:port`, e.g. Mosquitto), a link between the daemon and
//! the broker that a test can cut and restore, and a subscribing client.
//!
//! The in-process broker speaks the MQTT 3.1.1 that the uplink and the test client use:
//! CONNECT with will and login, PUBLISH at QoS 0 and 1 with PUBACK, retained messages (an
//! empty one deletes), SUBSCRIBE with wildcards, PINGREQ, DISCONNECT. It delivers to
//! subscribers at QoS 0, which over loopback loses nothing.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::tokio_rustls::{rustls, TlsAcceptor};
use rumqttc::{
    matches, AsyncClient, ConnAck, ConnectReturnCode, Event, MqttOptions, Packet, PubAck, Publish,
    QoS, SubAck, SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const MAX_PACKET: usize = 1024 * 1024;

/// The broker the tests run against.
pub struct Broker {
    pub addr: SocketAddr,
    /// The in-process broker, when no external one is named.
    local: Option<LocalBroker>,
}

impl Broker {
    /// `SENSORGATE_TEST_BROKER` if set, otherwise a new in-process broker on loopback.
    pub async fn start() -> Broker {
        match std::env::var("SENSORGATE_TEST_BROKER") {
            Ok(addr) if !addr.is_empty() => Broker {
                addr: addr
                    .parse()
                    .expect("SENSORGATE_TEST_BROKER is host:port with an IP address"),
                local: None,
            },
            _ => {
                let local = LocalBroker::start().await;
                Broker {
                    addr: local.addr,
                    local: Some(local),
                }
            }
        }
    }
}

/// A message as a subscriber received it.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub at: Instant,
}

impl Message {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {:?}", self.topic, self.text()))
    }
}

/// A client subscribed to some topic filters, collecting what arrives.
pub struct Subscriber {
    messages: mpsc::UnboundedReceiver<Message>,
    task: JoinHandle<()>,
}

static CLIENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Subscriber {
    /// Connects to `addr` and subscribes to `filters` at QoS 1; returns once the broker
    /// confirmed the subscription (retained messages may already be on their way).
    pub async fn start(addr: SocketAddr, filters: &[&str]) -> Subscriber {
        let n = CLIENTS.fetch_add(1, Ordering::Relaxed);
        let id = format!("test-sub-{}-{n}", std::process::id());
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        for filter in filters {
            client.subscribe(*filter, QoS::AtLeastOnce).await.unwrap();
        }
        let (tx, messages) = mpsc::unbounded_channel();
        let mut acks = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while acks < filters.len() {
            let event = tokio::time::timeout_at(deadline, eventloop.poll())
                .await
                .expect("subscription confirmed in time")
                .expect("subscriber connects");
            match event {
                Event::Incoming(Packet::SubAck(_)) => acks += 1,
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(message(p));
                }
                _ => {}
            }
        }
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(message(p)).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("test subscriber lost its broker: {e}"),
                }
            }
        });
        Subscriber { messages, task }
    }

    /// The next message, or `None` if none arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Message> {
        tokio::time::timeout(wait, self.messages.recv())
            .await
            .ok()
            .flatten()
    }

    /// Messages until one matches `done` (included); panics after `wait`.
    pub async fn until(
        &mut self,
        wait: Duration,
        mut done: impl FnMut(&Message) -> bool,
    ) -> Vec<Message> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        loop {
            let message = tokio::time::timeout_at(deadline, self.messages.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "expected message did not arrive within {wait:?}; got {} others, the last: {:?}",
                        got.len(),
                        got.last().map(|m: &Message| (m.topic.clone(), m.text()))
                    )
                })
                .expect("subscriber runs");
            let stop = done(&message);
            got.push(message);
            if stop {
                return got;
            }
        }
    }

    /// Everything that arrives until nothing has for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Message> {
        let mut got = Vec::new();
        while let Some(m) = self.next_within(quiet).await {
            got.push(m);
        }
        got
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn message(p: Publish) -> Message {
    Message {
        topic: p.topic,
        payload: p.payload,
        retain: p.retain,
        at: Instant::now(),
    }
}

/// A TCP route from the daemon to the broker that the test can cut, as a broker that
/// goes away looks to the daemon: connections reset, new ones refused. The cut is clean:
/// first bytes towards the broker are held back (and later dropped), then acknowledgements
/// already on their way back get a moment to arrive, then everything closes. So nothing
/// the broker took goes unacknowledged, and a test can expect every message exactly once.
/// (A real broker can die between taking a message and acknowledging it; then QoS 1
/// delivers that one twice, with the same `seq`.)
pub struct Link {
    pub addr: SocketAddr,
    target: SocketAddr,
    /// Set when the daemon's side of the link speaks TLS.
    tls: Option<TlsAcceptor>,
    up: Option<LinkUp>,
}

struct LinkUp {
    accept: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    flow: Arc<Flow>,
}

/// Shared by a link's connections.
struct Flow {
    /// Set when the link is being cut: bytes towards the broker are dropped.
    hold: AtomicBool,
    /// When bytes last went towards the daemon.
    last_down: Mutex<Instant>,
}

impl Link {
    /// A link on a new loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Link {
            addr,
            target,
            tls: None,
            up: Some(LinkUp::serve(listener, target, None)),
        }
    }

    /// A link whose daemon side is TLS, with a certificate for `127.0.0.1` and
    /// `localhost` from a new CA; returns the link and the CA certificate (PEM).
    pub async fn start_tls(target: SocketAddr) -> (Link, String) {
        let (ca, chain, key) = certificates();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("test certificate is usable");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let link = Link {
            addr,
            target,
            tls: Some(acceptor.clone()),
            up: Some(LinkUp::serve(listener, target, Some(acceptor))),
        };
        (link, ca)
    }

    /// Cuts the link: the broker is gone as far as the daemon can tell.
    pub async fn cut(&mut self) {
        let up = self.up.take().expect("link is up");
        up.flow.hold.store(true, Ordering::SeqCst);
        // Acknowledgements of what the broker took are on their way back: wait until the
        // line towards the daemon has been quiet a while (the daemon sends nothing the
        // broker answers meanwhile), however slow a loaded machine is.
        let held = Instant::now();
        let quiet = Duration::from_millis(500);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let last_down = *up.flow.last_down.lock().unwrap();
            if (held.elapsed() >= quiet && last_down.elapsed() >= quiet)
                || held.elapsed() > Duration::from_secs(10)
            {
                break;
            }
        }
        up.accept.abort();
        let _ = up.accept.await;
        let connections: Vec<_> = std::mem::take(&mut *up.connections.lock().unwrap());
        for c in connections {
            c.abort();
            let _ = c.await;
        }
    }

    /// Lets the daemon reach the broker again, on the same port.
    pub async fn restore(&mut self) {
        assert!(self.up.is_none(), "link is up already");
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("link port free again");
        self.up = Some(LinkUp::serve(listener, self.target, self.tls.clone()));
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(up) = self.up.take() {
            up.accept.abort();
            for c in up.connections.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }
}

impl LinkUp {
    fn serve(listener: TcpListener, target: SocketAddr, tls: Option<TlsAcceptor>) -> LinkUp {
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let flow = Arc::new(Flow {
            hold: AtomicBool::new(false),
            last_down: Mutex::new(Instant::now()),
        });
        let accept = {
            let connections = connections.clone();
            let flow = flow.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let flow = flow.clone();
                    let tls = tls.clone();
                    let pump = tokio::spawn(async move {
                        match tls {
                            None => forward(client, target, flow).await,
                            Some(acceptor) => {
                                // A client that refuses the certificate ends here.
                                if let Ok(client) = acceptor.accept(client).await {
                                    forward(client, target, flow).await;
                                }
                            }
                        }
                    });
                    connections.lock().unwrap().push(pump);
                }
            })
        };
        LinkUp {
            accept,
            connections,
            flow,
        }
    }
}

/// Copies both ways between `client` and a new connection to `target`; while the link is
/// held, bytes towards `target` are read and dropped (read, so that closing the socket
/// later is an orderly close, not a reset that could discard what the daemon has yet to
/// read).
async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
    client: S,
    target: SocketAddr,
    flow: Arc<Flow>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = server.into_split();
    let up = relay(client_read, server_write, || {
        !flow.hold.load(Ordering::SeqCst)
    });
    let down = relay(server_read, client_write, || {
        *flow.last_down.lock().unwrap() = Instant::now();
        true
    });
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies from `from` to `to` until either side closes; a chunk is passed on only when
/// `pass` says so, and read all the same otherwise.
async fn relay<R, W>(mut from: R, mut to: W, mut pass: impl FnMut() -> bool)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !pass() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            break;
        }
    }
}

/// A new CA (its certificate as PEM) and a server certificate chain and key it signed,
/// for `127.0.0.1` and `localhost`.
pub fn certificates() -> (
    String,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "sensorgate test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (
        ca.pem(),
        vec![server.der().clone(), ca.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// The in-process broker.
struct LocalBroker {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct Shared {
    retained: BTreeMap<String, Publish>,
    /// Subscriptions: connection id, filter, where to send.
    subscriptions: Vec<(u64, String, mpsc::UnboundedSender<Publish>)>,
    next_id: u64,
}

impl Shared {
    fn route(&mut self, publish: &Publish) {
        if publish.retain {
            if publish.payload.is_empty() {
                self.retained.remove(&publish.topic);
            } else {
                self.retained.insert(publish.topic.clone(), publish.clone());
            }
        }
        let mut out = publish.clone();
        // Delivered to current subscribers without the retain flag, as MQTT 3.1.1 says.
        out.retain = false;
        out.qos = QoS::AtMostOnce;
        out.pkid = 0;
        out.dup = false;
        let mut sent_to = Vec::new();
        for (conn, filter, tx) in &self.subscriptions {
            if !sent_to.contains(conn) && matches(&publish.topic, filter) {
                sent_to.push(*conn);
                let _ = tx.send(out.clone());
            }
        }
    }
}

impl LocalBroker {
    async fn start() -> LocalBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared: Arc<Mutex<Shared>> = Arc::default();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                connections.spawn(serve(stream, shared));
            }
        });
        LocalBroker { addr, task }
    }
}

/// One client connection of the in-process broker.
async fn serve(mut stream: TcpStream, shared: Arc<Mutex<Shared>>) {
    let id = {
        let mut s = shared.lock().unwrap();
        s.next_id += 1;
        s.next_id
    };
    let (tx, mut outgoing) = mpsc::unbounded_channel::<Publish>();
    let mut input = BytesMut::with_capacity(4096);
    let mut will = None;
    let mut clean = false;
    let mut connected = false;
    loop {
        let packet = loop {
            match Packet::read(&mut input, MAX_PACKET) {
                Ok(packet) => break Some(packet),
                Err(rumqttc::Error::InsufficientBytes(_)) => {}
                Err(_) => break None,
            }
            tokio::select! {
                read = stream.read_buf(&mut input) => match read {
                    Ok(0) | Err(_) => break None,
                    Ok(_) => {}
                },
                Some(publish) = outgoing.recv() => {
                    if write(&mut stream, Packet::Publish(publish)).await.is_err() {
                        break None;
                    }
                }
            }
        };
        let Some(packet) = packet else { break };
        let answer = match packet {
            Packet::Connect(connect) if !connected => {
                connected = true;
                will = connect.last_will;
                Some(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::Success,
                    false,
                )))
            }
            Packet::Publish(publish) if connected => {
                let ack = (publish.qos == QoS::AtLeastOnce)
                    .then(|| Packet::PubAck(PubAck::new(publish.pkid)));
                shared.lock().unwrap().route(&publish);
                ack
            }
            Packet::Subscribe(subscribe) if connected => {
                let mut codes = Vec::new();
                let mut retained = Vec::new();
                {
                    let mut s = shared.lock().unwrap();
                    for filter in &subscribe.filters {
                        s.subscriptions.push((id, filter.path.clone(), tx.clone()));
                        codes.push(SubscribeReasonCode::Success(QoS::AtLeastOnce));
                        retained.extend(
                            s.retained
                                .values()
                                .filter(|p| matches(&p.topic, &filter.path))
                                .cloned(),
                        );
                    }
                }
                if write(
                    &mut stream,
                    Packet::SubAck(SubAck::new(subscribe.pkid, codes)),
                )
                .await
                .is_err()
                {
                    break;
                }
                for mut p in retained {
                    p.retain = true;
                    p.qos = QoS::AtMostOnce;
                    p.pkid = 0;
                    if write(&mut stream, Packet::Publish(p)).await.is_err() {
                        break;
                    }
                }
                None
            }
            Packet::PingReq => Some(Packet::PingResp),
            Packet::Disconnect => {
                clean = true;
                break;
            }
            _ => None,
        };
        if let Some(answer) = answer {
            if write(&mut stream, answer).await.is_err() {
                break;
            }
        }
    }
    let mut s = shared.lock().unwrap();
    s.subscriptions.retain(|(conn, _, _)| *conn != id);
    if let (false, Some(will)) = (clean, will) {
        let mut publish = Publish::new(will.topic, will.qos, will.message.to_vec());
        publish.retain = will.retain;
        s.route(&publish);
    }
}

async fn write(stream: &mut TcpStream, packet: Packet) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, MAX_PACKET)
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    stream.write_all(&out).await
}
