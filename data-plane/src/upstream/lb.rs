//! Load balancing: weighted round robin, least request (the least busy of
//! N random choices, or weights scaled down by active requests), random
//! and ring hash, within a priority level chosen as Envoy chooses it.
//! Unavailable endpoints are skipped; when none is available the caller
//! answers 503.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::{now_ms, Cluster, Endpoint, EndpointSet};
use crate::config::cluster::{ClusterConfig, LbKind, RingSize};

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
    /// Maglev table over every endpoint of the level (as Envoy's while
    /// all are healthy).
    maglev: super::maglev::Table,
    /// The table over the endpoints a pick may take, when some may not
    /// (Envoy builds its table over healthy endpoints only), one per
    /// kind of pick (any, healthy only, degraded only).
    maglev_live: Arc<[arc_swap::ArcSwapOption<LiveMaglev>; 3]>,
    /// The available endpoints' total weight, for bounded loads, and until
    /// when ([`now_ms`]) it holds (0: counted again at the next pick).
    pub(crate) available_weight: AtomicU64,
    pub(crate) available_until: AtomicU64,
}

/// Envoy's hash for ring positions and request keys: xxHash64, seed 0.
pub fn hash64(v: impl AsRef<[u8]>) -> u64 {
    xxhash_rust::xxh64::xxh64(v.as_ref(), 0)
}

/// Envoy's hash of several values (a header's): each value's hash seeds
/// the next, in sorted order so that their order does not count.
pub fn hash_values(mut values: Vec<Vec<u8>>) -> u64 {
    values.sort_unstable();
    values
        .iter()
        .fold(0, |seed, v| xxhash_rust::xxh64::xxh64(v, seed))
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
    /// Builds the tables the cluster's policy needs.
    pub fn build(config: &ClusterConfig, eps: &[Arc<Endpoint>]) -> Self {
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
        if config.lb == LbKind::RingHash && !eps.is_empty() {
            t.ring = ring(eps, config.ring_size, config.hash_by_hostname);
        }
        if config.lb == LbKind::Maglev {
            t.maglev =
                super::maglev::build(eps, config.maglev_table, config.hash_by_hostname, |_| true);
        }
        t
    }
}

/// A hash ring sized as Envoy sizes it: the lightest endpoint gets a whole
/// number of entries and the ring at least `size.min` of them, but no more
/// than `size.max`; each endpoint's share of entries is its share of the
/// weight. Entries are where Envoy puts them (xxHash64 of `address_n`, or
/// of `key_n` for an endpoint with a hash key or, when the cluster says
/// so, a host name), so a key goes to the same endpoint as through an Envoy beside this
/// proxy. (Envoy builds its ring over the healthy endpoints; this one
/// holds them all and walks past those that are not: the same endpoint
/// for a key while all are healthy, and only keys of an unhealthy one
/// move.)
fn ring(eps: &[Arc<Endpoint>], size: RingSize, by_hostname: bool) -> Vec<(u64, u32)> {
    let total: f64 = eps.iter().map(|e| f64::from(e.weight.max(1))).sum();
    let lightest = eps
        .iter()
        .map(|e| f64::from(e.weight.max(1)) / total)
        .fold(1.0, f64::min);
    let scale = ((lightest * size.min as f64).ceil() / lightest).min(size.max as f64);
    let mut ring = Vec::with_capacity(scale.ceil() as usize + eps.len());
    let (mut made, mut target) = (0u64, 0.0f64);
    let mut key = String::new();
    for (i, e) in eps.iter().enumerate() {
        // Envoy's `hashKey`: the metadata's key, else the host name when
        // the cluster hashes by name (here: when it has one), else the
        // address.
        let name = e
            .hash_key
            .as_deref()
            .or(e.hostname.as_deref().filter(|_| by_hostname));
        // In Envoy's float arithmetic, so that the counts agree.
        target += scale * (f64::from(e.weight.max(1)) / total);
        let mut p = 0u64;
        while (made as f64) < target {
            use std::fmt::Write;
            key.clear();
            let _ = match name {
                Some(n) => write!(key, "{n}_{p}"),
                None => write!(key, "{}_{p}", e.addr),
            };
            ring.push((hash64(&key), i as u32));
            made += 1;
            p += 1;
        }
    }
    ring.sort_unstable();
    ring
}

/// An endpoint drawn at random in proportion to its weight over (active
/// requests + 1) to the power `bias`: Envoy's weighted least request
/// shares (Envoy keeps an earliest-deadline-first schedule of the same
/// weights; drawing at random gives each the same share without a
/// schedule shared between workers).
fn by_load(
    eps: &[Arc<Endpoint>],
    bias: f64,
    ok: impl Fn(&Endpoint) -> bool,
) -> Option<&Arc<Endpoint>> {
    draw(eps, |e| f64::from(e.weight) / busy(e, bias), ok)
}

/// (Active requests + 1) to the power `bias`.
fn busy(e: &Endpoint, bias: f64) -> f64 {
    let busy = e.active.load(Relaxed) as f64 + 1.0;
    if bias == 1.0 {
        busy
    } else {
        busy.powf(bias)
    }
}

/// An endpoint of those `ok` admits, drawn at random in proportion to
/// `share`.
fn draw(
    eps: &[Arc<Endpoint>],
    share: impl Fn(&Endpoint) -> f64,
    ok: impl Fn(&Endpoint) -> bool,
) -> Option<&Arc<Endpoint>> {
    let total: f64 = eps.iter().filter(|e| ok(e)).map(|e| share(e)).sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let mut x = fastrand::f64() * total;
    let mut last = None;
    for e in eps.iter().filter(|e| ok(e)) {
        let s = share(e);
        if x < s {
            return Some(e);
        }
        x -= s;
        last = Some(e);
    }
    // Active counts moved between the two passes (other workers).
    last
}

/// What a request's tries remember for Envoy's `previous_priorities`
/// retry priority: the priorities tried so far, and those excluded since
/// the last update (every `update_frequency` tries).
#[derive(Debug, Default)]
pub struct TriedLevels {
    seen: Vec<u32>,
    excluded: Vec<u32>,
}

impl TriedLevels {
    /// The priorities retry number `attempt` (1 for the first retry)
    /// excludes, `last` being the endpoint the try before it went to.
    pub fn before_retry(
        &mut self,
        cluster: &Cluster,
        last: &Endpoint,
        attempt: u32,
        every: u32,
    ) -> &[u32] {
        if let Some(p) = cluster.priority_of(last) {
            if !self.seen.contains(&p) {
                self.seen.push(p);
            }
        }
        // Envoy: the original load until `every` tries were made, then
        // every `every` tries the levels of all tried so far.
        if attempt >= every && attempt.is_multiple_of(every) {
            self.excluded.clone_from(&self.seen);
        }
        &self.excluded
    }
}

/// Which endpoints of a level a pick may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Any available one (every one, in panic).
    Any { panic: bool },
    /// Available ones, healthy or degraded.
    Only { degraded: bool },
}

/// How old (in ms) cached priority-load shares must be before a level
/// with nothing to offer has them counted again within a pick.
const RECOUNT_AFTER_MS: u64 = 5;

/// Envoy's priority load: the percent of requests each priority level
/// takes, its healthy endpoints first and then its degraded ones (as
/// running sums), and which levels are in panic.
#[derive(Debug, Default)]
pub struct Spill {
    /// Good until this [`now_ms`].
    until: u64,
    /// Running sums of the levels' healthy percentages, then of their
    /// degraded ones (the last is 100).
    cumulative: Vec<u32>,
    /// Whether each level is in panic.
    panic: Vec<bool>,
}

/// The running sums of the levels' loads (what a draw is compared with).
fn running_sums(loads: &[u32]) -> Vec<u32> {
    loads
        .iter()
        .scan(0, |sum, l| {
            *sum += l;
            Some(*sum)
        })
        .collect()
}

/// A level as Envoy scores it: its healthy and its degraded share (by
/// count or by weight) each times the overprovisioning factor, at most
/// 100, and how many of its endpoints are available (either way).
struct LevelHealth {
    healthy: u32,
    degraded: u32,
    up: usize,
    /// Its endpoints, less those kept out until their first health check
    /// (Envoy's excluded hosts count nowhere).
    len: usize,
}

fn level_health(set: &EndpointSet, eps: &[Arc<Endpoint>], now: u64) -> LevelHealth {
    let (mut total, mut healthy, mut degraded, mut up) = (0u128, 0u128, 0u128, 0usize);
    let mut len = 0;
    for e in eps {
        if !e.in_play_in_panic() {
            continue;
        }
        len += 1;
        let w = if set.policy.weighted_health {
            u128::from(e.weight)
        } else {
            1
        };
        total += w;
        if e.available(now) {
            if e.degraded() {
                degraded += w;
            } else {
                healthy += w;
            }
            up += 1;
        }
    }
    let opf = u128::from(set.policy.overprovisioning);
    let score = |w: u128| {
        (opf * w)
            .checked_div(total)
            .map_or(0, |h| h.min(100) as u32)
    };
    LevelHealth {
        healthy: score(healthy),
        degraded: score(degraded),
        up,
        len,
    }
}

/// Whether a level with `up` of `len` endpoints available is below the
/// panic threshold (counted by endpoints, whatever health is weighed by).
fn below_threshold(up: usize, len: usize, threshold: f64) -> bool {
    (up as f64) * 100.0 < threshold * len as f64
}

impl Spill {
    /// Envoy's arithmetic: levels take their health in turn, scaled up
    /// when together they fall short of 100%; only then is a level below
    /// the panic threshold in panic, and when every level is, the levels
    /// share the traffic by their endpoint counts instead.
    pub(crate) fn compute(set: &EndpointSet, panic_threshold: f64, now: u64) -> Spill {
        let n = set.levels.len();
        // Healthy scores of every level, then degraded ones: the order in
        // which load is handed out.
        let mut shares = vec![0u64; 2 * n];
        let mut panic = Vec::with_capacity(n);
        for (i, l) in set.levels.iter().enumerate() {
            let eps = &set.endpoints[l.start..l.end];
            let h = level_health(set, eps, now);
            (shares[i], shares[n + i]) = (h.healthy.into(), h.degraded.into());
            panic.push(below_threshold(h.up, h.len, panic_threshold));
        }
        let mut whole = shares.iter().sum::<u64>().min(100);
        if whole == 100 {
            panic.fill(false);
        }
        if panic.iter().all(|p| *p) {
            // Total panic: by endpoint counts, all of them as healthy.
            for (i, l) in set.levels.iter().enumerate() {
                (shares[i], shares[n + i]) = ((l.end - l.start) as u64, 0);
            }
            whole = set.endpoints.len() as u64;
        }
        let mut loads = vec![0u32; 2 * n];
        let mut left = 100;
        for (load, s) in loads.iter_mut().zip(&shares) {
            *load = ((s * 100).checked_div(whole).unwrap_or(0) as u32).min(left);
            left -= *load;
        }
        // What rounding left over goes to the first level with healthy
        // share, else with degraded share; with none anywhere, all of it
        // goes to the first level.
        let first = shares.iter().position(|s| *s > 0).unwrap_or(0);
        loads[first] += left;
        Spill {
            until: now + super::PANIC_RECHECK_MS,
            cumulative: running_sums(&loads),
            panic,
        }
    }

    /// Envoy's `previous_priorities` retry priority: the load shared
    /// again among the levels whose priority is not in `excluded` (the
    /// levels a request's earlier tries went to), in proportion to their
    /// healthy and degraded scores (their total at most 100), each level
    /// keeping its panic; `None` when no level is left with any score
    /// (Envoy then keeps the original load).
    fn excluding(
        set: &EndpointSet,
        excluded: &[u32],
        panic_threshold: f64,
        now: u64,
    ) -> Option<Spill> {
        let n = set.levels.len();
        let mut scores = vec![0u32; 2 * n];
        for (i, l) in set.levels.iter().enumerate() {
            if !excluded.contains(&l.priority) {
                let h = level_health(set, &set.endpoints[l.start..l.end], now);
                (scores[i], scores[n + i]) = (h.healthy, h.degraded);
            }
        }
        let total = scores.iter().sum::<u32>().min(100);
        if total == 0 {
            return None;
        }
        // Envoy's rounds: each level its share of what is left, healthy
        // ones first; what rounding leaves goes round again (to the first
        // level with a share).
        let mut loads = vec![0u32; 2 * n];
        let mut left = 100u32;
        while left != 0 {
            for (load, s) in loads.iter_mut().zip(&scores) {
                let delta = left.min(s * 100 / total);
                *load += delta;
                left -= delta;
            }
        }
        Some(Spill {
            until: 0,
            cumulative: running_sums(&loads),
            panic: Spill::compute(set, panic_threshold, now).panic,
        })
    }

    /// The level a draw (any number; the request's hash under ring hash)
    /// lands in, and whether among its degraded endpoints.
    fn level(&self, draw: u64) -> (usize, bool) {
        let x = (draw % 100) as u32 + 1;
        let n = self.panic.len();
        let slot = self
            .cumulative
            .iter()
            .position(|c| x <= *c)
            .unwrap_or(2 * n - 1);
        (slot % n, slot >= n)
    }
}

impl Cluster {
    /// Picks an endpoint for a request (`hash` for ring hash), skipping
    /// `avoid` (the endpoint a retry is moving away from) when possible:
    /// first a priority level, then an endpoint in it.
    pub fn pick(&self, hash: Option<u64>, avoid: Option<&Endpoint>) -> Option<Arc<Endpoint>> {
        let set = self.endpoints.load();
        let now = now_ms();
        match set.levels.as_slice() {
            [] => return None,
            [one] if !set.has_degraded.load(Relaxed) => {
                let panic = in_panic(&set, self.config.panic_threshold, now);
                let class = Class::Any { panic };
                return self.pick_in(&set.endpoints, &one.lb, class, hash, avoid, now);
            }
            _ => {}
        }
        let draw = hash.unwrap_or_else(|| fastrand::u64(..));
        let in_level = |spill: &Spill| self.pick_in_spill(&set, spill, draw, hash, avoid, now);
        let cached = set.spill.load();
        if cached.until > now {
            let got = in_level(&cached);
            // The shares may predate a change of health (they are reused
            // for a while): if the level has nothing, once more on fresh
            // ones, unless these are only a few milliseconds old (a level
            // that is down for good is not recounted per request).
            if got.is_some() || cached.until > now + super::PANIC_RECHECK_MS - RECOUNT_AFTER_MS {
                return got;
            }
        }
        drop(cached);
        let fresh = Arc::new(Spill::compute(&set, self.config.panic_threshold, now));
        set.spill.store(fresh.clone());
        in_level(&fresh)
    }

    /// [`Cluster::pick`] for a retry under Envoy's `previous_priorities`:
    /// the levels of priorities in `excluded` take no load while another
    /// level has some to offer.
    pub fn pick_excluding(
        &self,
        hash: Option<u64>,
        avoid: Option<&Endpoint>,
        excluded: &[u32],
    ) -> Option<Arc<Endpoint>> {
        let set = self.endpoints.load();
        let now = now_ms();
        let spill = match set.levels.as_slice() {
            [_, _, ..] if !excluded.is_empty() => {
                Spill::excluding(&set, excluded, self.config.panic_threshold, now)
            }
            _ => None,
        };
        let Some(spill) = spill else {
            drop(set);
            return self.pick(hash, avoid);
        };
        let draw = hash.unwrap_or_else(|| fastrand::u64(..));
        self.pick_in_spill(&set, &spill, draw, hash, avoid, now)
    }

    /// The priority of the level `ep` is in now (`None`: gone from the
    /// cluster).
    pub fn priority_of(&self, ep: &Endpoint) -> Option<u32> {
        let set = self.endpoints.load();
        let i = set
            .endpoints
            .iter()
            .position(|e| std::ptr::eq(Arc::as_ptr(e), ep))?;
        set.levels
            .iter()
            .find(|l| (l.start..l.end).contains(&i))
            .map(|l| l.priority)
    }

    /// Picks in the level a draw lands in by `spill`.
    fn pick_in_spill(
        &self,
        set: &EndpointSet,
        spill: &Spill,
        draw: u64,
        hash: Option<u64>,
        avoid: Option<&Endpoint>,
        now: u64,
    ) -> Option<Arc<Endpoint>> {
        let (i, degraded) = spill.level(draw);
        let l = &set.levels[i];
        let class = if spill.panic[i] {
            Class::Any { panic: true }
        } else if set.has_degraded.load(Relaxed) {
            Class::Only { degraded }
        } else {
            Class::Any { panic: false }
        };
        self.pick_in(
            &set.endpoints[l.start..l.end],
            &l.lb,
            class,
            hash,
            avoid,
            now,
        )
    }

    /// Picks an endpoint of `class` among one level's `eps` (with its
    /// `tables`).
    fn pick_in(
        &self,
        eps: &[Arc<Endpoint>],
        tables: &Tables,
        class: Class,
        hash: Option<u64>,
        avoid: Option<&Endpoint>,
        now: u64,
    ) -> Option<Arc<Endpoint>> {
        let n = eps.len();
        if class == (Class::Any { panic: true }) {
            self.stats.lb_healthy_panic.fetch_add(1, Relaxed);
        }
        let usable = |e: &Endpoint| match class {
            Class::Any { panic } => (panic && e.in_play_in_panic()) || e.available(now),
            Class::Only { degraded } => e.available(now) && e.degraded() == degraded,
        };
        let ok = |e: &Endpoint| usable(e) && (n == 1 || avoid.is_none_or(|a| !std::ptr::eq(a, e)));
        // While an endpoint ramps up, shares follow the ramped weights
        // (scaled down by load under least request).
        if let Some(ss) = &self.config.slow_start {
            if now < self.slow_until.load(Relaxed) {
                let bias = (self.config.lb == LbKind::LeastRequest)
                    .then_some(self.config.least_request.active_request_bias);
                let share = |e: &Endpoint| {
                    let w = f64::from(e.weight) * e.ramp(ss, now);
                    bias.map_or(w, |b| w / busy(e, b))
                };
                if let Some(e) = draw(eps, share, ok) {
                    return Some(e.clone());
                }
            }
        }
        let start = match (self.config.lb, hash) {
            (LbKind::RingHash, Some(h)) if !tables.ring.is_empty() => {
                let ring = &tables.ring;
                let i = ring.partition_point(|(x, _)| *x < h) % ring.len();
                // Walk the ring to the first usable endpoint.
                let first = (0..ring.len().min(n * 64))
                    .map(|k| &eps[ring[(i + k) % ring.len()].1 as usize])
                    .find(|e| ok(e))?;
                return Some(match self.config.hash_balance_factor {
                    None => first.clone(),
                    Some(f) => {
                        let load = (f, self.active.load(Relaxed));
                        super::bounded::choose((eps, tables), first, h, load, ok, now).clone()
                    }
                });
            }
            (LbKind::Maglev, Some(h)) if !tables.maglev.is_empty() => {
                let first = self.maglev_pick(eps, tables, (h, class), usable, avoid, now)?;
                return Some(match self.config.hash_balance_factor {
                    None => first.clone(),
                    Some(f) => {
                        let load = (f, self.active.load(Relaxed));
                        super::bounded::choose((eps, tables), first, h, load, ok, now).clone()
                    }
                });
            }
            (LbKind::LeastRequest, _) if n > 1 => {
                let lr = &self.config.least_request;
                if tables.cumulative.is_empty() {
                    // Equal weights: the least busy of `choice_count`
                    // drawn at random (Envoy's N choices).
                    let mut best: Option<&Arc<Endpoint>> = None;
                    // Past a few hundred draws more cannot change the
                    // outcome, only the cost of a pick.
                    for _ in 0..lr.choice_count.min(256) {
                        let e = &eps[fastrand::usize(..n)];
                        if ok(e)
                            && best.is_none_or(|b| e.active.load(Relaxed) < b.active.load(Relaxed))
                        {
                            best = Some(e);
                        }
                    }
                    if let Some(e) = best {
                        return Some(e.clone());
                    }
                    fastrand::usize(..n)
                } else if lr.active_request_bias == 0.0 {
                    // Active requests do not count: weighted round robin.
                    pick_weighted(tables, n, self.rr.fetch_add(1, Relaxed))
                } else {
                    if let Some(e) = by_load(eps, lr.active_request_bias, ok) {
                        return Some(e.clone());
                    }
                    // Every share rounded to nothing: by weight alone.
                    pick_weighted(tables, n, fastrand::u64(..))
                }
            }
            (LbKind::Random | LbKind::RingHash | LbKind::Maglev | LbKind::LeastRequest, _) => {
                pick_weighted(tables, n, fastrand::u64(..))
            }
            (LbKind::RoundRobin, _) => pick_weighted(tables, n, self.rr.fetch_add(1, Relaxed)),
        };
        (0..n)
            .map(|k| &eps[(start + k) % n])
            .find(|e| ok(e))
            .cloned()
    }
}

/// A level's Maglev table over the endpoints one kind of pick may take:
/// which those were (`None` table: all, the full table serves), and until
/// when ([`now_ms`]) that is taken as still so.
#[derive(Debug)]
pub(crate) struct LiveMaglev {
    usable: Vec<bool>,
    table: Option<super::maglev::Table>,
    until: AtomicU64,
}

impl Tables {
    /// Drops what was learnt of which endpoints picks may take (their
    /// availability changed).
    pub(crate) fn availability_changed(&self) {
        self.available_until.store(0, Relaxed);
        for live in self.maglev_live.iter() {
            if let Some(l) = live.load().as_ref() {
                l.until.store(0, Relaxed);
            }
        }
    }
}

impl Cluster {
    /// Maglev's endpoint for `hash` among a level's `eps`: from the table
    /// over every endpoint while all may be taken, else from one over
    /// those `usable` admits (Envoy builds its table over healthy
    /// endpoints). Which those are is looked at again every
    /// [`PANIC_RECHECK_MS`](super::PANIC_RECHECK_MS) or when availability
    /// changes; a new set's table is built off the request path (a
    /// blocking task), and until it lands picks take the table there is,
    /// walking past what may not be taken. A retry that must avoid
    /// `avoid` takes the flipped hash's slot, as Envoy's second attempt.
    fn maglev_pick<'a>(
        &self,
        eps: &'a [Arc<Endpoint>],
        tables: &Tables,
        (hash, class): (u64, Class),
        usable: impl Fn(&Endpoint) -> bool,
        avoid: Option<&Endpoint>,
        now: u64,
    ) -> Option<&'a Arc<Endpoint>> {
        let kind = match class {
            Class::Any { .. } => 0,
            Class::Only { degraded: false } => 1,
            Class::Only { degraded: true } => 2,
        };
        let cell = &tables.maglev_live[kind];
        let mut live = cell.load();
        if live.as_ref().is_none_or(|l| l.until.load(Relaxed) <= now) {
            let mask: Vec<bool> = eps.iter().map(|e| usable(e)).collect();
            let until = now + super::PANIC_RECHECK_MS;
            match live.as_ref() {
                Some(l) if l.usable == mask => l.until.store(until, Relaxed),
                _ => {
                    let all = mask.iter().all(|u| *u);
                    let next = Arc::new(LiveMaglev {
                        usable: mask.clone(),
                        table: None,
                        until: AtomicU64::new(until),
                    });
                    let prev = cell.compare_and_swap(&*live, Some(next));
                    // The one that made the change has the table built.
                    let won = match (&*prev, &*live) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    };
                    if won && !all {
                        self.build_live_maglev(eps, &tables.maglev_live, kind, mask);
                    }
                    live = cell.load();
                }
            }
        }
        let table = live
            .as_ref()
            .and_then(|l| l.table.as_ref())
            .unwrap_or(&tables.maglev);
        if table.is_empty() {
            return None;
        }
        let avoided = |e: &Endpoint| eps.len() > 1 && avoid.is_some_and(|a| std::ptr::eq(a, e));
        let at = |attempt| &eps[table[super::maglev::slot(table, hash, attempt)] as usize];
        let first = at(0);
        if usable(first) && !avoided(first) {
            return Some(first);
        }
        if usable(first) {
            let second = at(1);
            if usable(second) {
                return Some(second);
            }
        }
        // A table that predates the latest change: the next slots that
        // may be taken, then any endpoint that may.
        let start = super::maglev::slot(table, hash, 0);
        let take = |e: &&Arc<Endpoint>| usable(e) && !avoided(e);
        (1..table.len().min(eps.len() * 64))
            .map(|k| &eps[table[(start + k) % table.len()] as usize])
            .find(take)
            .or_else(|| {
                (0..eps.len())
                    .map(|k| &eps[(start + k) % eps.len()])
                    .find(take)
            })
    }

    /// Builds the Maglev table over the endpoints of `eps` that `usable`
    /// marks and puts it in `cells[kind]`, unless another set was noted
    /// meanwhile: on a blocking task when in a runtime (a large table
    /// takes a while), else here.
    fn build_live_maglev(
        &self,
        eps: &[Arc<Endpoint>],
        cells: &Arc<[arc_swap::ArcSwapOption<LiveMaglev>; 3]>,
        kind: usize,
        usable: Vec<bool>,
    ) {
        let (eps, cells) = (eps.to_vec(), cells.clone());
        let (size, by_hostname) = (self.config.maglev_table, self.config.hash_by_hostname);
        let build = move || {
            let table = super::maglev::build(&eps, size, by_hostname, |i| usable[i]);
            let cell = &cells[kind];
            let current = cell.load();
            if current.as_ref().is_some_and(|l| l.usable == usable) {
                let until = now_ms() + super::PANIC_RECHECK_MS;
                cell.compare_and_swap(
                    &*current,
                    Some(Arc::new(LiveMaglev {
                        usable,
                        table: Some(table),
                        until: AtomicU64::new(until),
                    })),
                );
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(build)),
            Err(_) => build(),
        }
    }
}

/// Envoy's panic mode for a single level: unless it is healthy enough (its
/// health score at 100%), fewer than the threshold's share of its endpoints
/// available puts all of them in play, so that a health check that fails
/// everywhere does not take the whole service down. (The same rule as
/// [`Spill::compute`]'s for one level, without its shares.)
fn in_panic(set: &EndpointSet, threshold: f64, now: u64) -> bool {
    if threshold <= 0.0 {
        return false;
    }
    let cached = set.panic.load(Relaxed);
    if cached >> 1 > now {
        return cached & 1 == 1;
    }
    let h = level_health(set, &set.endpoints, now);
    let panic = h.healthy < 100 && below_threshold(h.up, h.len, threshold);
    set.panic.store(
        ((now + super::PANIC_RECHECK_MS) << 1) | u64::from(panic),
        Relaxed,
    );
    panic
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::cluster::{Assignment, ClusterConfig, EndpointSpec, LoadPolicy};
    use crate::stats::ClusterStats;
    use portico_proto::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy, LeastRequestLbConfig,
        RingHashLbConfig,
    };
    use portico_proto::envoy::config::cluster::v3::Cluster as PbCluster;
    use portico_proto::envoy::config::core::v3::{HealthStatus, RuntimeDouble};
    use portico_proto::google::protobuf::{UInt32Value, UInt64Value};

    fn pb(lb: LbPolicy, config: Option<LbConfig>) -> PbCluster {
        PbCluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            lb_policy: lb as i32,
            lb_config: config,
            ..Default::default()
        }
    }

    /// A cluster of endpoints with these weights.
    fn cluster(weights: &[u32], lb: LbPolicy, config: Option<LbConfig>) -> Arc<Cluster> {
        let cfg = ClusterConfig::convert(&pb(lb, config)).expect("converts");
        let c = Cluster::new(Arc::new(cfg), Arc::new(ClusterStats::default()));
        let specs: Vec<EndpointSpec> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| EndpointSpec {
                weight: *w,
                ..EndpointSpec::at(([127, 0, 0, 1], 1000 + i as u16))
            })
            .collect();
        c.set_endpoints(&specs, LoadPolicy::default());
        c
    }

    /// How many of `picks` picks went to each endpoint.
    fn shares(c: &Cluster, picks: u32) -> Vec<u32> {
        let set = c.endpoints.load();
        let mut n = vec![0; set.endpoints.len()];
        for _ in 0..picks {
            let e = c.pick(None, None).expect("an endpoint");
            let i = set
                .endpoints
                .iter()
                .position(|x| Arc::ptr_eq(x, &e))
                .expect("one of them");
            n[i] += 1;
        }
        n
    }

    fn least_request(choices: Option<u32>, bias: Option<f64>) -> Option<LbConfig> {
        Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
            choice_count: choices.map(|value| UInt32Value { value }),
            active_request_bias: bias.map(|default_value| RuntimeDouble {
                default_value,
                runtime_key: String::new(),
            }),
            ..Default::default()
        }))
    }

    /// Equal weights: the least busy of `choice_count` random draws.
    #[test]
    fn least_request_takes_the_least_busy_of_its_choices() {
        for (choices, low, high) in [(None, 700, 1050), (Some(10), 1800, 2000)] {
            let c = cluster(
                &[1, 1, 1, 1],
                LbPolicy::LeastRequest,
                least_request(choices, None),
            );
            // Endpoint 0 idle, the others busy: it wins whenever drawn,
            // 1 - (3/4)^N of the picks (44% with two choices, 94% with ten).
            for e in &c.endpoints.load().endpoints[1..] {
                e.active.store(5, Relaxed);
            }
            let n = shares(&c, 2000);
            assert!((low..=high).contains(&n[0]), "{choices:?}: {n:?}");
        }
    }

    /// Unequal weights: shares are weight / (active + 1)^bias; bias 0 is
    /// weighted round robin.
    #[test]
    fn weighted_least_request_scales_weights_by_load() {
        let c = cluster(&[1, 3], LbPolicy::LeastRequest, None);
        let n = shares(&c, 4000);
        assert!((800..=1200).contains(&n[0]), "idle, 1:3 by weight: {n:?}");
        // Two requests on the heavier one: 3 / (2 + 1) = 1, as light as
        // the other.
        c.endpoints.load().endpoints[1].active.store(2, Relaxed);
        let n = shares(&c, 4000);
        assert!((1800..=2200).contains(&n[0]), "1:1 under load: {n:?}");
        // Bias 0: the load does not count, turns go by weight exactly.
        let c = cluster(
            &[1, 3],
            LbPolicy::LeastRequest,
            least_request(None, Some(0.0)),
        );
        c.endpoints.load().endpoints[1].active.store(2, Relaxed);
        assert_eq!(shares(&c, 4000), vec![1000, 3000]);
        // Bias 2: (2 + 1)^2 = 9, so 1 : 1/3.
        let c = cluster(
            &[1, 3],
            LbPolicy::LeastRequest,
            least_request(None, Some(2.0)),
        );
        c.endpoints.load().endpoints[1].active.store(2, Relaxed);
        let n = shares(&c, 4000);
        assert!((2800..=3200).contains(&n[0]), "3:1 with bias 2: {n:?}");
    }

    /// Envoy's ring sizing: the lightest endpoint gets whole entries, the
    /// ring at least the minimum, at most the maximum.
    #[test]
    fn ring_is_sized_by_its_bounds_and_weights() {
        let ring_of = |weights: &[u32], min: Option<u64>, max: Option<u64>| {
            let cfg = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                minimum_ring_size: min.map(|value| UInt64Value { value }),
                maximum_ring_size: max.map(|value| UInt64Value { value }),
                ..Default::default()
            }));
            let c = cluster(weights, LbPolicy::RingHash, cfg);
            let set = c.endpoints.load();
            let mut per = vec![0; weights.len()];
            for (_, i) in &set.levels[0].lb.ring {
                per[*i as usize] += 1;
            }
            per
        };
        assert_eq!(ring_of(&[1, 1, 2], None, None), vec![256, 256, 512]);
        assert_eq!(ring_of(&[1, 1, 2], Some(8), None), vec![2, 2, 4]);
        // The maximum wins over whole entries for the lightest.
        assert_eq!(ring_of(&[1, 100], Some(500), Some(500)), vec![5, 495]);
        // The lightest gets whole entries: 11 of 1111, not 10.1 of 1024.
        assert_eq!(ring_of(&[1, 100], None, None), vec![11, 1100]);
    }

    /// A changed ring size takes effect though the endpoints stay the same.
    #[tokio::test]
    async fn config_change_rebuilds_the_ring() {
        let configs = |min: u64| {
            let ring = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                minimum_ring_size: Some(UInt64Value { value: min }),
                ..Default::default()
            }));
            let cfg = ClusterConfig::convert(&pb(LbPolicy::RingHash, ring)).expect("converts");
            std::collections::HashMap::from([(Arc::<str>::from("c"), Arc::new(cfg))])
        };
        let eps = two_endpoints();
        let mut m = super::super::ClusterManager::default();
        let live = m.update(&configs(16), &eps);
        assert_eq!(live["c"].endpoints.load().levels[0].lb.ring.len(), 16);
        let live = m.update(&configs(64), &eps);
        assert_eq!(live["c"].endpoints.load().levels[0].lb.ring.len(), 64);
    }

    /// Cluster "c"'s endpoints by EDS: two of weight 1.
    fn two_endpoints() -> std::collections::HashMap<Arc<str>, Arc<Assignment>> {
        let endpoints: Vec<EndpointSpec> = (0..2)
            .map(|i| EndpointSpec::at(([127, 0, 0, 1], 1000 + i)))
            .collect();
        let a = Assignment {
            endpoints,
            ..Assignment::default()
        };
        std::collections::HashMap::from([(Arc::<str>::from("c"), Arc::new(a))])
    }

    /// Endpoints (their pools, health and counts) outlive a change of the
    /// cluster's config only when their pools would be made alike: a new
    /// pool setting (here the circuit breaker's connection limit) gets new
    /// pools.
    #[tokio::test]
    async fn endpoints_outlive_a_config_change_only_with_alike_pools() {
        let configs = |lb: LbPolicy, max_connections: Option<u32>| {
            use portico_proto::envoy::config::cluster::v3::{circuit_breakers, CircuitBreakers};
            let mut c = pb(lb, None);
            c.circuit_breakers = max_connections.map(|value| CircuitBreakers {
                thresholds: vec![circuit_breakers::Thresholds {
                    max_connections: Some(UInt32Value { value }),
                    ..Default::default()
                }],
                ..Default::default()
            });
            let cfg = ClusterConfig::convert(&c).expect("converts");
            std::collections::HashMap::from([(Arc::<str>::from("c"), Arc::new(cfg))])
        };
        let eps = two_endpoints();
        let mut m = super::super::ClusterManager::default();
        let first = m.update(&configs(LbPolicy::RoundRobin, None), &eps)["c"]
            .endpoints
            .load_full();
        let second = m.update(&configs(LbPolicy::LeastRequest, None), &eps)["c"]
            .endpoints
            .load_full();
        assert!(
            Arc::ptr_eq(&first.endpoints[0], &second.endpoints[0]),
            "a policy change keeps the endpoints"
        );
        let third = m.update(&configs(LbPolicy::LeastRequest, Some(10)), &eps)["c"]
            .endpoints
            .load_full();
        assert!(
            !Arc::ptr_eq(&second.endpoints[0], &third.endpoints[0]),
            "new pool settings make new pools"
        );
    }

    /// A cluster replaced or removed by a newer config is retired: its
    /// background tasks (health checks, outlier detection, DNS) stop,
    /// though requests that started on it may keep it alive.
    #[tokio::test]
    async fn replaced_and_removed_clusters_are_retired() {
        use super::super::{live, ClusterManager};
        let configs = |lb: LbPolicy| {
            let cfg = ClusterConfig::convert(&pb(lb, None)).expect("converts");
            std::collections::HashMap::from([(Arc::<str>::from("c"), Arc::new(cfg))])
        };
        let eps = two_endpoints();
        let mut m = ClusterManager::default();
        let first = m.update(&configs(LbPolicy::RoundRobin), &eps)["c"].clone();
        let same = m.update(&configs(LbPolicy::RoundRobin), &eps)["c"].clone();
        assert!(
            Arc::ptr_eq(&first, &same),
            "an unchanged config keeps the cluster"
        );
        assert!(live(&Arc::downgrade(&first)).is_some(), "and it stays live");
        let second = m.update(&configs(LbPolicy::LeastRequest), &eps)["c"].clone();
        assert!(
            live(&Arc::downgrade(&first)).is_none(),
            "the replaced one is retired"
        );
        assert!(live(&Arc::downgrade(&second)).is_some());
        m.update(&std::collections::HashMap::new(), &eps);
        assert!(
            live(&Arc::downgrade(&second)).is_none(),
            "a removed one too"
        );
    }

    /// Settings Envoy would refuse are refused, naming the field.
    #[test]
    fn bad_lb_settings_are_refused() {
        let err = |lb, cfg| {
            ClusterConfig::convert(&pb(lb, cfg))
                .expect_err("refused")
                .to_string()
        };
        let e = err(LbPolicy::LeastRequest, least_request(Some(1), None));
        assert!(e.contains("choice_count 1 is below 2"), "{e}");
        // Envoy warns and takes 1.0.
        let pbc = pb(LbPolicy::LeastRequest, least_request(None, Some(-1.0)));
        let cfg = ClusterConfig::convert(&pbc).expect("converts");
        assert_eq!(cfg.least_request.active_request_bias, 1.0);
        let ring = |min: u64, max: u64| {
            Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                minimum_ring_size: Some(UInt64Value { value: min }),
                maximum_ring_size: Some(UInt64Value { value: max }),
                ..Default::default()
            }))
        };
        let e = err(LbPolicy::RingHash, ring(2048, 1024));
        assert!(
            e.contains("minimum_ring_size 2048 is above maximum_ring_size 1024"),
            "{e}"
        );
        let e = err(LbPolicy::RingHash, ring(1024, 9_000_000));
        assert!(
            e.contains("maximum_ring_size 9000000 is above 8388608"),
            "{e}"
        );
        let e = err(LbPolicy::RingHash, ring(0, 1024));
        assert!(e.contains("minimum_ring_size 0 makes an empty ring"), "{e}");
        let e = err(
            LbPolicy::RingHash,
            Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                hash_function: 1,
                ..Default::default()
            })),
        );
        assert!(e.contains("hash_function 1 is not supported"), "{e}");
        // Another policy's settings are not this cluster's concern.
        ClusterConfig::convert(&pb(LbPolicy::RoundRobin, ring(2048, 1024))).expect("converts");
    }

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
                ..Tables::default()
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

    /// `up[i]` of `sizes[i]` endpoints at priority `i` available, with
    /// `weights` (1 when empty) and `policy`; the cluster keeps Envoy's
    /// default panic threshold (50%).
    fn tiered(sizes: &[usize], up: &[usize], weights: &[u32], policy: LoadPolicy) -> Arc<Cluster> {
        let cfg = ClusterConfig::convert(&pb(LbPolicy::RoundRobin, None)).expect("converts");
        let c = Cluster::new(Arc::new(cfg), Arc::new(ClusterStats::default()));
        let mut specs = Vec::new();
        for (level, (&size, &up)) in sizes.iter().zip(up).enumerate() {
            for i in 0..size {
                specs.push(EndpointSpec {
                    weight: weights.get(specs.len()).copied().unwrap_or(1),
                    health: if i < up {
                        HealthStatus::Healthy
                    } else {
                        HealthStatus::Unhealthy
                    },
                    locality: level as u32,
                    priority: level as u32,
                    ..EndpointSpec::at(([127, 0, 0, 1], (1000 * (level + 1) + i) as u16))
                });
            }
        }
        c.set_endpoints(&specs, policy);
        c
    }

    /// Each level's share in percent, and which are in panic.
    /// (Each level's healthy share, then each one's degraded share when
    /// any is not 0.)
    fn spill_of(c: &Cluster) -> (Vec<u32>, Vec<bool>) {
        let set = c.endpoints.load();
        let s = Spill::compute(&set, c.config.panic_threshold, now_ms());
        let mut shares: Vec<u32> = s
            .cumulative
            .iter()
            .scan(0, |before, c| {
                let share = c - *before;
                *before = *c;
                Some(share)
            })
            .collect();
        let n = s.panic.len();
        if shares[n..].iter().all(|d| *d == 0) {
            shares.truncate(n);
        }
        (shares, s.panic)
    }

    /// Envoy's own examples (its "Priority levels" and "Panic threshold"
    /// pages), with 100 endpoints per level so that counts are percents.
    #[test]
    fn priority_levels_share_traffic_as_envoys() {
        let d = LoadPolicy::default();
        // Priority 1 wholly healthy; priority 0 at:
        for (up, to_p0) in [(100, 100), (72, 100), (71, 99), (50, 70), (25, 35), (0, 0)] {
            let (shares, panic) = spill_of(&tiered(&[100, 100], &[up, 100], &[], d));
            assert_eq!(shares, vec![to_p0, 100 - to_p0], "P0 {up}% healthy");
            assert_eq!(panic, vec![false, false], "P0 {up}% healthy");
        }
        // Both short: their health (84 + 7) is scaled up to the whole
        // (92 + 7, the point left over to the first), and the level below
        // the panic threshold is in panic.
        assert_eq!(
            spill_of(&tiered(&[100, 100], &[60, 5], &[], d)),
            (vec![93, 7], vec![false, true])
        );
        // Every level in panic: shares by endpoint counts, not health.
        assert_eq!(
            spill_of(&tiered(&[100, 300], &[40, 30], &[], d)),
            (vec![25, 75], vec![true, true])
        );
        // Three levels: what the first two leave goes to the third.
        assert_eq!(
            spill_of(&tiered(&[100, 100, 100], &[50, 10, 100], &[], d)).0,
            vec![70, 14, 16]
        );
        // Nothing available anywhere: the same (all in panic).
        assert_eq!(
            spill_of(&tiered(&[100, 100], &[0, 0], &[], d)),
            (vec![50, 50], vec![true, true])
        );
        // Without a panic threshold, nothing available anywhere sends all
        // to the first level.
        let calm = tiered(&[100, 100], &[0, 0], &[], d);
        let set = calm.endpoints.load();
        let s = Spill::compute(&set, 0.0, now_ms());
        assert_eq!(
            (s.cumulative, s.panic),
            (vec![100, 100, 100, 100], vec![false, false])
        );
        // The overprovisioning factor, and health weighed by weight.
        let exact = LoadPolicy {
            overprovisioning: 100,
            ..d
        };
        assert_eq!(
            spill_of(&tiered(&[100, 100], &[80, 100], &[], exact)).0,
            vec![80, 20]
        );
        let by_weight = LoadPolicy {
            weighted_health: true,
            ..d
        };
        // The healthy one weighs 1 of 4: 25% × 1.4; by count, 50% × 1.4.
        assert_eq!(
            spill_of(&tiered(&[2, 1], &[1, 1], &[1, 3, 1], by_weight)).0,
            vec![35, 65]
        );
        assert_eq!(
            spill_of(&tiered(&[2, 1], &[1, 1], &[1, 3, 1], d)).0,
            vec![70, 30]
        );
    }

    /// Envoy's `previous_priorities`: the levels tried take nothing while
    /// the others have anything to offer, and those share the load in
    /// proportion to their health; with nothing left, the original load.
    #[test]
    fn retries_move_away_from_priorities_tried() {
        let d = LoadPolicy::default();
        let shares = |c: &Cluster, excluded: &[u32]| {
            let set = c.endpoints.load();
            let s = Spill::excluding(&set, excluded, c.config.panic_threshold, now_ms())?;
            let mut before = 0;
            let mut v: Vec<u32> = s
                .cumulative
                .iter()
                .map(|c| {
                    let share = c - before;
                    before = *c;
                    share
                })
                .collect();
            v.truncate(s.panic.len());
            Some(v)
        };
        let all = tiered(&[10, 10, 10], &[10, 10, 10], &[], d);
        assert_eq!(shares(&all, &[]), Some(vec![100, 0, 0]));
        assert_eq!(shares(&all, &[0]), Some(vec![0, 100, 0]));
        assert_eq!(shares(&all, &[0, 1]), Some(vec![0, 0, 100]));
        assert_eq!(shares(&all, &[1, 0, 2]), None);
        // P1 at 20% healthy scores 28: P2 takes the rest.
        let weak = tiered(&[10, 10, 10], &[10, 2, 10], &[], d);
        assert_eq!(shares(&weak, &[0]), Some(vec![0, 28, 72]));
        // Alone, a weak level takes everything (its score is the whole).
        let two = tiered(&[10, 10], &[10, 5], &[], d);
        assert_eq!(shares(&two, &[0]), Some(vec![0, 100]));
        // Picks follow: every retry that excludes P0 lands in P1 (ports
        // 2000 and up), and with all excluded, the original load again.
        for _ in 0..200 {
            let e = all.pick_excluding(None, None, &[0]).expect("an endpoint");
            assert!((2000..3000).contains(&e.addr.port()), "{}", e.addr);
            let e = all
                .pick_excluding(None, None, &[0, 1, 2])
                .expect("an endpoint");
            assert!((1000..2000).contains(&e.addr.port()), "{}", e.addr);
        }
        // Tries remembered: with update_frequency 2, the first retry keeps
        // the original load; the second excludes both levels tried.
        let level = |p: u16| {
            all.endpoints
                .load()
                .endpoints
                .iter()
                .find(|e| e.addr.port() == p)
                .cloned()
                .expect("endpoint")
        };
        let mut t = TriedLevels::default();
        assert!(t.before_retry(&all, &level(1000), 1, 2).is_empty());
        assert_eq!(t.before_retry(&all, &level(2000), 2, 2), &[0, 1][..]);
        assert_eq!(t.before_retry(&all, &level(3000), 3, 2), &[0, 1][..]);
        assert_eq!(t.before_retry(&all, &level(3001), 4, 2), &[0, 1, 2][..]);
        let mut t = TriedLevels::default();
        assert_eq!(t.before_retry(&all, &level(1000), 1, 1), &[0][..]);
    }

    /// Picks follow the shares: random draws for most policies, the
    /// request's hash under ring hash (one key, one level).
    #[test]
    fn picks_spill_to_lower_priorities() {
        let c = tiered(&[2, 1], &[1, 1], &[], LoadPolicy::default());
        let n = 10_000;
        let backup = (0..n)
            .filter(|_| c.pick(None, None).expect("an endpoint").addr.port() >= 2000)
            .count();
        // 30% expected; σ = 46.
        assert!((2_724..=3_276).contains(&backup), "{backup}");
        // Only the available endpoint of priority 0 takes its share.
        let set = c.endpoints.load();
        assert!((0..100).all(|_| !Arc::ptr_eq(&c.pick(None, None).unwrap(), &set.endpoints[1])));
        // The level is the hash's: 70 of every 100 consecutive hashes
        // stay at priority 0, each the same way every time.
        let backed = |h: u64| c.pick(Some(h), None).unwrap().addr.port() >= 2000;
        assert!((0..300).all(|h| backed(h) == (h % 100 >= 70)));
        // One level: no draw for a level at all.
        let flat = tiered(&[3], &[3], &[], LoadPolicy::default());
        assert_eq!(flat.endpoints.load().levels.len(), 1);
        assert!(flat.pick(None, None).is_some());
    }

    /// A level's health check answers for the cached shares: a pick right
    /// after its endpoints went down fails over at once; an endpoint moving
    /// between levels keeps its state.
    #[test]
    fn failover_is_immediate_and_endpoints_keep_their_state_across_levels() {
        let c = tiered(&[2, 1], &[2, 1], &[], LoadPolicy::default());
        let set = c.endpoints.load_full();
        assert!(c.pick(None, None).unwrap().addr.port() < 2000, "priority 0");
        // Health checks find priority 0 down (the cached shares still
        // send it everything).
        for e in &set.endpoints[..2] {
            e.hc_healthy.store(false, Relaxed);
            c.availability_changed();
        }
        for _ in 0..20 {
            assert!(
                c.pick(None, None).unwrap().addr.port() >= 2000,
                "priority 1"
            );
        }
        // Swap the levels: the same endpoints, by address.
        let specs: Vec<EndpointSpec> = set
            .endpoints
            .iter()
            .zip(set.priorities())
            .map(|(e, p)| EndpointSpec {
                weight: e.weight,
                priority: 1 - p,
                ..EndpointSpec::at(e.addr)
            })
            .collect();
        let mut specs = specs;
        specs.sort_by_key(|s| s.priority);
        c.set_endpoints(&specs, LoadPolicy::default());
        let after = c.endpoints.load();
        assert_eq!(after.priorities().collect::<Vec<_>>(), vec![0, 1, 1]);
        for e in &set.endpoints {
            assert!(
                after.endpoints.iter().any(|a| Arc::ptr_eq(a, e)),
                "{} kept",
                e.addr
            );
        }
    }

    /// One level healthy enough by its overprovisioned score is never in
    /// panic, whatever the threshold (Envoy's normalized total at 100%).
    #[test]
    fn a_healthy_enough_level_is_not_in_panic() {
        use portico_proto::envoy::config::cluster::v3::cluster::CommonLbConfig;
        use portico_proto::envoy::r#type::v3::Percent;
        let mut pbc = pb(LbPolicy::RoundRobin, None);
        pbc.common_lb_config = Some(CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 80.0 }),
            ..Default::default()
        });
        let c = Cluster::new(
            Arc::new(ClusterConfig::convert(&pbc).expect("converts")),
            Arc::new(ClusterStats::default()),
        );
        let specs: Vec<EndpointSpec> = (0..4)
            .map(|i| EndpointSpec {
                // 3 of 4: 75% × 1.4 is over 100%.
                health: if i == 0 {
                    HealthStatus::Unhealthy
                } else {
                    HealthStatus::Healthy
                },
                ..EndpointSpec::at(([127, 0, 0, 1], 1000 + i))
            })
            .collect();
        c.set_endpoints(&specs, LoadPolicy::default());
        for _ in 0..20 {
            assert_ne!(c.pick(None, None).unwrap().addr.port(), 1000);
        }
        assert_eq!(c.stats.lb_healthy_panic.load(Relaxed), 0);
    }

    /// Envoy's slow start: an endpoint added to a cluster that had some
    /// takes `max(min_weight, elapsed / window)` of its share, growing over
    /// the window; the cluster's first endpoints do not ramp.
    #[test]
    fn added_endpoints_ramp_up_over_the_slow_start_window() {
        use crate::config::cluster::SlowStart;
        use portico_proto::envoy::config::cluster::v3::cluster::{
            RoundRobinLbConfig, SlowStartConfig,
        };
        use portico_proto::google::protobuf::Duration as PbDuration;
        let ss = |aggression: f64, min: f64| SlowStart {
            window: std::time::Duration::from_secs(10),
            aggression,
            min_weight: min,
        };
        assert_eq!(ss(1.0, 0.1).factor(0), 0.1);
        assert_eq!(ss(1.0, 0.1).factor(5_000), 0.5);
        assert_eq!(ss(1.0, 0.1).factor(10_000), 1.0);
        assert_eq!(ss(2.0, 0.1).factor(2_500), 0.5);
        assert_eq!(ss(1.0, 0.0).factor(1_000), 0.1);

        let config = |window_ms: i64, aggression: f64, min: Option<f64>| {
            let mut c = pb(LbPolicy::RoundRobin, None);
            c.lb_config = Some(LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
                slow_start_config: Some(SlowStartConfig {
                    slow_start_window: Some(PbDuration {
                        seconds: window_ms / 1000,
                        nanos: (window_ms % 1000) as i32 * 1_000_000,
                    }),
                    aggression: Some(RuntimeDouble {
                        default_value: aggression,
                        runtime_key: String::new(),
                    }),
                    min_weight_percent: min
                        .map(|value| portico_proto::envoy::r#type::v3::Percent { value }),
                }),
            }));
            ClusterConfig::convert(&c).map_err(|e| e.to_string())
        };
        assert!(
            config(0, 1.0, None).unwrap().slow_start.is_none(),
            "no window"
        );
        assert!(config(10, 0.0, None)
            .unwrap_err()
            .contains("aggression 0 must be above 0"));
        assert!(config(10, 1.0, Some(120.0))
            .unwrap_err()
            .contains("min_weight_percent 120"));

        // A window of 10 s: the new endpoint starts at the minimum.
        let c = Cluster::new(
            Arc::new(config(10_000, 1.0, None).expect("converts")),
            Arc::new(ClusterStats::default()),
        );
        let spec = |port: u16| EndpointSpec::at(([127, 0, 0, 1], port));
        c.set_endpoints(&[spec(1), spec(2)], LoadPolicy::default());
        assert!(c
            .endpoints
            .load()
            .endpoints
            .iter()
            .all(|e| e.ramp(&ss(1.0, 0.1), now_ms()) == 1.0));
        c.set_endpoints(&[spec(1), spec(2), spec(3)], LoadPolicy::default());
        let new = c.endpoints.load().endpoints[2].clone();
        let share = |c: &Cluster| {
            (0..10_000)
                .filter(|_| c.pick(None, None).unwrap().addr.port() == 3)
                .count()
        };
        // 0.1 of 2.1: 476 expected, σ 21.
        let n = share(&c);
        assert!((350..=600).contains(&n), "{n}");
        assert!(new.ramp(&ss(1.0, 0.1), now_ms()) < 0.2);
        // Its ramp by the cluster's own settings, at given times (the
        // shares follow it, as the draw above shows at its start).
        let own = c.config.slow_start.expect("slow start");
        new.slow_since.store(1_000, Relaxed);
        assert_eq!(new.ramp(&own, 6_000), 0.5);
        assert_eq!(new.ramp(&own, 11_000), 1.0);
    }

    /// The ring is Envoy's, entry for entry: its own test's ring of six
    /// endpoints (127.0.0.1:90 to :95, minimum size 12) and of two (:80,
    /// :81, minimum 3), and the endpoints its lookups pick.
    #[test]
    fn the_ring_is_envoys() {
        let ring_of = |ports: std::ops::RangeInclusive<u16>, min: u64| {
            let cfg = ClusterConfig::convert(&pb(
                LbPolicy::RingHash,
                Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                    minimum_ring_size: Some(UInt64Value { value: min }),
                    ..Default::default()
                })),
            ))
            .expect("converts");
            let c = Cluster::new(Arc::new(cfg), Arc::new(ClusterStats::default()));
            let specs: Vec<EndpointSpec> = ports
                .map(|port| EndpointSpec::at(([127, 0, 0, 1], port)))
                .collect();
            c.set_endpoints(&specs, LoadPolicy::default());
            let ring: Vec<(u64, u16)> = c.endpoints.load().levels[0]
                .lb
                .ring
                .iter()
                .map(|(h, i)| (*h, specs[*i as usize].addr.port()))
                .collect();
            (c, ring)
        };
        let (c, ring) = ring_of(90..=95, 12);
        assert_eq!(
            ring,
            vec![
                (833437586790550860, 94),
                (928266305478181108, 92),
                (1033482794131418490, 90),
                (3551244743356806947, 95),
                (3851675632748031481, 93),
                (5583722120771150861, 91),
                (6311230543546372928, 91),
                (7700377290971790572, 93),
                (13144177310400110813, 95),
                (13444792449719432967, 92),
                (15516499411664133160, 94),
                (16117243373044804889, 90),
            ]
        );
        let port = |h: u64| c.pick(Some(h), None).unwrap().addr.port();
        assert_eq!(port(0), 94);
        assert_eq!(port(u64::MAX), 94);
        assert_eq!(port(3551244743356806947), 95);
        assert_eq!(port(3551244743356806948), 93);
        let (_, ring) = ring_of(80..=81, 3);
        assert_eq!(
            ring,
            vec![
                (5454692015285649509, 80),
                (7859399908942313493, 81),
                (13838424394637650569, 80),
                (16064866803292627174, 81),
            ]
        );
    }

    /// Maglev as Envoy's own unit tests have it: six endpoints in a table
    /// of 7 by address and by host name, weights 1 and 2 in a table of 17,
    /// a retry avoiding the key's endpoint; an endpoint that is down
    /// gives the table over the others (as Envoy's, built over healthy
    /// endpoints); a size that is not a prime is refused.
    #[test]
    fn maglev_is_envoys() {
        use portico_proto::envoy::config::cluster::v3::cluster::{
            common_lb_config::ConsistentHashingLbConfig, CommonLbConfig, MaglevLbConfig,
        };
        let config = |size: u64, by_hostname: bool| {
            let mut p = pb(
                LbPolicy::Maglev,
                Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
                    table_size: Some(UInt64Value { value: size }),
                })),
            );
            p.common_lb_config = Some(CommonLbConfig {
                consistent_hashing_lb_config: Some(ConsistentHashingLbConfig {
                    use_hostname_for_hashing: by_hostname,
                    ..Default::default()
                }),
                ..Default::default()
            });
            p
        };
        let cluster_of = |size: u64, by_hostname: bool, specs: &[EndpointSpec]| {
            let cfg = ClusterConfig::convert(&config(size, by_hostname)).expect("converts");
            let c = Cluster::new(Arc::new(cfg), Arc::new(ClusterStats::default()));
            c.set_endpoints(specs, LoadPolicy::default());
            c
        };
        let six: Vec<EndpointSpec> = (90..96)
            .map(|p| EndpointSpec {
                hostname: Some(p.to_string().into()),
                ..EndpointSpec::at(([127, 0, 0, 1], p))
            })
            .collect();
        let picks = |c: &Cluster, n: u64| -> Vec<u16> {
            (0..n)
                .map(|h| c.pick(Some(h), None).expect("a pick").addr.port())
                .collect()
        };
        let ports = |idx: &[u16], base: u16| -> Vec<u16> { idx.iter().map(|i| base + i).collect() };
        let by_addr = cluster_of(7, false, &six);
        assert_eq!(picks(&by_addr, 7), ports(&[2, 4, 0, 1, 5, 0, 3], 90));
        let by_name = cluster_of(7, true, &six);
        assert_eq!(picks(&by_name, 7), ports(&[2, 5, 0, 3, 4, 1, 0], 90));
        let weighted = cluster_of(
            17,
            false,
            &[
                EndpointSpec::at(([127, 0, 0, 1], 90)),
                EndpointSpec {
                    weight: 2,
                    ..EndpointSpec::at(([127, 0, 0, 1], 91))
                },
            ],
        );
        assert_eq!(
            picks(&weighted, 17),
            ports(&[1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 1], 90)
        );
        // Hash 10 takes slot 3 (127.0.0.1:91); avoiding it, a retry takes
        // the flipped hash's (127.0.0.1:90), as in Envoy's test.
        let set = by_addr.endpoints.load();
        assert_eq!(by_addr.pick(Some(10), None).unwrap().addr.port(), 91);
        let avoided = by_addr.pick(Some(10), Some(&set.endpoints[1])).unwrap();
        assert_eq!(avoided.addr.port(), 90);
        // 127.0.0.1:92 down: keys go as a table over the other five sends
        // them.
        set.endpoints[2].eds_healthy.store(false, Relaxed);
        by_addr.availability_changed();
        let five: Vec<EndpointSpec> = six
            .iter()
            .filter(|s| s.addr.port() != 92)
            .cloned()
            .collect();
        let without = cluster_of(7, false, &five);
        assert_eq!(picks(&by_addr, 50), picks(&without, 50));
        assert!(!picks(&by_addr, 50).contains(&92));
        let e = ClusterConfig::convert(&config(8, false))
            .unwrap_err()
            .to_string();
        assert!(e.contains("table_size 8 is not a prime"), "{e}");
        let default = ClusterConfig::convert(&pb(LbPolicy::Maglev, None)).expect("converts");
        assert_eq!(default.maglev_table, 65_537);
    }

    /// In a runtime, the table over the endpoints still up is built on a
    /// blocking task: meanwhile no pick takes the endpoint that is down,
    /// and once it lands, keys go as that table sends them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn maglev_builds_the_live_table_off_the_request_path() {
        use portico_proto::envoy::config::cluster::v3::cluster::MaglevLbConfig;
        let cluster_of = |specs: &[EndpointSpec]| {
            let cfg = ClusterConfig::convert(&pb(
                LbPolicy::Maglev,
                Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
                    table_size: Some(UInt64Value { value: 65_537 }),
                })),
            ))
            .expect("converts");
            let c = Cluster::new(Arc::new(cfg), Arc::new(ClusterStats::default()));
            c.set_endpoints(specs, LoadPolicy::default());
            c
        };
        let six: Vec<EndpointSpec> = (90..96)
            .map(|p| EndpointSpec::at(([127, 0, 0, 1], p)))
            .collect();
        let c = cluster_of(&six);
        let picks = |c: &Cluster| -> Vec<u16> {
            (0..200u64)
                .map(|h| {
                    c.pick(Some(h.wrapping_mul(0x9e37_79b9_7f4a_7c15)), None)
                        .unwrap()
                        .addr
                        .port()
                })
                .collect()
        };
        c.endpoints.load().endpoints[2]
            .eds_healthy
            .store(false, Relaxed);
        c.availability_changed();
        assert!(!picks(&c).contains(&92), "never the endpoint that is down");
        let five: Vec<EndpointSpec> = six
            .iter()
            .filter(|s| s.addr.port() != 92)
            .cloned()
            .collect();
        let want = picks(&cluster_of(&five));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while picks(&c) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "the live table never landed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Consistent hashing with bounded loads: one hot key's requests in
    /// flight spread once its endpoint holds more than its share times
    /// the factor (each endpoint at most one over its slots), the same way
    /// for the same key; without load the ring's endpoint takes them. A
    /// factor below 100 is refused.
    #[test]
    fn bounded_loads_spread_a_hot_key() {
        use portico_proto::envoy::config::cluster::v3::cluster::{
            common_lb_config::ConsistentHashingLbConfig, CommonLbConfig,
        };
        let with_factor = |factor: u32| {
            let mut p = pb(LbPolicy::RingHash, None);
            p.common_lb_config = Some(CommonLbConfig {
                consistent_hashing_lb_config: Some(ConsistentHashingLbConfig {
                    hash_balance_factor: Some(UInt32Value { value: factor }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            p
        };
        let e = ClusterConfig::convert(&with_factor(99))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hash_balance_factor 99 is below 100"), "{e}");
        let spread = || {
            let cfg = ClusterConfig::convert(&with_factor(150)).expect("converts");
            let c = Cluster::new(Arc::new(cfg), Arc::new(ClusterStats::default()));
            let specs: Vec<EndpointSpec> = (0..4)
                .map(|i| EndpointSpec::at(([127, 0, 0, 1], 1000 + i)))
                .collect();
            c.set_endpoints(&specs, LoadPolicy::default());
            let hot = hash64("hot");
            let home = c.pick(Some(hot), None).expect("a pick").addr;
            assert_eq!(c.pick(Some(hot), None).expect("a pick").addr, home);
            // 40 requests of the key, none finished.
            let mut seq = Vec::new();
            for _ in 0..40 {
                let e = c.pick(Some(hot), None).expect("a pick");
                c.active.fetch_add(1, Relaxed);
                e.active.fetch_add(1, Relaxed);
                seq.push(e.addr.port());
            }
            let set = c.endpoints.load();
            let loads: Vec<u32> = set
                .endpoints
                .iter()
                .map(|e| e.active.load(Relaxed))
                .collect();
            (home.port(), seq, loads)
        };
        let (home, seq, loads) = spread();
        // ceil(ceil(40 × 1.5) / 4) = 15 slots each, one over at most.
        assert!(loads.iter().all(|l| *l <= 16), "{loads:?}");
        assert_eq!(loads.iter().sum::<u32>(), 40);
        assert_eq!(seq[0], home, "the ring's endpoint first");
        assert!(loads.iter().filter(|l| **l > 0).count() > 1, "{loads:?}");
        assert_eq!(spread().1, seq, "the same key spreads the same way");
    }

    /// Envoy's ring keys: an endpoint's `hash_key` first, then its host
    /// name when the cluster hashes by name, else its address; a key kept
    /// across addresses keeps its requests where they were.
    #[test]
    fn the_ring_places_endpoints_by_hash_key_or_host_name() {
        use portico_proto::envoy::config::cluster::v3::cluster::{
            common_lb_config::ConsistentHashingLbConfig, CommonLbConfig,
        };
        let ring_of = |by_hostname: bool, specs: &[EndpointSpec]| {
            let mut p = pb(
                LbPolicy::RingHash,
                Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                    minimum_ring_size: Some(UInt64Value { value: 4 }),
                    ..Default::default()
                })),
            );
            p.common_lb_config = Some(CommonLbConfig {
                consistent_hashing_lb_config: Some(ConsistentHashingLbConfig {
                    use_hostname_for_hashing: by_hostname,
                    ..Default::default()
                }),
                ..Default::default()
            });
            let c = Cluster::new(
                Arc::new(ClusterConfig::convert(&p).expect("converts")),
                Arc::new(ClusterStats::default()),
            );
            c.set_endpoints(specs, LoadPolicy::default());
            let set = c.endpoints.load();
            let ring: Vec<(u64, u32)> = set.levels[0].lb.ring.clone();
            ring
        };
        let expect = |keys: [&str; 2]| {
            let mut v: Vec<(u64, u32)> = (0..2)
                .flat_map(|i| (0..2).map(move |n| (i, n)))
                .map(|(i, n)| (hash64(format!("{}_{n}", keys[i])), i as u32))
                .collect();
            v.sort_unstable();
            v
        };
        let named = |port: u16, host: &str, key: Option<&str>| EndpointSpec {
            hostname: Some(host.into()),
            hash_key: key.map(Into::into),
            ..EndpointSpec::at(([127, 0, 0, 1], port))
        };
        let specs = [named(80, "a.example", None), named(81, "b.example", None)];
        assert_eq!(
            ring_of(false, &specs),
            expect(["127.0.0.1:80", "127.0.0.1:81"])
        );
        assert_eq!(ring_of(true, &specs), expect(["a.example", "b.example"]));
        let keyed = [
            named(80, "a.example", Some("k1")),
            named(81, "b.example", None),
        ];
        assert_eq!(ring_of(false, &keyed), expect(["k1", "127.0.0.1:81"]));
        assert_eq!(ring_of(true, &keyed), expect(["k1", "b.example"]));
        // Without a host name, an endpoint keeps its address.
        let bare = [
            EndpointSpec::at(([127, 0, 0, 1], 80)),
            named(81, "b.example", None),
        ];
        assert_eq!(ring_of(true, &bare), expect(["127.0.0.1:80", "b.example"]));
    }

    /// A new endpoint set answers the panic question afresh: after EDS
    /// marks every endpoint unhealthy, the next pick is in panic (Envoy's
    /// default threshold), not held to the old set's "no panic".
    #[test]
    fn a_new_endpoint_set_counts_panic_afresh() {
        let c = cluster(&[1, 1], LbPolicy::RoundRobin, None);
        assert!(c.pick(None, None).is_some());
        let down: Vec<EndpointSpec> = c
            .endpoints
            .load()
            .endpoints
            .iter()
            .map(|e| EndpointSpec {
                health: HealthStatus::Unhealthy,
                ..EndpointSpec::at(e.addr)
            })
            .collect();
        c.set_endpoints(&down, LoadPolicy::default());
        assert!(c.pick(None, None).is_some(), "in panic: all take traffic");
        assert_eq!(c.stats.lb_healthy_panic.load(Relaxed), 1);
    }

    /// Degraded endpoints (EDS DEGRADED) take only what the healthy ones
    /// cannot carry (Envoy's degraded class), level by level.
    #[test]
    fn degraded_endpoints_take_what_healthy_ones_cannot() {
        use HealthStatus::{Degraded, Healthy};
        let with = |levels: &[&[(usize, HealthStatus)]]| {
            let cfg = ClusterConfig::convert(&pb(LbPolicy::RoundRobin, None)).expect("converts");
            let c = Cluster::new(Arc::new(cfg), Arc::new(ClusterStats::default()));
            let mut specs = Vec::new();
            for (level, runs) in levels.iter().enumerate() {
                let mut i = 0;
                for (count, health) in runs.iter() {
                    for _ in 0..*count {
                        specs.push(EndpointSpec {
                            health: *health,
                            priority: level as u32,
                            ..EndpointSpec::at(([127, 0, 0, 1], (1000 * (level + 1) + i) as u16))
                        });
                        i += 1;
                    }
                }
            }
            c.set_endpoints(&specs, LoadPolicy::default());
            c
        };
        // Half healthy, half degraded: 50% × 1.4 healthy, the rest degraded.
        let half = with(&[&[(5, Healthy), (5, Degraded)]]);
        assert_eq!(spill_of(&half), (vec![70, 30], vec![false]));
        let degraded = (0..10_000)
            .filter(|_| half.pick(None, None).unwrap().degraded())
            .count();
        // 3,000 expected; σ = 46.
        assert!((2_724..=3_276).contains(&degraded), "{degraded}");
        // A healthy lower level comes before a degraded higher one.
        assert_eq!(
            spill_of(&with(&[
                &[(71, Healthy), (29, Degraded)],
                &[(100, Healthy)]
            ]))
            .0,
            vec![99, 1]
        );
        // Only degraded ones: they take it all, and no panic.
        let all = with(&[&[(4, Degraded)]]);
        assert_eq!(spill_of(&all), (vec![0, 100], vec![false]));
        assert!((0..20).all(|_| all.pick(None, None).unwrap().degraded()));
        assert_eq!(all.stats.lb_healthy_panic.load(Relaxed), 0);
        assert_eq!(
            all.endpoints.load().endpoints[0].health_flags(),
            "/degraded_eds_health"
        );
    }
}
