//! Clusters at run time: endpoints with their health, connection pools and
//! load balancing. Endpoint state outlives configuration changes: an EDS or
//! CDS update keeps the pools and health of endpoints that remain.

pub mod h1;
pub mod health;
pub mod lb;
pub mod pool;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use portico_proto::envoy::config::core::v3::HealthStatus;

use crate::config::cluster::{ClusterConfig, Discovery, DnsTargets, EndpointSpec, LbKind};
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
    /// Health from the control plane (EDS `health_status`).
    eds_healthy: AtomicBool,
    /// Health from active checks (true when none are configured).
    pub(crate) hc_healthy: AtomicBool,
    pub(crate) hc_streak: AtomicU32,
    /// Ejected by outlier detection until this [`now_ms`] (0: not).
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Requests in flight.
    pub active: AtomicU32,
    /// Connections to it.
    pub pool: Pool,
}

impl Endpoint {
    fn new(spec: &EndpointSpec, cfg: &ClusterConfig, stats: &Arc<ClusterStats>) -> Self {
        Endpoint {
            addr: spec.addr,
            weight: spec.weight,
            eds_healthy: AtomicBool::new(eds_ok(spec.health)),
            hc_healthy: AtomicBool::new(true),
            hc_streak: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            active: AtomicU32::new(0),
            pool: Pool::new(spec.addr, cfg, stats.clone()),
        }
    }

    /// Whether it may take new requests now.
    pub fn available(&self, now: u64) -> bool {
        self.eds_healthy.load(Relaxed)
            && self.hc_healthy.load(Relaxed)
            && self.ejected_until.load(Relaxed) <= now
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
    /// The endpoints.
    pub endpoints: Vec<Arc<Endpoint>>,
    pub(crate) lb: lb::Tables,
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
    /// Whether the cluster is in panic, and until when that answer holds
    /// (`(until_ms << 1) | panic`): counting the available endpoints is a
    /// pass over all of them, so it is done at most every
    /// [`PANIC_RECHECK_MS`], not per request.
    pub(crate) panic: AtomicU64,
}

/// How long a panic decision is reused.
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
            panic: AtomicU64::new(0),
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

    /// Replaces the endpoints, keeping the state of those that remain.
    pub fn set_endpoints(&self, specs: &[EndpointSpec]) {
        let specs = &*self.effective(specs);
        let old = self.endpoints.load();
        let by_addr: HashMap<SocketAddr, &Arc<Endpoint>> =
            old.endpoints.iter().map(|e| (e.addr, e)).collect();
        let endpoints: Vec<Arc<Endpoint>> = specs
            .iter()
            .map(|s| match by_addr.get(&s.addr) {
                Some(e) if e.weight == s.weight => {
                    e.eds_healthy.store(eds_ok(s.health), Relaxed);
                    Arc::clone(e)
                }
                _ => Arc::new(Endpoint::new(s, &self.config, &self.stats)),
            })
            .collect();
        let lb = lb::Tables::build(self.config.lb, &endpoints);
        self.stats
            .membership_total
            .store(endpoints.len() as u64, Relaxed);
        self.endpoints
            .store(Arc::new(EndpointSet { endpoints, lb }));
    }

    /// Records the outcome of a request for outlier detection.
    pub fn observe(&self, ep: &Endpoint, status: Option<u16>) {
        let Some(o) = &self.config.outlier else {
            return;
        };
        let is_5xx = status.is_none_or(|s| s >= 500);
        let is_gw = status.is_none_or(|s| (502..=504).contains(&s));
        let trip = |counter: &AtomicU32, bad: bool, limit: u32| -> bool {
            if !bad {
                counter.store(0, Relaxed);
                return false;
            }
            limit > 0 && counter.fetch_add(1, Relaxed) + 1 >= limit
        };
        let t1 = trip(&ep.consecutive_5xx, is_5xx, o.consecutive_5xx);
        let t2 = trip(&ep.consecutive_gateway, is_gw, o.consecutive_gateway);
        if !(t1 || t2) {
            return;
        }
        let now = now_ms();
        let set = self.endpoints.load();
        let ejected = set
            .endpoints
            .iter()
            .filter(|e| e.ejected_until.load(Relaxed) > now)
            .count();
        // Envoy always allows ejecting one host, whatever the percentage.
        if ejected > 0
            && (ejected + 1) * 100 > set.endpoints.len() * o.max_ejection_percent as usize
        {
            return;
        }
        let n = ep.ejections.fetch_add(1, Relaxed) + 1;
        let length = (o.base_ejection * n).min(o.max_ejection);
        ep.ejected_until
            .store(now + length.as_millis() as u64, Relaxed);
        ep.consecutive_5xx.store(0, Relaxed);
        ep.consecutive_gateway.store(0, Relaxed);
        self.stats.outlier_ejections.fetch_add(1, Relaxed);
        tracing::warn!(cluster = %self.config.name, endpoint = %ep.addr, for_ms = length.as_millis() as u64, "endpoint ejected by outlier detection");
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
        endpoints: &HashMap<Arc<str>, Arc<Vec<EndpointSpec>>>,
    ) -> foldhash::HashMap<Arc<str>, Arc<Cluster>> {
        let mut next =
            foldhash::HashMap::with_capacity_and_hasher(configs.len(), Default::default());
        for (name, cfg) in configs {
            let cluster = match self.clusters.get(name) {
                Some(c) if c.config == *cfg || *c.config == **cfg => c.clone(),
                old => {
                    let stats = self.stats.entry(name.clone()).or_default().clone();
                    let c = Cluster::new(cfg.clone(), stats);
                    // Keep endpoints (pools, health) when only the policy changed.
                    if let Some(old) = old {
                        if old.config.http2 == cfg.http2
                            && old.config.connect_timeout == cfg.connect_timeout
                        {
                            c.endpoints.store(old.endpoints.load_full());
                        }
                    }
                    if let Some(hc) = &cfg.health_check {
                        health::spawn(Arc::downgrade(&c), hc.clone());
                    }
                    spawn_idle_sweep(Arc::downgrade(&c));
                    if let Discovery::Dns(hosts) = &cfg.discovery {
                        spawn_dns(Arc::downgrade(&c), hosts.clone());
                    }
                    c
                }
            };
            match &cfg.discovery {
                Discovery::Eds(service) => {
                    let specs = endpoints.get(service).map(|v| v.as_slice()).unwrap_or(&[]);
                    if !same_endpoints(&cluster, specs) {
                        cluster.set_endpoints(specs);
                    }
                }
                Discovery::Static(specs) => {
                    if !same_endpoints(&cluster, specs) {
                        cluster.set_endpoints(specs);
                    }
                }
                Discovery::Dns(_) => {}
            }
            next.insert(name.clone(), cluster);
        }
        self.stats.retain(|n, _| next.contains_key(n));
        self.clusters = next.clone();
        next
    }
}

fn same_endpoints(cluster: &Cluster, specs: &[EndpointSpec]) -> bool {
    let set = cluster.endpoints.load();
    let specs = &*cluster.effective(specs);
    set.endpoints.len() == specs.len()
        && set.endpoints.iter().zip(specs).all(|(e, s)| {
            e.addr == s.addr
                && e.weight == s.weight
                && e.eds_healthy.load(Relaxed) == eds_ok(s.health)
        })
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

/// Resolves a DNS cluster's host names now and at its refresh rate while
/// it lives.
fn spawn_dns(cluster: std::sync::Weak<Cluster>, dns: DnsTargets) {
    tokio::spawn(async move {
        loop {
            let mut specs = Vec::new();
            for (h, port, weight) in &dns.hosts {
                match tokio::net::lookup_host((h.as_str(), *port)).await {
                    Ok(addrs) => {
                        let mut kept = dns.family.keep(addrs.collect());
                        if dns.logical {
                            kept.truncate(1);
                        }
                        specs.extend(kept.into_iter().map(|addr| EndpointSpec {
                            addr,
                            weight: *weight,
                            health: HealthStatus::Unknown,
                            locality: 0,
                            locality_weight: 1,
                        }));
                    }
                    Err(e) => tracing::warn!(host = %h, error = %e, "DNS resolution failed"),
                }
            }
            specs.sort_by_key(|s| s.addr);
            specs.dedup_by_key(|s| s.addr);
            let Some(c) = cluster.upgrade() else { return };
            if !same_endpoints(&c, &specs) {
                c.set_endpoints(&specs);
            }
            drop(c);
            tokio::time::sleep(dns.refresh).await;
        }
    });
}

/// Which load balancer to use is fixed per cluster.
pub fn is_hashing(c: &Cluster) -> bool {
    c.config.lb == LbKind::RingHash
}
