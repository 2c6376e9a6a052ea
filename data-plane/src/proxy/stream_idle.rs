//! Envoy's stream idle timeout (the HCM's `stream_idle_timeout`, 5 minutes
//! unless set, 0 to turn it off): a request whose stream sees no activity
//! for that long ends. With no response head sent yet, the client gets a
//! 408; after that the stream is reset (HTTP/2) or the connection closed
//! (HTTP/1.1). It bounds upstreams that stall, clients that stop sending
//! their body and clients that stop reading the answer.
//!
//! Activity is counted, not timed: reads and writes bump a counter (a
//! plain store, no clock read), and a coarse tick, a fifth of the timeout
//! and armed once per connection, looks for a change. A stream ends at the
//! [`QUIET_TICKS`]th tick in a row without one: between the timeout and a
//! fifth more after its last activity (its start counts as activity).
//!
//! A route may set its own (Envoy's `RouteAction.idle_timeout`; 0 turns it
//! off for the route): the handler records it in the stream's
//! [`RouteIdle`] once the route is chosen, and from then on the stream
//! needs as many quiet ticks as that timeout spans, rounded up. So a
//! route's timeout is honoured to within one tick (a fifth of the
//! listener's). With the listener's off, a route's still applies (as in
//! Envoy), on a tick of its own: a fifth of the route's timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::quiet::Quiet;

/// Ticks per timeout.
pub(super) const QUIET_TICKS: u32 = 5;

/// The tick's period for a timeout.
pub(super) fn period(timeout: Duration) -> Duration {
    (timeout / QUIET_TICKS).max(Duration::from_millis(1))
}

/// The idle timeout a stream's route set, if any.
#[derive(Debug)]
pub struct RouteIdle(AtomicU64);

/// What [`RouteIdle`] holds when the route set nothing.
const UNSET: u64 = u64::MAX;

/// A stream's idle limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limit {
    /// The listener's.
    Listener,
    /// None: the route turned it off.
    Off,
    /// The route's.
    After(Duration),
}

impl Default for RouteIdle {
    fn default() -> Self {
        RouteIdle(AtomicU64::new(UNSET))
    }
}

impl RouteIdle {
    /// Records the route's idle timeout: `None` turns it off.
    pub fn set(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |d| (d.as_millis() as u64).clamp(1, UNSET - 1));
        self.0.store(ms, Relaxed);
    }

    /// Forgets the route's (a new stream on the same connection).
    pub(super) fn clear(&self) {
        if self.0.load(Relaxed) != UNSET {
            self.0.store(UNSET, Relaxed);
        }
    }

    pub(super) fn limit(&self) -> Limit {
        match self.0.load(Relaxed) {
            UNSET => Limit::Listener,
            0 => Limit::Off,
            ms => Limit::After(Duration::from_millis(ms)),
        }
    }
}

/// Something that carries a stream's [`RouteIdle`] (the connection's
/// activity counter for HTTP/1.1, the stream's waker for HTTP/2): handed
/// to the handler without an allocation of its own.
pub trait HasRouteIdle: Send + Sync {
    /// The stream's slot.
    fn route_idle(&self) -> &RouteIdle;
}

/// Quiet ticks in a row after which a stream with this limit ends
/// (`None`: never).
pub(super) fn ticks_for(limit: Limit, period: Duration) -> Option<u32> {
    match limit {
        Limit::Listener => Some(QUIET_TICKS),
        Limit::Off => None,
        Limit::After(d) => {
            let n = d.as_nanos().div_ceil(period.as_nanos().max(1));
            Some(n.clamp(1, u128::from(u32::MAX / 2)) as u32)
        }
    }
}

/// A stream's activity counter, shared with whoever reads its body, and
/// its route's idle timeout.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress(Arc<ProgressInner>);

#[derive(Debug, Default)]
pub(crate) struct ProgressInner {
    count: AtomicU32,
    route: RouteIdle,
}

impl HasRouteIdle for ProgressInner {
    fn route_idle(&self) -> &RouteIdle {
        &self.route
    }
}

impl Progress {
    /// Records activity. Only the count's change matters, so a plain load
    /// and store does (no locked instruction on the hot path).
    pub(crate) fn bump(&self) {
        let c = &self.0.count;
        c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
    }

    fn get(&self) -> u32 {
        self.0.count.load(Relaxed)
    }

    /// What the stream's route set (see [`RouteIdle`]).
    pub(super) fn route_limit(&self) -> Limit {
        self.0.route.limit()
    }

    /// The slot for the handler, cleared for a new stream.
    pub(super) fn for_stream(&self) -> Arc<dyn HasRouteIdle> {
        self.0.route.clear();
        self.0.clone()
    }
}

/// The stream idle timeout of one HTTP/1.1 connection (one stream at a
/// time).
pub(super) struct Watch {
    period: Duration,
    tick: Quiet<Pin<Box<Sleep>>>,
    /// The count at the last tick, and ticks since it changed.
    seen: u32,
    quiet: u32,
}

impl Watch {
    /// A watch for `timeout`.
    pub(super) fn new(timeout: Duration) -> Watch {
        let period = period(timeout);
        Watch {
            period,
            tick: Quiet::new(Box::pin(tokio::time::sleep(period))),
            seen: 0,
            quiet: 0,
        }
    }

    /// Whether the timeout still matches `timeout` (the listener's config
    /// may change under a live connection).
    pub(super) fn is_for(&self, timeout: Duration) -> bool {
        self.period == period(timeout)
    }

    fn begin(&mut self, progress: &Progress) {
        // Unlike any count: the first tick sees a change (the start).
        self.seen = progress.get().wrapping_sub(1);
        self.quiet = 0;
        if self.tick.get_ref().is_elapsed() {
            // It fired while the connection was idle: count from now.
            let at = Instant::now() + self.period;
            self.tick.get_mut().as_mut().reset(at);
        }
    }

    /// Completes once the stream has been idle for the timeout; never
    /// without a watch. Raced against the handler's future with
    /// `select!`, which holds that (large) future in place: wrapping it in
    /// a combinator would copy it on every request.
    pub(super) async fn expiry(watch: Option<&mut Watch>, progress: &Progress) {
        let Some(w) = watch else {
            // The listener's is off, but the route may set its own. The
            // handler records it before it first waits, and this future
            // is polled right after the handler's in the same `select!`,
            // so no wake-up is needed to see it.
            let timeout = std::future::poll_fn(|_| match progress.route_limit() {
                Limit::After(d) => std::task::Poll::Ready(d),
                _ => std::task::Poll::Pending,
            })
            .await;
            let mut w = Watch::new(timeout);
            w.begin(progress);
            return w.idle_out(progress).await;
        };
        w.begin(progress);
        w.idle_out(progress).await;
    }

    async fn idle_out(&mut self, progress: &Progress) {
        loop {
            (&mut self.tick).await;
            if self.expired(progress) {
                return;
            }
        }
    }

    /// The tick fired: whether the stream has now been idle too long.
    fn expired(&mut self, progress: &Progress) -> bool {
        let at = Instant::now() + self.period;
        self.tick.get_mut().as_mut().reset(at);
        let now = progress.get();
        if now != self.seen {
            self.seen = now;
            self.quiet = 0;
            false
        } else {
            self.quiet += 1;
            ticks_for(progress.0.route.limit(), self.period).is_some_and(|n| self.quiet >= n)
        }
    }
}

/// The error an answer's write ends with when the stream idled out (told
/// apart from the socket's own timeouts by [`is_idle_out`]).
#[derive(Debug, thiserror::Error)]
#[error("stream idle timeout")]
pub(super) struct IdleOut;

/// Whether `e` is the stream idle timeout's.
pub(super) fn is_idle_out(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<IdleOut>())
}

/// The answer's side of a stream: its activity, and the watch consulted
/// only where writing it has to wait (for the upstream's next data or for
/// the client's socket), so that an answer that goes out at once pays
/// nothing for it.
pub(super) struct Activity<'a> {
    /// The stream's activity counter.
    pub(super) progress: &'a Progress,
    watch: Option<&'a mut Watch>,
}

impl<'a> Activity<'a> {
    /// Starts watching the answer (its start counts as activity).
    pub(super) fn new(mut watch: Option<&'a mut Watch>, progress: &'a Progress) -> Self {
        if let Some(w) = watch.as_deref_mut() {
            w.begin(progress);
        }
        Activity { progress, watch }
    }

    /// Waits for `f`; an [`IdleOut`] error once the stream was idle for
    /// the timeout.
    pub(super) async fn wait<F: Future>(&mut self, f: F) -> io::Result<F::Output> {
        let Some(w) = self.watch.as_deref_mut() else {
            return Ok(f.await);
        };
        tokio::select! {
            biased;
            out = f => Ok(out),
            () = w.idle_out(self.progress) => Err(io::Error::new(io::ErrorKind::TimedOut, IdleOut)),
        }
    }
}

/// An upgraded connection's socket (a WebSocket tunnel) whose reads and
/// writes count as activity: every byte through the tunnel passes through
/// the client's side, so wrapping that side alone watches both ways.
pub(crate) struct Tracked<T> {
    io: T,
    progress: Progress,
}

impl<T> Tracked<T> {
    /// `io`, counted in `progress`.
    pub(crate) fn new(io: T, progress: Progress) -> Self {
        Tracked { io, progress }
    }

    fn note<R>(&self, p: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if matches!(p, Poll::Ready(Ok(_))) {
            self.progress.bump();
        }
        p
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.io).poll_read(cx, buf);
        self.note(p)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(p)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route's timeout is counted in whole ticks, rounded up; 0 turns
    /// it off; unset, the listener's five ticks apply.
    #[test]
    fn route_timeouts_in_ticks() {
        let p = period(Duration::from_secs(300));
        let slot = RouteIdle::default();
        assert_eq!(ticks_for(slot.limit(), p), Some(QUIET_TICKS));
        slot.set(Some(Duration::from_secs(3600)));
        assert_eq!(ticks_for(slot.limit(), p), Some(60));
        slot.set(Some(Duration::from_secs(61)));
        assert_eq!(ticks_for(slot.limit(), p), Some(2));
        slot.set(Some(Duration::from_millis(1)));
        assert_eq!(ticks_for(slot.limit(), p), Some(1));
        slot.set(None);
        assert_eq!(ticks_for(slot.limit(), p), None);
        slot.clear();
        assert_eq!(slot.limit(), Limit::Listener);
    }

    /// A stream that keeps making progress is never cut; one that stops
    /// is cut no sooner than the timeout after its last activity (real
    /// time: the upper bound is loose for a busy machine).
    #[tokio::test]
    async fn only_streams_without_activity_end() {
        let timeout = Duration::from_millis(200);
        let mut w = Watch::new(timeout);
        let p = Progress::default();
        let busy = {
            let p = p.clone();
            async move {
                for _ in 0..30 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    p.bump();
                }
            }
        };
        tokio::select! {
            biased;
            () = busy => {}
            () = Watch::expiry(Some(&mut w), &p) => panic!("cut while active"),
        }
        let start = Instant::now();
        Watch::expiry(Some(&mut w), &p).await;
        let waited = start.elapsed();
        assert!(
            waited >= timeout && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }
}
