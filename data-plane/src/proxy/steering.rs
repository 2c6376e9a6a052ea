//! An internal request's say in how the router treats it: Envoy's
//! `x-envoy-*` request headers for timeouts and retries. Requests from
//! outside the trusted network have lost them already ([`super::edge`]);
//! the router reads them here and takes them off the request, as Envoy's
//! does, so they never reach the upstream.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName};

use crate::config::matcher::HeaderMatch;
use crate::config::route::RetryPolicy;

static RETRY_ON: HeaderName = HeaderName::from_static("x-envoy-retry-on");
static RETRY_GRPC_ON: HeaderName = HeaderName::from_static("x-envoy-retry-grpc-on");
static MAX_RETRIES: HeaderName = HeaderName::from_static("x-envoy-max-retries");
static RETRIABLE_STATUS_CODES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-status-codes");
static RETRIABLE_HEADER_NAMES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-header-names");
static HEDGE_ON_PER_TRY_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-hedge-on-per-try-timeout");
static TIMEOUT_MS: HeaderName = HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
static PER_TRY_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms");
static TIMEOUT_ALT_RESPONSE: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-timeout-alt-response");

/// What a request's headers change of its route's timeouts and retries.
#[derive(Debug, Default)]
pub struct Steering {
    /// The route's timeout instead (`None` inside: no timeout).
    pub timeout: Option<Option<Duration>>,
    /// Each try's timeout instead.
    pub per_try: Option<Duration>,
    /// The retry policy instead of the route's (the route's with the
    /// request's conditions added, or Envoy's default one when the route
    /// has none); `None`: the route's as it is.
    pub retry: Option<RetryPolicy>,
    /// Answer a timeout with 204, not 504.
    pub timeout_no_content: bool,
}

/// Reads the steering headers of `headers` and removes them, for a route
/// whose own retry policy is `route`.
pub fn take(headers: &mut HeaderMap, route: Option<&RetryPolicy>) -> Steering {
    let mut s = Steering::default();
    let text = |h: &HeaderMap, n: &HeaderName| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_owned())
    };
    let millis = |h: &HeaderMap, n: &HeaderName| {
        text(h, n)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
    };
    // Zero is no timeout, as in the route's own.
    s.timeout = millis(headers, &TIMEOUT_MS).map(|t| (!t.is_zero()).then_some(t));
    s.per_try = millis(headers, &PER_TRY_TIMEOUT_MS).filter(|t| !t.is_zero());
    s.timeout_no_content = headers.contains_key(&TIMEOUT_ALT_RESPONSE);

    let retry_on = text(headers, &RETRY_ON);
    let grpc_on = text(headers, &RETRY_GRPC_ON);
    let max = text(headers, &MAX_RETRIES).and_then(|v| v.parse::<u32>().ok());
    let codes = text(headers, &RETRIABLE_STATUS_CODES);
    let names = text(headers, &RETRIABLE_HEADER_NAMES);
    if retry_on.is_some()
        || grpc_on.is_some()
        || (route.is_some() && (max, &codes, &names) != (None, &None, &None))
    {
        let mut p = route.cloned().unwrap_or_else(RetryPolicy::asked_for);
        // Conditions Envoy does not know are passed over, as it does.
        for t in tokens(retry_on.as_deref()) {
            p.add_http_condition(t);
        }
        for t in tokens(grpc_on.as_deref()) {
            p.add_grpc_condition(t);
        }
        if let (Some(n), true) = (max, p.any_condition()) {
            p.num_retries = n;
        }
        p.statuses
            .extend(tokens(codes.as_deref()).filter_map(|c| c.parse::<u16>().ok()));
        p.answer_headers
            .extend(tokens(names.as_deref()).filter_map(HeaderMatch::present));
        s.retry = Some(p);
    }
    for n in [
        &TIMEOUT_MS,
        &PER_TRY_TIMEOUT_MS,
        &TIMEOUT_ALT_RESPONSE,
        &RETRY_ON,
        &RETRY_GRPC_ON,
        &MAX_RETRIES,
        &RETRIABLE_STATUS_CODES,
        &RETRIABLE_HEADER_NAMES,
        &HEDGE_ON_PER_TRY_TIMEOUT,
    ] {
        headers.remove(n);
    }
    s
}

/// A comma-separated list's non-empty entries.
fn tokens(list: Option<&str>) -> impl Iterator<Item = &str> {
    list.into_iter()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in list {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h.insert("x-kept", HeaderValue::from_static("1"));
        h
    }

    #[test]
    fn timeouts_replace_the_routes_and_go_no_further() {
        let mut h = headers(&[
            ("x-envoy-upstream-rq-timeout-ms", "250"),
            ("x-envoy-upstream-rq-per-try-timeout-ms", "100"),
            ("x-envoy-upstream-rq-timeout-alt-response", ""),
        ]);
        let s = take(&mut h, None);
        assert_eq!(s.timeout, Some(Some(Duration::from_millis(250))));
        assert_eq!(s.per_try, Some(Duration::from_millis(100)));
        assert!(s.timeout_no_content);
        assert!(s.retry.is_none(), "no retries asked for");
        assert_eq!(h.len(), 1, "only x-kept is left: {h:?}");
        let s = take(
            &mut headers(&[("x-envoy-upstream-rq-timeout-ms", "0")]),
            None,
        );
        assert_eq!(s.timeout, Some(None), "0 turns the timeout off");
        let s = take(
            &mut headers(&[("x-envoy-upstream-rq-timeout-ms", "soon")]),
            None,
        );
        assert_eq!(s.timeout, None, "not a number: the route's");
    }

    #[test]
    fn retry_headers_add_to_the_routes_policy_or_make_envoys_default() {
        let mut h = headers(&[
            ("x-envoy-retry-on", "5xx, nonsense ,retriable-status-codes"),
            ("x-envoy-retry-grpc-on", "unavailable"),
            ("x-envoy-max-retries", "3"),
            ("x-envoy-retriable-status-codes", "418,x"),
        ]);
        let p = take(&mut h, None).retry.expect("a policy");
        assert!(p.on_5xx && p.on_statuses);
        assert_eq!((p.num_retries, p.grpc.as_slice()), (3, &[14][..]));
        assert!(p.retry_status(418, &HeaderMap::new()));
        assert!(!p.retry_status(404, &HeaderMap::new()));
        assert_eq!(h.len(), 1, "{h:?}");

        let route = RetryPolicy {
            connect_failure: true,
            num_retries: 2,
            ..RetryPolicy::asked_for()
        };
        let p = take(
            &mut headers(&[("x-envoy-retry-on", "gateway-error")]),
            Some(&route),
        )
        .retry
        .expect("a policy");
        assert!(p.connect_failure && p.gateway_error && p.num_retries == 2);
        let p = take(&mut headers(&[("x-envoy-max-retries", "5")]), Some(&route))
            .retry
            .expect("a policy");
        assert_eq!(p.num_retries, 5);
        assert!(
            take(&mut headers(&[("x-envoy-max-retries", "5")]), None)
                .retry
                .is_none(),
            "a count without a condition asks for nothing"
        );
        let p = take(
            &mut headers(&[
                ("x-envoy-retry-on", "retriable-headers"),
                ("x-envoy-retriable-header-names", "x-try-again"),
            ]),
            None,
        )
        .retry
        .expect("a policy");
        let mut answer = HeaderMap::new();
        assert!(!p.retry_status(200, &answer));
        answer.insert("x-try-again", HeaderValue::from_static("1"));
        assert!(p.retry_status(200, &answer));
    }
}
