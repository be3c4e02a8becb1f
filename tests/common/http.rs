//! The one HTTP/1.1 client of the tests and the load benchmark: keep-alive, bodies framed
//! by Content-Length, chunked or the end of the connection, an optional bearer token.
//! Written by hand so that what goes on the wire is exactly what the test says.

#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long [`Client::call`] waits for an answer.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A response: status, headers (names in lower case) and whole body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body parsed as JSON; `Null` when it is empty or not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The value of header `name` (lower case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One keep-alive connection, opened on first use and again after the server closes it
/// or an exchange fails.
pub struct Client {
    addr: SocketAddr,
    token: Option<String>,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    framing: Framing,
    close: bool,
}

impl Client {
    /// A client of `addr` that sends no token.
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            token: None,
            stream: None,
            buf: Vec::with_capacity(8192),
        }
    }

    /// The same client, sending `token` as a bearer token with every request.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token;
        self
    }

    /// Opens the connection now, so that timing does not include the handshake.
    pub async fn connect(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        Ok(())
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> io::Result<Response> {
        self.request("GET", path, &[], None).await
    }

    /// `POST path` with a JSON `body`.
    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> io::Result<Response> {
        self.request("POST", path, &[], Some(body)).await
    }

    /// `PUT path` with a JSON `body`.
    pub async fn put_json(&mut self, path: &str, body: &[u8]) -> io::Result<Response> {
        self.request("PUT", path, &[], Some(body)).await
    }

    /// One exchange with extra `headers`; a body is sent as JSON.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        if let Some(token) = &self.token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        let result = self.exchange(&bytes, method == "HEAD").await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    /// Sends `request` and reads its response, which has no body if `no_body`.
    async fn exchange(&mut self, request: &[u8], no_body: bool) -> io::Result<Response> {
        self.connect().await?;
        let Client { stream, buf, .. } = self;
        let stream = stream.as_mut().expect("connected above");
        stream.write_all(request).await?;

        let head_len = loop {
            if let Some(at) = find(buf, b"\r\n\r\n") {
                break at + 4;
            }
            fill(stream, buf).await?;
        };
        let head = parse_head(&buf[..head_len], no_body)?;
        let (body, used) = match head.framing {
            Framing::Empty => (Vec::new(), head_len),
            Framing::Length(n) => {
                while buf.len() < head_len + n {
                    fill(stream, buf).await?;
                }
                (buf[head_len..head_len + n].to_vec(), head_len + n)
            }
            Framing::Chunked => loop {
                if let Some((body, used)) = dechunk(&buf[head_len..])? {
                    break (body, head_len + used);
                }
                fill(stream, buf).await?;
            },
            Framing::UntilClose => {
                while fill(stream, buf).await.is_ok() {}
                (buf[head_len..].to_vec(), buf.len())
            }
        };
        buf.drain(..used);
        if head.close || matches!(head.framing, Framing::UntilClose) {
            self.stream = None;
        }
        Ok(Response {
            status: head.status,
            headers: head.headers,
            body,
        })
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.reserve(8192);
    if stream.read_buf(buf).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn parse_head(head: &[u8], no_body: bool) -> io::Result<Head> {
    let text = std::str::from_utf8(head).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("malformed status line"))?;
    let mut close = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(bad("not an HTTP/1.x response")),
    };
    let mut headers = Vec::new();
    let mut length = None;
    let mut chunked = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("malformed header"))?;
        let (name, value) = (name.to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| bad("bad Content-Length"))?,
            );
        } else if name == "transfer-encoding" {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name == "connection" {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                close = true;
            } else if value.contains("keep-alive") {
                close = false;
            }
        }
        headers.push((name, value.to_owned()));
    }
    let framing = if no_body || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(Head {
        status,
        headers,
        framing,
        close,
    })
}

/// Decodes a chunked body if all of it is in `data`: the body and the bytes used.
fn dechunk(data: &[u8]) -> io::Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_len) = find(&data[at..], b"\r\n") else {
            return Ok(None);
        };
        let line =
            std::str::from_utf8(&data[at..at + line_len]).map_err(|_| bad("bad chunk size"))?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
        at += line_len + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(len) = find(&data[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += len + 2;
                if len == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if data.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[at..at + size]);
        at += size + 2;
    }
}

/// The calls the tests make most, each checked to succeed; for tests, which panic on
/// what they do not expect.
impl Client {
    /// One exchange with a JSON body (or none); status and the answer as JSON.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let exchange = self.request(method, path, &[], body.map(str::as_bytes));
        let response = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer in time"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (response.status, response.json())
    }

    /// Creates a DHT22 sensor of `tipo`; returns its id.
    pub async fn create_sensor(&mut self, tipo: &str) -> i64 {
        let body = format!(r#"{{"tipo": "{tipo}", "modelo": "DHT22"}}"#);
        let (status, sensor) = self.call("POST", "/api/v1/sensores/", Some(&body)).await;
        assert_eq!(status, 201, "{sensor}");
        sensor["id"].as_i64().unwrap()
    }

    /// Creates `count` DHT22 sensors of `temperatura`; returns their ids.
    pub async fn create_sensors(&mut self, count: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(self.create_sensor("temperatura").await);
        }
        ids
    }

    /// Posts a reading in the unit the daemon knows for `tipo`; returns the stored reading.
    pub async fn reading(&mut self, sensor_id: i64, tipo: &str, valor: f64) -> serde_json::Value {
        let body = format!(r#"{{"sensor_id": {sensor_id}, "tipo": "{tipo}", "valor": {valor}}}"#);
        let (status, reading) = self.call("POST", "/api/v1/lecturas/", Some(&body)).await;
        assert_eq!(status, 201, "{reading}");
        reading
    }

    /// A PUT that must succeed; returns the answer.
    pub async fn put(&mut self, path: &str, body: &str) -> serde_json::Value {
        let (status, answer) = self.call("PUT", path, Some(body)).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }
}
