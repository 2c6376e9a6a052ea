//! How long a stream may last, as Envoy decides it: a gRPC call's own
//! deadline (its `grpc-timeout` header) where the route allows that,
//! else the route's `max_stream_duration`, else the listener's. When the
//! limit passes before the answer started, the client gets a local reply
//! (`downstream duration timeout`, DEADLINE_EXCEEDED for gRPC); after
//! that, the answer is cut.
//!
//! The deprecated `max_grpc_timeout` works on the route timeout instead:
//! see [`grpc_route_timeout`].

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::config::route::{GrpcRouteTimeout, MaxStreamDuration};

/// The stream's limit (`None`: none), from the route's settings, the
/// listener's and the request's `grpc-timeout` header.
pub(super) fn stream_limit(
    route: Option<&MaxStreamDuration>,
    listener: Option<Duration>,
    headers: &HeaderMap,
) -> Option<Duration> {
    let header_max = route.and_then(|r| r.grpc_header_max);
    let header = header_max.and_then(|_| headers.get("grpc-timeout").and_then(grpc_timeout));
    let (Some(max), Some(mut t)) = (header_max, header) else {
        // No deadline from the call: the route's limit (0 for none), else
        // the listener's.
        return match route.and_then(|r| r.max) {
            Some(d) => Some(d).filter(|d| !d.is_zero()),
            None => listener,
        };
    };
    if !max.is_zero() {
        t = t.min(max);
    }
    if let Some(offset) = route.and_then(|r| r.grpc_header_offset) {
        // An offset that leaves nothing ends the stream at once, as in
        // Envoy.
        t = t.saturating_sub(offset);
    }
    Some(t)
}

/// The route timeout of a gRPC request on a route with the deprecated
/// `max_grpc_timeout`: the call's `grpc-timeout` less the offset (if that
/// leaves some), capped at the maximum (0: uncapped); no header, and no
/// cap, means no timeout.
pub(super) fn grpc_route_timeout(g: &GrpcRouteTimeout, headers: &HeaderMap) -> Option<Duration> {
    let mut t = headers
        .get("grpc-timeout")
        .and_then(grpc_timeout)
        .unwrap_or(Duration::ZERO);
    if let Some(offset) = g.offset {
        if offset < t {
            t -= offset;
        }
    }
    if !g.max.is_zero() && (t.is_zero() || t > g.max) {
        t = g.max;
    }
    Some(t).filter(|t| !t.is_zero())
}

/// A `grpc-timeout` value: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`); `None` when malformed (and then ignored, as gRPC servers do).
pub(super) fn grpc_timeout(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    let (unit, digits) = b.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = timeout {
            h.insert("grpc-timeout", HeaderValue::from_str(t).expect("value"));
        }
        h
    }

    fn route(max: Option<u64>, header_max: Option<u64>, offset: Option<u64>) -> MaxStreamDuration {
        let ms = |v: Option<u64>| v.map(Duration::from_millis);
        MaxStreamDuration {
            max: ms(max),
            grpc_header_max: ms(header_max),
            grpc_header_offset: ms(offset),
        }
    }

    #[test]
    fn grpc_timeout_values() {
        let t = |s: &str| grpc_timeout(&HeaderValue::from_str(s).expect("value"));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("3S"), Some(Duration::from_secs(3)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("10n"), Some(Duration::from_nanos(10)));
        for bad in ["", "S", "123456789S", "1.5S", "-1S", "10x", "10"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }

    /// Envoy's order: the call's deadline where the route allows it
    /// (capped, less the offset), else the route's limit (0: none, the
    /// listener's not applying either), else the listener's.
    #[test]
    fn the_limit_of_a_stream() {
        let l = Some(Duration::from_secs(60));
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(stream_limit(None, l, &headers(Some("1S"))), l);
        assert_eq!(stream_limit(None, None, &headers(None)), None);
        let r = route(Some(5000), None, None);
        assert_eq!(stream_limit(Some(&r), l, &headers(Some("1S"))), ms(5000));
        let r = route(Some(0), None, None);
        assert_eq!(stream_limit(Some(&r), l, &headers(None)), None);
        let r = route(None, Some(0), None);
        assert_eq!(stream_limit(Some(&r), l, &headers(Some("90S"))), ms(90_000));
        assert_eq!(stream_limit(Some(&r), l, &headers(None)), l);
        assert_eq!(stream_limit(Some(&r), l, &headers(Some("bad"))), l);
        let r = route(Some(5000), Some(2000), Some(300));
        assert_eq!(stream_limit(Some(&r), l, &headers(Some("1S"))), ms(700));
        assert_eq!(stream_limit(Some(&r), l, &headers(Some("9S"))), ms(1700));
        assert_eq!(stream_limit(Some(&r), l, &headers(Some("100m"))), ms(0));
        assert_eq!(stream_limit(Some(&r), l, &headers(None)), ms(5000));
    }

    #[test]
    fn the_deprecated_max_grpc_timeout() {
        let g = |max, offset: Option<u64>| GrpcRouteTimeout {
            max: Duration::from_millis(max),
            offset: offset.map(Duration::from_millis),
        };
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(grpc_route_timeout(&g(0, None), &headers(None)), None);
        assert_eq!(
            grpc_route_timeout(&g(0, None), &headers(Some("2S"))),
            ms(2000)
        );
        assert_eq!(
            grpc_route_timeout(&g(1000, None), &headers(Some("2S"))),
            ms(1000)
        );
        assert_eq!(grpc_route_timeout(&g(1000, None), &headers(None)), ms(1000));
        assert_eq!(
            grpc_route_timeout(&g(0, Some(500)), &headers(Some("2S"))),
            ms(1500)
        );
        assert_eq!(
            grpc_route_timeout(&g(0, Some(5000)), &headers(Some("2S"))),
            ms(2000)
        );
    }
}
