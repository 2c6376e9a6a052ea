//! HPACK header compression (RFC 7541): the decoder of request header
//! blocks, with its dynamic table, and an encoder for response headers
//! that never indexes (static-table names, literal values), so the
//! encoder has no table to keep in step with the client's.

use std::collections::VecDeque;
use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderName};

use super::huffman;

/// A header field's name as decoded: a pseudo-header, a regular header
/// name (lowercase, valid), or something no request may carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Name {
    /// `:authority`
    Authority,
    /// `:method`
    Method,
    /// `:path`
    Path,
    /// `:scheme`
    Scheme,
    /// `:status` (responses only)
    Status,
    /// `:protocol` (RFC 8441)
    Protocol,
    /// A regular header.
    Header(HeaderName),
    /// An unknown pseudo-header, or a name with uppercase or invalid bytes.
    Invalid,
}

impl Name {
    fn parse(raw: &[u8]) -> Name {
        match raw {
            b":authority" => Name::Authority,
            b":method" => Name::Method,
            b":path" => Name::Path,
            b":scheme" => Name::Scheme,
            b":status" => Name::Status,
            b":protocol" => Name::Protocol,
            _ => HeaderName::from_lowercase(raw).map_or(Name::Invalid, Name::Header),
        }
    }
}

/// Why a header block could not be decoded (a connection error: the
/// decoder's table can no longer be trusted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The block ended inside a representation.
    Truncated,
    /// An integer too large for any sane header.
    IntegerOverflow,
    /// An index past both tables.
    BadIndex(usize),
    /// A Huffman-coded literal that is not valid.
    BadHuffman,
    /// A dynamic table size update over the limit or after a field.
    BadTableSize(usize),
    /// A string longer than the limit given to the decoder.
    StringTooLong(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("header block ends inside a field"),
            DecodeError::IntegerOverflow => f.write_str("integer too large in header block"),
            DecodeError::BadIndex(i) => write!(f, "header index {i} is in neither table"),
            DecodeError::BadHuffman => f.write_str("invalid Huffman-coded string"),
            DecodeError::BadTableSize(n) => write!(
                f,
                "dynamic table size update to {n} over the limit or not at the block's start"
            ),
            DecodeError::StringTooLong(n) => write!(f, "header string of {n} bytes over the limit"),
        }
    }
}

impl std::error::Error for DecodeError {}

struct Entry {
    name: Name,
    /// What the entry counts against the table size (RFC 7541 4.1).
    size: usize,
    value: Bytes,
}

/// The decoding side of a connection's HPACK context.
pub(crate) struct Decoder {
    table: VecDeque<Entry>,
    size: usize,
    /// The table size the client last chose.
    max_size: usize,
    /// The table size this side allows (its SETTINGS_HEADER_TABLE_SIZE).
    limit: usize,
    /// Scratch space for Huffman decoding.
    scratch: Vec<u8>,
}

impl Decoder {
    /// A decoder allowing a dynamic table of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
            scratch: Vec::new(),
        }
    }

    /// Decodes a whole header block, calling `field` for each field in
    /// order with its name, its value and its size (RFC 7541 4.1, what
    /// counts against SETTINGS_MAX_HEADER_LIST_SIZE). `max_string` bounds
    /// each literal's length.
    pub(crate) fn decode(
        &mut self,
        block: &Bytes,
        max_string: usize,
        mut field: impl FnMut(Name, Bytes, usize),
    ) -> Result<(), DecodeError> {
        let mut pos = 0;
        let mut first = true;
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                // Indexed field.
                let i = integer(block, &mut pos, 7)?;
                let (name, value, size) = self.get(i)?;
                field(name, value, size);
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update: only before the first field.
                let n = integer(block, &mut pos, 5)?;
                if !first || n > self.limit {
                    return Err(DecodeError::BadTableSize(n));
                }
                self.max_size = n;
                self.evict(0);
                continue;
            } else {
                // A literal: with incremental indexing (01), without (0000)
                // or never indexed (0001).
                let (prefix, index) = if b & 0xc0 == 0x40 {
                    (6, true)
                } else {
                    (4, false)
                };
                let i = integer(block, &mut pos, prefix)?;
                let (name, raw_len) = if i == 0 {
                    let raw = self.string(block, &mut pos, max_string)?;
                    (Name::parse(&raw), raw.len())
                } else {
                    let (name, _, size) = self.get(i)?;
                    (name, size - 32 - self.value_len(i))
                };
                let value = self.string(block, &mut pos, max_string)?;
                let size = raw_len + value.len() + 32;
                if index {
                    // Copied: the table outlives the frame it came in, and
                    // a slice would keep the whole read buffer alive.
                    let kept = Bytes::copy_from_slice(&value);
                    self.insert(name.clone(), kept, size);
                }
                field(name, value, size);
            }
            first = false;
        }
        Ok(())
    }

    /// The value length of the entry at index `i` (known to exist).
    fn value_len(&self, i: usize) -> usize {
        if i <= STATIC.len() {
            STATIC[i - 1].2.len()
        } else {
            self.table[i - STATIC.len() - 1].value.len()
        }
    }

    fn get(&self, i: usize) -> Result<(Name, Bytes, usize), DecodeError> {
        if i == 0 {
            return Err(DecodeError::BadIndex(0));
        }
        if let Some(&(ref name, raw, value)) = STATIC.get(i - 1) {
            return Ok((
                name.clone(),
                Bytes::from_static(value),
                raw.len() + value.len() + 32,
            ));
        }
        let e = self
            .table
            .get(i - STATIC.len() - 1)
            .ok_or(DecodeError::BadIndex(i))?;
        Ok((e.name.clone(), e.value.clone(), e.size))
    }

    fn insert(&mut self, name: Name, value: Bytes, size: usize) {
        self.evict(size);
        // An entry larger than the whole table empties it and is not kept
        // (RFC 7541 4.4).
        if size <= self.max_size {
            self.size += size;
            self.table.push_front(Entry { name, size, value });
        }
    }

    /// Evicts oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }

    /// A string literal: a slice of the block, or Huffman-decoded.
    fn string(&mut self, block: &Bytes, pos: &mut usize, max: usize) -> Result<Bytes, DecodeError> {
        let huff = block.get(*pos).ok_or(DecodeError::Truncated)? & 0x80 != 0;
        let len = integer(block, pos, 7)?;
        if len > max {
            return Err(DecodeError::StringTooLong(len));
        }
        let end = pos.checked_add(len).ok_or(DecodeError::Truncated)?;
        if end > block.len() {
            return Err(DecodeError::Truncated);
        }
        let raw = &block[*pos..end];
        let s = if huff {
            self.scratch.clear();
            huffman::decode(raw, &mut self.scratch).ok_or(DecodeError::BadHuffman)?;
            Bytes::copy_from_slice(&self.scratch)
        } else {
            block.slice(*pos..end)
        };
        *pos = end;
        Ok(s)
    }
}

/// An integer with an N-bit prefix (RFC 7541 5.1); at most 2^28.
fn integer(block: &[u8], pos: &mut usize, prefix: u8) -> Result<usize, DecodeError> {
    let mask = (1usize << prefix) - 1;
    let first = usize::from(*block.get(*pos).ok_or(DecodeError::Truncated)?) & mask;
    *pos += 1;
    if first < mask {
        return Ok(first);
    }
    let mut n = mask;
    let mut shift = 0;
    loop {
        let b = *block.get(*pos).ok_or(DecodeError::Truncated)?;
        *pos += 1;
        n += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(n);
        }
        shift += 7;
        if shift > 21 {
            return Err(DecodeError::IntegerOverflow);
        }
    }
}

/// Appends an integer with an N-bit prefix, the prefix byte's high bits
/// set to `high`.
fn put_integer(out: &mut Vec<u8>, high: u8, prefix: u8, mut n: usize) {
    let mask = (1usize << prefix) - 1;
    if n < mask {
        out.push(high | n as u8);
        return;
    }
    out.push(high | mask as u8);
    n -= mask;
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Appends `:status` (indexed when the static table has it).
pub(crate) fn encode_status(out: &mut Vec<u8>, status: u16) {
    let index = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => 0,
    };
    if index != 0 {
        out.push(0x80 | index);
        return;
    }
    // Literal without indexing, name `:status` (index 8).
    out.push(0x08);
    let digits = [
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ];
    put_integer(out, 0, 7, 3);
    out.extend_from_slice(&digits);
}

/// Appends a header field as a literal without indexing; the name by its
/// static index when it has one.
pub(crate) fn encode_field(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    encode_name_and_len(out, name, value.len());
    out.extend_from_slice(value);
}

/// Appends a literal field's name and its value's length: the value's
/// `len` bytes must follow.
pub(crate) fn encode_name_and_len(out: &mut Vec<u8>, name: &HeaderName, len: usize) {
    match static_name_index(name) {
        Some(i) => put_integer(out, 0, 4, i),
        None => {
            out.push(0);
            put_integer(out, 0, 7, name.as_str().len());
            out.extend_from_slice(name.as_str().as_bytes());
        }
    }
    put_integer(out, 0, 7, len);
}

fn static_name_index(name: &HeaderName) -> Option<usize> {
    // The response headers worth a lookup; others go as literals.
    Some(if name == header::CONTENT_TYPE {
        31
    } else if name == header::CONTENT_LENGTH {
        28
    } else if name == header::DATE {
        33
    } else if name == header::SERVER {
        54
    } else if name == header::CACHE_CONTROL {
        24
    } else if name == header::SET_COOKIE {
        55
    } else if name == header::LOCATION {
        46
    } else if name == header::CONTENT_ENCODING {
        26
    } else if name == header::ETAG {
        34
    } else if name == header::LAST_MODIFIED {
        44
    } else if name == header::VARY {
        59
    } else {
        return None;
    })
}

const fn h(n: HeaderName) -> Name {
    Name::Header(n)
}

/// The static table (RFC 7541 appendix A): name, name as bytes, value.
static STATIC: [(Name, &str, &[u8]); 61] = [
    (Name::Authority, ":authority", b""),
    (Name::Method, ":method", b"GET"),
    (Name::Method, ":method", b"POST"),
    (Name::Path, ":path", b"/"),
    (Name::Path, ":path", b"/index.html"),
    (Name::Scheme, ":scheme", b"http"),
    (Name::Scheme, ":scheme", b"https"),
    (Name::Status, ":status", b"200"),
    (Name::Status, ":status", b"204"),
    (Name::Status, ":status", b"206"),
    (Name::Status, ":status", b"304"),
    (Name::Status, ":status", b"400"),
    (Name::Status, ":status", b"404"),
    (Name::Status, ":status", b"500"),
    (h(header::ACCEPT_CHARSET), "accept-charset", b""),
    (
        h(header::ACCEPT_ENCODING),
        "accept-encoding",
        b"gzip, deflate",
    ),
    (h(header::ACCEPT_LANGUAGE), "accept-language", b""),
    (h(header::ACCEPT_RANGES), "accept-ranges", b""),
    (h(header::ACCEPT), "accept", b""),
    (
        h(header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "access-control-allow-origin",
        b"",
    ),
    (h(header::AGE), "age", b""),
    (h(header::ALLOW), "allow", b""),
    (h(header::AUTHORIZATION), "authorization", b""),
    (h(header::CACHE_CONTROL), "cache-control", b""),
    (h(header::CONTENT_DISPOSITION), "content-disposition", b""),
    (h(header::CONTENT_ENCODING), "content-encoding", b""),
    (h(header::CONTENT_LANGUAGE), "content-language", b""),
    (h(header::CONTENT_LENGTH), "content-length", b""),
    (h(header::CONTENT_LOCATION), "content-location", b""),
    (h(header::CONTENT_RANGE), "content-range", b""),
    (h(header::CONTENT_TYPE), "content-type", b""),
    (h(header::COOKIE), "cookie", b""),
    (h(header::DATE), "date", b""),
    (h(header::ETAG), "etag", b""),
    (h(header::EXPECT), "expect", b""),
    (h(header::EXPIRES), "expires", b""),
    (h(header::FROM), "from", b""),
    (h(header::HOST), "host", b""),
    (h(header::IF_MATCH), "if-match", b""),
    (h(header::IF_MODIFIED_SINCE), "if-modified-since", b""),
    (h(header::IF_NONE_MATCH), "if-none-match", b""),
    (h(header::IF_RANGE), "if-range", b""),
    (h(header::IF_UNMODIFIED_SINCE), "if-unmodified-since", b""),
    (h(header::LAST_MODIFIED), "last-modified", b""),
    (h(header::LINK), "link", b""),
    (h(header::LOCATION), "location", b""),
    (h(header::MAX_FORWARDS), "max-forwards", b""),
    (h(header::PROXY_AUTHENTICATE), "proxy-authenticate", b""),
    (h(header::PROXY_AUTHORIZATION), "proxy-authorization", b""),
    (h(header::RANGE), "range", b""),
    (h(header::REFERER), "referer", b""),
    (h(HeaderName::from_static("refresh")), "refresh", b""),
    (h(header::RETRY_AFTER), "retry-after", b""),
    (h(header::SERVER), "server", b""),
    (h(header::SET_COOKIE), "set-cookie", b""),
    (
        h(header::STRICT_TRANSPORT_SECURITY),
        "strict-transport-security",
        b"",
    ),
    (h(header::TRANSFER_ENCODING), "transfer-encoding", b""),
    (h(header::USER_AGENT), "user-agent", b""),
    (h(header::VARY), "vary", b""),
    (h(header::VIA), "via", b""),
    (h(header::WWW_AUTHENTICATE), "www-authenticate", b""),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Bytes {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
            .into()
    }

    fn decode(d: &mut Decoder, block: &str) -> Result<Vec<(Name, String)>, DecodeError> {
        let mut out = Vec::new();
        d.decode(&hex(block), 8192, |n, v, _| {
            out.push((n, String::from_utf8(v.to_vec()).unwrap()))
        })?;
        Ok(out)
    }

    fn hn(s: &'static str) -> Name {
        Name::Header(HeaderName::from_static(s))
    }

    #[test]
    fn static_table_names_match_their_entries() {
        for (name, raw, _) in &STATIC {
            assert_eq!(&Name::parse(raw.as_bytes()), name, "{raw}");
        }
    }

    #[test]
    fn decodes_the_rfc_request_examples_with_the_dynamic_table() {
        // RFC 7541 appendix C.4: three requests on one connection, Huffman
        // coded, each reusing the table the one before filled.
        let mut d = Decoder::new(4096);
        let r1 = decode(&mut d, "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff").unwrap();
        assert_eq!(
            r1,
            [
                (Name::Method, "GET".into()),
                (Name::Scheme, "http".into()),
                (Name::Path, "/".into()),
                (Name::Authority, "www.example.com".into()),
            ]
        );
        assert_eq!(d.size, 57);
        let r2 = decode(&mut d, "8286 84be 5886 a8eb 1064 9cbf").unwrap();
        assert_eq!(r2[3], (Name::Authority, "www.example.com".into()));
        assert_eq!(r2[4], (hn("cache-control"), "no-cache".into()));
        assert_eq!(d.size, 110);
        let r3 = decode(
            &mut d,
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        )
        .unwrap();
        assert_eq!(r3[1], (Name::Scheme, "https".into()));
        assert_eq!(r3[2], (Name::Path, "/index.html".into()));
        assert_eq!(r3[3], (Name::Authority, "www.example.com".into()));
        assert_eq!(r3[4], (hn("custom-key"), "custom-value".into()));
        assert_eq!(d.size, 164);
        assert_eq!(d.table.len(), 3);
    }

    #[test]
    fn evicts_to_the_size_the_client_sets() {
        // RFC 7541 C.5-style: a 256-byte table; then an update to 0 empties it.
        let mut d = Decoder::new(256);
        decode(&mut d, "4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf").unwrap();
        assert_eq!(d.table.len(), 1);
        decode(&mut d, "20").unwrap();
        assert_eq!((d.table.len(), d.size), (0, 0));
        // The entry is gone: index 62 is now past both tables.
        assert_eq!(decode(&mut d, "3fe1 01 be"), Err(DecodeError::BadIndex(62)));
    }

    #[test]
    fn refuses_bad_blocks() {
        let mut d = Decoder::new(4096);
        assert_eq!(decode(&mut d, "80"), Err(DecodeError::BadIndex(0)));
        assert_eq!(decode(&mut d, "ff80"), Err(DecodeError::Truncated));
        assert_eq!(
            decode(&mut d, "ffff ffff ffff 7f"),
            Err(DecodeError::IntegerOverflow)
        );
        // A size update over the limit, and one after a field.
        assert_eq!(
            decode(&mut d, "3fe2 1f"),
            Err(DecodeError::BadTableSize(4097))
        );
        assert_eq!(decode(&mut d, "82 20"), Err(DecodeError::BadTableSize(0)));
        // A literal running past the block, and one over the string limit.
        assert_eq!(decode(&mut d, "0003 6162"), Err(DecodeError::Truncated));
        let mut big = Decoder::new(4096);
        let mut block = vec![0x00, 0x7f, 0x82, 0x40]; // name of 8321 bytes
        block.resize(block.len() + 8321, b'a');
        assert_eq!(
            big.decode(&block.into(), 8192, |_, _, _| {}),
            Err(DecodeError::StringTooLong(8321))
        );
        // Invalid Huffman: all-ones padding of 8 bits.
        assert_eq!(decode(&mut d, "0081 ff"), Err(DecodeError::BadHuffman));
        // Uppercase and unknown pseudo-header names decode, as Invalid.
        let r = decode(&mut d, "0001 41 0162 0003 3a7a 7a 00").unwrap();
        assert_eq!(r[0].0, Name::Invalid);
        assert_eq!(r[1].0, Name::Invalid);
    }

    #[test]
    fn encodes_what_it_decodes() {
        let mut out = Vec::new();
        encode_status(&mut out, 200);
        encode_status(&mut out, 503);
        encode_field(&mut out, &header::CONTENT_TYPE, b"text/plain");
        encode_field(&mut out, &HeaderName::from_static("x-long"), &[b'v'; 300]);
        let mut d = Decoder::new(4096);
        let mut got = Vec::new();
        d.decode(&out.into(), 8192, |n, v, _| got.push((n, v)))
            .unwrap();
        assert_eq!(got[0], (Name::Status, Bytes::from_static(b"200")));
        assert_eq!(got[1], (Name::Status, Bytes::from_static(b"503")));
        assert_eq!(
            got[2],
            (hn("content-type"), Bytes::from_static(b"text/plain"))
        );
        assert_eq!(got[3].0, hn("x-long"));
        assert_eq!(got[3].1.len(), 300);
        assert!(d.table.is_empty(), "the encoder never indexes");
    }
}
