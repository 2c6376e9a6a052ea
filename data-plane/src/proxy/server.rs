//! The accept loop of one listener, and each connection's protocol: the
//! listener's codec, or for `AUTO` the first bytes (an HTTP/2 connection
//! preface means h2c with prior knowledge, anything else HTTP/1.1).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::handler::Conn;
use super::quiet::Quiet;
use super::{h2, http1, ListenerRuntime};
use crate::config::listener::Codec;
use crate::h2::frame::PREFACE;
use crate::snapshot::Shared;

pub(super) async fn serve(
    sock: std::net::TcpListener,
    runtime: Arc<ArcSwap<ListenerRuntime>>,
    shared: Arc<Shared>,
    mut drain: watch::Receiver<bool>,
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
    // Every connection holds a receiver of `alive`: when all are gone,
    // `closed` resolves and the drain is over.
    let (alive, alive_rx) = watch::channel(());
    // Fires when the drain timeout ends, closing what is still open.
    let (kill, killed) = watch::channel(false);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.changed() => break,
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
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn {
            shared: shared.clone(),
            listener: runtime.clone(),
            peer,
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
        let drain = drain.clone();
        stats.downstream_cx_total.fetch_add(1, Relaxed);
        stats.downstream_cx_active.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let _alive = alive;
            tokio::select! {
                _ = connection(stream, conn, drain) => {}
                _ = killed => {}
            }
            stats.downstream_cx_active.fetch_sub(1, Relaxed);
        });
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
