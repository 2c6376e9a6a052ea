//! Spare header maps, kept per worker thread for reuse.
//!
//! Every proxied request builds two maps (the request's head, parsed, and
//! the upstream response's), and a map is two allocations. A map whose
//! message has been written out is cleared and kept here instead of
//! freed, so the next head parsed on the thread reuses its allocations.
//! Workers are single-threaded runtimes, so a thread-local list needs no
//! lock; a map dropped anywhere else is simply freed.

use std::cell::RefCell;

use http::HeaderMap;

/// Maps kept per thread: enough for the heads in flight between a parse
/// and a write on one worker, small enough to pin little memory.
const KEEP: usize = 64;
/// A map that grew past this many fields is freed, not kept.
const LARGEST: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for `fields`, reused when there is one.
pub fn header_map(fields: usize) -> HeaderMap {
    let reused = SPARE
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .filter(|m| m.capacity() >= fields);
    reused.unwrap_or_else(|| HeaderMap::with_capacity(fields))
}

/// Clears `map` and keeps it for [`header_map`].
pub fn recycle(mut map: HeaderMap) {
    if map.capacity() > LARGEST || map.capacity() == 0 {
        return;
    }
    map.clear();
    let _ = SPARE.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_come_back_empty_with_their_room() {
        let mut m = header_map(10);
        m.insert("x-a", "1".parse().expect("value"));
        let room = m.capacity();
        recycle(m);
        let again = header_map(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room, "the same allocation");
        // Asked for more room than the spare has: a new map.
        recycle(again);
        assert!(header_map(room + 1).capacity() > room);
        let mut big = HeaderMap::with_capacity(LARGEST * 2);
        big.insert("x-a", "1".parse().expect("value"));
        recycle(big);
        assert!(
            header_map(0).capacity() <= LARGEST,
            "a large map is not kept"
        );
    }
}
