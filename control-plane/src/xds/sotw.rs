//! State-of-the-world streams (ADS and per-type).
//!
//! The rules kept here are numbered as in the project's xDS notes: LDS/CDS
//! responses always carry the whole subscribed set (6), RDS/EDS only what
//! changed (7), the wildcard sequence (8), newly named resources are always
//! sent (9), stale nonces are ignored (12), a NACK is recorded and the same
//! version never resent (5), make-before-break order on ADS (20) and EDS
//! after every CDS push (21).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use portico_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tonic::Status;

use super::resources::{PerType, Sent, TypeUrl, View, XdsResource, XdsSnapshot};
use super::stream::{
    drive, set_version, NodeCtx, Protocol, Scope, Shared, StreamGuard, Subscription,
};

type Tx = mpsc::Sender<Box<Result<DiscoveryResponse, Status>>>;

#[derive(Default)]
struct TypeState {
    sub: Subscription,
    started: bool,
    /// Nonce of the last response (0: none yet); only a request echoing
    /// it is current.
    nonce: u64,
    /// What the client was last sent (for LDS/CDS, exactly its state).
    sent: Sent,
    sent_at: Option<Instant>,
}

struct Stream {
    shared: Arc<Shared>,
    guard: StreamGuard,
    scope: Scope,
    node: Option<NodeCtx>,
    view: Arc<View>,
    types: PerType<TypeState>,
    nonce: u64,
    tx: Tx,
}

/// Serves one SotW stream until the client closes it or it fails.
pub async fn run(
    shared: Arc<Shared>,
    scope: Scope,
    peer: Option<SocketAddr>,
    inbound: impl tokio_stream::Stream<Item = Result<Box<DiscoveryRequest>, Status>> + Unpin + Send,
    tx: Tx,
) {
    let s = Stream {
        guard: StreamGuard::new(shared.clone(), scope, "sotw"),
        shared,
        scope,
        node: None,
        view: Arc::new(View::default()),
        types: PerType::default(),
        nonce: 0,
        tx,
    };
    drive(s, scope, peer, inbound).await
}

/// Starts a stream task; its responses (and final status) come out of the
/// returned channel, at most [`QUEUE`](super::stream::QUEUE) ahead of the client.
pub fn spawn(
    shared: Arc<Shared>,
    scope: Scope,
    peer: Option<SocketAddr>,
    inbound: impl tokio_stream::Stream<Item = Result<Box<DiscoveryRequest>, Status>>
        + Unpin
        + Send
        + 'static,
) -> mpsc::Receiver<Box<Result<DiscoveryResponse, Status>>> {
    let (tx, rx) = mpsc::channel(super::stream::QUEUE);
    tokio::spawn(run(shared, scope, peer, inbound, tx));
    rx
}

impl Protocol for Stream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn node(req: &DiscoveryRequest) -> Option<&portico_proto::envoy::config::core::v3::Node> {
        req.node.as_ref()
    }
    fn variant() -> &'static str {
        "sotw"
    }
    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    fn guard(&self) -> &StreamGuard {
        &self.guard
    }
    fn tx(&self) -> &Tx {
        &self.tx
    }
    fn has_node(&self) -> bool {
        self.node.is_some()
    }
    fn set_node(&mut self, node: NodeCtx) {
        self.node = Some(node);
    }
    fn take_view(&mut self, snap: &XdsSnapshot) -> bool {
        let view = snap.view(
            self.node
                .as_ref()
                .map(|n| n.group.as_str())
                .unwrap_or_default(),
        );
        if Arc::ptr_eq(&view, &self.view) {
            return false;
        }
        self.view = view;
        true
    }
    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<bool, Status> {
        self.handle(req).await
    }
    async fn push_all(&mut self) -> bool {
        self.push_changes().await
    }
}

impl Stream {
    /// Handles one request; `Ok(false)` when the client is gone.
    async fn handle(&mut self, req: DiscoveryRequest) -> Result<bool, Status> {
        let t = self.scope.resolve(&req.type_url)?;
        let id = self.guard.id;
        let shared = self.shared.clone();
        let ty = self.types.slot(t);
        if !req.response_nonce.is_empty() {
            if ty.nonce == 0 || req.response_nonce != ty.nonce.to_string() {
                return Ok(true); // stale: superseded by a later response (12)
            }
            match &req.error_detail {
                Some(err) => shared.nack(id, t, err),
                None => shared.ack(id, t, ty.sent_at.take(), Some(req.version_info.clone())),
            }
        }
        if req.resource_names.len() > super::stream::MAX_NAMES {
            return Err(super::stream::too_many_names(t));
        }
        let mut names: std::collections::BTreeSet<Arc<str>> = req
            .resource_names
            .iter()
            .map(|n| Subscription::intern(&self.view, t, n))
            .collect();
        let star = names.remove("*");
        let first = !ty.started;
        let names = Arc::new(names);
        let mut sub = if first && names.is_empty() && !star && t.is_full_state() {
            Subscription {
                wildcard: true,
                legacy: true,
                names,
            }
        } else if !first && ty.sub.legacy && names.is_empty() && !star {
            ty.sub.clone()
        } else {
            Subscription {
                wildcard: star,
                legacy: false,
                names,
            }
        };
        sub.share_names(&self.view, t);
        ty.started = true;
        let changed = sub != ty.sub;
        ty.sub = sub;
        if !(first || changed) {
            return Ok(true); // an ACK or NACK: nothing new to say (5)
        }
        let resources = ty.sub.resources(&self.view, t);
        if resources.is_empty() && !t.is_full_state() {
            ty.sent = Sent::default();
            return Ok(true); // nothing to send yet; pushed when it appears (9)
        }
        if !self.send(t, resources, true).await {
            return Ok(false);
        }
        if t == TypeUrl::Cluster && matches!(self.scope, Scope::Ads) {
            return Ok(self.push_endpoints_after_clusters().await);
        }
        Ok(true)
    }

    /// Sends every type whose subscribed resources changed, in
    /// make-before-break order; stale clusters go last.
    async fn push_changes(&mut self) -> bool {
        let mut final_clusters = None;
        for t in TypeUrl::ALL {
            let Some(ty) = self.types.get(&t).filter(|ty| ty.started) else {
                continue;
            };
            let desired = ty.sub.resources(&self.view, t);
            if t.is_full_state() {
                let same = desired.len() == ty.sent.len()
                    && desired
                        .iter()
                        .all(|r| ty.sent.get(&r.name).is_some_and(|s| s.version == r.version));
                if same {
                    continue;
                }
                let mut first_phase = desired.clone();
                if t == TypeUrl::Cluster && matches!(self.scope, Scope::Ads) {
                    // Keep clusters about to go until listeners and routes
                    // stop using them (20).
                    let kept: Vec<_> = ty
                        .sent
                        .values()
                        .filter(|old| !desired.iter().any(|d| d.name == old.name))
                        .cloned()
                        .collect();
                    if !kept.is_empty() {
                        first_phase.extend(kept);
                        first_phase.sort_by(|a, b| a.name.cmp(&b.name));
                        final_clusters = Some(desired);
                    }
                }
                let first_phase_is_news = first_phase.len() != ty.sent.len()
                    || first_phase
                        .iter()
                        .any(|r| ty.sent.get(&r.name).is_none_or(|s| s.version != r.version));
                if first_phase_is_news && !self.send(t, first_phase, true).await {
                    return false;
                }
                if t == TypeUrl::Cluster
                    && matches!(self.scope, Scope::Ads)
                    && !self.push_endpoints_after_clusters().await
                {
                    return false;
                }
            } else if !self.push_changed(t, desired).await {
                // (Endpoints of clusters just pushed were sent with them and
                // count as unchanged here.)
                return false;
            }
        }
        if let Some(clusters) = final_clusters {
            return self.send(TypeUrl::Cluster, clusters, true).await;
        }
        true
    }

    /// RDS/EDS/SDS: sends only the resources whose version changed.
    async fn push_changed(&mut self, t: TypeUrl, desired: Vec<Arc<XdsResource>>) -> bool {
        let Some(ty) = self.types.get_mut(&t) else {
            return true;
        };
        if ty
            .sent
            .keys()
            .any(|name| !desired.iter().any(|d| &d.name == name))
        {
            Arc::make_mut(&mut ty.sent).retain(|name, _| desired.iter().any(|d| &d.name == name));
        }
        let changed: Vec<_> = desired
            .into_iter()
            .filter(|r| ty.sent.get(&r.name).is_none_or(|s| s.version != r.version))
            .collect();
        if changed.is_empty() {
            return true;
        }
        self.send(t, changed, false).await
    }

    /// Envoy finishes warming a cluster only when endpoints arrive after
    /// it, so every CDS push is followed by EDS for its clusters (21).
    async fn push_endpoints_after_clusters(&mut self) -> bool {
        let Some(ty) = self.types.get(&TypeUrl::Endpoint).filter(|t| t.started) else {
            return true;
        };
        let clusters: Vec<Arc<str>> = self
            .types
            .get(&TypeUrl::Cluster)
            .map(|c| c.sent.keys().cloned().collect())
            .unwrap_or_default();
        let resources: Vec<_> = ty
            .sub
            .resources(&self.view, TypeUrl::Endpoint)
            .into_iter()
            .filter(|r| clusters.contains(&r.name))
            .collect();
        if resources.is_empty() {
            return true;
        }
        self.send(TypeUrl::Endpoint, resources, false).await
    }

    /// Sends a response; `replace` makes `resources` the client's whole set.
    async fn send(&mut self, t: TypeUrl, resources: Vec<Arc<XdsResource>>, replace: bool) -> bool {
        self.nonce += 1;
        let nonce = self.nonce;
        let Some(ty) = self.types.get_mut(&t) else {
            return true;
        };
        if replace {
            ty.sent = Sent::default();
        }
        let sent = Arc::make_mut(&mut ty.sent);
        for r in &resources {
            sent.insert(r.name.clone(), r.clone());
        }
        // Usually what every node of the group has: keep the view's map.
        if let Some(shared) = self.view.share_sent(t, &ty.sent) {
            ty.sent = shared;
        }
        let version = set_version(ty.sent.values().map(|r| (&*r.name, &*r.version)));
        ty.nonce = nonce;
        ty.sent_at = Some(Instant::now());
        let listing = self.view.versions_of(t, &ty.sent);
        let v = version.clone();
        self.shared.registry.update(self.guard.id, t, |st| {
            st.sent_version = Some(v);
            st.resources = listing;
        });
        self.shared
            .metrics
            .xds_pushes
            .get_or_create(&Shared::type_labels(t))
            .inc();
        let response = DiscoveryResponse {
            version_info: version,
            resources: resources.iter().map(|r| r.body.clone()).collect(),
            type_url: t.as_str().to_string(),
            nonce: nonce.to_string(),
            ..Default::default()
        };
        self.tx.send(Box::new(Ok(response))).await.is_ok()
    }
}
