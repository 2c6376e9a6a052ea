//! Load balancing: weighted round robin, least request (power of two
//! choices), random and ring hash. Unavailable endpoints are skipped; when
//! none is available the caller answers 503.

use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::{now_ms, Cluster, Endpoint};
use crate::config::cluster::LbKind;

/// Precomputed tables for an endpoint set.
#[derive(Debug, Default)]
pub struct Tables {
    /// Running sums of weights (empty when all weights are equal).
    cumulative: Vec<u64>,
    /// Ring of (hash, endpoint index), sorted by hash.
    ring: Vec<(u64, u32)>,
}

/// A stable 64-bit hash.
pub fn hash64(v: impl Hash) -> u64 {
    // SipHash with fixed keys: stable for the life of the process, which is
    // all a ring needs.
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

impl Tables {
    /// Builds the tables the policy needs.
    pub fn build(kind: LbKind, eps: &[Arc<Endpoint>]) -> Self {
        let mut t = Tables::default();
        if eps.iter().any(|e| e.weight != eps[0].weight) {
            let mut sum = 0u64;
            t.cumulative = eps
                .iter()
                .map(|e| {
                    sum += e.weight as u64;
                    sum
                })
                .collect();
        }
        if kind == LbKind::RingHash && !eps.is_empty() {
            // Envoy's minimum ring size is 1024 entries.
            let total: u64 = eps.iter().map(|e| e.weight as u64).sum();
            let scale = (1024.0 / total as f64).max(1.0);
            for (i, e) in eps.iter().enumerate() {
                let points = ((e.weight as f64) * scale).ceil() as u64;
                for p in 0..points.min(65_536) {
                    t.ring.push((hash64((e.addr, p)), i as u32));
                }
            }
            t.ring.sort_unstable();
        }
        t
    }
}

impl Cluster {
    /// Picks an endpoint for a request (`hash` for ring hash), skipping
    /// `avoid` (the endpoint a retry is moving away from) when possible.
    pub fn pick(&self, hash: Option<u64>, avoid: Option<&Endpoint>) -> Option<Arc<Endpoint>> {
        let set = self.endpoints.load();
        let eps = &set.endpoints;
        let n = eps.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let panic = self.in_panic(eps, now);
        if panic {
            self.stats.lb_healthy_panic.fetch_add(1, Relaxed);
        }
        let ok = |e: &Endpoint| {
            (panic || e.available(now)) && (n == 1 || avoid.is_none_or(|a| !std::ptr::eq(a, e)))
        };
        let start = match (self.config.lb, hash) {
            (LbKind::RingHash, Some(h)) if !set.lb.ring.is_empty() => {
                let ring = &set.lb.ring;
                let i = ring.partition_point(|(x, _)| *x < h) % ring.len();
                // Walk the ring to the first usable endpoint.
                for k in 0..ring.len().min(n * 64) {
                    let e = &eps[ring[(i + k) % ring.len()].1 as usize];
                    if ok(e) {
                        return Some(e.clone());
                    }
                }
                return None;
            }
            (LbKind::LeastRequest, _) if n > 1 => {
                let a = &eps[fastrand::usize(..n)];
                let b = &eps[fastrand::usize(..n)];
                let best = match (ok(a), ok(b)) {
                    (true, true) => Some(if b.active.load(Relaxed) < a.active.load(Relaxed) {
                        b
                    } else {
                        a
                    }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => None,
                };
                if let Some(e) = best {
                    return Some(e.clone());
                }
                fastrand::usize(..n)
            }
            (LbKind::Random | LbKind::RingHash | LbKind::LeastRequest, _) => {
                self.weighted(&set.lb, n, fastrand::u64(..))
            }
            (LbKind::RoundRobin, _) => self.weighted(&set.lb, n, self.rr.fetch_add(1, Relaxed)),
        };
        (0..n)
            .map(|k| &eps[(start + k) % n])
            .find(|e| ok(e))
            .cloned()
    }

    /// Envoy's panic mode: with fewer than the threshold's share of the
    /// endpoints available, they all take traffic, so that a health check
    /// that fails everywhere does not take the whole service down with it.
    fn in_panic(&self, eps: &[Arc<Endpoint>], now: u64) -> bool {
        let threshold = self.config.panic_threshold;
        if threshold <= 0.0 {
            return false;
        }
        let cached = self.panic.load(Relaxed);
        if cached >> 1 > now {
            return cached & 1 == 1;
        }
        let available = eps.iter().filter(|e| e.available(now)).count();
        let panic = (available as f64) * 100.0 < threshold * eps.len() as f64;
        self.panic.store(
            ((now + super::PANIC_RECHECK_MS) << 1) | u64::from(panic),
            Relaxed,
        );
        panic
    }

    fn weighted(&self, t: &Tables, n: usize, ticket: u64) -> usize {
        match t.cumulative.last() {
            None => (ticket % n as u64) as usize,
            Some(total) => {
                let x = ticket % total;
                t.cumulative.partition_point(|c| *c <= x)
            }
        }
    }
}
