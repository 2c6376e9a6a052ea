//! Envoy's Maglev table (`lb_policy: MAGLEV`): each endpoint, in the order
//! of its key (the `envoy.lb` hash key, else the host name when the
//! cluster hashes by name, else the address), fills slots of a prime-sized
//! table along its own permutation (offset and skip from two xxHash64s of
//! the key), heavier endpoints more often; a request's hash modulo the
//! size picks the slot. Built as Envoy builds it, so the same key reaches
//! the same endpoint as through an Envoy beside this proxy.

use std::sync::Arc;

use super::Endpoint;

/// A Maglev table: for each slot, the index of its endpoint among those
/// the table was built over.
pub(crate) type Table = Vec<u32>;

/// The key Envoy hashes an endpoint by (`hashKey`).
pub(crate) fn key(e: &Endpoint, by_hostname: bool) -> String {
    match e
        .hash_key
        .as_deref()
        .or(e.hostname.as_deref().filter(|_| by_hostname))
    {
        Some(k) => k.to_owned(),
        None => e.addr.to_string(),
    }
}

/// The table of `size` slots (a prime) over the endpoints of `eps` that
/// `include` admits, weighed by their weights (normalized as Envoy's).
/// Empty when none is admitted.
pub(crate) fn build(
    eps: &[Arc<Endpoint>],
    size: u64,
    by_hostname: bool,
    include: impl Fn(usize) -> bool,
) -> Table {
    struct Entry {
        index: u32,
        offset: u64,
        skip: u64,
        weight: f64,
        target: f64,
        next: u64,
    }
    let chosen: Vec<usize> = (0..eps.len()).filter(|i| include(*i)).collect();
    let total: f64 = chosen.iter().map(|i| f64::from(eps[*i].weight)).sum();
    if chosen.is_empty() || size < 2 || total <= 0.0 {
        return Table::new();
    }
    // Sorted by key: the order in which endpoints fill the table decides
    // it, and must not depend on the order they came in.
    let mut keyed: Vec<(String, usize)> = chosen
        .iter()
        .map(|i| (key(&eps[*i], by_hostname), *i))
        .collect();
    keyed.sort();
    let mut entries: Vec<Entry> = keyed
        .iter()
        .map(|(k, i)| Entry {
            index: *i as u32,
            offset: xxhash_rust::xxh64::xxh64(k.as_bytes(), 0) % size,
            skip: xxhash_rust::xxh64::xxh64(k.as_bytes(), 1) % (size - 1) + 1,
            weight: f64::from(eps[*i].weight) / total,
            target: 0.0,
            next: 0,
        })
        .collect();
    let max_weight = entries.iter().map(|e| e.weight).fold(0.0, f64::max);
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    let mut iteration = 1u32;
    while filled < size {
        for e in entries.iter_mut() {
            if filled == size {
                break;
            }
            // An endpoint of the largest weight takes a slot every round,
            // one of a third of it every third round (Envoy's arithmetic).
            if f64::from(iteration) * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            let mut c = (e.offset + e.skip * e.next) % size;
            while table[c as usize] != u32::MAX {
                e.next += 1;
                c = (e.offset + e.skip * e.next) % size;
            }
            table[c as usize] = e.index;
            e.next += 1;
            filled += 1;
        }
        iteration += 1;
    }
    table
}

/// The slot a request's `hash` takes, on its `attempt`-th try at a host
/// (Envoy's: a retry that must avoid the host of the first flips the
/// hash's bits).
pub(crate) fn slot(table: &Table, hash: u64, attempt: u64) -> usize {
    let hash = if attempt > 0 {
        hash ^ (u64::MAX - attempt + 1)
    } else {
        hash
    };
    (hash % table.len() as u64) as usize
}
