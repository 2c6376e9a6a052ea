//! Consistent hashing with bounded loads, as Envoy does it (its ring hash
//! and Maglev with `hash_balance_factor`): the endpoint a key hashes to
//! takes the request unless it already carries more than its share of
//! the cluster's requests in flight times the factor; then the others are
//! tried in an order shuffled by the key (the same key, the same order),
//! and the least overloaded takes it when all are over.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::lb::Tables;
use super::Endpoint;

/// The endpoint for `hash` among `eps`, starting from `first` (where the
/// ring put the key), with requests in flight capped at `factor` per cent
/// of each endpoint's weighted share of `in_flight + 1`. Only endpoints
/// `ok` admits are considered, their weights normalized among themselves;
/// their total weight is kept in the level's `tables` with the time
/// ([`now_ms`]) until which it holds (reused for a while, as the priority
/// shares are, and dropped when an endpoint's availability changes), so
/// that a key whose endpoint is not overloaded costs no pass over the
/// others.
///
/// [`now_ms`]: super::now_ms
pub(crate) fn choose<'a>(
    (eps, tables): (&'a [Arc<Endpoint>], &Tables),
    first: &'a Arc<Endpoint>,
    hash: u64,
    (factor, in_flight): (u32, u32),
    ok: impl Fn(&Endpoint) -> bool,
    now: u64,
) -> &'a Arc<Endpoint> {
    let (total_cache, until) = (&tables.available_weight, &tables.available_until);
    let total_weight = if until.load(Relaxed) > now {
        total_cache.load(Relaxed)
    } else {
        let t: u64 = eps
            .iter()
            .filter(|e| ok(e))
            .map(|e| u64::from(e.weight))
            .sum();
        total_cache.store(t, Relaxed);
        until.store(now + super::PANIC_RECHECK_MS, Relaxed);
        t
    };
    if total_weight == 0 {
        return first;
    }
    let total_slots = (u64::from(in_flight) + 1) * u64::from(factor);
    let total_slots = total_slots.div_ceil(100) as f64;
    // Envoy's `hostOverloadFactor`: requests in flight over the slots its
    // normalized weight is worth (at least one).
    let overload = |e: &Endpoint| {
        let share = f64::from(e.weight) / total_weight as f64;
        let slots = (total_slots * share).ceil().max(1.0);
        f64::from(e.active.load(Relaxed)) / slots
    };
    let mut least = (first, overload(first));
    if least.1 <= 1.0 {
        return first;
    }
    let candidates: Vec<&Arc<Endpoint>> = eps.iter().filter(|e| ok(e)).collect();
    // A shuffle seeded by the key (Envoy's mt19937 and its uniform draw),
    // so that the same key tries the same endpoints in the same order.
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    let mut random = Mt19937::new(hash as u32);
    let n = order.len();
    for i in 0..n {
        let j = random.below((n - i) as u32) as usize;
        order.swap(i, i + j);
        let alt = candidates[order[i]];
        if Arc::ptr_eq(alt, first) {
            continue;
        }
        let f = overload(alt);
        if f <= 1.0 {
            return alt;
        }
        if least.1 > f {
            least = (alt, f);
        }
    }
    least.0
}

/// The 32-bit Mersenne Twister (C++'s `std::mt19937`): Envoy seeds its
/// shuffle with it, and the same shuffle needs the same numbers.
struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, next: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.state[i] = self.state[(i + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.next = 0;
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A number below `k` (k > 0), drawn as Envoy draws it: the generator's
    /// range cut into `k` equal buckets, the remainder rejected.
    fn below(&mut self, k: u32) -> u32 {
        let bucket = (1u64 << 32) / u64::from(k);
        loop {
            let x = (u64::from(self.next_u32()) / bucket) as u32;
            if x < k {
                return x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C++ standard's check of `std::mt19937`: the 10000th number of
    /// a default-seeded generator (seed 5489) is 4123659995.
    #[test]
    fn the_generator_is_cpps_mt19937() {
        let mut m = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = m.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
        let mut m = Mt19937::new(5489);
        assert_eq!(m.next_u32(), 3_499_211_612);
    }
}
