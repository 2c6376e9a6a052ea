//! Clusters at run time: endpoints with their health, connection pools and
//! load balancing. Endpoint state outlives configuration changes: an EDS or
//! CDS update keeps the pools and health of endpoints that remain at the
//! same address (whatever their priority; one whose weight, names or check
//! settings change gets new pools and keeps its health).

mod bounded;
pub mod h1;
pub mod health;
pub mod lb;
mod maglev;
pub mod outlier;
pub mod pool;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use portico_proto::envoy::config::core::v3::HealthStatus;

use crate::config::cluster::{
    Assignment, ClusterConfig, Discovery, DnsTargets, EndpointSpec, LbKind, LoadPolicy,
};
use crate::stats::ClusterStats;
use pool::Pool;

/// Milliseconds since the process started: a cheap clock for ejections.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One upstream endpoint and what the proxy knows about it.
#[derive(Debug)]
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Load-balancing weight.
    pub weight: u32,
    /// Its host name, when it has one (`auto_host_rewrite` sets it).
    pub hostname: Option<Arc<str>>,
    /// Where a hash ring places it instead of its address.
    pub hash_key: Option<Arc<str>>,
    /// Its own health-check settings, if any.
    pub check: Option<Arc<crate::config::cluster::EndpointCheck>>,
    /// Health from the control plane (EDS `health_status`).
    eds_healthy: AtomicBool,
    /// The control plane says DEGRADED: it takes traffic only when the
    /// healthy endpoints cannot carry it all (Envoy's degraded class).
    eds_degraded: AtomicBool,
    /// Its last passing health check answered with `x-envoy-degraded`
    /// (Envoy's active degraded flag): degraded likewise.
    pub(crate) hc_degraded: AtomicBool,
    /// Health from active checks (true when none are configured).
    pub(crate) hc_healthy: AtomicBool,
    /// Added to a health-checked cluster and not checked yet: unhealthy
    /// until its first check, which decides alone (no threshold), as
    /// Envoy's hosts added after a cluster's start are.
    pub(crate) hc_first: AtomicBool,
    /// Kept out of play even in panic until that first check
    /// (`ignore_new_hosts_until_first_hc`).
    pub(crate) hc_excluded: AtomicBool,
    pub(crate) hc_streak: AtomicU32,
    /// Ejected by outlier detection until this [`now_ms`] (0: not).
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Consecutive local-origin failures (when split from answers).
    consecutive_local: AtomicU32,
    /// Requests answered, and of them failed, in the outlier detector's
    /// current interval (with local-origin failures split: answers only).
    window_total: AtomicU32,
    window_failed: AtomicU32,
    /// Local-origin results, and of them failures, in the interval (when
    /// split).
    window_local_total: AtomicU32,
    window_local_failed: AtomicU32,
    /// When its slow start began ([`now_ms`]; 0: never).
    slow_since: AtomicU64,
    /// Requests in flight.
    pub active: AtomicU32,
    /// The control plane removed it, but it passes its health checks: it
    /// stays until it fails one (Envoy's pending dynamic removal).
    pub(crate) pending_removal: AtomicBool,
    /// Connections to it.
    pub pool: Pool,
}

impl Endpoint {
    fn new(spec: &EndpointSpec, cfg: &ClusterConfig, stats: &Arc<ClusterStats>) -> Self {
        Endpoint {
            addr: spec.addr,
            weight: spec.weight,
            hostname: spec.hostname.clone(),
            hash_key: spec.hash_key.clone(),
            check: spec.check.clone(),
            eds_healthy: AtomicBool::new(eds_ok(spec.health)),
            eds_degraded: AtomicBool::new(spec.health == HealthStatus::Degraded),
            hc_degraded: AtomicBool::new(false),
            hc_healthy: AtomicBool::new(true),
            hc_first: AtomicBool::new(false),
            hc_excluded: AtomicBool::new(false),
            hc_streak: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            window_total: AtomicU32::new(0),
            window_failed: AtomicU32::new(0),
            window_local_total: AtomicU32::new(0),
            window_local_failed: AtomicU32::new(0),
            slow_since: AtomicU64::new(0),
            active: AtomicU32::new(0),
            pending_removal: AtomicBool::new(false),
            pool: Pool::new(spec.addr, cfg, stats.clone()).with_also(spec.also.clone()),
        }
    }

    /// Whether `spec` describes this endpoint as it was made: the same
    /// weight, names, check settings and other addresses (an address
    /// whose weight, names, check settings or other addresses change gets
    /// a new endpoint, as what was built from them is built again; it
    /// takes over the old one's state).
    fn same_identity(&self, spec: &EndpointSpec) -> bool {
        self.weight == spec.weight
            && self.hostname == spec.hostname
            && self.hash_key == spec.hash_key
            && self.check == spec.check
            && *self.pool.also() == *spec.also
    }

    /// Whether it may take new requests now.
    pub fn available(&self, now: u64) -> bool {
        self.eds_healthy.load(Relaxed)
            && self.hc_healthy.load(Relaxed)
            && self.ejected_until.load(Relaxed) <= now
    }

    /// Takes over what `old` (the same address, before its weight, names
    /// or check settings changed) knew: health from checks, outlier
    /// ejection, slow start.
    fn carry_over(&self, old: &Endpoint) {
        for (to, from) in [
            (&self.hc_healthy, &old.hc_healthy),
            (&self.hc_first, &old.hc_first),
            (&self.hc_excluded, &old.hc_excluded),
            (&self.hc_degraded, &old.hc_degraded),
        ] {
            to.store(from.load(Relaxed), Relaxed);
        }
        for (to, from) in [
            (&self.ejected_until, &old.ejected_until),
            (&self.slow_since, &old.slow_since),
        ] {
            to.store(from.load(Relaxed), Relaxed);
        }
        self.ejections.store(old.ejections.load(Relaxed), Relaxed);
    }

    /// Forgets what health checks said: it is not checked (any more).
    fn clear_checks(&self) {
        self.hc_healthy.store(true, Relaxed);
        self.hc_first.store(false, Relaxed);
        self.hc_excluded.store(false, Relaxed);
        self.hc_degraded.store(false, Relaxed);
    }

    /// Whether panic mode may put it in play (not while a first health
    /// check is awaited under `ignore_new_hosts_until_first_hc`).
    pub(crate) fn in_play_in_panic(&self) -> bool {
        !self.hc_excluded.load(Relaxed)
    }

    /// Whether it is degraded (usable, after the healthy ones).
    pub fn degraded(&self) -> bool {
        self.eds_degraded.load(Relaxed) || self.hc_degraded.load(Relaxed)
    }

    /// The factor on its weight under slow start `ss` (1 outside it).
    pub(crate) fn ramp(&self, ss: &crate::config::cluster::SlowStart, now: u64) -> f64 {
        match self.slow_since.load(Relaxed) {
            0 => 1.0,
            since => ss.factor(now.saturating_sub(since)),
        }
    }

    /// Health flags as `/clusters` shows them (Envoy's names).
    pub fn health_flags(&self) -> String {
        let mut f = Vec::new();
        if !self.eds_healthy.load(Relaxed) {
            f.push("/eds_status_unhealthy");
        }
        if !self.hc_healthy.load(Relaxed) {
            f.push("/failed_active_hc");
        }
        if self.ejected_until.load(Relaxed) > now_ms() {
            f.push("/failed_outlier_check");
        }
        if self.eds_degraded.load(Relaxed) {
            f.push("/degraded_eds_health");
        }
        if self.hc_degraded.load(Relaxed) {
            f.push("/degraded_active_hc");
        }
        if self.hc_excluded.load(Relaxed) {
            f.push("/pending_active_hc");
        }
        if self.pending_removal.load(Relaxed) {
            f.push("/pending_dynamic_removal");
        }
        if f.is_empty() {
            "healthy".into()
        } else {
            f.concat()
        }
    }
}

fn eds_ok(h: HealthStatus) -> bool {
    matches!(
        h,
        HealthStatus::Unknown | HealthStatus::Healthy | HealthStatus::Degraded
    )
}

/// An immutable set of endpoints with what load balancing needs.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// The endpoints, in ascending priority.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// One per priority present, in ascending priority.
    pub(crate) levels: Vec<Level>,
    /// The load assignment's policy.
    pub(crate) policy: LoadPolicy,
    /// With more than one level: the share of requests each takes, and
    /// which are in panic, reused for [`PANIC_RECHECK_MS`] (a pass over
    /// every endpoint, not made per request).
    pub(crate) spill: ArcSwap<lb::Spill>,
    /// With a single level: whether it is in panic, and until when that
    /// answer holds (`(until_ms << 1) | panic`), reused likewise.
    pub(crate) panic: AtomicU64,
    /// Some endpoint is degraded (the control plane says so when the set
    /// is made, or a health check since): a single level then takes the
    /// shares path too.
    pub(crate) has_degraded: AtomicBool,
}

/// One priority level: a run of the set's endpoints, and the balancer's
/// tables over them.
#[derive(Debug)]
pub(crate) struct Level {
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// Its priority (0 the highest).
    pub(crate) priority: u32,
    pub(crate) lb: lb::Tables,
}

impl EndpointSet {
    /// The set of `endpoints` with their `priorities` (ascending, one
    /// each).
    fn new(
        config: &ClusterConfig,
        endpoints: Vec<Arc<Endpoint>>,
        priorities: &[u32],
        policy: LoadPolicy,
    ) -> Self {
        debug_assert!(priorities.len() == endpoints.len() && priorities.is_sorted());
        let levels = priorities
            .chunk_by(|a, b| a == b)
            .scan(0, |start, run| {
                let (s, e) = (*start, *start + run.len());
                *start = e;
                Some(Level {
                    start: s,
                    end: e,
                    priority: run[0],
                    lb: lb::Tables::build(config, &endpoints[s..e]),
                })
            })
            .collect();
        EndpointSet {
            has_degraded: AtomicBool::new(endpoints.iter().any(|e| e.degraded())),
            endpoints,
            levels,
            policy,
            spill: ArcSwap::default(),
            panic: AtomicU64::new(0),
        }
    }

    /// Each endpoint's priority, in the set's order.
    pub fn priorities(&self) -> impl Iterator<Item = u32> + '_ {
        self.levels
            .iter()
            .flat_map(|l| std::iter::repeat_n(l.priority, l.end - l.start))
    }
}

/// A cluster at run time.
#[derive(Debug)]
pub struct Cluster {
    /// Its configuration.
    pub config: Arc<ClusterConfig>,
    /// Current endpoints, swapped whole on updates.
    pub endpoints: ArcSwap<EndpointSet>,
    /// Counters.
    pub stats: Arc<ClusterStats>,
    pub(crate) rr: AtomicU64,
    /// Requests in flight (circuit breaker).
    pub active: AtomicU32,
    /// Retries in flight (circuit breaker).
    pub retries: AtomicU32,
    /// The share of requests the load assignment drops, per million (a
    /// copy of the endpoint set's, read without loading the set).
    drop_per_million: AtomicU32,
    /// Until when ([`now_ms`]) some endpoint may be in slow start: before
    /// then picks weigh each endpoint's ramp.
    slow_until: AtomicU64,
    /// Held while an endpoint is ejected.
    ejecting: std::sync::Mutex<()>,
    /// Held while the endpoint set is rebuilt from the one installed (the
    /// control plane's changes and a health checker's removal must not
    /// undo each other).
    rebuilding: std::sync::Mutex<()>,
    /// It has had endpoints: endpoints it gets from now on are added ones
    /// (they ramp up, and await their first health check).
    initialized: AtomicBool,
    /// Told when a new endpoint set is installed (the health checker
    /// waits on it).
    pub(crate) endpoints_changed: Arc<tokio::sync::Notify>,
    /// Replaced or removed by a newer configuration. Requests that started
    /// on it may keep it alive (a stream can last hours), but its health
    /// checks, outlier detection and DNS stop: the live cluster runs its
    /// own, and kept endpoints are shared with it. (Its idle connections
    /// are still swept while it lives.)
    pub(crate) retired: AtomicBool,
}

/// The cluster behind `w` while it is the live one (not dropped, not
/// retired): what a cluster's background task checks before each round.
pub(crate) fn live(w: &std::sync::Weak<Cluster>) -> Option<Arc<Cluster>> {
    w.upgrade().filter(|c| !c.retired.load(Relaxed))
}

/// How long a panic or priority-load decision is reused.
pub(crate) const PANIC_RECHECK_MS: u64 = 100;

impl Cluster {
    fn new(config: Arc<ClusterConfig>, stats: Arc<ClusterStats>) -> Arc<Self> {
        Arc::new(Cluster {
            config,
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            stats,
            rr: AtomicU64::new(0),
            active: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            drop_per_million: AtomicU32::new(0),
            slow_until: AtomicU64::new(0),
            ejecting: std::sync::Mutex::new(()),
            rebuilding: std::sync::Mutex::new(()),
            initialized: AtomicBool::new(false),
            endpoints_changed: Arc::default(),
            retired: AtomicBool::new(false),
        })
    }

    /// Whether a retry may start now (the circuit breaker's retry limit,
    /// or its retry budget).
    pub fn may_retry(&self) -> bool {
        self.config
            .limits
            .may_retry(self.retries.load(Relaxed), self.active.load(Relaxed))
    }

    /// The endpoints as this cluster weighs them.
    fn effective<'s>(&self, specs: &'s [EndpointSpec]) -> std::borrow::Cow<'s, [EndpointSpec]> {
        if self.config.locality_weighted {
            std::borrow::Cow::Owned(crate::config::cluster::locality_weighted(specs))
        } else {
            std::borrow::Cow::Borrowed(specs)
        }
    }

    /// Replaces the endpoints (in ascending priority), keeping the state
    /// of those that remain.
    pub fn set_endpoints(&self, specs: &[EndpointSpec], policy: LoadPolicy) {
        let _one = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        let specs = &*self.effective(specs);
        let old = self.endpoints.load();
        let by_addr: HashMap<SocketAddr, &Arc<Endpoint>> =
            old.endpoints.iter().map(|e| (e.addr, e)).collect();
        // Endpoints added to a cluster that had some ramp up and await
        // their first health check; a new cluster's first endpoints take
        // their shares at once (as Envoy's initial hosts do, once warmed).
        // (Not a cluster that had endpoints and lost them all.)
        let now = now_ms();
        let ramp = self.initialized.load(Relaxed) || !old.endpoints.is_empty();
        let mut endpoints: Vec<Arc<Endpoint>> = specs
            .iter()
            .map(|s| match by_addr.get(&s.addr) {
                Some(e) if e.same_identity(s) => {
                    e.pending_removal.store(false, Relaxed);
                    e.eds_healthy.store(eds_ok(s.health), Relaxed);
                    e.eds_degraded
                        .store(s.health == HealthStatus::Degraded, Relaxed);
                    Arc::clone(e)
                }
                Some(old) => {
                    // Its weight or names changed: made anew, its state
                    // kept (it was there; Envoy updates such a host in
                    // place), unless where it is checked changed: then it
                    // is new as far as checks go.
                    let e = Endpoint::new(s, &self.config, &self.stats);
                    e.carry_over(old);
                    let target =
                        |x: &Endpoint| x.check.as_ref().map(|c| (c.target(x.addr), c.disabled));
                    if target(old) != target(&e) {
                        self.await_first_check(&e);
                    }
                    Arc::new(e)
                }
                None => {
                    let e = Endpoint::new(s, &self.config, &self.stats);
                    if ramp {
                        self.start_slow(&e, now);
                        self.await_first_check(&e);
                    }
                    Arc::new(e)
                }
            })
            .collect();
        // Endpoints whose checks are off (the cluster's, or their own) are
        // healthy as far as checks go, whatever checks said before.
        for e in &endpoints {
            if self.config.health_check.is_none() || e.check.as_ref().is_some_and(|c| c.disabled) {
                e.clear_checks();
            }
        }
        if !endpoints.is_empty() {
            self.initialized.store(true, Relaxed);
        }
        let mut priorities: Vec<u32> = specs.iter().map(|s| s.priority).collect();
        // Envoy's default for a health-checked cluster: an endpoint the
        // control plane removed stays while it passes its checks (it goes
        // when it fails one, see `drop_removed`).
        if self.config.health_check.is_some() && !self.config.ignore_health_on_removal {
            let named: std::collections::HashSet<SocketAddr> =
                specs.iter().map(|s| s.addr).collect();
            let kept: Vec<(u32, Arc<Endpoint>)> = old
                .priorities()
                .zip(&old.endpoints)
                // (Not one the control plane last called unhealthy, as
                // Envoy removes those at once too.)
                .filter(|(_, e)| {
                    !named.contains(&e.addr)
                        && e.hc_healthy.load(Relaxed)
                        && e.eds_healthy.load(Relaxed)
                        && !e.hc_first.load(Relaxed)
                })
                .map(|(p, e)| (p, e.clone()))
                .collect();
            if !kept.is_empty() {
                let mut all: Vec<(u32, Arc<Endpoint>)> =
                    priorities.into_iter().zip(endpoints).collect();
                for (p, e) in kept {
                    e.pending_removal.store(true, Relaxed);
                    all.push((p, e));
                }
                // (Stable: each level keeps the control plane's order.)
                all.sort_by_key(|(p, _)| *p);
                (priorities, endpoints) = all.into_iter().unzip();
            }
        }
        let membership_changed = endpoints.len() != old.endpoints.len()
            || endpoints.iter().any(|e| !by_addr.contains_key(&e.addr));
        self.install_members(endpoints, &priorities, policy, membership_changed);
    }

    /// Installs a new set of `endpoints` (with their `priorities`); when
    /// the members changed, Envoy's `close_connections_on_host_set_change`
    /// drains every connection to them first.
    fn install_members(
        &self,
        endpoints: Vec<Arc<Endpoint>>,
        priorities: &[u32],
        policy: LoadPolicy,
        changed: bool,
    ) {
        if self.config.drain_on_host_change && changed {
            for e in &endpoints {
                e.pool.drain();
            }
        }
        self.install(EndpointSet::new(
            &self.config,
            endpoints,
            priorities,
            policy,
        ));
    }

    /// Takes out `gone` if the control plane removed it and it stayed
    /// while it passed its checks, now that it failed one. (Told of every
    /// endpoint that fails: a removal may have been under way as it did.)
    pub(crate) fn drop_removed(&self, gone: &Endpoint) {
        let _one = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        if !gone.pending_removal.load(Relaxed) || gone.hc_healthy.load(Relaxed) {
            return;
        }
        let set = self.endpoints.load_full();
        let (priorities, endpoints): (Vec<u32>, Vec<Arc<Endpoint>>) = set
            .priorities()
            .zip(&set.endpoints)
            .filter(|(_, e)| !std::ptr::eq(&***e, gone))
            .map(|(p, e)| (p, e.clone()))
            .unzip();
        if endpoints.len() == set.endpoints.len() {
            return;
        }
        tracing::info!(cluster = %self.config.name, endpoint = %gone.addr, "removed endpoint failed its health check: gone");
        self.install_members(endpoints, &priorities, set.policy, true);
    }

    /// Puts a checked endpoint out of play until its first health check
    /// (Envoy's hosts added to a health-checked cluster), which decides
    /// alone; with `ignore_new_hosts_until_first_hc`, even panic leaves it
    /// out meanwhile.
    fn await_first_check(&self, e: &Endpoint) {
        let checked = !e.check.as_ref().is_some_and(|c| c.disabled);
        if let (Some(hc), true) = (&self.config.health_check, checked) {
            e.hc_healthy.store(false, Relaxed);
            e.hc_first.store(true, Relaxed);
            e.hc_excluded.store(hc.exclude_until_checked, Relaxed);
        }
    }

    /// Rebuilds the balancer's tables over the same endpoints (after a
    /// change of the cluster's config), with `policy` (a DNS cluster's,
    /// which comes with its config).
    fn rebalance(&self, policy: LoadPolicy) {
        let _one = self.rebuilding.lock().unwrap_or_else(|p| p.into_inner());
        let set = self.endpoints.load_full();
        if self.config.health_check.is_none() {
            for e in &set.endpoints {
                e.clear_checks();
            }
        }
        let priorities: Vec<u32> = set.priorities().collect();
        self.install(EndpointSet::new(
            &self.config,
            set.endpoints.clone(),
            &priorities,
            policy,
        ));
    }

    /// Makes `set` the cluster's, with what is read from it without
    /// loading it: its size, its drop share, the end of its slow starts.
    fn install(&self, set: EndpointSet) {
        self.stats
            .membership_total
            .store(set.endpoints.len() as u64, Relaxed);
        self.drop_per_million
            .store(set.policy.drop_per_million, Relaxed);
        let slow_until = self.config.slow_start.map_or(0, |ss| {
            let window = u64::try_from(ss.window.as_millis()).unwrap_or(u64::MAX);
            set.endpoints
                .iter()
                .map(|e| e.slow_since.load(Relaxed))
                .filter(|s| *s > 0)
                .max()
                .map_or(0, |s| s.saturating_add(window))
        });
        self.slow_until.store(slow_until, Relaxed);
        self.endpoints.store(Arc::new(set));
        // New endpoints get their first health check now, not at the
        // checker's next look.
        self.endpoints_changed.notify_one();
    }

    /// An endpoint's availability changed (a health check's verdict, an
    /// ejection): the reused panic and priority-load answers are dropped,
    /// so the next pick counts afresh.
    pub(crate) fn availability_changed(&self) {
        let set = self.endpoints.load();
        set.panic.store(0, Relaxed);
        set.spill.store(Arc::new(lb::Spill::default()));
        for l in &set.levels {
            l.lb.availability_changed();
        }
    }

    /// Notes that a health check changed whether an endpoint is degraded:
    /// the set's `has_degraded` is counted again (on the set installed
    /// meanwhile too, which may have counted before the change), and its
    /// cached shares dropped.
    pub(crate) fn degraded_changed(&self) {
        loop {
            let set = self.endpoints.load_full();
            set.has_degraded
                .store(set.endpoints.iter().any(|e| e.degraded()), Relaxed);
            self.availability_changed();
            if Arc::ptr_eq(&set, &self.endpoints.load()) {
                return;
            }
        }
    }

    /// Starts an endpoint's slow start now, when the cluster has one: it
    /// was just added, or found healthy again.
    pub(crate) fn start_slow(&self, e: &Endpoint, now: u64) {
        if let Some(ss) = &self.config.slow_start {
            e.slow_since.store(now, Relaxed);
            let until =
                now.saturating_add(u64::try_from(ss.window.as_millis()).unwrap_or(u64::MAX));
            self.slow_until.fetch_max(until, Relaxed);
        }
    }

    /// Whether to drop this request (the load assignment's
    /// `drop_overloads`).
    pub fn drops(&self) -> bool {
        let p = self.drop_per_million.load(Relaxed);
        p > 0 && fastrand::u32(..1_000_000) < p
    }
}

/// Every cluster, by name; changed only by the xDS client.
#[derive(Default)]
pub struct ClusterManager {
    clusters: foldhash::HashMap<Arc<str>, Arc<Cluster>>,
    stats: HashMap<Arc<str>, Arc<ClusterStats>>,
}

impl ClusterManager {
    /// Brings the clusters in line with `configs` and their endpoints with
    /// `endpoints` (EDS by service name); returns the live set.
    pub fn update(
        &mut self,
        configs: &HashMap<Arc<str>, Arc<ClusterConfig>>,
        endpoints: &HashMap<Arc<str>, Arc<Assignment>>,
    ) -> foldhash::HashMap<Arc<str>, Arc<Cluster>> {
        let mut next =
            foldhash::HashMap::with_capacity_and_hasher(configs.len(), Default::default());
        for (name, cfg) in configs {
            // A changed config weighs the endpoints anew even when they are
            // the same (the policy's tables, locality weighting).
            let mut changed = false;
            // A new cluster: its background tasks start once it has its
            // endpoints (below), so the first health checks run at once.
            let mut fresh = false;
            let cluster = match self.clusters.get(name) {
                Some(c) if c.config == *cfg || *c.config == **cfg => c.clone(),
                old => {
                    let stats = self.stats.entry(name.clone()).or_default().clone();
                    let c = Cluster::new(cfg.clone(), stats);
                    // Keep endpoints (pools, health) when their pools
                    // would be made alike (weighed anew below); otherwise
                    // new pools take the new settings, and the old ones
                    // close once their requests are done.
                    if let Some(old) = old {
                        if Pool::alike(&old.config, cfg) {
                            c.endpoints.store(old.endpoints.load_full());
                            changed = true;
                        }
                    }
                    fresh = true;
                    c
                }
            };
            match &cfg.discovery {
                Discovery::Eds(service) => {
                    let none = Assignment::default();
                    let a = endpoints.get(service).map_or(&none, |a| &**a);
                    if changed || !same_endpoints(&cluster, &a.endpoints, a.policy) {
                        cluster.set_endpoints(&a.endpoints, a.policy);
                    }
                }
                Discovery::Static(a) => {
                    if changed || !same_endpoints(&cluster, &a.endpoints, a.policy) {
                        cluster.set_endpoints(&a.endpoints, a.policy);
                    }
                }
                // DNS brings its endpoints itself; the kept ones get the
                // new policy's tables meanwhile.
                Discovery::Dns(d) if changed => cluster.rebalance(d.policy),
                Discovery::Dns(_) => {}
            }
            if fresh {
                spawn_background(&cluster);
            }
            next.insert(name.clone(), cluster);
        }
        self.stats.retain(|n, _| next.contains_key(n));
        for (name, old) in &self.clusters {
            if next.get(name).is_none_or(|c| !Arc::ptr_eq(c, old)) {
                old.retired.store(true, Relaxed);
            }
        }
        self.clusters = next.clone();
        next
    }
}

fn same_endpoints(cluster: &Cluster, specs: &[EndpointSpec], policy: LoadPolicy) -> bool {
    let set = cluster.endpoints.load();
    let specs = &*cluster.effective(specs);
    set.policy == policy
        && set.endpoints.len() == specs.len()
        && set.priorities().eq(specs.iter().map(|s| s.priority))
        && set.endpoints.iter().zip(specs).all(|(e, s)| {
            e.addr == s.addr
                && e.same_identity(s)
                && e.eds_healthy.load(Relaxed) == eds_ok(s.health)
                && e.eds_degraded.load(Relaxed) == (s.health == HealthStatus::Degraded)
        })
}

/// Starts a new cluster's background tasks: each holds it weakly and ends
/// when it is dropped or (but for the idle sweep) retired.
fn spawn_background(c: &Arc<Cluster>) {
    let cfg = &c.config;
    if let Some(hc) = &cfg.health_check {
        health::spawn(Arc::downgrade(c), hc.clone());
    }
    spawn_idle_sweep(Arc::downgrade(c));
    if cfg.outlier.is_some() {
        outlier::spawn(Arc::downgrade(c));
    }
    if let Discovery::Dns(hosts) = &cfg.discovery {
        spawn_dns(Arc::downgrade(c), hosts.clone());
    }
}

/// Closes a cluster's idle upstream connections that idled out or that
/// their origin closed, every half idle timeout (1–60 s) while it lives;
/// otherwise they would only be found out when next used.
fn spawn_idle_sweep(cluster: std::sync::Weak<Cluster>) {
    tokio::spawn(async move {
        loop {
            let every = match cluster.upgrade() {
                Some(c) => (c.config.idle_timeout / 2).clamp(
                    std::time::Duration::from_secs(1),
                    std::time::Duration::from_secs(60),
                ),
                None => return,
            };
            tokio::time::sleep(every).await;
            let Some(c) = cluster.upgrade() else { return };
            for ep in &c.endpoints.load().endpoints {
                ep.pool.sweep_idle();
            }
        }
    });
}

/// What a name's resolution says of its addresses.
#[derive(Debug, PartialEq)]
enum Resolved {
    /// These (none, when the name does not exist or has no address of
    /// the family asked for: Envoy's completed resolution without hosts).
    Addresses(Vec<SocketAddr>),
    /// Nothing known (the resolver failed, timed out, or could not be
    /// asked): the name keeps its last addresses, as in Envoy.
    Failed,
}

impl Resolved {
    /// Classifies a lookup's outcome. The standard library reports the
    /// resolver's errors only in words: glibc's for a name that does not
    /// exist or has no addresses mean an answer (no addresses); anything
    /// else is a failure (so with another C library every error is one:
    /// the last addresses stay).
    fn of(lookup: std::io::Result<Vec<SocketAddr>>) -> Self {
        match lookup {
            Ok(addrs) => Resolved::Addresses(addrs),
            Err(e) => {
                let words = e.to_string();
                if words.contains("Name or service not known")
                    || words.contains("No address associated with hostname")
                {
                    Resolved::Addresses(Vec::new())
                } else {
                    Resolved::Failed
                }
            }
        }
    }
}

/// Resolves a DNS cluster's host names now and at its refresh rate while
/// it is live (after a failure, at its failure refresh rate; a name whose
/// resolution failed keeps its last addresses).
fn spawn_dns(cluster: std::sync::Weak<Cluster>, dns: DnsTargets) {
    tokio::spawn(async move {
        let mut last: Vec<Vec<SocketAddr>> = vec![Vec::new(); dns.hosts.len()];
        let mut failures = 0u32;
        loop {
            let mut specs = Vec::new();
            let mut failed = false;
            for (d, last) in dns.hosts.iter().zip(&mut last) {
                let lookup = tokio::net::lookup_host((d.host.as_str(), d.port)).await;
                match Resolved::of(lookup.map(Iterator::collect)) {
                    Resolved::Addresses(addrs) => {
                        let mut kept = dns.family.keep(addrs);
                        if dns.logical {
                            kept.truncate(1);
                        }
                        *last = kept;
                    }
                    Resolved::Failed => {
                        tracing::warn!(host = %d.host, "DNS resolution failed; its last addresses stay");
                        failed = true;
                    }
                }
                specs.extend(last.iter().map(|&addr| EndpointSpec {
                    addr,
                    weight: d.weight,
                    health: d.health,
                    locality: d.locality,
                    locality_weight: d.locality_weight,
                    priority: d.priority,
                    hostname: Some(d.hostname.clone()),
                    hash_key: d.hash_key.clone(),
                    check: d.check.clone(),
                    also: Arc::new([]),
                }));
            }
            // An address under two names keeps its first (highest)
            // priority; the set is in ascending priority.
            specs.sort_by_key(|s| (s.addr, s.priority));
            specs.dedup_by_key(|s| s.addr);
            specs.sort_by_key(|s| (s.priority, s.addr));
            let Some(c) = live(&cluster) else { return };
            if !same_endpoints(&c, &specs, dns.policy) {
                c.set_endpoints(&specs, dns.policy);
            }
            drop(c);
            failures = if failed { failures + 1 } else { 0 };
            tokio::time::sleep(dns_wait(&dns, failures)).await;
        }
    });
}

/// How long until a DNS cluster's names are resolved again, after
/// `failures` rounds in a row with a failed name: with a failure refresh
/// rate, Envoy's jittered exponential backoff (a random wait below the
/// base, then below 3, 7, 15... times it, never over the maximum; at least
/// a millisecond here), without one the refresh rate; after a round
/// without a failure, the refresh rate plus up to the jitter.
fn dns_wait(dns: &DnsTargets, failures: u32) -> std::time::Duration {
    match (failures, dns.failure_refresh) {
        (0, _) => dns.refresh + dns.jitter.mul_f64(fastrand::f64()),
        (_, None) => dns.refresh,
        (n, Some((base, max))) => {
            let window = base.saturating_mul((1u32 << n.min(16)) - 1);
            window
                .mul_f64(fastrand::f64())
                .min(max)
                .max(std::time::Duration::from_millis(1))
        }
    }
}

/// Which load balancer to use is fixed per cluster.
pub fn is_hashing(c: &Cluster) -> bool {
    matches!(c.config.lb, LbKind::RingHash | LbKind::Maglev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A name that does not exist is an answer (no addresses); a resolver
    /// that fails is not (the name keeps its last addresses).
    #[test]
    fn dns_answers_and_failures_are_told_apart() {
        let a: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(Resolved::of(Ok(vec![a])), Resolved::Addresses(vec![a]));
        let gai = |words: &str| {
            Err(std::io::Error::other(format!(
                "failed to lookup address information: {words}"
            )))
        };
        assert_eq!(
            Resolved::of(gai("Name or service not known")),
            Resolved::Addresses(vec![])
        );
        assert_eq!(
            Resolved::of(gai("No address associated with hostname")),
            Resolved::Addresses(vec![])
        );
        assert_eq!(
            Resolved::of(gai("Temporary failure in name resolution")),
            Resolved::Failed
        );
    }

    #[test]
    fn dns_refreshes_back_off_after_failures() {
        let mut dns = DnsTargets {
            hosts: Vec::new(),
            family: crate::config::cluster::DnsFamily::Auto,
            logical: false,
            refresh: Duration::from_secs(5),
            jitter: Duration::from_secs(1),
            failure_refresh: None,
            policy: LoadPolicy::default(),
        };
        for _ in 0..50 {
            let ok = dns_wait(&dns, 0);
            assert!(
                ok >= dns.refresh && ok <= dns.refresh + dns.jitter,
                "{ok:?}"
            );
            assert_eq!(
                dns_wait(&dns, 3),
                dns.refresh,
                "no failure rate: the refresh rate"
            );
        }
        dns.failure_refresh = Some((Duration::from_millis(100), Duration::from_millis(1000)));
        let (mut first, mut late) = (Vec::new(), Vec::new());
        for _ in 0..200 {
            first.push(dns_wait(&dns, 1));
            late.push(dns_wait(&dns, 30));
        }
        // Below the base at first; later up to the maximum, never over.
        assert!(first.iter().all(|w| *w < Duration::from_millis(100)));
        assert!(late.iter().all(|w| *w <= Duration::from_millis(1000)));
        assert!(late.iter().any(|w| *w > Duration::from_millis(300)));
        assert!(first
            .iter()
            .chain(&late)
            .all(|w| *w >= Duration::from_millis(1)));
    }
}

#[cfg(test)]
mod drain_tests {
    use super::*;
    use crate::config::cluster::ClusterConfig;
    use portico_proto::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, CommonLbConfig, DiscoveryType,
    };

    /// `close_connections_on_host_set_change`: an endpoint added or
    /// removed drains the others' pools; the same endpoints again do not.
    /// Without it, nothing is drained.
    #[test]
    fn host_set_changes_drain_pools_when_asked() {
        for asked in [true, false] {
            let pb = portico_proto::envoy::config::cluster::v3::Cluster {
                name: "c".into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                common_lb_config: Some(CommonLbConfig {
                    close_connections_on_host_set_change: asked,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let cfg = ClusterConfig::convert(&pb).unwrap();
            assert_eq!(cfg.drain_on_host_change, asked);
            let c = Cluster::new(Arc::new(cfg), Arc::default());
            let at = |port| EndpointSpec::at(([127, 0, 0, 1], port));
            c.set_endpoints(&[at(1), at(2)], LoadPolicy::default());
            let first = c.endpoints.load().endpoints[0].clone();
            // (The first endpoints were an addition too.)
            let start = first.pool.drains();
            let drained = || first.pool.drains() != start;
            c.set_endpoints(&[at(1), at(2)], LoadPolicy::default());
            assert!(!drained(), "the same endpoints");
            c.set_endpoints(&[at(1)], LoadPolicy::default());
            assert_eq!(drained(), asked, "one removed (asked: {asked})");
        }
    }
}
