//! Incremental (Delta) streams (ADS and per-type).
//!
//! Per type the stream tracks what the client has (`known`: name →
//! version, seeded from `initial_resource_versions` on reconnect) and sends
//! only differences: changed resources, and `removed_resources` for
//! deletions and for subscribed names that do not exist (rules 14–19).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use portico_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::sync::mpsc;
use tonic::Status;

use super::resources::{PerType, TypeUrl, Versions, View, XdsResource, XdsSnapshot};
use super::stream::{
    drive, set_version, NodeCtx, Protocol, Scope, Shared, StreamGuard, Subscription,
};

type Tx = mpsc::Sender<Box<Result<DeltaDiscoveryResponse, Status>>>;

#[derive(Default)]
struct TypeState {
    sub: Subscription,
    started: bool,
    /// Nonce of the last response (0: none yet).
    nonce: u64,
    /// What the client has: name → version.
    known: Versions,
    sent_at: Option<Instant>,
}

struct Stream {
    shared: Arc<Shared>,
    guard: StreamGuard,
    scope: Scope,
    node: Option<NodeCtx>,
    view: Arc<View>,
    revision: u64,
    types: PerType<TypeState>,
    nonce: u64,
    tx: Tx,
}

/// Serves one Delta stream until the client closes it or it fails.
pub async fn run(
    shared: Arc<Shared>,
    scope: Scope,
    peer: Option<SocketAddr>,
    inbound: impl tokio_stream::Stream<Item = Result<Box<DeltaDiscoveryRequest>, Status>> + Unpin + Send,
    tx: Tx,
) {
    let s = Stream {
        guard: StreamGuard::new(shared.clone(), scope, "delta"),
        shared,
        scope,
        node: None,
        view: Arc::new(View::default()),
        revision: 0,
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
    inbound: impl tokio_stream::Stream<Item = Result<Box<DeltaDiscoveryRequest>, Status>>
        + Unpin
        + Send
        + 'static,
) -> mpsc::Receiver<Box<Result<DeltaDiscoveryResponse, Status>>> {
    let (tx, rx) = mpsc::channel(super::stream::QUEUE);
    tokio::spawn(run(shared, scope, peer, inbound, tx));
    rx
}

impl Protocol for Stream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn node(req: &DeltaDiscoveryRequest) -> Option<&portico_proto::envoy::config::core::v3::Node> {
        req.node.as_ref()
    }
    fn variant() -> &'static str {
        "delta"
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
        self.revision = snap.revision;
        if Arc::ptr_eq(&view, &self.view) {
            return false;
        }
        self.view = view;
        true
    }
    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<bool, Status> {
        self.handle(req).await
    }
    async fn push_all(&mut self) -> bool {
        self.push_changes().await
    }
}

impl Stream {
    async fn handle(&mut self, req: DeltaDiscoveryRequest) -> Result<bool, Status> {
        let t = self.scope.resolve(&req.type_url)?;
        let id = self.guard.id;
        let shared = self.shared.clone();
        let view = self.view.clone();
        let ty = self.types.slot(t);
        // ACK/NACK only for the latest nonce; subscription changes in a
        // stale request still count (12).
        if ty.nonce != 0 && req.response_nonce == ty.nonce.to_string() {
            match &req.error_detail {
                Some(err) => shared.nack(id, t, err),
                None => shared.ack(id, t, ty.sent_at.take(), None),
            }
        }
        let first = !ty.started;
        ty.started = true;
        let mut resources: BTreeMap<String, Arc<XdsResource>> = BTreeMap::new();
        let mut removed: BTreeSet<String> = BTreeSet::new();
        if first {
            // Reconnect: the client says what it has (18).
            let known = Arc::make_mut(&mut ty.known);
            for (name, version) in &req.initial_resource_versions {
                known.insert(name.as_str().into(), version.as_str().into());
            }
            if req.resource_names_subscribe.is_empty() && t.is_full_state() {
                ty.sub.wildcard = true; // legacy wildcard (15)
                ty.sub.legacy = true;
            }
        }
        let mut explicit = Vec::new();
        if ty.sub.names.len() + req.resource_names_subscribe.len() > super::stream::MAX_NAMES {
            return Err(super::stream::too_many_names(t));
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                ty.sub.wildcard = true;
            } else {
                Arc::make_mut(&mut ty.sub.names).insert(Subscription::intern(&view, t, name));
                explicit.push(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                ty.sub.wildcard = false;
                ty.sub.legacy = false;
                continue;
            }
            // Unsubscribing a name never subscribed is not an error (17).
            let had = ty.sub.names.contains(name.as_str());
            if had {
                Arc::make_mut(&mut ty.sub.names).remove(name.as_str());
            }
            if had && ty.sub.wildcard {
                match view.get(t, name).filter(|e| e.in_wildcard) {
                    Some(e) => {
                        resources.insert(name.clone(), e.resource.clone());
                    }
                    None => {
                        removed.insert(name.clone());
                    }
                }
            } else if !ty.sub.covers(&view, t, name) && ty.known.contains_key(name.as_str()) {
                Arc::make_mut(&mut ty.known).remove(name.as_str());
            }
        }
        ty.sub.share_names(&view, t);
        if first {
            for r in ty.sub.resources(&view, t) {
                if ty.known.get(&r.name) != Some(&r.version) {
                    resources.insert(r.name.to_string(), r);
                }
            }
            for name in ty.known.keys() {
                if view.get(t, name).is_none() || !ty.sub.covers(&view, t, name) {
                    removed.insert(name.to_string());
                }
            }
            for name in &explicit {
                if view.get(t, name).is_none() {
                    removed.insert(name.clone()); // does not exist (14)
                }
            }
        } else {
            // A name in resource_names_subscribe is always answered (16).
            for name in &explicit {
                match view.get(t, name) {
                    Some(e) => {
                        resources.insert(name.clone(), e.resource.clone());
                    }
                    None => {
                        removed.insert(name.clone());
                    }
                }
            }
        }
        let must_answer = first && ty.sub.wildcard;
        if resources.is_empty() && removed.is_empty() && !must_answer {
            return Ok(true);
        }
        let pushed_clusters = t == TypeUrl::Cluster && !resources.is_empty();
        let cluster_names: Vec<String> = resources.keys().cloned().collect();
        if !self
            .send(
                t,
                resources.into_values().collect(),
                removed.into_iter().collect(),
            )
            .await
        {
            return Ok(false);
        }
        if pushed_clusters && matches!(self.scope, Scope::Ads) {
            return Ok(self.push_endpoints_for(&cluster_names).await);
        }
        Ok(true)
    }

    /// Sends what changed for every type, make-before-break: additions in
    /// CDS, EDS, LDS, RDS order, then removals of clusters and endpoints.
    async fn push_changes(&mut self) -> bool {
        let mut late_removals: Vec<(TypeUrl, Vec<String>)> = Vec::new();
        for t in TypeUrl::ALL {
            let Some(ty) = self.types.get(&t).filter(|ty| ty.started) else {
                continue;
            };
            let desired = ty.sub.resources(&self.view, t);
            let changed: Vec<_> = desired
                .iter()
                .filter(|r| ty.known.get(&r.name) != Some(&r.version))
                .cloned()
                .collect();
            let mut removed: Vec<String> = ty
                .known
                .keys()
                .filter(|n| !desired.iter().any(|d| d.name == **n))
                .map(|n| n.to_string())
                .collect();
            let ads = matches!(self.scope, Scope::Ads);
            if ads && matches!(t, TypeUrl::Cluster | TypeUrl::Endpoint) && !removed.is_empty() {
                late_removals.push((t, std::mem::take(&mut removed)));
            }
            if changed.is_empty() && removed.is_empty() {
                continue;
            }
            let names: Vec<String> = changed.iter().map(|r| r.name.to_string()).collect();
            if !self.send(t, changed, removed).await {
                return false;
            }
            if t == TypeUrl::Cluster
                && ads
                && !names.is_empty()
                && !self.push_endpoints_for(&names).await
            {
                return false;
            }
        }
        for (t, removed) in late_removals {
            if !self.send(t, Vec::new(), removed).await {
                return false;
            }
        }
        true
    }

    /// Endpoints of clusters just sent, even if unchanged: Envoy finishes
    /// warming a cluster only when they arrive after it (21).
    async fn push_endpoints_for(&mut self, clusters: &[String]) -> bool {
        let Some(ty) = self.types.get(&TypeUrl::Endpoint).filter(|t| t.started) else {
            return true;
        };
        let resources: Vec<_> = ty
            .sub
            .resources(&self.view, TypeUrl::Endpoint)
            .into_iter()
            .filter(|r| clusters.iter().any(|c| c.as_str() == &*r.name))
            .collect();
        if resources.is_empty() {
            return true;
        }
        self.send(TypeUrl::Endpoint, resources, Vec::new()).await
    }

    async fn send(
        &mut self,
        t: TypeUrl,
        resources: Vec<Arc<XdsResource>>,
        removed: Vec<String>,
    ) -> bool {
        self.nonce += 1;
        let nonce = self.nonce;
        let Some(ty) = self.types.get_mut(&t) else {
            return true;
        };
        let known = Arc::make_mut(&mut ty.known);
        for r in &resources {
            known.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            known.remove(name.as_str());
        }
        // Usually what every node of the group has: keep the view's map.
        if let Some(shared) = self.view.share_versions(t, &ty.known) {
            ty.known = shared;
        }
        ty.nonce = nonce;
        ty.sent_at = Some(Instant::now());
        let version = set_version(ty.known.iter().map(|(n, v)| (&**n, &**v)));
        let listing = ty.known.clone();
        self.shared.registry.update(self.guard.id, t, |st| {
            st.sent_version = Some(version);
            st.resources = listing;
        });
        self.shared
            .metrics
            .xds_pushes
            .get_or_create(&Shared::type_labels(t))
            .inc();
        let response = DeltaDiscoveryResponse {
            system_version_info: self.revision.to_string(),
            resources: resources
                .iter()
                .map(|r| Resource {
                    name: r.name.to_string(),
                    version: r.version.to_string(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: t.as_str().to_string(),
            removed_resources: removed,
            nonce: nonce.to_string(),
            ..Default::default()
        };
        self.tx.send(Box::new(Ok(response))).await.is_ok()
    }
}
