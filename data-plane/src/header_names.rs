//! Header names, parsed once per worker thread.
//!
//! Every head parsed turns each field's name into an `http::HeaderName`:
//! a lowercasing copy and a search of the standard names (about 120
//! instructions), and for any other name an allocation. The names a
//! gateway sees repeat endlessly (an upstream answers with the same five
//! names every time, browsers send the same dozen), so each worker keeps
//! the last name parsed for each of a few dozen slots, keyed by the bytes
//! exactly as received, and hands out a clone on a hit (no allocation:
//! standard names are a small enum, others share their bytes).
//! Workers are single-threaded runtimes, so a thread-local table needs no
//! lock.

use std::cell::RefCell;

use http::header::{HeaderName, InvalidHeaderName};

/// Slots per thread.
const SLOTS: usize = 64;
/// Longer names are parsed every time (rare, and a slot stays small).
const LONGEST: usize = 32;

/// One remembered name: the bytes it was parsed from, and the result.
struct Slot {
    len: u8,
    raw: [u8; LONGEST],
    name: Option<HeaderName>,
}

impl Slot {
    const EMPTY: Slot = Slot {
        len: 0,
        raw: [0; LONGEST],
        name: None,
    };
}

thread_local! {
    static SLOTS_OF_THREAD: RefCell<[Slot; SLOTS]> =
        const { RefCell::new([Slot::EMPTY; SLOTS]) };
}

/// `HeaderName::from_bytes(raw)`, remembered per thread. Invalid names are
/// not remembered: they fail the same way each time.
pub fn parse(raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    let (Some(&first), Some(&last)) = (raw.first(), raw.last()) else {
        return HeaderName::from_bytes(raw);
    };
    if raw.len() > LONGEST {
        return HeaderName::from_bytes(raw);
    }
    // Length and end bytes tell the common names apart (content-type and
    // content-length differ in length, host and date in their letters).
    let slot = (raw.len() * 31 + first as usize * 7 + last as usize) % SLOTS;
    SLOTS_OF_THREAD
        .try_with(|table| {
            let mut table = table.borrow_mut();
            let s = &mut table[slot];
            if let Some(name) = &s.name {
                if same(&s.raw[..s.len as usize], raw) {
                    return Ok(name.clone());
                }
            }
            let name = HeaderName::from_bytes(raw)?;
            s.len = raw.len() as u8;
            s.raw[..raw.len()].copy_from_slice(raw);
            s.name = Some(name.clone());
            Ok(name)
        })
        .unwrap_or_else(|_| HeaderName::from_bytes(raw))
}

/// `a == b` for slices of at most [`LONGEST`] bytes, in a few word
/// compares instead of a call to `memcmp` (which costs more than the rest
/// of a lookup).
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"));
    let half = |s: &[u8], i: usize| u32::from_le_bytes(s[i..i + 4].try_into().expect("4 bytes"));
    match n {
        0..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        // Two overlapping loads cover the whole slice.
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        _ => {
            word(a, 0) == word(b, 0)
                && word(a, 8) == word(b, 8)
                && word(a, n - 16) == word(b, n - 16)
                && word(a, n - 8) == word(b, n - 8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_names_as_http_whatever_was_seen_before() {
        // Twice each, so the second comes from the table; names that share
        // a slot replace each other and stay right.
        let names: &[&[u8]] = &[
            b"Content-Type",
            b"content-type",
            b"CONTENT-LENGTH",
            b"x-request-id",
            b"X-Custom-Header",
            b"host",
            b"date",
            b"a",
            b"b",
            b"x-a-name-longer-than-thirty-two-bytes-in-all",
        ];
        for _ in 0..2 {
            for raw in names {
                assert_eq!(
                    parse(raw).expect("valid"),
                    HeaderName::from_bytes(raw).expect("valid"),
                    "{}",
                    String::from_utf8_lossy(raw)
                );
            }
        }
        // Every slot, filled and refilled with distinct names.
        for round in 0..2 {
            for i in 0..500 {
                let raw = format!("x-h{i}-{round}");
                assert_eq!(parse(raw.as_bytes()).unwrap().as_str(), raw);
            }
        }
        // The compare, against the standard library's, at every length
        // and with one byte off at every place.
        for n in 0..=LONGEST {
            let a: Vec<u8> = (0..n as u8).map(|i| b'a' + i % 26).collect();
            assert!(same(&a, &a.clone()), "{n}");
            assert!(!same(&a, &a[..n.saturating_sub(1)]) || n == 0, "{n}");
            for i in 0..n {
                let mut b = a.clone();
                b[i] ^= 0x20;
                assert_eq!(same(&a, &b), a == b, "{n} at {i}");
            }
        }
        for bad in [&b""[..], b"bad name", b"bad:name", b"\xff"] {
            assert!(parse(bad).is_err(), "{bad:?}");
            assert!(parse(bad).is_err(), "{bad:?} again");
        }
    }
}
