//! What SotW and Delta streams share: scope, subscriptions, the per-stream
//! guard that keeps the registry and metrics true.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::registry::Registry;
use super::resources::{Names, TypeUrl, View, XdsResource, XdsSnapshot};
use crate::metrics::{Metrics, StreamLabels, TypeLabels};

/// Responses a stream may have queued for a slow client. Small on
/// purpose: a client that does not read blocks only its own stream, which
/// then skips intermediate states (the snapshot channel keeps the latest).
pub(crate) const QUEUE: usize = 2;

/// Names one stream may subscribe to per type: far above any real
/// configuration, low enough that a client cannot grow a stream's memory
/// without bound.
pub(crate) const MAX_NAMES: usize = 100_000;

/// The status that ends a stream subscribing to too many names.
pub(crate) fn too_many_names(t: TypeUrl) -> Status {
    Status::resource_exhausted(format!(
        "more than {MAX_NAMES} {} names subscribed on one stream",
        t.short().to_uppercase()
    ))
}

/// What every stream needs.
pub struct Shared {
    /// The latest xDS snapshot (latest value wins).
    pub snapshots: watch::Receiver<Arc<XdsSnapshot>>,
    /// Connected nodes.
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

impl Shared {
    /// Shared state for a server.
    pub fn new(
        snapshots: watch::Receiver<Arc<XdsSnapshot>>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Shared {
            snapshots,
            registry,
            metrics,
            next_id: AtomicU64::new(1),
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn type_labels(t: TypeUrl) -> TypeLabels {
        TypeLabels {
            r#type: t.short().to_string(),
        }
    }

    /// Records a NACK: counted, logged, and shown until the node ACKs again.
    pub(crate) fn nack(&self, stream: u64, t: TypeUrl, err: &portico_proto::google::rpc::Status) {
        self.metrics
            .xds_nacks
            .get_or_create(&Self::type_labels(t))
            .inc();
        let message = format!("{} (code {})", err.message, err.code);
        tracing::warn!(stream, r#type = t.short(), error = %message, "NACK");
        self.registry
            .update(stream, t, |st| st.nack = Some(message));
    }

    /// Records an ACK of `version` (the sent version when `None`, as Delta
    /// ACKs carry none) and the time since the response was sent.
    pub(crate) fn ack(
        &self,
        stream: u64,
        t: TypeUrl,
        sent_at: Option<std::time::Instant>,
        version: Option<String>,
    ) {
        if let Some(at) = sent_at {
            self.metrics
                .xds_push_to_ack_seconds
                .get_or_create(&Self::type_labels(t))
                .observe(at.elapsed().as_secs_f64());
        }
        self.registry.update(stream, t, |st| {
            st.acked_version = version.or_else(|| st.sent_version.clone());
            st.nack = None;
        });
    }
}

/// Which types a stream serves: all (ADS) or one (a per-type service).
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// Aggregated Discovery Service.
    Ads,
    /// A per-type discovery service.
    Only(TypeUrl),
}

impl Scope {
    /// `ads`, or the type's short name.
    pub fn label(self) -> &'static str {
        match self {
            Scope::Ads => "ads",
            Scope::Only(t) => t.short(),
        }
    }

    /// The type a request is about, or the status that ends the stream.
    pub fn resolve(self, type_url: &str) -> Result<TypeUrl, Status> {
        match self {
            Scope::Ads if type_url.is_empty() => Err(Status::invalid_argument(
                "type_url is empty: every request on an aggregated (ADS) stream must name its resource type",
            )),
            Scope::Ads => TypeUrl::parse(type_url).ok_or_else(|| unknown_type(type_url)),
            Scope::Only(t) if type_url.is_empty() || type_url == t.as_str() => Ok(t),
            Scope::Only(t) => Err(Status::invalid_argument(format!(
                "type_url {type_url:?} on the {} service, which serves only {t}",
                t.short().to_uppercase()
            ))),
        }
    }
}

fn unknown_type(type_url: &str) -> Status {
    Status::invalid_argument(format!(
        "unknown type URL {type_url:?}: Portico serves {}",
        TypeUrl::ALL.map(|t| t.as_str()).join(", ")
    ))
}

/// A client's subscription to one type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Subscription {
    /// Everything the view offers to wildcard subscribers.
    pub wildcard: bool,
    /// Wildcard because the first request named nothing (LDS/CDS); stays
    /// so while the client keeps naming nothing.
    pub legacy: bool,
    /// Names subscribed explicitly (the view's own strings where it has
    /// the resource, so thousands of nodes naming the same clusters share
    /// them).
    pub names: Names,
}

impl Subscription {
    /// Shares the view's set when the names are exactly its wildcard set.
    pub fn share_names(&mut self, view: &View, t: TypeUrl) {
        if let Some(shared) = view.share_names(t, &self.names) {
            self.names = shared;
        }
    }

    /// `name` as a shared string: the view's when it has such a resource.
    pub fn intern(view: &View, t: TypeUrl, name: &str) -> Arc<str> {
        view.get(t, name)
            .map_or_else(|| name.into(), |e| e.resource.name.clone())
    }

    /// Whether the subscription covers `name` as it stands in `view`.
    pub fn covers(&self, view: &View, t: TypeUrl, name: &str) -> bool {
        self.names.contains(name)
            || (self.wildcard && view.get(t, name).is_some_and(|e| e.in_wildcard))
    }

    /// The existing resources the subscription covers, ordered by name.
    pub fn resources(&self, view: &View, t: TypeUrl) -> Vec<Arc<XdsResource>> {
        let mut out: Vec<Arc<XdsResource>> = Vec::new();
        if self.wildcard {
            out.extend(
                view.of(t)
                    .values()
                    .filter(|e| e.in_wildcard)
                    .map(|e| e.resource.clone()),
            );
        }
        for name in self.names.iter() {
            if let Some(e) = view.get(t, name) {
                if !(self.wildcard && e.in_wildcard) {
                    out.push(e.resource.clone());
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// A version for a set of resources: a hash of their names and versions.
pub(crate) fn set_version<'a>(items: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut h = Sha256::new();
    for (name, version) in items {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(version.as_bytes());
        h.update([0]);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Removes a stream from the registry and gauges however it ends.
pub(crate) struct StreamGuard {
    pub id: u64,
    shared: Arc<Shared>,
    labels: StreamLabels,
}

impl StreamGuard {
    pub fn new(shared: Arc<Shared>, scope: Scope, variant: &str) -> Self {
        let labels = StreamLabels {
            service: scope.label().to_string(),
            variant: variant.to_string(),
        };
        shared.metrics.xds_streams.get_or_create(&labels).inc();
        StreamGuard {
            id: shared.next_id(),
            shared,
            labels,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.shared
            .metrics
            .xds_streams
            .get_or_create(&self.labels)
            .dec();
        self.shared.registry.disconnect(self.id);
    }
}

/// The node of a stream, once its first request arrived.
pub(crate) struct NodeCtx {
    pub group: String,
}

/// Checks and records the node of a stream's first request.
pub(crate) fn register_node(
    shared: &Shared,
    guard: &StreamGuard,
    node: Option<&portico_proto::envoy::config::core::v3::Node>,
    peer: Option<SocketAddr>,
    kind: &str,
) -> Result<NodeCtx, Status> {
    let node = node.ok_or_else(|| {
        Status::invalid_argument(
            "the first request of a stream must carry node (with id and cluster)",
        )
    })?;
    shared.registry.connect(guard.id, node, peer, kind);
    tracing::debug!(node = %node.id, group = %node.cluster, stream = kind, "xDS stream opened");
    Ok(NodeCtx {
        group: node.cluster.clone(),
    })
}

/// What the stream loop needs from a protocol (SotW or Delta).
pub(crate) trait Protocol: Send + 'static {
    /// The protocol's request message.
    type Request: Send + 'static;
    /// The protocol's response message.
    type Response: Send + 'static;

    /// The node in a request (present at least on the first).
    fn node(req: &Self::Request) -> Option<&portico_proto::envoy::config::core::v3::Node>;
    /// `sotw` or `delta`.
    fn variant() -> &'static str;
    fn shared(&self) -> &Arc<Shared>;
    fn guard(&self) -> &StreamGuard;
    fn tx(&self) -> &mpsc::Sender<Box<Result<Self::Response, Status>>>;
    fn has_node(&self) -> bool;
    fn set_node(&mut self, node: NodeCtx);
    /// Takes the node's view from a new rendering; true if it changed.
    fn take_view(&mut self, snap: &XdsSnapshot) -> bool;
    /// Handles a request; `Ok(false)` when the client is gone.
    fn on_request(
        &mut self,
        req: Self::Request,
    ) -> impl std::future::Future<Output = Result<bool, Status>> + Send;
    /// Sends what changed in the view; false when the client is gone.
    fn push_all(&mut self) -> impl std::future::Future<Output = bool> + Send;
}

/// Runs a stream until the client closes it or it fails: requests in,
/// renderings in (latest wins), responses out.
pub(crate) async fn drive<P: Protocol>(
    mut s: P,
    scope: Scope,
    peer: Option<SocketAddr>,
    // Requests come boxed: a request is half a kilobyte, and an unboxed one
    // would sit in every idle stream's task.
    mut inbound: impl tokio_stream::Stream<Item = Result<Box<P::Request>, Status>> + Unpin + Send,
) {
    use tokio_stream::StreamExt;
    let mut snapshots = s.shared().snapshots.clone();
    loop {
        tokio::select! {
            msg = inbound.next() => {
                let req = match msg {
                    Some(Ok(req)) => req,
                    None => break,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "xDS stream ended by the client");
                        break;
                    }
                };
                if !s.has_node() {
                    let kind = format!("{}-{}", scope.label(), P::variant());
                    match register_node(s.shared(), s.guard(), P::node(&req), peer, &kind) {
                        Ok(node) => {
                            s.set_node(node);
                            let snap = snapshots.borrow_and_update().clone();
                            s.take_view(&snap);
                        }
                        Err(status) => {
                            let _ = s.tx().send(Box::new(Err(status))).await;
                            break;
                        }
                    }
                }
                // Boxed so an idle stream's task stays small.
                match Box::pin(s.on_request(*req)).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(status) => {
                        let _ = s.tx().send(Box::new(Err(status))).await;
                        break;
                    }
                }
            }
            changed = snapshots.changed(), if s.has_node() => {
                if changed.is_err() {
                    break;
                }
                let snap = snapshots.borrow_and_update().clone();
                if s.take_view(&snap) && !Box::pin(s.push_all()).await {
                    break;
                }
            }
        }
    }
}
