//! The accept loop of one listener, and each connection's protocol: the
//! listener's codec, or for `AUTO` the first bytes (an HTTP/2 connection
//! preface means h2c with prior knowledge, anything else HTTP/1.1).

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::handler::Conn;
use super::quiet::Quiet;
use super::{h2, http1, ListenerRuntime};
use crate::config::listener::Codec;
use crate::h2::frame::PREFACE;
use crate::snapshot::Shared;

/// A connection handed from one worker to another.
type Handed = (std::net::TcpStream, SocketAddr);

/// Evens out a listener's connections between its workers. The kernel
/// spreads connections over the workers' `SO_REUSEPORT` sockets by a hash
/// of their addresses, which leaves one worker with more of a few dozen
/// long-lived connections than the other, and its requests wait longer.
/// A worker that accepts a connection while it has more open than the
/// least loaded one hands it over (once per connection: nothing is
/// shared on the request path).
pub(super) struct Balance {
    /// Open connections per worker.
    open: Vec<AtomicUsize>,
    /// Each worker's inbox.
    inbox: Vec<mpsc::UnboundedSender<Handed>>,
}

impl Balance {
    /// A balance for `n` workers, and their inboxes' receiving ends.
    pub(super) fn new(n: usize) -> (Arc<Balance>, Vec<mpsc::UnboundedReceiver<Handed>>) {
        let (tx, rx) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let open = (0..n).map(|_| AtomicUsize::new(0)).collect();
        (Arc::new(Balance { open, inbox: tx }), rx)
    }

    /// The worker a connection accepted by worker `me` should go to.
    fn pick(&self, me: usize) -> usize {
        let mine = self.open[me].load(Relaxed);
        let (least, n) = self
            .open
            .iter()
            .enumerate()
            .map(|(i, o)| (i, o.load(Relaxed)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, mine));
        if n < mine {
            least
        } else {
            me
        }
    }
}

/// One worker's accept loop for a listener; `me` is the worker's index in
/// `balance`, `inbox` where other workers hand it connections.
pub(super) async fn serve(
    sock: std::net::TcpListener,
    runtime: Arc<ArcSwap<ListenerRuntime>>,
    shared: Arc<Shared>,
    drains: Drains,
    balance: Arc<Balance>,
    me: usize,
    mut inbox: mpsc::UnboundedReceiver<Handed>,
) {
    let listener = match sock
        .set_nonblocking(true)
        .and_then(|_| TcpListener::from_std(sock))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    let Drains {
        listener: mut drain,
        process: mut shutdown,
    } = drains;
    // What the connections watch: set when this loop stops accepting,
    // whichever drain stopped it.
    let (drain_conns, conn_drain) = watch::channel(false);
    // Every connection holds a receiver of `alive`: when all are gone,
    // `closed` resolves and the drain is over.
    let (alive, alive_rx) = watch::channel(());
    // Fires when the drain timeout ends, closing what is still open.
    let (kill, killed) = watch::channel(false);
    let mut backoff = Duration::from_millis(5);
    let start = |stream: TcpStream, peer: SocketAddr| {
        let _ = stream.set_nodelay(true);
        // The local address costs a system call: only for access logs.
        let local = if runtime.load().sinks.is_empty() {
            None
        } else {
            stream.local_addr().ok()
        };
        let conn = Arc::new(Conn {
            shared: shared.clone(),
            listener: runtime.clone(),
            peer,
            local,
            peer_ip: http::HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or(http::HeaderValue::from_static("unknown")),
        });
        let stats = shared.stats.clone();
        // Polled only when it fires, not each time the connection wakes.
        let mut killed = killed.clone();
        let killed = Quiet::new(Box::pin(async move {
            let _ = killed.changed().await;
        }));
        let alive = alive_rx.clone();
        let drain = conn_drain.clone();
        let balance = balance.clone();
        stats.downstream_cx_active.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let _alive = alive;
            tokio::select! {
                _ = connection(stream, conn, drain) => {}
                _ = killed => {}
            }
            stats.downstream_cx_active.fetch_sub(1, Relaxed);
            balance.open[me].fetch_sub(1, Relaxed);
        });
    };
    // A connection handed over (or back), already counted in `open` for
    // this worker: registered with this worker's poller and served.
    let adopt = |s: std::net::TcpStream, peer: SocketAddr| match TcpStream::from_std(s) {
        Ok(s) => start(s, peer),
        Err(e) => {
            balance.open[me].fetch_sub(1, Relaxed);
            tracing::warn!(error = %e, "cannot take over a connection");
        }
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some((s, peer)) = inbox.recv() => {
                adopt(s, peer);
                continue;
            }
            _ = drain.changed() => break,
            _ = shutdown.wait_for(|on| *on) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(5);
                x
            }
            Err(e) => {
                // Out of file descriptors and the like: wait and retry
                // rather than spin or give up the listener.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        shared.stats.downstream_cx_total.fetch_add(1, Relaxed);
        if let Some(m) = &runtime.load().config.chain_match {
            let local = if m.needs_local() {
                stream.local_addr().ok()
            } else {
                None
            };
            if !m.matches(local, peer) {
                // Envoy's answer when no filter chain matches: close.
                shared.stats.no_filter_chain_match.fetch_add(1, Relaxed);
                tracing::debug!(%peer, "no filter chain matches the connection");
                continue;
            }
        }
        let to = balance.pick(me);
        balance.open[to].fetch_add(1, Relaxed);
        if to == me {
            start(stream, peer);
            continue;
        }
        // Leaves this worker's poller, to be registered with the other's.
        match stream.into_std() {
            Ok(s) => {
                if let Err(mpsc::error::SendError((s, peer))) = balance.inbox[to].send((s, peer)) {
                    // That worker is gone (draining): serve it here.
                    balance.open[to].fetch_sub(1, Relaxed);
                    balance.open[me].fetch_add(1, Relaxed);
                    adopt(s, peer);
                }
            }
            Err(e) => {
                balance.open[to].fetch_sub(1, Relaxed);
                tracing::warn!(error = %e, "cannot hand over a connection");
            }
        }
    }
    drain_conns.send_replace(true);
    // Connections handed over just before the drain are served too.
    inbox.close();
    while let Ok((s, peer)) = inbox.try_recv() {
        adopt(s, peer);
    }
    // Draining: no new connections; open ones finish their requests
    // (HTTP/1.1 answers with `Connection: close`, HTTP/2 gets a GOAWAY),
    // bounded by the listener's drain timeout.
    drop(listener);
    drop(alive_rx);
    let timeout = runtime.load().config.drain_timeout;
    if tokio::time::timeout(timeout, alive.closed()).await.is_err() {
        tracing::info!("drain timeout reached; closing remaining connections");
    }
    let _ = kill.send(true);
    // Only now: the process exits once every accept loop let go of this.
    drop(shutdown);
}

/// When a connection drains: its listener's drain, or the HCM's
/// `max_connection_duration` passing (`aged_at`). Resolves to whether it
/// was the age.
pub(super) async fn drain_or_age(
    mut drain: watch::Receiver<bool>,
    aged_at: Option<tokio::time::Instant>,
) -> bool {
    match aged_at {
        None => {
            let _ = drain.changed().await;
            false
        }
        Some(at) => tokio::select! {
            _ = drain.changed() => false,
            () = tokio::time::sleep_until(at) => true,
        },
    }
}

/// When a connection opened now reaches the listener's age limit.
pub(super) fn aged_at(conn: &Conn) -> Option<tokio::time::Instant> {
    let listener = conn.listener.load();
    let c = &listener.config;
    c.max_connection_duration.map(|d| {
        // (Drawn per connection: `max_connection_duration_jitter`.)
        let jitter = match c.max_connection_jitter {
            j if j > 0.0 => d.mul_f64(j * fastrand::f64()),
            _ => Duration::ZERO,
        };
        tokio::time::Instant::now() + d + jitter
    })
}

/// What makes an accept loop stop and drain: its listener's removal, or
/// the process's shutdown.
pub(super) struct Drains {
    /// Set (or dropped) when the listener is removed or moves.
    pub(super) listener: watch::Receiver<bool>,
    /// The process's [`crate::shutdown::Shutdown`].
    pub(super) process: watch::Receiver<bool>,
}

/// Serves one connection in the protocol its listener or its first bytes
/// call for.
async fn connection(io: TcpStream, conn: Arc<Conn>, mut drain: watch::Receiver<bool>) {
    let (codec, header_timeout, idle_timeout) = {
        let lr = conn.listener.load();
        let c = &lr.config;
        (c.codec, c.request_headers_timeout, c.idle_timeout)
    };
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let h2 = match codec {
        Codec::Http1 => false,
        Codec::Http2 => true,
        Codec::Auto => {
            // The first bytes may take as long as an idle keep-alive
            // connection may; the rest of a preface is due within the
            // header timeout.
            let idle = async {
                match idle_timeout {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let first = tokio::select! {
                r = http1::fill(&io, &mut buf) => r,
                _ = drain.changed() => return,
                _ = idle => return,
            };
            if !matches!(first, Ok(n) if n > 0) {
                return;
            }
            let deadline = tokio::time::Instant::now() + header_timeout;
            loop {
                let n = buf.len().min(PREFACE.len());
                if buf[..n] != PREFACE[..n] {
                    break false;
                }
                if n == PREFACE.len() {
                    break true;
                }
                match tokio::time::timeout_at(deadline, http1::fill(&io, &mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
            }
        }
    };
    if !h2 {
        return http1::serve(io, buf, conn, drain).await;
    }
    h2::serve(io, buf, conn, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_loaded_worker_only_when_uneven() {
        let (b, _rx) = Balance::new(3);
        assert_eq!(b.pick(1), 1, "even: kept");
        b.open[1].store(2, Relaxed);
        b.open[0].store(2, Relaxed);
        b.open[2].store(1, Relaxed);
        assert_eq!(b.pick(1), 2, "more than the least loaded: handed over");
        assert_eq!(b.pick(2), 2, "the least loaded keeps its own");
        b.open[2].store(2, Relaxed);
        assert_eq!(b.pick(0), 0, "even again: kept");
    }
}
