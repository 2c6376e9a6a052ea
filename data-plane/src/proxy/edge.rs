//! What the HTTP connection manager does to a request at the edge of the
//! trusted network (Envoy's header sanitizing): with `use_remote_address`,
//! a request from an address outside `internal_address_config` is
//! external, and may not set the `x-envoy-*` headers that tell Envoys
//! (and the services behind them) how to treat a request; the client's
//! address goes upstream as `x-envoy-external-address`. A request from an
//! internal address is marked `x-envoy-internal: true` instead. As in
//! Envoy 1.33 and later, no address is internal unless configured.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::listener::InternalAddresses;

static X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
static X_ENVOY_EXTERNAL_ADDRESS: HeaderName = HeaderName::from_static("x-envoy-external-address");

/// The headers an external request may not carry (Envoy's
/// `cleanInternalHeaders` for an edge request: the documented list, and
/// the retry and hedging controls its router reads).
static INTERNAL_ONLY: [HeaderName; 19] = [
    HeaderName::from_static("x-envoy-decorator-operation"),
    HeaderName::from_static("x-envoy-downstream-service-cluster"),
    HeaderName::from_static("x-envoy-downstream-service-node"),
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms"),
    HeaderName::from_static("x-envoy-force-trace"),
    HeaderName::from_static("x-envoy-internal"),
    HeaderName::from_static("x-envoy-ip-tags"),
    HeaderName::from_static("x-envoy-max-retries"),
    HeaderName::from_static("x-envoy-retry-grpc-on"),
    HeaderName::from_static("x-envoy-retry-on"),
    HeaderName::from_static("x-envoy-upstream-alt-stat-name"),
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms"),
    HeaderName::from_static("x-envoy-upstream-rq-timeout-alt-response"),
    HeaderName::from_static("x-envoy-upstream-rq-timeout-ms"),
    HeaderName::from_static("x-envoy-upstream-stream-duration-ms"),
    HeaderName::from_static("x-envoy-retriable-status-codes"),
    HeaderName::from_static("x-envoy-retriable-header-names"),
    HeaderName::from_static("x-envoy-hedge-on-per-try-timeout"),
    HeaderName::from_static("x-envoy-is-timeout-retry"),
];

/// Marks or cleans `headers` of a request from `peer` (whose address as a
/// header value is `peer_value`), for a listener with
/// `use_remote_address`.
pub(super) fn sanitize(
    headers: &mut HeaderMap,
    peer: IpAddr,
    peer_value: &HeaderValue,
    internal: &InternalAddresses,
) {
    if internal.contains(peer) {
        headers.insert(&X_ENVOY_INTERNAL, HeaderValue::from_static("true"));
        return;
    }
    // One pass over the names finds whether there is anything to remove
    // (almost never): a lookup per listed name would cost every request.
    if headers.keys().any(|n| n.as_str().starts_with("x-envoy-")) {
        for name in &INTERNAL_ONLY {
            headers.remove(name);
        }
    }
    headers.insert(&X_ENVOY_EXTERNAL_ADDRESS, peer_value.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-envoy-retry-on", HeaderValue::from_static("5xx"));
        h.insert("x-envoy-internal", HeaderValue::from_static("true"));
        h.insert(
            "x-envoy-upstream-rq-timeout-ms",
            HeaderValue::from_static("1"),
        );
        h.insert(
            "x-envoy-external-address",
            HeaderValue::from_static("10.9.9.9"),
        );
        h.insert("x-envoy-original-path", HeaderValue::from_static("/kept"));
        h.insert("x-other", HeaderValue::from_static("kept"));
        h
    }

    #[test]
    fn external_requests_lose_internal_headers_and_get_their_address() {
        let peer: IpAddr = "203.0.113.7".parse().unwrap();
        let value = HeaderValue::from_static("203.0.113.7");
        let mut h = request();
        sanitize(&mut h, peer, &value, &InternalAddresses::default());
        for gone in [
            "x-envoy-retry-on",
            "x-envoy-internal",
            "x-envoy-upstream-rq-timeout-ms",
        ] {
            assert!(h.get(gone).is_none(), "{gone} removed: {h:?}");
        }
        assert_eq!(h["x-envoy-external-address"], "203.0.113.7");
        assert_eq!(h["x-envoy-original-path"], "/kept");
        assert_eq!(h["x-other"], "kept");
    }

    #[test]
    fn internal_requests_keep_their_headers_and_are_marked() {
        let internal = InternalAddresses::parse(&[("203.0.113.0", Some(24))], "test").unwrap();
        let peer: IpAddr = "203.0.113.7".parse().unwrap();
        let mut h = request();
        sanitize(&mut h, peer, &HeaderValue::from_static("x"), &internal);
        assert_eq!(h["x-envoy-retry-on"], "5xx");
        assert_eq!(h["x-envoy-internal"], "true");
        assert_eq!(h["x-envoy-external-address"], "10.9.9.9", "left alone");
    }
}
