//! Downstream bodies. A request body comes from Portico's HTTP/1.1
//! server or its HTTP/2 one. A response body is upstream bytes
//! streamed through, or a local reply; it carries the request's guard,
//! which holds the upstream endpoint (and an HTTP/2 stream slot) until the
//! response is done and, when dropped, releases counters and writes the
//! access log line.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};

use crate::access_log::{Record, Sink};
use crate::http1::BodyError;
use crate::stats::Stats;
use crate::upstream::pool::{RespBody, StreamSlot};
use crate::upstream::{Cluster, Endpoint};

/// A request body from a downstream connection.
#[derive(Debug)]
pub enum RequestBody {
    /// From an HTTP/1.1 connection.
    Http1(super::http1::Body),
    /// From an HTTP/2 connection.
    Http2(super::h2::Body),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Http1(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Http2(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Http1(b) => b.is_end_stream(),
            RequestBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Http1(b) => b.size_hint(),
            RequestBody::Http2(b) => b.size_hint(),
        }
    }
}

impl RequestBody {
    /// Tells later, after the body itself has gone upstream, whether the
    /// client had sent all of it: Envoy answers a stream duration timeout
    /// with 408 while it has not, 504 after.
    pub fn received(&mut self) -> Received {
        match self {
            RequestBody::Http1(b) => b.received().map_or(Received::Whole, Received::Http1),
            RequestBody::Http2(b) => b.received().map_or(Received::Whole, Received::Http2),
        }
    }
}

/// Whether a request body has been received whole (see
/// [`RequestBody::received`]).
pub enum Received {
    /// It had been already.
    Whole,
    /// Set at an HTTP/1.1 body's clean end.
    Http1(Arc<std::sync::atomic::AtomicBool>),
    /// An HTTP/2 stream's END_STREAM.
    Http2(super::h2::Received),
}

impl Received {
    /// The client has sent all of the body.
    pub fn whole(&self) -> bool {
        match self {
            Received::Whole => true,
            Received::Http1(f) => f.load(std::sync::atomic::Ordering::Relaxed),
            Received::Http2(r) => r.whole(),
        }
    }
}

/// A response body with its request's bookkeeping.
pub struct ResponseBody {
    inner: Either<RespBody, Full<Bytes>>,
    guard: Guard,
}

/// What a request holds until its response is done.
pub struct Guard {
    pub(crate) stats: Arc<Stats>,
    pub(crate) upstream: Option<Upstream>,
    pub(crate) log: Option<Box<(Vec<Sink>, Record, Instant)>>,
    pub(crate) bytes: u64,
    pub(crate) ended: bool,
    /// The stream's duration limit, when one applies: the answer is cut
    /// when it passes.
    pub(crate) deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// That limit is the cluster's on its upstream stream
    /// (`UMSDR`), not the downstream stream's (`DT`).
    pub(crate) deadline_upstream: bool,
}

/// The endpoint and connection serving a request.
pub struct Upstream {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) slot: Option<StreamSlot>,
}

impl Guard {
    /// The stream's duration limit passed mid-answer: counted and logged
    /// (out of line: every answer's frames are polled past this).
    #[cold]
    #[inline(never)]
    fn duration_reached(&mut self) -> Box<dyn std::error::Error + Send + Sync> {
        self.deadline = None;
        let flag = if self.deadline_upstream {
            if let Some(u) = &self.upstream {
                let s = &u.cluster.stats;
                s.upstream_rq_max_duration_reached.fetch_add(1, Relaxed);
            }
            "UMSDR"
        } else {
            let s = &self.stats;
            s.downstream_rq_max_duration_reached.fetch_add(1, Relaxed);
            "DT"
        };
        if let Some(b) = self.log.as_mut() {
            b.1.response_flags = flag.into();
        }
        "max stream duration reached".into()
    }

    /// A guard for a new request.
    pub fn new(stats: Arc<Stats>) -> Self {
        stats.downstream_rq_active.fetch_add(1, Relaxed);
        Guard {
            stats,
            upstream: None,
            log: None,
            bytes: 0,
            ended: false,
            deadline: None,
            deadline_upstream: false,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Relaxed);
        self.cluster.active.fetch_sub(1, Relaxed);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stats.downstream_rq_active.fetch_sub(1, Relaxed);
        self.upstream = None;
        if let Some(b) = self.log.take() {
            let (sinks, mut rec, start) = *b;
            rec.bytes_sent = self.bytes;
            rec.duration = start.elapsed().as_millis() as u64;
            if !self.ended && rec.response_flags.is_empty() {
                rec.response_flags = "DC".into(); // downstream went away mid-response
            }
            for s in &sinks {
                s.write(&rec, &self.stats);
            }
        }
    }
}

impl ResponseBody {
    /// An upstream body.
    pub fn upstream(body: RespBody, guard: Guard) -> Self {
        let mut b = ResponseBody {
            inner: Either::Left(body),
            guard,
        };
        b.guard.ended = b.inner.is_end_stream();
        b
    }

    /// Lets go of the upstream side now (its body, with its connection or
    /// stream, and the endpoint's and cluster's count of active requests),
    /// for an answer written without a body; the request's own record
    /// waits for the drop.
    pub fn release_upstream(&mut self) {
        self.inner = Either::Right(Full::new(Bytes::new()));
        self.guard.upstream = None;
    }

    /// A local body.
    pub fn local(body: Bytes, mut guard: Guard) -> Self {
        guard.ended = true;
        guard.bytes = body.len() as u64;
        ResponseBody {
            inner: Either::Right(Full::new(body)),
            guard,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(d) = this.guard.deadline.as_mut() {
            if std::future::Future::poll(d.as_mut(), cx).is_ready() {
                return Poll::Ready(Some(Err(this.guard.duration_reached())));
            }
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(d), Either::Left(_)) = (f.data_ref(), &this.inner) {
                    this.guard.bytes += d.len() as u64;
                } else if let (Some(t), Some(b)) = (f.trailers_ref(), this.guard.log.as_mut()) {
                    if let Some(s) = crate::access_log::grpc_status(t) {
                        b.1.grpc_status = Some(s);
                    }
                    if b.1.keep_trailers {
                        b.1.trailers = Some(Box::new(t.clone()));
                    }
                }
                if this.inner.is_end_stream() {
                    this.guard.ended = true;
                }
            }
            None => this.guard.ended = true,
            Some(Err(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
