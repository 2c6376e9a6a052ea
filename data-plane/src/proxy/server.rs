//! The accept loop and connection serving for one listener.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::framing::{Scanned, Verdict};
use super::handler::{handle, Conn};
use super::ListenerRuntime;
use crate::config::listener::Codec;
use crate::snapshot::Shared;

pub(super) async fn serve(
    sock: std::net::TcpListener,
    runtime: Arc<ArcSwap<ListenerRuntime>>,
    shared: Arc<Shared>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    {
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
        let graceful = GracefulShutdown::new();
        // Fires when the drain timeout ends, closing what is still open.
        let (kill, killed) = tokio::sync::watch::channel(false);
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
            let rt = runtime.load();
            let cfg = &rt.config;
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(cfg.request_headers_timeout)
                .max_buf_size(cfg.max_request_headers.max(8192))
                .keep_alive(true);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(cfg.max_request_headers as u32);
            let builder = match cfg.codec {
                Codec::Auto => builder,
                Codec::Http1 => builder.http1_only(),
                Codec::Http2 => builder.http2_only(),
            };
            let framing = Arc::new(Verdict::default());
            let conn = Arc::new(Conn {
                shared: shared.clone(),
                listener: runtime.clone(),
                peer,
                peer_ip: http::HeaderValue::from_str(&peer.ip().to_string())
                    .unwrap_or(http::HeaderValue::from_static("unknown")),
                framing: framing.clone(),
                requests: AtomicU32::new(0),
            });
            let stats = shared.stats.clone();
            let mut killed = killed.clone();
            stats.downstream_cx_total.fetch_add(1, Relaxed);
            stats.downstream_cx_active.fetch_add(1, Relaxed);
            let service = service_fn(move |req| handle(conn.clone(), req));
            let served = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(Scanned::new(stream, framing)),
                    service,
                )
                .into_owned();
            let served = graceful.watch(served);
            tokio::spawn(async move {
                tokio::select! {
                    r = served => if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    },
                    _ = killed.changed() => {}
                }
                stats.downstream_cx_active.fetch_sub(1, Relaxed);
            });
        }
        // Draining: no new connections; open ones finish their requests
        // (HTTP/1.1 gets `Connection: close`, HTTP/2 a GOAWAY), bounded by
        // the listener's drain timeout.
        drop(listener);
        let timeout = runtime.load().config.drain_timeout;
        if tokio::time::timeout(timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::info!("drain timeout reached; closing remaining connections");
        }
        let _ = kill.send(true);
    }
}
