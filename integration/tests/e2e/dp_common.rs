//! Shared set-up for data-plane tests: a control plane, real upstreams and
//! one `portico-dp`, plus plain HTTP/1.1 and h2c clients.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use portico_integration::dataplane::{free_port, DataPlane};
use portico_integration::upstream::Upstream;
use portico_integration::ControlPlane;
use serde_json::{json, Value};

pub use super::xds_sotw::apply;

/// Everything a data-plane test needs.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub cp: ControlPlane,
    pub port: u16,
}

impl Env {
    /// A control plane with `docs` applied (plus the `edge` gateway on a
    /// free port), without a data plane yet.
    pub fn new(docs: impl FnOnce(u16) -> Vec<Value>) -> Env {
        let (dir, cp) = super::fresh();
        let port = free_port();
        let mut all = vec![gateway(port)];
        all.extend(docs(port));
        apply(&cp, &all);
        Env { dir, cp, port }
    }

    /// Service `s` on `ups` (with `service_extra` in its spec) behind Api
    /// `a`, which sends everything under `/a` to it.
    pub fn one_route(ups: &[&Upstream], service_extra: Value) -> Env {
        Env::new(|_| {
            vec![
                service("s", ups, service_extra),
                api(
                    "a",
                    "/a",
                    &[],
                    json!([{"name": "all", "match": {"path": "/"}, "action": {"service": "s"}}]),
                ),
            ]
        })
    }

    /// Starts a data-plane node in group `edge` and waits until it serves.
    pub fn dp(&self, name: &str, extra: &[&str]) -> DataPlane {
        let dp = DataPlane::start(self.dir.path(), name, &self.cp.xds_addr, "edge", extra);
        // Ready means the listener is bound; wait until it answers.
        portico_integration::wait_for(Duration::from_secs(10), || {
            http1(self.port, "GET", "/__ready_probe", "probe", &[], "").ok()
        })
        .expect("listener answers");
        dp
    }
}

pub fn gateway(port: u16) -> Value {
    json!({"apiVersion": "portico.dev/v1", "kind": "Gateway", "metadata": {"name": "edge"},
           "spec": {"nodeGroup": "edge", "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}]}})
}

pub fn service(name: &str, ups: &[&Upstream], extra: Value) -> Value {
    let mut spec = json!({"endpoints": ups.iter().map(|u| json!({"address": "127.0.0.1", "port": u.addr.port()})).collect::<Vec<_>>()});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({"apiVersion": "portico.dev/v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
}

pub fn api(name: &str, base: &str, hostnames: &[&str], routes: Value) -> Value {
    json!({"apiVersion": "portico.dev/v1", "kind": "Api", "metadata": {"name": name},
           "spec": {"version": "v1", "gateways": ["edge"], "hostnames": hostnames, "basePath": base,
                    "lifecycle": {"state": "published"}, "routes": routes}})
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, n: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (raw bytes, so tests see
/// exactly what the proxy sends).
pub fn http1(
    port: u16,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Resp> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    raw(port, req.as_bytes())
}

/// Sends raw bytes, reads until the server closes.
pub fn raw(port: u16, bytes: &[u8]) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(bytes)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    parse(&out)
}

pub fn parse(out: &[u8]) -> std::io::Result<Resp> {
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad response: {:?}", String::from_utf8_lossy(out)),
        )
    };
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&out[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = out[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

/// An h2c (prior knowledge) connection to the gateway, driven by its own
/// task.
pub async fn h2_sender<B>(port: u16) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    tx
}

/// One h2c (prior knowledge) request.
pub async fn h2(
    port: u16,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let mut tx = h2_sender(port).await;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{host}{path}"))
        .version(http::Version::HTTP_2);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tx
        .send_request(
            req.body(Full::new(Bytes::from(body.to_string())))
                .expect("request"),
        )
        .await
        .expect("h2 response");
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A runtime for the async clients inside sync tests.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A raw connection to `port` on loopback whose reads give up after 10 s.
pub fn connect(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// A WebSocket upgrade through the gateway: the socket, after the 101.
pub fn upgrade(port: u16, path: &str) -> std::net::TcpStream {
    let (head, s) = upgrade_to(port, path, "websocket");
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s
}

/// Asks `path` on `port` to upgrade to `protocol`: the answer's head
/// (lowercased) and the connection.
pub fn upgrade_to(port: u16, path: &str, protocol: &str) -> (String, std::net::TcpStream) {
    let mut s = connect(port);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read head");
        head.push(byte[0]);
    }
    (String::from_utf8_lossy(&head).to_ascii_lowercase(), s)
}

/// Sends `msg` through a tunnel to the echoing upstream and reads it back.
pub fn echo(s: &mut std::net::TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write into the tunnel");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo through the tunnel");
    assert_eq!(back, msg);
}
