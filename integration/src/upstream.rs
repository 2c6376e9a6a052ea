//! Real upstream servers for data-plane tests: HTTP/1.1 and h2c on one
//! port, gRPC (trailers, streaming echo) and WebSocket (101, then echo).
//!
//! Paths (after any prefix): `/status/N` answers N; `/slow/MS` answers after MS ms
//! (a gRPC echo too);
//! `/bytes/N` answers N bytes;
//! `/reset` closes the connection without answering; `/flaky/KEY/N`
//! answers 503 the first N times for KEY, then 200; `/healthz` answers
//! 200 unless the server was told to fail health checks. Every answer
//! carries `x-upstream: NAME` (and `server: V` when the request has
//! `x-answer-server: V`) and echoes the request line and headers as
//! `METHOD PATH` on the first body line, then `name: value` lines.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A running upstream.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// Make `/healthz` fail.
    pub unhealthy: Arc<AtomicBool>,
    /// Make every request answer 500.
    pub failing: Arc<AtomicBool>,
    /// Every request seen: `METHOD PATH HOST CONTENT-LENGTH` (`-` for
    /// what is missing).
    pub seen: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

type Body = BoxBody<Bytes, Infallible>;

struct Ctx {
    name: String,
    unhealthy: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
    flaky: Mutex<HashMap<String, u32>>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    /// Starts one on an ephemeral loopback port.
    pub fn start(name: &str) -> Upstream {
        let (rt, listener, addr) = crate::loopback_server();
        let ctx = Arc::new(Ctx {
            name: name.to_string(),
            unhealthy: Arc::new(AtomicBool::new(false)),
            failing: Arc::new(AtomicBool::new(false)),
            flaky: Mutex::new(HashMap::new()),
            seen: Arc::new(Mutex::new(Vec::new())),
        });
        let (unhealthy, failing, seen) =
            (ctx.unhealthy.clone(), ctx.failing.clone(), ctx.seen.clone());
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(ctx.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            unhealthy,
            failing,
            seen,
            _rt: rt,
        }
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

async fn handle(
    ctx: Arc<Ctx>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let path = req.uri().path().to_string();
    {
        let h = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let host = h("host")
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or("-".into());
        let line = format!(
            "{} {} {host} {}",
            req.method(),
            req.uri().path_and_query().map_or("/", |p| p.as_str()),
            h("content-length").unwrap_or("-".into())
        );
        ctx.seen.lock().expect("lock").push(line);
    }
    let mut echo = format!(
        "{} {}\n",
        req.method(),
        req.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    for (k, v) in req.headers() {
        echo.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    // `x-answer-server: V` asks for a `server: V` on the answer, and
    // `x-answer-header-bytes: N` for an `x-big` field of N bytes.
    let server = req.headers().get("x-answer-server").cloned();
    let big = req
        .headers()
        .get("x-answer-header-bytes")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .map(|n| http::HeaderValue::from_str(&"b".repeat(n)).expect("a header value"));
    let reply = |status: u16, body: Body| {
        let mut r = Response::builder()
            .status(status)
            .header("x-upstream", ctx.name.as_str())
            .body(body)
            .expect("response");
        if let Some(v) = &server {
            r.headers_mut().insert("server", v.clone());
        }
        if let Some(v) = &big {
            r.headers_mut().insert("x-big", v.clone());
        }
        r
    };
    if req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    {
        // gRPC echo: every message frame goes back as it arrives, then
        // trailers with grpc-status 0; `/slow/MS` in the path holds the
        // answer's head back that long.
        let mut words = path.split('/').skip_while(|w| *w != "slow").skip(1);
        if let Some(ms) = words.next().and_then(|w| w.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
        let mut body = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    if tx.send(Ok(Frame::data(d))).await.is_err() {
                        return;
                    }
                }
            }
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().expect("v"));
            t.insert("grpc-message", "ok".parse().expect("v"));
            let _ = tx.send(Ok(Frame::trailers(t))).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut r = reply(200, StreamBody::new(stream).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().expect("v"));
        return Ok(r);
    }
    // Any protocol asked for is granted (WebSocket or another), and then
    // echoed.
    if let Some(kind) = req.headers().get("upgrade").cloned() {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = reply(101, full(Bytes::new()));
        r.headers_mut()
            .insert("connection", "upgrade".parse().expect("v"));
        r.headers_mut().insert("upgrade", kind);
        return Ok(r);
    }
    if ctx.failing.load(Ordering::Relaxed) && path != "/healthz" {
        return Ok(reply(500, full("failing\n")));
    }
    // The keyword may come after a gateway prefix (`/api/slow/100`).
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let at = parts
        .iter()
        .position(|p| {
            matches!(
                *p,
                "healthz"
                    | "status"
                    | "slow"
                    | "reset"
                    | "flaky"
                    | "sluggish"
                    | "limited"
                    | "bytes"
            )
        })
        .unwrap_or(0);
    match &parts[at..] {
        ["healthz"] => {
            let code = if ctx.unhealthy.load(Ordering::Relaxed) {
                500
            } else {
                200
            };
            Ok(reply(code, full("health\n")))
        }
        ["status", n] => Ok(reply(n.parse().unwrap_or(500), full(echo))),
        ["slow", ms] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
            Ok(reply(200, full(echo)))
        }
        ["reset"] => Err(std::io::Error::other("reset on purpose")),
        // The first `n` requests of `key` are told 429 and to come back
        // in `secs` (`retry-after`), the rest answered (the echo).
        ["limited", key, n, secs] => {
            let limited = {
                let mut f = ctx.flaky.lock().expect("lock");
                let seen = f.entry(key.to_string()).or_insert(0);
                *seen += 1;
                *seen <= n.parse().unwrap_or(0)
            };
            let mut r = reply(if limited { 429 } else { 200 }, full(echo));
            if limited {
                r.headers_mut()
                    .insert("retry-after", secs.parse().expect("a header value"));
            }
            Ok(r)
        }
        // The first `n` requests of `key` take `ms` to answer, the rest
        // answer at once (the echo).
        ["sluggish", key, n, ms] => {
            let slow = {
                let mut f = ctx.flaky.lock().expect("lock");
                let seen = f.entry(key.to_string()).or_insert(0);
                *seen += 1;
                *seen <= n.parse().unwrap_or(0)
            };
            if slow {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
            }
            Ok(reply(200, full(echo)))
        }
        ["bytes", n] => Ok(reply(200, full(vec![b'x'; n.parse().unwrap_or(0)]))),
        ["flaky", key, n] => {
            let fail = {
                let mut f = ctx.flaky.lock().expect("lock");
                let seen = f.entry(key.to_string()).or_insert(0);
                *seen += 1;
                *seen <= n.parse().unwrap_or(0)
            };
            // The whole request first: answering early and closing on an
            // unread body resets the connection, and the reset can beat
            // the answer (a race of its own, not the one tested here).
            let _ = req.into_body().collect().await;
            Ok(reply(if fail { 503 } else { 200 }, full(echo)))
        }
        _ => {
            let collected = req.into_body().collect().await.ok();
            let trailers = collected.as_ref().and_then(|c| c.trailers().cloned());
            let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
            echo.push('\n');
            let mut out = echo.into_bytes();
            out.extend_from_slice(&body);
            // Request trailers, when there were any, after the body.
            for (k, v) in trailers.iter().flatten() {
                out.extend_from_slice(
                    format!("\ntrailer {k}: {}", v.to_str().unwrap_or("?")).as_bytes(),
                );
            }
            Ok(reply(200, full(out)))
        }
    }
}
