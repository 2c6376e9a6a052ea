//! HTTP/2 wire pieces (RFC 9113 frames, RFC 7541 HPACK) for Portico's own
//! HTTP/2 server ([`crate::proxy::h2`]).

pub(crate) mod frame;
pub(crate) mod hpack;
mod huffman;
