//! The Huffman code of HPACK string literals (RFC 7541 appendix B).
//!
//! The code is canonical: each symbol's code follows from the lengths alone
//! (codes of one length are consecutive, in symbol order), so only the
//! lengths are written down here. Decoding walks the code tree four bits
//! at a time through a table built once from them.

use std::sync::LazyLock;

/// The code length in bits of each symbol; 256 is end-of-string.
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// The canonical code of each symbol, right-aligned.
fn codes() -> [u32; 257] {
    let mut order: Vec<usize> = (0..257).collect();
    order.sort_by_key(|&s| (LENGTHS[s], s));
    let mut codes = [0u32; 257];
    let mut code = 0u32;
    let mut prev = LENGTHS[order[0]];
    for (i, &s) in order.iter().enumerate() {
        if i > 0 {
            code = (code + 1) << (LENGTHS[s] - prev);
            prev = LENGTHS[s];
        }
        codes[s] = code;
    }
    codes
}

/// One step of the decoder: from a state, on four input bits.
#[derive(Clone, Copy, Default)]
struct Step {
    /// The state after the four bits.
    next: u8,
    /// A symbol completed on the way, if `emit`.
    sym: u8,
    emit: bool,
    /// The bits complete end-of-string: an error inside a literal.
    fail: bool,
}

/// The decoder's table: a state is an inner node of the code tree.
struct Table {
    steps: Vec<[Step; 16]>,
    /// Whether input may end in this state: the bits since the last symbol
    /// are all ones and fewer than eight (a prefix of end-of-string used as
    /// padding, RFC 7541 section 5.2).
    accept: Vec<bool>,
}

static TABLE: LazyLock<Table> = LazyLock::new(build);

fn build() -> Table {
    // The code tree: inner nodes hold their two children, each either an
    // inner node or a leaf (a symbol).
    #[derive(Clone, Copy)]
    enum Child {
        None,
        Node(usize),
        Leaf(u16),
    }
    let codes = codes();
    let mut nodes: Vec<[Child; 2]> = vec![[Child::None; 2]];
    let mut depth_ones: Vec<(u8, bool)> = vec![(0, true)];
    for sym in 0..257usize {
        let len = LENGTHS[sym];
        let mut n = 0;
        for i in (0..len).rev() {
            let bit = ((codes[sym] >> i) & 1) as usize;
            if i == 0 {
                nodes[n][bit] = Child::Leaf(sym as u16);
            } else {
                n = match nodes[n][bit] {
                    Child::Node(m) => m,
                    _ => {
                        let m = nodes.len();
                        let (d, ones) = depth_ones[n];
                        nodes.push([Child::None; 2]);
                        depth_ones.push((d + 1, ones && bit == 1));
                        nodes[n][bit] = Child::Node(m);
                        m
                    }
                };
            }
        }
    }
    assert_eq!(
        nodes.len(),
        256,
        "a complete code over 257 symbols has 256 inner nodes"
    );
    let mut steps = vec![[Step::default(); 16]; nodes.len()];
    for (state, row) in steps.iter_mut().enumerate() {
        for (nibble, step) in row.iter_mut().enumerate() {
            let mut n = state;
            for i in (0..4).rev() {
                let bit = (nibble >> i) & 1;
                match nodes[n][bit] {
                    Child::Node(m) => n = m,
                    Child::Leaf(256) => {
                        step.fail = true;
                        break;
                    }
                    Child::Leaf(s) => {
                        // The shortest code has five bits: at most one
                        // symbol ends within four.
                        step.sym = s as u8;
                        step.emit = true;
                        n = 0;
                    }
                    Child::None => unreachable!("the code is complete"),
                }
            }
            step.next = n as u8;
        }
    }
    let accept = depth_ones.iter().map(|&(d, ones)| ones && d < 8).collect();
    Table { steps, accept }
}

/// Decodes a Huffman-coded string literal; `None` when it is invalid
/// (end-of-string inside it, or padding that is not a short run of ones).
pub(super) fn decode(src: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let t = &*TABLE;
    let mut state = 0usize;
    for &b in src {
        for nibble in [b >> 4, b & 0xf] {
            let step = t.steps[state][usize::from(nibble)];
            if step.fail {
                return None;
            }
            if step.emit {
                out.push(step.sym);
            }
            state = usize::from(step.next);
        }
    }
    t.accept[state].then_some(())
}

/// Appends `src` Huffman-coded (for tests and a future encoder).
#[cfg(test)]
pub(super) fn encode(src: &[u8], out: &mut Vec<u8>) {
    let codes = codes();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in src {
        acc = (acc << LENGTHS[usize::from(b)]) | u64::from(codes[usize::from(b)]);
        bits += u32::from(LENGTHS[usize::from(b)]);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn decodes_the_rfc_examples() {
        // RFC 7541 appendix C.4 and C.6.
        for (coded, plain) in [
            ("f1e3c2e5f23a6ba0ab90f4ff", "www.example.com"),
            ("a8eb10649cbf", "no-cache"),
            ("25a849e95ba97d7f", "custom-key"),
            ("25a849e95bb8e8b4bf", "custom-value"),
            ("6402", "302"),
            ("aec3771a4b", "private"),
            (
                "d07abe941054d444a8200595040b8166e082a62d1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29ad171863c78f0b97c8e9ae82ae43d3",
                "https://www.example.com",
            ),
        ] {
            let mut out = Vec::new();
            assert_eq!(decode(&hex(coded), &mut out), Some(()), "{plain}");
            assert_eq!(out, plain.as_bytes());
            let mut enc = Vec::new();
            encode(plain.as_bytes(), &mut enc);
            assert_eq!(enc, hex(coded), "{plain}");
        }
    }

    #[test]
    fn every_byte_round_trips_and_bad_padding_fails() {
        let all: Vec<u8> = (0..=255).collect();
        let mut enc = Vec::new();
        encode(&all, &mut enc);
        let mut out = Vec::new();
        assert_eq!(decode(&enc, &mut out), Some(()));
        assert_eq!(out, all);
        // Eight or more bits of padding, or padding with a zero bit.
        assert_eq!(decode(&[0xff], &mut Vec::new()), None);
        let mut enc = Vec::new();
        encode(b"a", &mut enc); // 00011 then 111 of padding
        assert_eq!(decode(&[enc[0] & !1], &mut Vec::new()), None);
        // End-of-string (30 ones) inside a literal.
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xfc], &mut Vec::new()), None);
    }
}
