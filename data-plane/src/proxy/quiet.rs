//! A future polled only when it has asked to be.
//!
//! A connection waits for its next request together with the listener's
//! drain and its idle timer; a `select!` polls all three every time the
//! socket wakes the task, and those two polls cost more than a small
//! request's parsing (a `Notified` takes a lock, a `Sleep` reaches the
//! timer wheel). [`Quiet`] gives its future its own waker, which marks it
//! as woken and wakes the task: in between, polling it is a flag check.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// `inner`, polled only once its own waker fired (and on the first poll).
pub(crate) struct Quiet<F> {
    inner: F,
    wake: Arc<QuietWake>,
}

struct QuietWake {
    fired: AtomicBool,
    /// The task's waker, from its latest poll.
    task: Mutex<Option<Waker>>,
}

impl Wake for QuietWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(w) = &*self.task.lock().unwrap_or_else(|p| p.into_inner()) {
            w.wake_by_ref();
        }
    }
}

impl<F> Quiet<F> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: F) -> Quiet<F> {
        Quiet {
            inner,
            wake: Arc::new(QuietWake {
                fired: AtomicBool::new(true),
                task: Mutex::new(None),
            }),
        }
    }

    /// The inner future, to look at.
    pub(crate) fn get_ref(&self) -> &F {
        &self.inner
    }

    /// The inner future, to change it (a timer's deadline): it is polled
    /// again at the next poll.
    pub(crate) fn get_mut(&mut self) -> &mut F {
        self.wake.fired.store(true, Ordering::Release);
        &mut self.inner
    }
}

impl<F: Future + Unpin> Future for Quiet<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        {
            let mut task = this.wake.task.lock().unwrap_or_else(|p| p.into_inner());
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        if !this.wake.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.wake.clone());
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn completes_when_its_future_does_and_after_a_change() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let mut q = Quiet::new(rx);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = tx.send(7);
        });
        assert_eq!((&mut q).await, Ok(7));

        let mut t = Quiet::new(Box::pin(tokio::time::sleep(Duration::from_secs(60))));
        let start = tokio::time::Instant::now();
        // Not due: a poll through select! does not complete it.
        tokio::select! {
            biased;
            _ = &mut t => panic!("not due yet"),
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        t.get_mut()
            .as_mut()
            .reset(start + Duration::from_millis(20));
        (&mut t).await;
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the new deadline counts"
        );
    }
}
