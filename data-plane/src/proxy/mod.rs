//! Listeners and the request path.
//!
//! The listener manager binds, updates and drains listeners as the
//! configuration changes; each accepted connection is served by
//! [`http1`] (Portico's own HTTP/1.1 server) or [`h2`] (its own HTTP/2
//! server, h2c), and each
//! request by [`handler::handle`].

pub mod body;
mod edge;
mod edits;
pub mod h2;
pub mod handler;
mod header_rules;
pub mod http1;
mod max_duration;
mod mirror;
mod path;
mod quiet;
mod server;
mod steering;
pub mod stream_idle;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::access_log::Sink;
use crate::config::listener::{ListenerConfig, LogTarget};
use crate::config::ConfigError;
use crate::snapshot::{Shared, Snapshot};

/// A listener's configuration with what it resolved to at apply time.
pub struct ListenerRuntime {
    /// Its configuration.
    pub config: Arc<ListenerConfig>,
    /// Its access log sinks.
    pub sinks: Vec<Sink>,
    /// The request headers its access log formats write.
    pub log_headers: Vec<http::HeaderName>,
    /// The response headers its access log formats write.
    pub log_response_headers: Vec<http::HeaderName>,
    /// Whether a format writes the upstream connection's local address.
    pub log_upstream_local: bool,
    /// Whether a log filter matches request headers (kept for it).
    pub log_filter_headers: bool,
    /// Whether a format logs response trailers (kept for it).
    pub log_trailers: bool,
}

struct Running {
    addr: SocketAddr,
    runtime: Arc<ArcSwap<ListenerRuntime>>,
    drain: tokio::sync::watch::Sender<bool>,
}

/// The worker threads that serve traffic: one single-threaded runtime
/// each, like nginx's worker processes. Every listener is bound once per
/// worker with `SO_REUSEPORT`, so the kernel spreads connections and a
/// connection lives on one thread from accept to close (no work stealing,
/// no cross-thread wake-ups on the request path).
#[derive(Clone)]
pub struct Workers(pub Vec<tokio::runtime::Handle>);

/// Starts, updates and drains listeners.
pub struct ListenerManager {
    shared: Arc<Shared>,
    workers: Workers,
    /// Access logs every listener writes to, besides its own.
    extra_logs: Vec<LogTarget>,
    running: HashMap<Arc<str>, Running>,
}

impl ListenerManager {
    /// No listeners yet.
    pub fn new(shared: Arc<Shared>, workers: Workers, extra_logs: Vec<LogTarget>) -> Self {
        ListenerManager {
            shared,
            workers,
            extra_logs,
            running: HashMap::new(),
        }
    }

    /// Binds every new listener of `snap` before anything changes, so a
    /// port that cannot be bound rejects the update as a whole.
    pub fn prepare(&self, snap: &Snapshot) -> Result<Prepared, ConfigError> {
        let mut bound = HashMap::new();
        for (name, l) in &snap.listeners {
            let reuse = self.running.get(name).is_some_and(|r| r.addr == l.address);
            // A listener moving to another address binds before the old one
            // closes; one taking over an address another listener held is
            // bound after that one is drained (see apply).
            let held_by_other = self
                .running
                .iter()
                .any(|(n, r)| n != name && r.addr == l.address);
            if reuse || held_by_other {
                continue;
            }
            let sock = bind_all(l.address, self.workers.0.len()).map_err(|e| {
                ConfigError::new(
                    &format!("Listener {name:?}"),
                    format!("cannot listen on {}: {e}", l.address),
                )
            })?;
            bound.insert(name.clone(), sock);
        }
        for l in snap.listeners.values() {
            for t in l
                .access_logs
                .iter()
                .map(|a| &a.target)
                .chain(&self.extra_logs)
            {
                self.shared.access_logs.sink(t).map_err(|e| {
                    ConfigError::new(
                        &format!("Listener {:?} access_log", l.name),
                        format!("cannot open {t:?}: {e}"),
                    )
                })?;
            }
        }
        Ok(Prepared { bound })
    }

    /// Brings running listeners in line with `snap`.
    pub fn apply(&mut self, snap: &Snapshot, mut prepared: Prepared) {
        // Drain removed listeners and those that moved.
        let gone: Vec<Arc<str>> = self
            .running
            .iter()
            .filter(|(n, r)| snap.listeners.get(*n).is_none_or(|l| l.address != r.addr))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            if let Some(r) = self.running.remove(&n) {
                tracing::info!(listener = %n, addr = %r.addr, "draining listener");
                let _ = r.drain.send(true);
            }
        }
        for (name, l) in &snap.listeners {
            let own = l.access_logs.iter().filter_map(|a| {
                let sink = self.shared.access_logs.sink(&a.target).ok()?;
                Some(sink.formatted(a.format.clone()).filtered(a.filter.clone()))
            });
            let extra = self
                .extra_logs
                .iter()
                .filter_map(|t| self.shared.access_logs.sink(t).ok());
            let (mut log_headers, mut log_response_headers) = (Vec::new(), Vec::new());
            for f in l.access_logs.iter().filter_map(|a| a.format.as_ref()) {
                for h in f.request_headers() {
                    if !log_headers.contains(&h) {
                        log_headers.push(h);
                    }
                }
                for h in f.response_headers() {
                    if !log_response_headers.contains(&h) {
                        log_response_headers.push(h);
                    }
                }
            }
            // Local replies read their record too.
            for h in l.local_replies.iter().flat_map(|r| r.request_headers()) {
                if !log_headers.contains(&h) {
                    log_headers.push(h);
                }
            }
            let rt = Arc::new(ListenerRuntime {
                config: l.clone(),
                sinks: own.chain(extra).collect(),
                log_headers,
                log_response_headers,
                log_trailers: l
                    .access_logs
                    .iter()
                    .filter_map(|a| a.format.as_ref())
                    .any(|f| f.wants_trailers()),
                log_filter_headers: l
                    .access_logs
                    .iter()
                    .filter_map(|a| a.filter.as_ref())
                    .any(|f| f.needs_headers()),
                log_upstream_local: l
                    .access_logs
                    .iter()
                    .filter_map(|a| a.format.as_ref())
                    .any(|f| f.wants_upstream_local_address()),
            });
            if let Some(r) = self.running.get(name) {
                r.runtime.store(rt);
                continue;
            }
            let sock = match prepared.bound.remove(name) {
                Some(s) => s,
                None => match bind_all(l.address, self.workers.0.len()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(listener = %name, addr = %l.address, error = %e, "cannot listen");
                        continue;
                    }
                },
            };
            let runtime = Arc::new(ArcSwap::new(rt));
            let (drain, drained) = tokio::sync::watch::channel(false);
            tracing::info!(listener = %name, addr = %l.address, "listening");
            let (balance, inboxes) = server::Balance::new(sock.len());
            let each = sock.into_iter().zip(&self.workers.0).zip(inboxes);
            for (me, ((socket, worker), inbox)) in each.enumerate() {
                worker.spawn(server::serve(
                    socket,
                    runtime.clone(),
                    self.shared.clone(),
                    server::Drains {
                        listener: drained.clone(),
                        process: self.shared.shutdown.watch(),
                    },
                    balance.clone(),
                    me,
                    inbox,
                ));
            }
            self.running.insert(
                name.clone(),
                Running {
                    addr: l.address,
                    runtime,
                    drain,
                },
            );
        }
    }
}

/// Sockets bound for an update that has not been applied yet.
pub struct Prepared {
    bound: HashMap<Arc<str>, Vec<std::net::TcpListener>>,
}

/// One socket per worker on the same address.
fn bind_all(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    (0..n.max(1)).map(|_| bind(addr)).collect()
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    // std's bind does not set SO_REUSEADDR; tokio's does, so a restarted
    // proxy can rebind a port with connections in TIME_WAIT.
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    let l = sock.listen(4096)?;
    l.into_std()
}
