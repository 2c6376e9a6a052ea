//! Access logs: JSON lines with the fields of Envoy's default format plus
//! the route and cluster names, or the listener's own format (Envoy's
//! `log_format`: see [`format`]). Lines are formatted on the worker and written
//! by one thread per target, so a slow disk never blocks a request; when
//! the writer falls behind, lines are dropped and counted.

use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::listener::LogTarget;
use crate::stats::Stats;

pub mod filter;
pub mod format;

pub use filter::LogFilter;
pub use format::LogFormat;

/// One request's log record (Envoy's default format fields).
#[derive(Debug, Default, Serialize)]
pub struct Record {
    /// Request start, RFC 3339 with milliseconds.
    pub start_time: String,
    /// `:method`.
    pub method: String,
    /// Original path (before rewrites).
    pub path: String,
    /// HTTP/1.1 or HTTP/2.
    pub protocol: &'static str,
    /// Status sent downstream.
    pub response_code: u16,
    /// Envoy's response flags (NR, UH, UF, UT, URX, UO, UC, DC, ...).
    pub response_flags: String,
    /// Request body bytes received (when known).
    pub bytes_received: u64,
    /// Response body bytes sent.
    pub bytes_sent: u64,
    /// Total duration, ms.
    pub duration: u64,
    /// Time to upstream response headers, ms.
    pub upstream_service_time: Option<u64>,
    /// Whether the answer carried it as `x-envoy-upstream-service-time`
    /// (what `%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%` reads; not when the
    /// router suppresses its headers).
    #[serde(skip)]
    pub upstream_service_time_sent: bool,
    /// `x-forwarded-for` as the connection manager left it (with the
    /// client appended, at the edge).
    pub x_forwarded_for: Option<String>,
    /// `user-agent`.
    pub user_agent: Option<String>,
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// `:authority`.
    pub authority: String,
    /// Endpoint that answered.
    pub upstream_host: Option<String>,
    /// Route name.
    pub route_name: String,
    /// Cluster name.
    pub upstream_cluster: String,
    /// The trusted client address: the connection's peer, or the address
    /// x-forwarded-for names when the listener reads it from there.
    pub downstream_remote_address: String,
    /// The connection's peer.
    #[serde(skip)]
    pub downstream_direct_remote_address: String,
    /// The request headers the listener's formats log.
    #[serde(skip)]
    pub headers: Vec<(http::HeaderName, Option<String>)>,
    /// The response headers the listener's formats log.
    #[serde(skip)]
    pub response_headers: Vec<(http::HeaderName, Option<String>)>,
    /// Request start, for formats with a time format of their own.
    #[serde(skip)]
    pub started: Option<std::time::SystemTime>,
    /// The address the client connected to (known when a format of the
    /// listener may want it).
    #[serde(skip)]
    pub downstream_local_address: Option<std::net::SocketAddr>,
    /// Why the response is what it is, in Envoy's words (`via_upstream`,
    /// `route_not_found`, ...).
    #[serde(skip)]
    pub response_code_details: &'static str,
    /// This side's address on the upstream connection (only when a
    /// format asks).
    #[serde(skip)]
    pub upstream_local_address: Option<std::net::SocketAddr>,
    /// Why the last connection attempt to an upstream failed.
    #[serde(skip)]
    pub upstream_transport_failure_reason: Option<String>,
    /// The request's headers, kept only for a log filter that matches on
    /// them.
    #[serde(skip)]
    pub filter_headers: Option<Box<http::HeaderMap>>,
    /// Whether the request was a gRPC call (`content-type: application/grpc`).
    #[serde(skip)]
    pub grpc_request: bool,
    /// The answer's `grpc-status`, from its trailers or (trailers-only) its
    /// head.
    #[serde(skip)]
    pub grpc_status: Option<u32>,
    /// The text of the proxy's own answer, when it made one.
    #[serde(skip)]
    pub local_reply_body: Option<String>,
    /// Keep the response's trailers (a format logs them).
    #[serde(skip)]
    pub keep_trailers: bool,
    /// The response's trailers, when kept.
    #[serde(skip)]
    pub trailers: Option<Box<http::HeaderMap>>,
}

impl Record {
    /// The call's gRPC status as Envoy finds it: the answer's
    /// `grpc-status`, else inferred from the HTTP status.
    pub fn grpc_status_or_inferred(&self) -> u32 {
        self.grpc_status
            .unwrap_or_else(|| grpc_status_for_http(self.response_code))
    }
}

/// The gRPC status for an HTTP status (gRPC's HTTP-to-gRPC mapping, as
/// Envoy applies it).
pub fn grpc_status_for_http(status: u16) -> u32 {
    match status {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// The values of `names` in `h`, as a record keeps them for its formats
/// (`None` where a header is missing or not text).
pub fn logged_headers(
    names: &[http::HeaderName],
    h: &http::HeaderMap,
) -> Vec<(http::HeaderName, Option<String>)> {
    names
        .iter()
        .map(|n| {
            let v = h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
            (n.clone(), v)
        })
        .collect()
}

/// A `grpc-status` field's value.
pub fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    std::str::from_utf8(h.get("grpc-status")?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

/// Writers by target, shared by every listener logging there.
#[derive(Default)]
pub struct AccessLogs {
    writers: Mutex<HashMap<LogTarget, SyncSender<Vec<u8>>>>,
}

/// A handle to one target's writer, with the format lines get there.
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<Vec<u8>>,
    /// `None`: the default JSON fields.
    format: Option<Arc<LogFormat>>,
    /// Which requests get a line (`None`: all).
    filter: Option<Arc<LogFilter>>,
}

impl AccessLogs {
    /// The sink for a target, starting its writer on first use.
    pub fn sink(&self, target: &LogTarget) -> std::io::Result<Sink> {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = w.get(target) {
            return Ok(Sink {
                tx: tx.clone(),
                format: None,
                filter: None,
            });
        }
        let mut out: Box<dyn Write + Send> = match target {
            LogTarget::Stdout => Box::new(std::io::stdout()),
            LogTarget::Stderr => Box::new(std::io::stderr()),
            LogTarget::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = sync_channel::<Vec<u8>>(8192);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Ok(line) = rx.recv() {
                    buf.extend_from_slice(&line);
                    while let Ok(more) = rx.try_recv() {
                        buf.extend_from_slice(&more);
                        if buf.len() > 60 * 1024 {
                            break;
                        }
                    }
                    if out.write_all(&buf).and_then(|_| out.flush()).is_err() {
                        return;
                    }
                    buf.clear();
                }
            })?;
        w.insert(target.clone(), tx.clone());
        Ok(Sink {
            tx,
            format: None,
            filter: None,
        })
    }
}

impl Sink {
    /// This sink with lines in `format` (`None`: the default JSON).
    pub fn formatted(mut self, format: Option<Arc<LogFormat>>) -> Sink {
        self.format = format;
        self
    }

    /// This sink writing only the lines `filter` admits.
    pub fn filtered(mut self, filter: Option<Arc<LogFilter>>) -> Sink {
        self.filter = filter;
        self
    }

    /// Formats and queues one record, if the sink's filter admits it.
    pub fn write(&self, r: &Record, stats: &Arc<Stats>) {
        if self.filter.as_ref().is_some_and(|f| !f.admits(r)) {
            return;
        }
        let line = match &self.format {
            Some(f) => f.render(r),
            None => {
                let mut line = Vec::with_capacity(384);
                if serde_json::to_writer(&mut line, r).is_err() {
                    return;
                }
                line.push(b'\n');
                line
            }
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            stats
                .access_log_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
