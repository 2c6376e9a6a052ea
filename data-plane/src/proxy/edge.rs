//! Who sent a request, and what the HTTP connection manager does to its
//! head because of it (Envoy's `mutateRequestHeaders`): the trusted client
//! address, from the connection or from x-forwarded-for; the append to
//! x-forwarded-for and the x-forwarded-proto; and whether the request is
//! internal (marked `x-envoy-internal: true`) or not, in which case it may
//! not set the `x-envoy-*` headers that tell Envoys and the services
//! behind them how to treat it. An edge request (`use_remote_address` and
//! not internal) also gets `x-envoy-external-address`. As in Envoy 1.33
//! and later, no address is internal unless configured.

use std::net::{IpAddr, SocketAddr};

use http::header::{Entry, HeaderMap, HeaderName, HeaderValue};

use crate::config::listener::ClientAddressing;

static X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
static X_ENVOY_EXTERNAL_ADDRESS: HeaderName = HeaderName::from_static("x-envoy-external-address");
pub(super) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Removed from every request that is not internal (Envoy's
/// `cleanInternalHeaders`, and the router's other retry and hedging
/// controls).
static INTERNAL_ONLY: [HeaderName; 16] = [
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms"),
    HeaderName::from_static("x-envoy-force-trace"),
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
    HeaderName::from_static("x-envoy-original-url"),
];

/// Removed from edge requests only: they name the calling service.
static EDGE_ONLY: [HeaderName; 3] = [
    HeaderName::from_static("x-envoy-decorator-operation"),
    HeaderName::from_static("x-envoy-downstream-service-cluster"),
    HeaderName::from_static("x-envoy-downstream-service-node"),
];

/// Who a request is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// Envoy's trusted client address: the connection's peer, or an
    /// address from x-forwarded-for (with port 0).
    pub client: SocketAddr,
    /// From inside the trusted network (`internal_address_config`).
    pub internal: bool,
    /// From outside it, to a listener with `use_remote_address`.
    pub edge: bool,
    /// Internal, with `x-envoy-*` headers that may steer the router.
    pub steered: bool,
}

/// Decides who a request from `peer` (whose address as a header value is
/// `peer_value`) is from, and edits its head to match. Headers the route
/// configuration lists as internal-only are removed by the caller, which
/// knows the route configuration.
pub fn mutate(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    peer_value: &HeaderValue,
    c: &ClientAddressing,
) -> Origin {
    let hops = c.xff_num_trusted_hops;
    let (client, trusted) = if c.use_remote_address {
        let from_xff = if hops > 0 {
            from_xff(headers, hops - 1).0
        } else {
            None
        };
        let trusted = if c.skip_xff_append {
            !headers.contains_key(&X_FORWARDED_FOR)
        } else {
            // One lookup for the check and the write.
            match headers.entry(&X_FORWARDED_FOR) {
                Entry::Vacant(v) => {
                    v.insert(peer_value.clone());
                    true
                }
                Entry::Occupied(mut o) => {
                    // Every line of it, joined, then the peer.
                    let lines: Option<Vec<&str>> = o.iter().map(|v| v.to_str().ok()).collect();
                    let appended = lines.and_then(|l| {
                        HeaderValue::from_str(&format!("{}, {}", l.join(", "), peer.ip())).ok()
                    });
                    if let Some(v) = appended {
                        o.insert(v);
                    }
                    false
                }
            }
        };
        (from_xff.map(|ip| SocketAddr::new(ip, 0)), trusted)
    } else {
        let (ip, single) = from_xff(headers, hops);
        (ip.map(|ip| SocketAddr::new(ip, 0)), single)
    };
    // How the client came: a peer that is not a trusted proxy may not say
    // (at the edge without trusted hops it is overwritten); otherwise it
    // is filled in when missing.
    let overwrite = c.use_remote_address && hops == 0;
    set_forwarded(
        headers,
        &X_FORWARDED_PROTO,
        HeaderValue::from_static("http"),
        overwrite,
    );
    if let Some(port) = &c.forwarded_port {
        set_forwarded(headers, &X_FORWARDED_PORT, port.clone(), overwrite);
    }
    // Only a request whose x-forwarded-for holds one address (or none,
    // with `use_remote_address`) can be internal.
    let internal = trusted && c.internal.contains(client.map_or(peer.ip(), |a| a.ip()));
    let client = client.unwrap_or(peer);
    let edge = !internal && c.use_remote_address;
    // One pass over the names finds whether there is anything to remove
    // (almost never): a lookup per listed name would cost every request.
    let (mut envoy_headers, mut client_cert) = (false, false);
    for n in headers.keys() {
        let n = n.as_str();
        envoy_headers |= n.starts_with("x-envoy-");
        client_cert |= n == X_FORWARDED_CLIENT_CERT.as_str();
    }
    if client_cert && !c.keep_client_cert {
        // A client's own claim of a certificate it did not present.
        headers.remove(&X_FORWARDED_CLIENT_CERT);
    }
    if envoy_headers {
        headers.remove(&X_ENVOY_INTERNAL);
        if !internal {
            for name in &INTERNAL_ONLY {
                headers.remove(name);
            }
        }
        if edge {
            for name in &EDGE_ONLY {
                headers.remove(name);
            }
        }
    }
    if internal {
        headers.insert(&X_ENVOY_INTERNAL, HeaderValue::from_static("true"));
    }
    if edge {
        let v = if client == peer {
            peer_value.clone()
        } else {
            // An address always makes a header value.
            HeaderValue::try_from(client.ip().to_string()).unwrap_or_else(|_| peer_value.clone())
        };
        headers.insert(&X_ENVOY_EXTERNAL_ADDRESS, v);
    }
    Origin {
        client,
        internal,
        edge,
        steered: internal && envoy_headers,
    }
}

/// Sets `name` unless it is there and may stay.
fn set_forwarded(headers: &mut HeaderMap, name: &HeaderName, value: HeaderValue, overwrite: bool) {
    if overwrite || !headers.contains_key(name) {
        headers.insert(name, value);
    }
}

/// The address `skip` entries from the right end of x-forwarded-for (its
/// lines taken in order), and whether it is the header's only entry.
/// `None` when there are too few entries or that one is not an address
/// (Envoy's `getLastAddressFromXFF`).
fn from_xff(headers: &HeaderMap, skip: u32) -> (Option<IpAddr>, bool) {
    let mut seen = 0u32;
    let mut found: Option<&[u8]> = None;
    for v in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        for entry in v.as_bytes().rsplit(|b| *b == b',') {
            if seen == skip {
                found = Some(entry);
            }
            seen += 1;
        }
    }
    let ip = found
        .and_then(|e| std::str::from_utf8(e.trim_ascii()).ok())
        .and_then(|e| e.parse().ok());
    (ip, ip.is_some() && seen == 1 && skip == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::listener::AddressRanges;

    const PEER: &str = "192.0.2.5:4444";

    fn request(xff: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-envoy-retry-on", HeaderValue::from_static("5xx"));
        h.insert("x-envoy-internal", HeaderValue::from_static("true"));
        h.insert(
            "x-envoy-upstream-rq-timeout-ms",
            HeaderValue::from_static("1"),
        );
        h.insert(
            "x-envoy-downstream-service-cluster",
            HeaderValue::from_static("front"),
        );
        h.insert(
            "x-envoy-external-address",
            HeaderValue::from_static("10.9.9.9"),
        );
        h.insert("x-envoy-original-path", HeaderValue::from_static("/kept"));
        h.insert("x-other", HeaderValue::from_static("kept"));
        if let Some(x) = xff {
            h.insert("x-forwarded-for", HeaderValue::from_str(x).unwrap());
        }
        h
    }

    fn rules(remote: bool, hops: u32, internal: &[(&str, Option<u32>)]) -> ClientAddressing {
        ClientAddressing {
            use_remote_address: remote,
            xff_num_trusted_hops: hops,
            skip_xff_append: false,
            internal: AddressRanges::parse(internal, "cidr_ranges", "test").unwrap(),
            keep_client_cert: false,
            forwarded_port: None,
        }
    }

    fn run(h: &mut HeaderMap, c: &ClientAddressing) -> Origin {
        let peer: SocketAddr = PEER.parse().unwrap();
        let value = HeaderValue::from_str(&peer.ip().to_string()).unwrap();
        mutate(h, peer, &value, c)
    }

    fn get<'a>(h: &'a HeaderMap, n: &str) -> Option<&'a str> {
        h.get(n).map(|v| v.to_str().unwrap())
    }

    fn assert_cleaned(h: &HeaderMap) {
        for gone in ["x-envoy-retry-on", "x-envoy-upstream-rq-timeout-ms"] {
            assert!(h.get(gone).is_none(), "{gone} removed: {h:?}");
        }
        assert_eq!(get(h, "x-envoy-original-path"), Some("/kept"));
        assert_eq!(get(h, "x-other"), Some("kept"));
    }

    // Envoy's documented x-forwarded-for examples, one test each.

    #[test]
    fn edge_without_trusted_proxies_trusts_the_connection() {
        let xff = "203.0.113.128, 203.0.113.10, 203.0.113.1";
        let mut h = request(Some(xff));
        let o = run(&mut h, &rules(true, 0, &[]));
        assert_eq!(o.client, PEER.parse().unwrap());
        assert!(o.edge && !o.internal && !o.steered);
        assert_eq!(get(&h, "x-envoy-external-address"), Some("192.0.2.5"));
        assert_eq!(
            get(&h, "x-forwarded-for"),
            Some("203.0.113.128, 203.0.113.10, 203.0.113.1, 192.0.2.5")
        );
        assert_eq!(get(&h, "x-forwarded-proto"), Some("http"));
        assert!(h.get("x-envoy-internal").is_none());
        assert!(h.get("x-envoy-downstream-service-cluster").is_none());
        assert_cleaned(&h);
    }

    #[test]
    fn internal_proxy_trusts_the_last_forwarded_address() {
        let xff = "203.0.113.128, 203.0.113.10, 203.0.113.1, 192.0.2.5";
        let mut h = request(Some(xff));
        let o = run(&mut h, &rules(false, 0, &[("192.0.2.0", Some(24))]));
        assert_eq!(o.client, "192.0.2.5:0".parse().unwrap());
        // Several addresses: not internal, though the last one is.
        assert!(!o.edge && !o.internal);
        assert_eq!(get(&h, "x-forwarded-for"), Some(xff), "not appended");
        assert_eq!(get(&h, "x-envoy-external-address"), Some("10.9.9.9"));
        assert_eq!(
            get(&h, "x-envoy-downstream-service-cluster"),
            Some("front"),
            "only an edge request loses it"
        );
        assert!(h.get("x-envoy-internal").is_none());
        assert_cleaned(&h);
    }

    #[test]
    fn edge_with_two_trusted_proxies() {
        let xff = "203.0.113.128, 203.0.113.10, 203.0.113.1";
        let mut h = request(Some(xff));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let o = run(&mut h, &rules(true, 2, &[]));
        assert_eq!(o.client, "203.0.113.10:0".parse().unwrap());
        assert!(o.edge);
        assert_eq!(get(&h, "x-envoy-external-address"), Some("203.0.113.10"));
        assert_eq!(
            get(&h, "x-forwarded-for"),
            Some("203.0.113.128, 203.0.113.10, 203.0.113.1, 192.0.2.5")
        );
        assert_eq!(
            get(&h, "x-forwarded-proto"),
            Some("https"),
            "a trusted proxy's kept"
        );
    }

    #[test]
    fn internal_proxy_behind_two_trusted_proxies() {
        let xff = "203.0.113.128, 203.0.113.10, 203.0.113.1, 192.0.2.5";
        let mut h = request(Some(xff));
        let o = run(&mut h, &rules(false, 2, &[]));
        assert_eq!(o.client, "203.0.113.10:0".parse().unwrap());
        assert!(!o.edge && !o.internal);
    }

    #[test]
    fn internal_client_without_forwarded_for_is_external_to_an_internal_proxy() {
        let mut h = request(None);
        let o = run(&mut h, &rules(false, 0, &[("192.0.2.0", Some(24))]));
        assert_eq!(o.client, PEER.parse().unwrap(), "the connection, for logs");
        assert!(!o.internal && !o.edge);
        assert!(h.get("x-envoy-internal").is_none());
        assert_cleaned(&h);
        assert_eq!(get(&h, "x-forwarded-proto"), Some("http"), "added");
        assert!(h.get("x-forwarded-for").is_none());
    }

    #[test]
    fn one_internal_forwarded_address_is_internal() {
        let mut h = request(Some("10.20.30.40"));
        let o = run(&mut h, &rules(false, 0, &[("10.0.0.0", Some(8))]));
        assert_eq!(o.client, "10.20.30.40:0".parse().unwrap());
        assert!(o.internal && !o.edge && o.steered);
        assert_eq!(get(&h, "x-envoy-internal"), Some("true"));
        assert_eq!(get(&h, "x-envoy-retry-on"), Some("5xx"), "kept");
    }

    #[test]
    fn internal_peer_at_the_edge_keeps_its_headers() {
        let mut h = request(None);
        let o = run(&mut h, &rules(true, 0, &[("192.0.2.0", Some(24))]));
        assert!(o.internal && !o.edge);
        assert_eq!(get(&h, "x-envoy-internal"), Some("true"));
        assert_eq!(get(&h, "x-envoy-retry-on"), Some("5xx"));
        assert_eq!(get(&h, "x-envoy-external-address"), Some("10.9.9.9"));
        assert_eq!(get(&h, "x-forwarded-for"), Some("192.0.2.5"));
        // With an x-forwarded-for it came through a proxy: external.
        let mut h = request(Some("10.1.1.1"));
        let o = run(&mut h, &rules(true, 0, &[("192.0.2.0", Some(24))]));
        assert!(o.edge && !o.internal);
        assert_cleaned(&h);
    }

    #[test]
    fn client_certificate_claims_are_removed_unless_always_forwarded() {
        let xfcc = "By=spiffe://a;Hash=00;URI=spiffe://me";
        for remote in [true, false] {
            let mut h = request(None);
            h.insert("x-forwarded-client-cert", HeaderValue::from_static(xfcc));
            run(&mut h, &rules(remote, 0, &[]));
            assert!(h.get("x-forwarded-client-cert").is_none(), "{h:?}");
        }
        let mut c = rules(true, 0, &[]);
        c.keep_client_cert = true;
        let mut h = request(None);
        h.insert("x-forwarded-client-cert", HeaderValue::from_static(xfcc));
        run(&mut h, &c);
        assert_eq!(get(&h, "x-forwarded-client-cert"), Some(xfcc));
    }

    #[test]
    fn forwarded_port_is_the_listeners_unless_a_trusted_hop_said() {
        let port = || Some(HeaderValue::from(8443u16));
        let mut c = rules(true, 0, &[]);
        c.forwarded_port = port();
        let mut h = request(None);
        h.insert("x-forwarded-port", HeaderValue::from_static("1"));
        run(&mut h, &c);
        assert_eq!(
            get(&h, "x-forwarded-port"),
            Some("8443"),
            "untrusted: replaced"
        );
        c.xff_num_trusted_hops = 1;
        let mut h = request(None);
        h.insert("x-forwarded-port", HeaderValue::from_static("1"));
        run(&mut h, &c);
        assert_eq!(
            get(&h, "x-forwarded-port"),
            Some("1"),
            "a trusted hop's kept"
        );
        let mut c = rules(false, 0, &[]);
        c.forwarded_port = port();
        let mut h = request(None);
        run(&mut h, &c);
        assert_eq!(
            get(&h, "x-forwarded-port"),
            Some("8443"),
            "added when absent"
        );
        let mut h = request(None);
        run(&mut h, &rules(true, 0, &[]));
        assert!(h.get("x-forwarded-port").is_none(), "not asked for");
    }

    #[test]
    fn every_forwarded_for_line_is_kept_when_appending() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        run(&mut h, &rules(true, 0, &[]));
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["1.1.1.1, 2.2.2.2, 192.0.2.5"]
        );
    }

    #[test]
    fn skip_append_leaves_forwarded_for_alone() {
        let mut h = request(Some("198.51.100.1"));
        let mut c = rules(true, 0, &[]);
        c.skip_xff_append = true;
        let o = run(&mut h, &c);
        assert_eq!(get(&h, "x-forwarded-for"), Some("198.51.100.1"));
        assert!(o.edge);
        let mut h = request(None);
        run(&mut h, &c);
        assert!(h.get("x-forwarded-for").is_none());
    }

    #[test]
    fn forwarded_for_entries_are_read_across_lines_and_bad_ones_fall_back() {
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static(" 2001:db8::1 "));
        assert_eq!(
            from_xff(&h, 0),
            (Some("2001:db8::1".parse().unwrap()), false)
        );
        assert_eq!(from_xff(&h, 1), (Some("2.2.2.2".parse().unwrap()), false));
        assert_eq!(from_xff(&h, 2), (Some("1.1.1.1".parse().unwrap()), false));
        assert_eq!(from_xff(&h, 3), (None, false));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("unknown"));
        assert_eq!(from_xff(&h, 0), (None, false));
        let mut h = request(Some("not-an-address"));
        let o = run(&mut h, &rules(false, 0, &[("0.0.0.0", Some(0))]));
        assert_eq!(o.client, PEER.parse().unwrap());
        assert!(!o.internal, "no trusted address, not internal");
    }
}
