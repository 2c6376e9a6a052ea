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
    /// A step coprime with the total weight, near its golden section:
    /// round robin takes tickets `i * stride mod total`, which visit every
    /// slot once per cycle but spread, so an endpoint of weight 100 gets
    /// its turns between the others' rather than 100 in a row.
    stride: u64,
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

/// The endpoint (index among `n`) a ticket picks: in turn when all
/// weights are equal, else by weight, spread by the table's stride.
fn pick_weighted(t: &Tables, n: usize, ticket: u64) -> usize {
    match t.cumulative.last() {
        None => (ticket % n as u64) as usize,
        Some(&total) => {
            let x =
                ((u128::from(ticket % total) * u128::from(t.stride)) % u128::from(total)) as u64;
            t.cumulative.partition_point(|c| *c <= x)
        }
    }
}

/// The smallest step at or above 0.618 of `total` that is coprime with
/// it (1 for totals below 3).
fn stride(total: u64) -> u64 {
    fn gcd(mut a: u64, mut b: u64) -> u64 {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
    if total < 3 {
        return 1;
    }
    let mut s = (total as f64 * 0.618) as u64;
    while gcd(s, total) != 1 {
        s += 1;
    }
    s
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
            t.stride = stride(sum);
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
                pick_weighted(&set.lb, n, fastrand::u64(..))
            }
            (LbKind::RoundRobin, _) => pick_weighted(&set.lb, n, self.rr.fetch_add(1, Relaxed)),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weighted round robin: exact shares over a cycle, spread out.
    #[test]
    fn weighted_round_robin_spreads_turns() {
        for weights in [vec![100u64, 1], vec![2, 1, 1], vec![5, 3, 2, 7]] {
            let mut sum = 0;
            let cumulative: Vec<u64> = weights
                .iter()
                .map(|w| {
                    sum += w;
                    sum
                })
                .collect();
            let t = Tables {
                cumulative,
                stride: stride(sum),
                ring: Vec::new(),
            };
            let picks: Vec<usize> = (0..sum)
                .map(|i| pick_weighted(&t, weights.len(), i))
                .collect();
            for (i, w) in weights.iter().enumerate() {
                assert_eq!(
                    picks.iter().filter(|p| **p == i).count() as u64,
                    *w,
                    "{weights:?}"
                );
            }
            // Turns are interleaved: no endpoint runs much longer than
            // its weight over the others' allows (blocks of `weight` in a
            // row would be the plain cumulative walk).
            let max = *weights.iter().max().unwrap();
            let bound = max.div_ceil(sum - max) + 1;
            let longest = picks
                .chunk_by(|a, b| a == b)
                .map(<[usize]>::len)
                .max()
                .unwrap_or(0);
            assert!(longest as u64 <= bound, "{weights:?}: {picks:?}");
        }
        assert_eq!(stride(10), 7);
        assert_eq!(stride(2), 1);
    }
}
