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
use crate::config::listener::{ListenSocket, ListenerConfig, LogTarget, SocketStage};
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
    /// How its sockets were set up (another setup binds anew).
    socket: ListenSocket,
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
            let reuse = self
                .running
                .get(name)
                .is_some_and(|r| r.addr == l.address && r.socket == l.socket);
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
            let sock = bind_all(l.address, &l.socket, self.workers.0.len()).map_err(|e| {
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
            .filter(|(n, r)| {
                snap.listeners
                    .get(*n)
                    .is_none_or(|l| l.address != r.addr || l.socket != r.socket)
            })
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
                None => match bind_all(l.address, &l.socket, self.workers.0.len()) {
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
                    socket: l.socket.clone(),
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
fn bind_all(
    addr: SocketAddr,
    setup: &ListenSocket,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    (0..n.max(1)).map(|_| bind(addr, setup)).collect()
}

fn bind(addr: SocketAddr, setup: &ListenSocket) -> std::io::Result<std::net::TcpListener> {
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
    if let Some(k) = &setup.keepalive {
        k.apply(socket2::SockRef::from(&sock))?;
    }
    set_options(&sock, setup, SocketStage::Prebind)?;
    sock.bind(addr)?;
    set_options(&sock, setup, SocketStage::Bound)?;
    let l = sock.listen(setup.backlog.unwrap_or(4096))?;
    set_options(&l, setup, SocketStage::Listening)?;
    l.into_std()
}

/// Sets the listener's raw socket options of `stage` on `sock`; an error
/// names the option.
fn set_options(
    sock: &impl std::os::fd::AsRawFd,
    setup: &ListenSocket,
    stage: SocketStage,
) -> std::io::Result<()> {
    for o in setup.options.iter().filter(|o| o.stage == stage) {
        // SAFETY: a live socket; the value's pointer and length describe
        // its own bytes, which the kernel only reads.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                o.level,
                o.name,
                o.value.as_ptr().cast(),
                o.value.len() as libc::socklen_t,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "socket option {:?} (level {}, name {}): {e}",
                    o.description, o.level, o.name
                ),
            ));
        }
    }
    Ok(())
}

/// An int socket option of `fd` (tests read what was set).
#[cfg(test)]
pub(crate) fn int_sockopt(fd: &impl std::os::fd::AsRawFd, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a live socket, and an int-sized buffer for an int option.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    assert_eq!(r, 0, "getsockopt");
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::listener::SocketOption;
    use crate::config::Keepalive;
    use std::time::Duration;

    use super::int_sockopt as opt;

    /// Through real sockets: a listener's raw socket options and TCP
    /// keep-alive are set on its socket (keep-alive is inherited by the
    /// connections it accepts); an option the kernel refuses fails the
    /// bind with the option named.
    #[tokio::test]
    async fn listener_sockets_take_their_options() {
        let setup = ListenSocket {
            options: vec![SocketOption {
                description: "tos".into(),
                level: libc::IPPROTO_IP,
                name: libc::IP_TOS,
                value: 0x10i32.to_ne_bytes().to_vec(),
                stage: SocketStage::Prebind,
            }],
            keepalive: Some(Keepalive {
                idle: Some(Duration::from_secs(77)),
                interval: None,
                probes: Some(3),
            }),
            backlog: Some(16),
        };
        let l = bind("127.0.0.1:0".parse().unwrap(), &setup).expect("bound");
        assert_eq!(opt(&l, libc::IPPROTO_IP, libc::IP_TOS), 0x10);
        l.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert_eq!(opt(&accepted, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(opt(&accepted, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 77);
        assert_eq!(opt(&accepted, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        // Without them: no keep-alive.
        let plain = bind("127.0.0.1:0".parse().unwrap(), &ListenSocket::default()).unwrap();
        assert_eq!(opt(&plain, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);

        let bad = ListenSocket {
            options: vec![SocketOption {
                description: "made up".into(),
                level: libc::SOL_SOCKET,
                name: 99_999,
                value: 1i32.to_ne_bytes().to_vec(),
                stage: SocketStage::Listening,
            }],
            ..ListenSocket::default()
        };
        let e = bind("127.0.0.1:0".parse().unwrap(), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("socket option \"made up\" (level 1, name 99999)"),
            "{e}"
        );
    }
}
