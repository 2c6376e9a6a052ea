//! Graceful shutdown. On SIGTERM (or Ctrl-C) every listener drains as a
//! removed one does: it stops accepting, HTTP/1.1 connections answer
//! their open request with `Connection: close` and idle ones close,
//! HTTP/2 connections get a GOAWAY and finish their open streams, and
//! what is still open when the listener's drain timeout ends is closed.
//! Meanwhile `/ready` answers 503 `DRAINING`, so a load balancer stops
//! sending new connections. The process exits once every listener is done
//! (or at a second signal).

use tokio::sync::watch;

/// The process-wide drain: begun once, watched by every listener's accept
/// loops, and finished when all of them have ended.
pub struct Shutdown(watch::Sender<bool>);

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown(watch::channel(false).0)
    }
}

impl Shutdown {
    /// Starts draining every listener, running or started later.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// For one accept loop, held until it has drained: [`Shutdown::finished`]
    /// waits for every one of these to be dropped.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }

    /// Completes when no accept loop is left (at once if none ran).
    pub async fn finished(&self) {
        self.0.closed().await;
    }
}
