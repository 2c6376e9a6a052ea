//! The local admin listener (Envoy's admin endpoints), on a thread of its
//! own so that reading stats never takes time from the workers: `/ready`,
//! `/stats` (`stats.rs`), `/config_dump`, `/clusters`, `/listeners`
//! and `POST /drain_listeners`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::snapshot::Shared;

mod stats;

use stats::{Format, Query};

/// Binds the admin address and serves it on a new thread; returns the
/// bound address (the port may have been 0).
pub fn start(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin runtime failed");
                    return;
                }
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                    return;
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let shared = shared.clone();
                            async move { Ok::<_, std::convert::Infallible>(route(&shared, &req)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        })?;
    Ok(bound)
}

fn text(status: StatusCode, body: String, ctype: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    r
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/ready" => {
            if shared.shutdown.is_draining() {
                // Envoy's state name: load balancers stop sending here.
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "DRAINING\n".into(),
                    "text/plain",
                )
            } else if shared.ready.load(Relaxed) {
                text(StatusCode::OK, "LIVE\n".into(), "text/plain")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "PRE_INITIALIZING\n".into(),
                    "text/plain",
                )
            }
        }
        p @ ("/stats" | "/stats/prometheus") => {
            let default = if p == "/stats" {
                Format::Text
            } else {
                Format::Prometheus
            };
            match Query::parse(req.uri().query(), default) {
                Ok(q) => {
                    let (body, ctype) = stats::render(shared, &q);
                    text(StatusCode::OK, body, ctype)
                }
                Err(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n"), "text/plain"),
            }
        }
        "/drain_listeners" => {
            if req.method() != Method::POST {
                return text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("Method {} not allowed, POST required.\n", req.method()),
                    "text/plain",
                );
            }
            // Envoy's: every listener stops accepting and drains; the
            // process keeps running (a SIGTERM then exits once they are done).
            shared.shutdown.begin();
            text(StatusCode::OK, "OK\n".into(), "text/plain")
        }
        "/config_dump" => {
            let snap = shared.snapshot.load();
            let body = serde_json::to_string_pretty(&snap.dump.to_json()).unwrap_or_default();
            release_free_memory();
            text(StatusCode::OK, body, "application/json")
        }
        "/clusters" => text(StatusCode::OK, clusters(shared), "text/plain"),
        "/listeners" => {
            let snap = shared.snapshot.load();
            let mut out = String::new();
            for (n, l) in &snap.listeners {
                let _ = writeln!(out, "{n}::{}", l.address);
            }
            text(StatusCode::OK, out, "text/plain")
        }
        "/" => text(
            StatusCode::OK,
            "/ready /stats /stats/prometheus /config_dump /clusters /listeners; POST /drain_listeners\n"
                .into(),
            "text/plain",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

fn clusters(shared: &Shared) -> String {
    let snap = shared.snapshot.load();
    let mut out = String::new();
    let mut names: Vec<_> = snap.clusters.keys().collect();
    names.sort();
    for n in names {
        let c = &snap.clusters[n];
        let set = c.endpoints.load();
        if set.endpoints.is_empty() {
            let _ = writeln!(out, "{n}::no_endpoints");
        }
        for (e, priority) in set.endpoints.iter().zip(set.priorities()) {
            let (idle, open) = e.pool.describe();
            let _ = writeln!(out, "{n}::{}::health_flags::{}", e.addr, e.health_flags());
            let _ = writeln!(out, "{n}::{}::weight::{}", e.addr, e.weight);
            let _ = writeln!(out, "{n}::{}::priority::{priority}", e.addr);
            let host = e.hostname.as_deref().unwrap_or("");
            let _ = writeln!(out, "{n}::{}::hostname::{host}", e.addr);
            let _ = writeln!(out, "{n}::{}::cx_active::{open}", e.addr);
            let _ = writeln!(out, "{n}::{}::cx_idle::{idle}", e.addr);
            let _ = writeln!(
                out,
                "{n}::{}::rq_active::{}",
                e.addr,
                e.active.load(Relaxed)
            );
        }
    }
    out
}

/// Hands freed heap pages back to the kernel. A config dump decodes a few
/// MB of protobuf descriptors and frees them; glibc would otherwise keep
/// those pages, and the proxy's resident memory would stay that much higher
/// for good after one dump.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }
    // SAFETY: malloc_trim(3) takes a plain integer and only releases free
    // memory of the allocator's own arenas; it has no preconditions.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
