//! The ADS client: Delta (default) or SotW, ACK what was applied, NACK
//! with the reason, reconnect with jittered backoff while the last good
//! configuration keeps serving.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_proto::envoy::config::cluster::v3::Cluster;
use portico_proto::envoy::config::core::v3::{node::UserAgentVersionType, Node};
use portico_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use portico_proto::envoy::config::listener::v3::Listener;
use portico_proto::envoy::config::route::v3::RouteConfiguration;
use portico_proto::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DiscoveryRequest,
};
use portico_proto::google::protobuf::Any;
use portico_proto::google::rpc::Status;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::cache;
use super::dump::ConfigDump;
use super::state::{State, Ty, Update};
use crate::config::ConfigError;
use crate::proxy::{ListenerManager, Workers};
use crate::snapshot::{Shared, Snapshot};
use crate::upstream::ClusterManager;

/// How to reach the control plane and who we are.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the xDS server.
    pub server: String,
    /// This node.
    pub node: Node,
    /// Delta (incremental) ADS rather than SotW.
    pub delta: bool,
    /// Where to keep the last good configuration, if anywhere.
    pub cache: Option<PathBuf>,
    /// Access logs for every listener, besides those the config names.
    pub access_logs: Vec<crate::config::listener::LogTarget>,
}

/// The node identity Portico's data plane sends.
pub fn node(id: &str, group: &str) -> Node {
    Node {
        id: id.into(),
        cluster: group.into(),
        user_agent_name: "portico-dp".into(),
        user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
            env!("CARGO_PKG_VERSION").into(),
        )),
        ..Default::default()
    }
}

/// The name inside a resource of a given type.
pub fn resource_name(ty: Ty, any: &Any) -> Option<String> {
    let b = any.value.as_slice();
    Some(match ty {
        Ty::Listener => Listener::decode(b).ok()?.name,
        Ty::Route => RouteConfiguration::decode(b).ok()?.name,
        Ty::Cluster => Cluster::decode(b).ok()?.name,
        Ty::Endpoint => ClusterLoadAssignment::decode(b).ok()?.cluster_name,
    })
}

/// The client and everything it configures.
pub struct Client {
    cfg: ClientConfig,
    shared: Arc<Shared>,
    listeners: ListenerManager,
    clusters: ClusterManager,
    state: State,
    /// Non-wildcard subscriptions on the current stream.
    subscribed: HashMap<Ty, BTreeSet<String>>,
    /// Last nonce per type on the current SotW stream.
    nonces: HashMap<Ty, String>,
    lds_seen: bool,
    cache_generation: Arc<std::sync::atomic::AtomicU64>,
    last_rejection: Option<(String, String)>,
    /// When each load assignment with an `endpoint_stale_after` goes
    /// stale unless another arrives (by name).
    stale: HashMap<String, tokio::time::Instant>,
}

type Error = String;

impl Client {
    /// A client that has applied nothing yet.
    pub fn new(cfg: ClientConfig, shared: Arc<Shared>, workers: Workers) -> Self {
        Client {
            listeners: ListenerManager::new(shared.clone(), workers, cfg.access_logs.clone()),
            cfg,
            shared,
            clusters: ClusterManager::default(),
            state: State::default(),
            subscribed: HashMap::new(),
            nonces: HashMap::new(),
            lds_seen: false,
            cache_generation: Arc::default(),
            last_rejection: None,
            stale: HashMap::new(),
        }
    }

    /// Awaits `fut`, meanwhile dropping load assignments as they go stale
    /// (whatever the client is doing: streaming, connecting or waiting to
    /// reconnect — stale endpoints matter most while the control plane is
    /// away).
    async fn awaiting<T>(&mut self, fut: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(fut);
        loop {
            let Some(&at) = self.stale.values().min() else {
                return fut.await;
            };
            tokio::select! {
                // What arrives first wins a tie: a new assignment that
                // comes with its deadline keeps its endpoints.
                biased;
                v = &mut fut => return v,
                () = tokio::time::sleep_until(at) => self.expire_stale(),
            }
        }
    }

    /// Drops the load assignments whose time is up, as if the control
    /// plane had removed them: their clusters have no endpoints until
    /// another assignment arrives (Envoy's `onAssignmentTimeout`).
    fn expire_stale(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<String> = self
            .stale
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &due {
            self.stale.remove(n);
        }
        // Only those still held (a later update may have dropped some).
        let due: Vec<String> = due
            .into_iter()
            .filter(|n| self.state.endpoints.contains_key(n.as_str()))
            .collect();
        if due.is_empty() {
            return;
        }
        let users = self.clusters_by_assignment();
        for n in &due {
            tracing::warn!(assignment = %n, "load assignment is stale (endpoint_stale_after passed without a new one); its endpoints are dropped");
            for c in users.get(n.as_str()).into_iter().flatten() {
                c.stats.assignment_stale.fetch_add(1, Relaxed);
            }
        }
        let u = Update {
            ty: Ty::Endpoint,
            resources: Vec::new(),
            removed: due,
            complete: false,
        };
        // Not the control plane's update: applied as one, but neither
        // counted nor timed as one.
        if let Err(e) = self.apply_inner(u) {
            // Removing assignments cannot fail a check; say so if it does.
            tracing::error!(error = %e, "dropping stale load assignments failed");
        }
    }

    /// The live EDS clusters, by the assignment that gives their
    /// endpoints.
    fn clusters_by_assignment(&self) -> HashMap<Arc<str>, Vec<Arc<crate::upstream::Cluster>>> {
        let mut by: HashMap<Arc<str>, Vec<_>> = HashMap::new();
        for c in self.shared.snapshot.load().clusters.values() {
            if let crate::config::cluster::Discovery::Eds(s) = &c.config.discovery {
                by.entry(s.clone()).or_default().push(c.clone());
            }
        }
        by
    }

    /// Arms or disarms the stale timers of the assignments `u` brought.
    fn note_assignments(&mut self, u: &Update) {
        for n in &u.removed {
            self.stale.remove(n);
        }
        let now = tokio::time::Instant::now();
        let mut users = None;
        for (n, _, _) in &u.resources {
            match self
                .state
                .endpoints
                .get(n.as_str())
                .and_then(|a| a.value.stale_after)
            {
                Some(d) => {
                    // (Validated below 10,000 years; checked all the same.)
                    let at = now
                        .checked_add(d)
                        .unwrap_or(now + Duration::from_secs(1 << 40));
                    self.stale.insert(n.clone(), at);
                    let users = users.get_or_insert_with(|| self.clusters_by_assignment());
                    for c in users.get(n.as_str()).into_iter().flatten() {
                        c.stats.assignment_timeout_received.fetch_add(1, Relaxed);
                    }
                }
                None => {
                    self.stale.remove(n);
                }
            }
        }
    }

    /// Runs forever: connect, follow the stream, reconnect after failures.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(250);
        let mut tried_cache = false;
        loop {
            let started = Instant::now();
            let r = if self.cfg.delta {
                self.delta_session().await
            } else {
                self.sotw_session().await
            };
            self.shared.xds_connected.store(false, Relaxed);
            if let Err(e) = r {
                tracing::warn!(server = %self.cfg.server, error = %e, "xDS stream ended; serving the last good configuration");
            }
            if !tried_cache && !self.shared.ready.load(Relaxed) {
                tried_cache = true;
                self.boot_from_cache();
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(250);
            }
            // Full jitter keeps a fleet from reconnecting in lockstep.
            self.awaiting(tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())))
                .await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    fn boot_from_cache(&mut self) {
        let Some(path) = self.cfg.cache.clone() else {
            return;
        };
        let saved = match cache::load(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the config cache");
                return;
            }
        };
        for (ty, resources) in saved {
            if let Err(e) = self.apply(Update {
                ty,
                resources,
                removed: Vec::new(),
                complete: true,
            }) {
                tracing::warn!(error = %e, "cached configuration rejected");
                return;
            }
        }
        tracing::info!(path = %path.display(), "control plane unreachable; serving the cached configuration");
    }

    /// Stages, checks and applies one update; nothing changes on error.
    fn apply(&mut self, u: Update) -> Result<(), ConfigError> {
        let started = Instant::now();
        let ty = u.ty;
        let count = u.resources.len();
        let result = self.apply_inner(u);
        if result.is_ok() {
            self.shared.stats.xds_update_success.fetch_add(1, Relaxed);
        }
        let took = started.elapsed();
        if took > Duration::from_millis(20) {
            tracing::info!(
                type_url = ty.url(),
                resources = count,
                ms = took.as_millis() as u64,
                "slow configuration update"
            );
        }
        result
    }

    fn apply_inner(&mut self, u: Update) -> Result<(), ConfigError> {
        let mut next = self.state.staged(&u)?;
        next.collect_garbage();
        let endpoints = u.ty == Ty::Endpoint;
        let mut snap = Snapshot {
            listeners: next
                .listeners
                .iter()
                .map(|(n, i)| (n.clone(), i.value.clone()))
                .collect::<BTreeMap<_, _>>(),
            routes: next
                .routes
                .iter()
                .map(|(n, i)| (n.clone(), i.value.clone()))
                .collect(),
            ..Default::default()
        };
        let prepared = self.listeners.prepare(&snap)?;
        let configs = next
            .clusters
            .iter()
            .map(|(n, i)| (n.clone(), i.value.clone()))
            .collect();
        let eps = next
            .endpoints
            .iter()
            .map(|(n, i)| (n.clone(), i.value.clone()))
            .collect();
        snap.clusters = self.clusters.update(&configs, &eps);
        let old_state = std::mem::replace(&mut self.state, next);
        if u.ty == Ty::Listener {
            self.lds_seen = true;
        }
        snap.dump = Arc::new(ConfigDump::capture(
            &self.state,
            self.last_rejection.clone(),
        ));
        let snap = Arc::new(snap);
        let old_snap = self.shared.snapshot.swap(snap.clone());
        self.listeners.apply(&snap, prepared);
        if endpoints {
            self.note_assignments(&u);
        }
        // Freeing a large route table takes milliseconds; do it off the
        // path of the next update and of the workers.
        tokio::task::spawn_blocking(move || drop((old_snap, old_state)));
        if self.lds_seen && self.state.complete() && !self.shared.ready.swap(true, Relaxed) {
            tracing::info!(
                listeners = snap.listeners.len(),
                clusters = snap.clusters.len(),
                "initial configuration applied; ready"
            );
        }
        // Only a complete configuration is worth booting from.
        if let (Some(path), true) = (
            self.cfg.cache.clone(),
            self.lds_seen && self.state.complete(),
        ) {
            let state = self.state.clone();
            let generation = self.cache_generation.fetch_add(1, Relaxed) + 1;
            let written = self.cache_generation.clone();
            tokio::task::spawn_blocking(move || {
                // Saves may run out of order; an older one never overwrites
                // a newer one.
                static WRITER: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
                let mut last = WRITER.lock().unwrap_or_else(|p| p.into_inner());
                if generation > *last && generation == written.load(Relaxed) {
                    cache::save(&path, &state);
                    *last = generation;
                }
            });
        }
        Ok(())
    }

    fn rejected(&mut self, ty: Ty, e: &ConfigError) -> Status {
        self.shared.stats.xds_update_rejected.fetch_add(1, Relaxed);
        tracing::warn!(type_url = ty.url(), error = %e, "rejected configuration update; keeping the last good one");
        self.last_rejection = Some((ty.url().into(), e.to_string()));
        // Republish the dump so /config_dump shows the rejection.
        let cur = self.shared.snapshot.load_full();
        let snap = Snapshot {
            listeners: cur.listeners.clone(),
            routes: cur.routes.clone(),
            clusters: cur.clusters.clone(),
            dump: Arc::new(ConfigDump::capture(
                &self.state,
                self.last_rejection.clone(),
            )),
        };
        self.shared.snapshot.store(Arc::new(snap));
        Status {
            code: tonic::Code::InvalidArgument as i32,
            message: e.to_string(),
            details: vec![],
        }
    }

    /// Connects to the control plane (stale assignments expiring
    /// meanwhile).
    async fn connect(
        &mut self,
    ) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, Error> {
        let (server, shared) = (self.cfg.server.clone(), self.shared.clone());
        self.awaiting(connect(server, shared)).await
    }

    /// What a new stream asks for first, in make-before-break order:
    /// wildcard CDS and LDS, and the EDS/RDS names already needed (so a
    /// reconnect resumes where the last stream left off). Records the
    /// non-wildcard subscriptions.
    fn initial_subscriptions(&mut self) -> Vec<(Ty, BTreeSet<String>)> {
        self.subscribed.clear();
        self.nonces.clear();
        let mut out = Vec::new();
        for ty in Ty::ALL {
            if ty.wildcard() {
                out.push((ty, BTreeSet::new()));
                continue;
            }
            let names = self.state.wanted(ty);
            if !names.is_empty() {
                self.subscribed.insert(ty, names.clone());
                out.push((ty, names));
            }
        }
        out
    }

    async fn delta_session(&mut self) -> Result<(), Error> {
        let mut client = self.connect().await?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        for (ty, names) in self.initial_subscriptions() {
            let req = DeltaDiscoveryRequest {
                node: (ty == Ty::Cluster).then(|| self.cfg.node.clone()),
                type_url: ty.url().into(),
                resource_names_subscribe: names.into_iter().collect(),
                initial_resource_versions: self.state.versions(ty),
                ..Default::default()
            };
            let _ = tx.send(req).await;
        }
        let mut stream = self
            .awaiting(client.delta_aggregated_resources(ReceiverStream::new(rx)))
            .await
            .map_err(|s| format!("stream refused: {}", s.message()))?
            .into_inner();
        self.shared.xds_connected.store(true, Relaxed);
        tracing::info!(server = %self.cfg.server, "xDS stream (Delta) established");
        loop {
            let resp = next_message(self.awaiting(stream.message()).await)?;
            let Some(ty) = Ty::from_url(&resp.type_url) else {
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: resp.type_url.clone(),
                        response_nonce: resp.nonce,
                        error_detail: Some(Status {
                            code: tonic::Code::InvalidArgument as i32,
                            message: format!("type {} is not supported", resp.type_url),
                            details: vec![],
                        }),
                        ..Default::default()
                    })
                    .await;
                continue;
            };
            let u = Update {
                ty,
                resources: resp
                    .resources
                    .into_iter()
                    .filter_map(|r| r.resource.map(|a| (r.name, r.version, a)))
                    .collect(),
                removed: resp.removed_resources,
                complete: false,
            };
            let error_detail = self.apply(u).err().map(|e| self.rejected(ty, &e));
            let ack = DeltaDiscoveryRequest {
                type_url: ty.url().into(),
                response_nonce: resp.nonce,
                error_detail,
                ..Default::default()
            };
            if tx.send(ack).await.is_err() {
                return Err("request stream closed".into());
            }
            for ty in [Ty::Endpoint, Ty::Route] {
                let want = self.state.wanted(ty);
                let have = self.subscribed.entry(ty).or_default();
                if want == *have {
                    continue;
                }
                let req = DeltaDiscoveryRequest {
                    type_url: ty.url().into(),
                    resource_names_subscribe: want.difference(have).cloned().collect(),
                    resource_names_unsubscribe: have.difference(&want).cloned().collect(),
                    ..Default::default()
                };
                *have = want;
                if tx.send(req).await.is_err() {
                    return Err("request stream closed".into());
                }
            }
        }
    }

    async fn sotw_session(&mut self) -> Result<(), Error> {
        let mut client = self.connect().await?;
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
        for (ty, names) in self.initial_subscriptions() {
            let req = DiscoveryRequest {
                node: (ty == Ty::Cluster).then(|| self.cfg.node.clone()),
                type_url: ty.url().into(),
                resource_names: names.into_iter().collect(),
                version_info: self
                    .state
                    .sotw_versions
                    .get(&ty)
                    .cloned()
                    .unwrap_or_default(),
                ..Default::default()
            };
            let _ = tx.send(req).await;
        }
        let mut stream = self
            .awaiting(client.stream_aggregated_resources(ReceiverStream::new(rx)))
            .await
            .map_err(|s| format!("stream refused: {}", s.message()))?
            .into_inner();
        self.shared.xds_connected.store(true, Relaxed);
        tracing::info!(server = %self.cfg.server, "xDS stream (SotW) established");
        loop {
            let resp = next_message(self.awaiting(stream.message()).await)?;
            let Some(ty) = Ty::from_url(&resp.type_url) else {
                continue;
            };
            let mut resources = Vec::with_capacity(resp.resources.len());
            for a in resp.resources {
                let name = resource_name(ty, &a).unwrap_or_default();
                resources.push((name, resp.version_info.clone(), a));
            }
            let u = Update {
                ty,
                resources,
                removed: Vec::new(),
                complete: ty.wildcard(),
            };
            let result = self.apply(u);
            let error_detail = result.as_ref().err().map(|e| self.rejected(ty, e));
            if error_detail.is_none() {
                self.state
                    .sotw_versions
                    .insert(ty, resp.version_info.clone());
            }
            self.nonces.insert(ty, resp.nonce.clone());
            let ack = DiscoveryRequest {
                type_url: ty.url().into(),
                version_info: self
                    .state
                    .sotw_versions
                    .get(&ty)
                    .cloned()
                    .unwrap_or_default(),
                resource_names: self
                    .subscribed
                    .get(&ty)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
                response_nonce: resp.nonce,
                error_detail,
                ..Default::default()
            };
            if tx.send(ack).await.is_err() {
                return Err("request stream closed".into());
            }
            for ty in [Ty::Endpoint, Ty::Route] {
                let want = self.state.wanted(ty);
                if self.subscribed.get(&ty).is_some_and(|h| *h == want)
                    || (want.is_empty() && !self.subscribed.contains_key(&ty))
                {
                    continue;
                }
                let req = DiscoveryRequest {
                    type_url: ty.url().into(),
                    version_info: self
                        .state
                        .sotw_versions
                        .get(&ty)
                        .cloned()
                        .unwrap_or_default(),
                    resource_names: want.iter().cloned().collect(),
                    response_nonce: self.nonces.get(&ty).cloned().unwrap_or_default(),
                    ..Default::default()
                };
                self.subscribed.insert(ty, want);
                if tx.send(req).await.is_err() {
                    return Err("request stream closed".into());
                }
            }
        }
    }
}

/// A connection to the control plane at `server`.
async fn connect(
    server: String,
    shared: Arc<Shared>,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, Error> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
        .map_err(|e| format!("bad xDS server address {server:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let ch = ep
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))?;
    shared.stats.xds_connects.fetch_add(1, Relaxed);
    // Large route tables exceed tonic's 4 MiB default.
    Ok(AggregatedDiscoveryServiceClient::new(ch).max_decoding_message_size(256 << 20))
}

/// The next response on a stream, or why the stream ended.
fn next_message<T>(r: Result<Option<T>, tonic::Status>) -> Result<T, Error> {
    match r {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err("the server closed the stream".into()),
        Err(s) => Err(format!("{}: {}", s.code(), s.message())),
    }
}
