//! `RouteConfiguration` → [`RouteTable`]: virtual hosts found by host name,
//! routes tried in order, first match wins (Envoy's semantics).

// Envoy's deprecated fields are still sent by control planes; honour them.
#![allow(deprecated)]

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use portico_proto::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValueOption,
};
use portico_proto::envoy::config::route::v3::route_action::RequestMirrorPolicy as PbMirrorPolicy;
use portico_proto::envoy::config::route::v3::{
    redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
    route::Action,
    route_action::{hash_policy::PolicySpecifier, ClusterSpecifier, HostRewriteSpecifier},
    route_match::PathSpecifier,
    HeaderMatcher as PbHeaderMatcher, RetryPolicy as PbRetryPolicy, Route as PbRoute,
    RouteConfiguration, VirtualHost as PbVirtualHost, WeightedCluster as WeightedClusterProto,
};
use prost::Message;
use regex::Regex;

use super::matcher::{full_regex, CookieMatch, HeaderMatch, QueryMatch, RequestHead, Substitution};
use super::{duration, inline_bytes, ConfigError};

/// A converted route configuration, ready for lookups.
#[derive(Debug)]
pub struct RouteTable {
    /// The resource name.
    pub name: Arc<str>,
    vhosts: Vec<Arc<VirtualHost>>,
    /// Where each virtual host's encoding was in the bytes the table was
    /// decoded from (empty when converted from a message).
    spans: Vec<Range<usize>>,
    exact: foldhash::HashMap<String, usize>,
    /// `*SUFFIX` domains, longest suffix first.
    suffix: Vec<(String, usize)>,
    /// `PREFIX*` domains, longest prefix first.
    prefix: Vec<(String, usize)>,
    any: Option<usize>,
    ignore_port: bool,
    /// Header edits run from the least specific level to the most, so
    /// the route's win (`most_specific_header_mutations_wins`); by default
    /// the configuration's do.
    pub most_specific_wins: bool,
    /// The header that picks the virtual host instead of `:authority`
    /// (`vhost_header`), when the request has it.
    pub vhost_header: Option<HeaderName>,
    /// Routes match the path without its `;` parameters
    /// (`ignore_path_parameters_in_path_matching`).
    pub ignore_path_parameters: bool,
    /// Header edits of the whole configuration (applied last).
    pub edits: Edits,
    /// Every cluster a route names (weighted ones included).
    pub clusters: Vec<Arc<str>>,
    /// Refuse the table while a route names a cluster the proxy does not
    /// have: unless `validate_clusters` is set false (then such a route
    /// answers with its `cluster_not_found_response_code`, 503 unless
    /// set, as Envoy's). Envoy does not check RDS tables by default; this
    /// proxy does, so that a mistyped cluster is a NACK, not 503s.
    pub validate_clusters: bool,
    /// Mirrors of every route whose virtual host and action name none
    /// (`request_mirror_policies`; the most specific non-empty list wins).
    pub mirrors: Vec<Mirror>,
    /// Headers a request from outside the trusted network may not carry
    /// (`internal_only_headers`): removed before routing.
    pub internal_only_headers: Vec<HeaderName>,
}

/// A virtual host.
#[derive(Debug)]
pub struct VirtualHost {
    /// Its name, for stats and logs.
    pub name: Arc<str>,
    /// The host names it serves.
    pub domains: Vec<String>,
    /// Every cluster its routes name, sorted, once each.
    pub clusters: Vec<Arc<str>>,
    /// Routes in order.
    pub routes: Vec<Route>,
    /// Header edits of the virtual host.
    pub edits: Edits,
    /// Mirrors of its routes that name none themselves
    /// (`request_mirror_policies`).
    pub mirrors: Vec<Mirror>,
    /// Tell the upstream which try this is (`x-envoy-attempt-count`;
    /// `include_request_attempt_count`).
    pub attempt_count_to_upstream: bool,
    /// Retries tell the upstream whether a per-try timeout caused them
    /// (`x-envoy-is-timeout-retry`, `include_is_timeout_retry_header`).
    pub timeout_retry_header: bool,
    /// Tell the client how many tries it took
    /// (`include_attempt_count_in_response`).
    pub attempt_count_in_response: bool,
    /// Requests that must come over TLS, else get a redirect to https
    /// (`require_tls`). No listener terminates TLS yet, so every request
    /// it covers is redirected.
    pub require_tls: RequireTls,
}

/// Which requests a virtual host sends to https (`require_tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequireTls {
    /// None.
    No,
    /// Requests that are not internal.
    ExternalOnly,
    /// All.
    All,
}

/// One route: what it matches and what it does.
#[derive(Debug)]
pub struct Route {
    /// Its name (may be empty), for the access log.
    pub name: Arc<str>,
    matcher: RouteMatcher,
    /// What to do with a matching request.
    pub action: RouteAction,
    /// Header edits of the route.
    pub edits: Edits,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Arc<Regex>),
    SeparatedPrefix(String),
}

#[derive(Debug)]
struct RouteMatcher {
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    cookies: Vec<CookieMatch>,
    /// It asks for a client certificate (`tls_context`), which no
    /// connection here has.
    never: bool,
    grpc: bool,
    /// `runtime_fraction`: the share of requests the route takes, as
    /// (numerator, denominator); the rest go on to the next route.
    fraction: Option<(u64, u64)>,
}

/// The action of a route.
#[derive(Debug)]
pub enum RouteAction {
    /// Proxy to a cluster.
    Forward(Box<Forward>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer directly.
    Direct {
        /// Status code.
        status: http::StatusCode,
        /// Body.
        body: Bytes,
    },
}

/// Which cluster a forwarded request goes to.
#[derive(Debug)]
pub enum ClusterChoice {
    /// Always this one.
    One(Arc<str>),
    /// One of these, by weight (`weighted_clusters`).
    Weighted(Box<Weighted>),
    /// The one named by a request header.
    Header(HeaderName),
}

/// A route's `weighted_clusters`.
#[derive(Debug)]
pub struct Weighted {
    /// The clusters, in order (a draw below a cluster's weight picks it,
    /// else the next is tried with the draw less that weight).
    pub targets: Vec<WeightedTarget>,
    /// The sum of the weights (above 0).
    pub total: u32,
    /// Where each request's draw comes from.
    pub draw: WeightDraw,
}

/// One of a route's weighted clusters (`WeightedCluster.ClusterWeight`).
#[derive(Debug)]
pub struct WeightedTarget {
    /// The cluster.
    pub name: Arc<str>,
    /// Its weight.
    pub weight: u32,
    /// Its own header edits, applied before the route's (so the route's,
    /// the virtual host's and the configuration's win), as Envoy does.
    pub edits: Option<Box<Edits>>,
    /// Its `host_rewrite_literal`: the Host upstream unless the route
    /// rewrites the host itself (the route's rewrite comes after).
    pub host: Option<HeaderValue>,
}

/// Where a weighted choice's draw comes from (`random_value_specifier`).
#[derive(Debug)]
pub enum WeightDraw {
    /// A random number per request.
    Random,
    /// The decimal number in this request header (a proxy in front made
    /// the draw, so that both pick alike); random when absent, repeated or
    /// not a number.
    Header(HeaderName),
    /// The route's hash policies (`use_hash_policy`): the same request
    /// keys pick the same cluster; random when no policy yields a hash.
    HashPolicy,
}

/// How the Host header is rewritten upstream (Envoy's
/// `host_rewrite_specifier`). Each but `Keep` appends the original to
/// `x-forwarded-host` when the route says so, if it rewrites.
#[derive(Debug)]
pub enum HostRewrite {
    /// Left alone.
    Keep,
    /// Set to this.
    Literal(HeaderValue),
    /// Set to the chosen endpoint's host name (`auto_host_rewrite`); left
    /// alone for an endpoint without one, as Envoy does.
    Auto,
    /// Set to this request header's value (after the route's header
    /// edits), unless it is absent or empty (`host_rewrite_header`).
    Header(HeaderName),
    /// Set to the request's path (without its query), substituted
    /// (`host_rewrite_path_regex`).
    PathRegex(Substitution),
}

/// A hash policy for ring-hash load balancing (`RouteAction.HashPolicy`).
/// A route's policies are combined: each one that yields a hash is
/// mixed into the hash so far.
#[derive(Debug)]
pub struct HashPolicy {
    /// What is hashed.
    pub key: HashKey,
    /// No later policy counts once there is a hash (`terminal`).
    pub terminal: bool,
}

/// What a hash policy hashes.
#[derive(Debug)]
pub enum HashKey {
    /// A request header's value (its first), rewritten first when a
    /// `regex_rewrite` is set.
    Header(HeaderName, Option<Substitution>),
    /// The client's IP.
    SourceIp,
    /// A cookie's value.
    Cookie(CookieHash),
    /// A query parameter's value.
    Query(String),
}

/// A cookie hash policy.
#[derive(Debug)]
pub struct CookieHash {
    /// The cookie.
    pub name: String,
    /// With a `ttl`: a request without the cookie gets one made (from the
    /// client's connection), hashed, and set on the answer, so the
    /// client's next requests stick to the same endpoint.
    pub set: Option<SetCookie>,
}

/// How a made cookie is set on the answer.
#[derive(Debug)]
pub struct SetCookie {
    /// `Max-Age` (none when 0: a session cookie).
    pub ttl: Duration,
    /// `Path`, when not empty.
    pub path: String,
    /// More attributes, as `name` or `name=value`.
    pub attributes: Vec<String>,
}

impl SetCookie {
    /// The `set-cookie` value for `name=value`, as Envoy writes it.
    pub fn header(&self, name: &str, value: &str) -> Option<HeaderValue> {
        let mut s = format!("{name}=\"{value}\"");
        if !self.ttl.is_zero() {
            s.push_str(&format!("; Max-Age={}", self.ttl.as_secs()));
        }
        if !self.path.is_empty() {
            s.push_str(&format!("; Path={}", self.path));
        }
        for a in &self.attributes {
            s.push_str("; ");
            s.push_str(a);
        }
        s.push_str("; HttpOnly");
        HeaderValue::from_str(&s).ok()
    }
}

/// A route's forwarding settings.
#[derive(Debug)]
pub struct Forward {
    /// Target cluster(s).
    pub clusters: ClusterChoice,
    /// Replace the matched prefix with this.
    pub prefix_rewrite: Option<String>,
    /// Or rewrite the path by regex.
    pub regex_rewrite: Option<Substitution>,
    /// Host header rewrite.
    pub host_rewrite: HostRewrite,
    /// A rewritten host's original goes to `x-forwarded-host`
    /// (`append_x_forwarded_host`).
    pub append_x_forwarded_host: bool,
    /// Whole-request timeout (None: disabled).
    pub timeout: Option<Duration>,
    /// Retries (the route's, else the virtual host's).
    pub retry: Option<Arc<RetryPolicy>>,
    /// Hash policies for ring hash.
    pub hash: Vec<HashPolicy>,
    /// The route's own stream idle timeout (`RouteAction.idle_timeout`):
    /// `None` when unset, `Some(None)` when turned off with 0.
    pub idle_timeout: Option<Option<Duration>>,
    /// The route's stream duration limit and gRPC deadline handling
    /// (`RouteAction.max_stream_duration`).
    pub max_stream: Option<MaxStreamDuration>,
    /// The deprecated `max_grpc_timeout`: a gRPC request's route timeout
    /// from its `grpc-timeout` header.
    pub grpc_timeout: Option<GrpcRouteTimeout>,
    /// The route's word on upgrades (over the connection manager's).
    pub upgrades: super::upgrades::Upgrades,
    /// Clusters that get a copy of each request (`request_mirror_policies`).
    pub mirrors: Vec<Mirror>,
    /// The route's (else its virtual host's) limit on the body kept for
    /// retries and mirrors; `None`: the listener's.
    pub body_buffer_limit: Option<BodyBufferLimit>,
    /// The status when the cluster does not exist
    /// (`cluster_not_found_response_code`: 503, 404 or 500).
    pub cluster_not_found: http::StatusCode,
    /// `x-envoy-expected-rq-timeout-ms` for a first try that starts at
    /// once, made once here: its value, and the header value.
    pub expected_timeout: Option<(u64, HeaderValue)>,
}

/// The time in milliseconds an upstream try is expected to take, as
/// Envoy's router computes it: the per-try timeout when one is set and
/// shorter than the route's, else the route's; capped by what is left of
/// the route's (at least 1 ms, since 0 means none). `None`: no limit.
pub fn expected_timeout_ms(
    route: Option<Duration>,
    per_try: Option<Duration>,
    elapsed: Duration,
) -> Option<u64> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let global = route.map_or(0, ms);
    let per_try = per_try.map_or(0, ms);
    let per_try = if global != 0 && per_try >= global {
        0
    } else {
        per_try
    };
    let expected = if per_try == 0 { global } else { per_try };
    if expected == 0 {
        return None;
    }
    if global == 0 {
        return Some(expected);
    }
    let elapsed = ms(elapsed);
    Some(if elapsed >= global {
        1
    } else {
        expected.min(global - elapsed)
    })
}

/// A route's or virtual host's limit on the request body kept for retries
/// and mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyBufferLimit {
    /// `request_body_buffer_limit`: this many bytes, whatever the
    /// listener's.
    Exact(u64),
    /// The deprecated `per_request_buffer_limit_bytes`: this many, but
    /// not more than the listener's.
    AtMost(u64),
}

impl BodyBufferLimit {
    /// From a route's or virtual host's two fields (at most one set).
    #[allow(deprecated)]
    fn convert(
        per_request: Option<u32>,
        body: Option<u64>,
        at: &str,
    ) -> Result<Option<Self>, ConfigError> {
        match (per_request, body) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                at,
                "only one of per_request_buffer_limit_bytes and request_body_buffer_limit may be set",
            )),
            (Some(n), None) => Ok(Some(Self::AtMost(u64::from(n)))),
            (None, Some(n)) => Ok(Some(Self::Exact(n))),
            (None, None) => Ok(None),
        }
    }

    /// The limit in bytes, given the listener's.
    pub fn bytes(limit: Option<Self>, listener: u64) -> u64 {
        match limit {
            None => listener,
            Some(Self::Exact(n)) => n,
            Some(Self::AtMost(n)) => n.min(listener),
        }
    }
}

/// A `request_mirror_policy`: a share of the route's requests is also
/// sent to another cluster, and its answers are dropped.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// The cluster.
    pub cluster: Arc<str>,
    /// The share of requests, as (numerator, denominator); `None`: all.
    pub fraction: Option<(u64, u64)>,
    /// Whether the copy's host keeps its name (else `-shadow` is added).
    pub keep_host: bool,
    /// The copy's host instead (`host_rewrite_literal`, no suffix added).
    pub host: Option<HeaderValue>,
}

/// Envoy's deprecated `RouteAction.max_grpc_timeout` and
/// `grpc_timeout_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcRouteTimeout {
    /// The cap on the header's timeout (0: uncapped).
    pub max: Duration,
    /// Taken off the header's timeout when that leaves some.
    pub offset: Option<Duration>,
}

/// Envoy's `RouteAction.MaxStreamDuration`, each field `None` when unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxStreamDuration {
    /// How long a stream may last (0: no limit, not even the listener's).
    pub max: Option<Duration>,
    /// When set, a gRPC `grpc-timeout` header sets the limit instead,
    /// capped at this (0: uncapped).
    pub grpc_header_max: Option<Duration>,
    /// Taken off the header's timeout (leaving time for the answer to
    /// travel back).
    pub grpc_header_offset: Option<Duration>,
}

/// A route's redirect.
#[derive(Debug)]
pub struct Redirect {
    /// Status code.
    pub status: http::StatusCode,
    /// New scheme.
    pub scheme: Option<String>,
    /// New host.
    pub host: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New path.
    pub path: Option<String>,
    /// Or replace the matched prefix.
    pub prefix: Option<String>,
    /// Or rewrite by regex.
    pub regex: Option<Substitution>,
    /// Drop the query string.
    pub strip_query: bool,
}

/// Envoy's retry policy.
#[derive(Debug, Clone, Default)]
pub struct RetryPolicy {
    /// Retry on 5xx responses (includes connect failures and resets).
    pub on_5xx: bool,
    /// Retry on 502, 503, 504 (includes connect failures and resets).
    pub gateway_error: bool,
    /// Retry when the upstream reset the stream.
    pub reset: bool,
    /// Retry when connecting failed.
    pub connect_failure: bool,
    /// Retry on 409.
    pub retriable_4xx: bool,
    /// Retry on HTTP/2 REFUSED_STREAM.
    pub refused_stream: bool,
    /// Retry on `statuses` (`retriable-status-codes`).
    pub on_statuses: bool,
    /// The `retriable_status_codes`.
    pub statuses: Vec<u16>,
    /// gRPC statuses to retry on (from `grpc-status`).
    pub grpc: Vec<u32>,
    /// Retry when the answer carries `x-envoy-ratelimited`
    /// (`envoy-ratelimited`).
    pub ratelimited: bool,
    /// Retry on `answer_headers` (`retriable-headers`).
    pub on_answer_headers: bool,
    /// Answer headers that ask for another try (`retriable_headers`).
    pub answer_headers: Vec<HeaderMatch>,
    /// Retry only requests with a header matching one of these
    /// (`retriable_request_headers`; empty: any request).
    pub request_headers: Vec<HeaderMatch>,
    /// Retries after the first try.
    pub num_retries: u32,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
    /// Backoff base.
    pub base: Duration,
    /// Backoff ceiling.
    pub max: Duration,
    /// Answer headers that say how long to wait before the retry
    /// (`rate_limited_retry_back_off.reset_headers`: `Retry-After` and the
    /// like), each in seconds or as a Unix time.
    pub reset_headers: Vec<(HeaderName, bool)>,
    /// A reset header's wait above this is not taken (its `max_interval`,
    /// 300 s unless set).
    pub reset_max: Duration,
    /// Envoy's `previous_priorities` retry priority, by its
    /// `update_frequency`: every that many tries, the priority levels
    /// tried so far take no load while another level can take it.
    pub previous_priorities: Option<u32>,
}

/// The `update_frequency` of a retry policy's `retry_priority`, which may
/// only be Envoy's `previous_priorities` (any other would move retries
/// elsewhere than this proxy sends them).
fn previous_priorities(
    rp: &portico_proto::envoy::config::route::v3::retry_policy::RetryPriority,
    at: &str,
) -> Result<u32, ConfigError> {
    use portico_proto::envoy::config::route::v3::retry_policy::retry_priority::ConfigType;
    use portico_proto::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
    let config: PreviousPrioritiesConfig = match &rp.config_type {
        Some(ConfigType::TypedConfig(a))
            if a.type_url == <PreviousPrioritiesConfig as prost::Name>::type_url() =>
        {
            super::unpack(a, at)?
        }
        Some(ConfigType::TypedConfig(a)) => {
            return Err(ConfigError::new(
                at,
                format!(
                    "{} is not supported; only previous_priorities is",
                    a.type_url
                ),
            ))
        }
        // Named, without a config: Envoy's default frequency would not
        // pass its own validation (it must be above 0).
        None => {
            return Err(ConfigError::new(
                at,
                format!(
                    "{:?} needs a typed_config (previous_priorities with its update_frequency)",
                    rp.name
                ),
            ))
        }
    };
    u32::try_from(config.update_frequency)
        .ok()
        .filter(|f| *f > 0)
        .ok_or_else(|| {
            ConfigError::new(
                at,
                format!(
                    "previous_priorities.update_frequency must be above 0, not {}",
                    config.update_frequency
                ),
            )
        })
}

impl RetryPolicy {
    fn convert(p: &PbRetryPolicy, at: &str) -> Result<Self, ConfigError> {
        // Fields that would change which host answers, or when a try is
        // given up, if ignored. A retry never goes back to the endpoint
        // that just failed, which is what previous_hosts asks.
        for (i, pred) in p.retry_host_predicate.iter().enumerate() {
            use portico_proto::envoy::config::route::v3::retry_policy::retry_host_predicate::ConfigType;
            let type_url = match &pred.config_type {
                Some(ConfigType::TypedConfig(a)) => a.type_url.as_str(),
                None => "",
            };
            let previous_hosts = type_url.ends_with(".PreviousHostsPredicate")
                || (type_url.is_empty()
                    && pred.name == "envoy.retry_host_predicates.previous_hosts");
            if !previous_hosts {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "retry_host_predicate[{i}] ({}) is not supported; only previous_hosts is",
                        if type_url.is_empty() {
                            &pred.name
                        } else {
                            type_url
                        }
                    ),
                ));
            }
        }
        if p.per_try_idle_timeout
            .as_ref()
            .is_some_and(|d| d.seconds != 0 || d.nanos != 0)
        {
            return Err(ConfigError::new(
                at,
                "retry_policy.per_try_idle_timeout is not supported",
            ));
        }
        let previous_priorities = match &p.retry_priority {
            None => None,
            Some(rp) => Some(previous_priorities(
                rp,
                &format!("{at} retry_policy.retry_priority"),
            )?),
        };
        if p.refresh_cluster_on_retry {
            return Err(ConfigError::new(
                at,
                "retry_policy.refresh_cluster_on_retry is not supported",
            ));
        }
        let mut r = RetryPolicy {
            num_retries: p.num_retries.as_ref().map_or(1, |v| v.value),
            per_try_timeout: p
                .per_try_timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero()),
            base: Duration::from_millis(25),
            previous_priorities,
            ..Default::default()
        };
        for token in p
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            if !(r.add_http_condition(token) || r.add_grpc_condition(token)) {
                return Err(ConfigError::new(
                    at,
                    format!("unknown retry_on condition {token:?}"),
                ));
            }
        }
        r.statuses = p.retriable_status_codes.iter().map(|c| *c as u16).collect();
        let matchers = |ms: &[PbHeaderMatcher], what: &str| {
            ms.iter()
                .enumerate()
                .map(|(i, m)| HeaderMatch::compile(m, &format!("{at} retry_policy.{what}[{i}]")))
                .collect::<Result<Vec<_>, _>>()
        };
        r.answer_headers = matchers(&p.retriable_headers, "retriable_headers")?;
        r.request_headers = matchers(&p.retriable_request_headers, "retriable_request_headers")?;
        if let Some(b) = &p.retry_back_off {
            if let Some(base) = b.base_interval.as_ref().map(duration) {
                if base.is_zero() {
                    return Err(ConfigError::new(
                        at,
                        "retry_back_off.base_interval must be > 0",
                    ));
                }
                r.base = base;
            }
            r.max = b.max_interval.as_ref().map(duration).unwrap_or(r.base * 10);
            if r.max < r.base {
                return Err(ConfigError::new(
                    at,
                    "retry_back_off.max_interval is below base_interval",
                ));
            }
        } else {
            r.max = r.base * 10;
        }
        if let Some(rl) = &p.rate_limited_retry_back_off {
            let rat = format!("{at} retry_policy.rate_limited_retry_back_off");
            if rl.reset_headers.is_empty() {
                return Err(ConfigError::new(&rat, "needs reset_headers"));
            }
            r.reset_headers = rl
                .reset_headers
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let name = header_name(&h.name, &format!("{rat}.reset_headers[{i}]"))?;
                    Ok((name, h.format == 1))
                })
                .collect::<Result<_, ConfigError>>()?;
            r.reset_max = rl
                .max_interval
                .as_ref()
                .map_or(Duration::from_secs(300), duration);
            if r.reset_max.is_zero() {
                return Err(ConfigError::new(&rat, "max_interval must be above 0"));
            }
        }
        Ok(r)
    }

    /// The wait an answer asks for before a retry (Envoy's rate-limited
    /// back-off): the first reset header that says a wait within
    /// `reset_max`, jittered up to half again (Envoy's lower-bound
    /// jitter); `None` when none does (the usual back-off then).
    pub fn reset_backoff(&self, answer: &HeaderMap) -> Option<Duration> {
        let wait = self.reset_headers.iter().find_map(|(name, unix_time)| {
            let v: u64 = answer.get(name)?.to_str().ok()?.trim().parse().ok()?;
            let wait = if *unix_time {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?;
                Duration::from_secs(v).checked_sub(now)?
            } else {
                Duration::from_secs(v)
            };
            (!wait.is_zero() && wait <= self.reset_max).then_some(wait)
        })?;
        let ms = wait.as_millis() as u64;
        Some(Duration::from_millis(ms + fastrand::u64(0..=ms / 2)))
    }

    /// The policy of a route without one whose request asks for retries
    /// (Envoy's defaults: one retry, 25 ms backoff).
    pub fn asked_for() -> Self {
        RetryPolicy {
            num_retries: 1,
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
            ..Default::default()
        }
    }

    /// Turns on one of `retry_on`'s HTTP conditions (as in the
    /// `x-envoy-retry-on` header); `false` if there is no such condition.
    pub fn add_http_condition(&mut self, token: &str) -> bool {
        match token {
            "5xx" => self.on_5xx = true,
            "gateway-error" => self.gateway_error = true,
            "reset" | "reset-before-request" => self.reset = true,
            "connect-failure" => self.connect_failure = true,
            "retriable-4xx" => self.retriable_4xx = true,
            "refused-stream" => self.refused_stream = true,
            "retriable-status-codes" => self.on_statuses = true,
            "envoy-ratelimited" => self.ratelimited = true,
            "retriable-headers" => self.on_answer_headers = true,
            // A condition this proxy never meets (it speaks no HTTP/3);
            // accepted so Envoy configuration runs unchanged.
            "http3-post-connect-failure" => {}
            _ => return false,
        }
        true
    }

    /// Turns on one of `retry_on`'s gRPC conditions (as in the
    /// `x-envoy-retry-grpc-on` header); `false` if there is no such one.
    pub fn add_grpc_condition(&mut self, token: &str) -> bool {
        let code = match token {
            "cancelled" => 1,
            "deadline-exceeded" => 4,
            "resource-exhausted" => 8,
            "internal" => 13,
            "unavailable" => 14,
            _ => return false,
        };
        if !self.grpc.contains(&code) {
            self.grpc.push(code);
        }
        true
    }

    /// Whether any condition is on: a policy without one never retries.
    pub fn any_condition(&self) -> bool {
        self.on_5xx
            || self.gateway_error
            || self.reset
            || self.connect_failure
            || self.retriable_4xx
            || self.refused_stream
            || self.on_statuses
            || self.ratelimited
            || self.on_answer_headers
            || !self.grpc.is_empty()
    }

    /// Whether a response status asks for another try.
    pub fn retry_status(&self, status: u16, headers: &HeaderMap) -> bool {
        (self.on_5xx && status >= 500)
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || (self.on_statuses && self.statuses.contains(&status))
            || (self.ratelimited && headers.contains_key("x-envoy-ratelimited"))
            || (self.on_answer_headers && !self.answer_headers.is_empty() && {
                let head = RequestHead {
                    method: "",
                    path: "",
                    authority: "",
                    scheme: "",
                    headers,
                };
                self.answer_headers.iter().any(|m| m.matches(&head))
            })
            || (!self.grpc.is_empty()
                && headers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
                    .is_some_and(|c| self.grpc.contains(&c)))
    }

    /// Whether the request may be retried at all (its headers match
    /// `retriable_request_headers`, when there are any).
    pub fn request_retriable(&self, head: &RequestHead<'_>) -> bool {
        self.request_headers.is_empty() || self.request_headers.iter().any(|m| m.matches(head))
    }

    /// Whether a failed connect asks for another try.
    pub fn retry_connect(&self) -> bool {
        self.connect_failure || self.on_5xx || self.gateway_error
    }

    /// Whether a reset (or broken connection) asks for another try.
    pub fn retry_reset(&self) -> bool {
        self.reset || self.on_5xx || self.gateway_error
    }

    /// Backoff before retry number `n` (1-based): full jitter over an
    /// exponentially growing window, as Envoy does.
    pub fn backoff(&self, n: u32) -> Duration {
        let window = self.base.saturating_mul(1u32 << n.min(16)).min(self.max);
        let ms = window.as_millis().max(1) as u64;
        Duration::from_millis(fastrand::u64(0..ms))
    }
}

/// Header edits at one level (route, virtual host, configuration).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Edits {
    /// Request headers to add.
    pub request_add: Vec<HeaderAdd>,
    /// Request headers to remove.
    pub request_remove: Vec<HeaderName>,
    /// Response headers to add.
    pub response_add: Vec<HeaderAdd>,
    /// Response headers to remove.
    pub response_remove: Vec<HeaderName>,
    /// Whether a request (response) value is made per request.
    formatted: [bool; 2],
}

/// One header to add, with Envoy's append semantics.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderAdd {
    name: HeaderName,
    value: AddValue,
    action: HeaderAppendAction,
    /// Added even when its value comes out empty (`keep_empty_value`).
    keep_empty: bool,
}

/// A header's value to add: fixed, or made per request from Envoy's
/// command operators (`%DOWNSTREAM_REMOTE_ADDRESS%`, `%REQ(x)%`, ...),
/// which Envoy's header values take as its access logs do.
#[derive(Debug, Clone, PartialEq)]
enum AddValue {
    Fixed(HeaderValue),
    Format(Box<crate::access_log::LogFormat>),
}

/// What the values made per request read: the request's (or response's)
/// fields of an access log record.
pub type FormatRecord = crate::access_log::Record;

impl Edits {
    pub(crate) fn convert(
        req_add: &[HeaderValueOption],
        req_rm: &[String],
        resp_add: &[HeaderValueOption],
        resp_rm: &[String],
        at: &str,
    ) -> Result<Self, ConfigError> {
        let adds = |v: &[HeaderValueOption], what: &str| -> Result<Vec<HeaderAdd>, ConfigError> {
            v.iter()
                .enumerate()
                .map(|(i, o)| {
                    let at = format!("{at}.{what}[{i}]");
                    let h = o
                        .header
                        .as_ref()
                        .ok_or_else(|| ConfigError::new(&at, "no header"))?;
                    if h.key.eq_ignore_ascii_case("host") {
                        // Envoy's rule; the route's host rewrites do this.
                        return Err(ConfigError::new(
                            &at,
                            "\"host\" cannot be set here (use a host rewrite)",
                        ));
                    }
                    let name = header_name(&h.key, &at)?;
                    let raw = if h.raw_value.is_empty() {
                        h.value.as_bytes()
                    } else {
                        &h.raw_value
                    };
                    let bad = || ConfigError::new(&at, format!("bad value for header {:?}", h.key));
                    let value = match std::str::from_utf8(raw) {
                        Ok(text) if text.contains('%') => {
                            let f = crate::access_log::LogFormat::text(text)
                                .map_err(|e| ConfigError::new(&at, e))?
                                .omitting_empty();
                            match f.literal() {
                                // `%%` and nothing else: fixed after all.
                                Some(t) => {
                                    AddValue::Fixed(HeaderValue::from_str(&t).map_err(|_| bad())?)
                                }
                                None => AddValue::Format(Box::new(f)),
                            }
                        }
                        _ => AddValue::Fixed(HeaderValue::from_bytes(raw).map_err(|_| bad())?),
                    };
                    if matches!(&value, AddValue::Fixed(v) if v.is_empty()) && !o.keep_empty_value {
                        // Envoy adds an empty value only when asked to.
                        return Ok(None);
                    }
                    let action = match o.append {
                        Some(b) if b.value => HeaderAppendAction::AppendIfExistsOrAdd,
                        Some(_) => HeaderAppendAction::OverwriteIfExistsOrAdd,
                        None => HeaderAppendAction::try_from(o.append_action)
                            .unwrap_or(HeaderAppendAction::AppendIfExistsOrAdd),
                    };
                    Ok(Some(HeaderAdd {
                        name,
                        value,
                        action,
                        keep_empty: o.keep_empty_value,
                    }))
                })
                .filter_map(Result::transpose)
                .collect()
        };
        let removes = |v: &[String], what: &str| -> Result<Vec<HeaderName>, ConfigError> {
            v.iter()
                .map(|n| {
                    let at = format!("{at}.{what}");
                    if n.starts_with(':') || n.eq_ignore_ascii_case("host") {
                        return Err(ConfigError::new(&at, format!("{n:?} cannot be removed")));
                    }
                    header_name(n, &at)
                })
                .collect()
        };
        let request_add = adds(req_add, "request_headers_to_add")?;
        let response_add = adds(resp_add, "response_headers_to_add")?;
        let formatted = |v: &[HeaderAdd]| v.iter().any(|a| matches!(a.value, AddValue::Format(_)));
        Ok(Edits {
            formatted: [formatted(&request_add), formatted(&response_add)],
            request_add,
            request_remove: removes(req_rm, "request_headers_to_remove")?,
            response_add,
            response_remove: removes(resp_rm, "response_headers_to_remove")?,
        })
    }

    /// Whether a value to add is made per request from a record (request
    /// edits, response edits).
    pub fn formatted(&self) -> [bool; 2] {
        self.formatted
    }

    /// The request and response headers the values made per request read,
    /// to be kept in their record.
    pub fn format_headers(&self) -> (Vec<HeaderName>, Vec<HeaderName>) {
        let (mut req, mut resp) = (Vec::new(), Vec::new());
        for a in self.request_add.iter().chain(&self.response_add) {
            if let AddValue::Format(f) = &a.value {
                req.extend(f.request_headers());
                resp.extend(f.response_headers());
            }
        }
        (req, resp)
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.request_add.is_empty()
            && self.request_remove.is_empty()
            && self.response_add.is_empty()
            && self.response_remove.is_empty()
    }

    /// Applies the request edits; values made per request read `rec`
    /// (without one they come out empty).
    pub fn apply_request(&self, h: &mut HeaderMap, rec: Option<&FormatRecord>) {
        apply(h, &self.request_remove, &self.request_add, rec);
    }

    /// Applies the response edits, as [`Edits::apply_request`].
    pub fn apply_response(&self, h: &mut HeaderMap, rec: Option<&FormatRecord>) {
        apply(h, &self.response_remove, &self.response_add, rec);
    }
}

fn apply(h: &mut HeaderMap, remove: &[HeaderName], add: &[HeaderAdd], rec: Option<&FormatRecord>) {
    for n in remove {
        h.remove(n);
    }
    for a in add {
        let value = match &a.value {
            AddValue::Fixed(v) => v.clone(),
            AddValue::Format(f) => {
                let text = rec.map(|r| f.render_body(r)).unwrap_or_default();
                match HeaderValue::from_bytes(&text) {
                    Ok(v) if !v.is_empty() || a.keep_empty => v,
                    // Empty (Envoy drops it unless told), or not a value.
                    _ => continue,
                }
            }
        };
        match a.action {
            HeaderAppendAction::AppendIfExistsOrAdd => {
                h.append(a.name.clone(), value);
            }
            HeaderAppendAction::AddIfAbsent => {
                if !h.contains_key(&a.name) {
                    h.insert(a.name.clone(), value);
                }
            }
            HeaderAppendAction::OverwriteIfExistsOrAdd => {
                h.insert(a.name.clone(), value);
            }
            HeaderAppendAction::OverwriteIfExists => {
                if h.contains_key(&a.name) {
                    h.insert(a.name.clone(), value);
                }
            }
        }
    }
}

/// Converts a hash policy; `None` for one that never yields a hash
/// (connection properties without `source_ip`).
fn hash_policy(
    h: &portico_proto::envoy::config::route::v3::route_action::HashPolicy,
    at: &str,
) -> Result<Option<HashPolicy>, ConfigError> {
    let key = match &h.policy_specifier {
        Some(PolicySpecifier::Header(h)) => HashKey::Header(
            header_name(&h.header_name, at)?,
            h.regex_rewrite
                .as_ref()
                .map(|s| Substitution::compile(s, at))
                .transpose()?,
        ),
        Some(PolicySpecifier::ConnectionProperties(c)) if c.source_ip => HashKey::SourceIp,
        Some(PolicySpecifier::ConnectionProperties(_)) => return Ok(None),
        Some(PolicySpecifier::Cookie(c)) => {
            if c.name.is_empty() {
                return Err(ConfigError::new(at, "cookie has no name"));
            }
            HashKey::Cookie(CookieHash {
                name: c.name.clone(),
                set: c.ttl.as_ref().map(|ttl| SetCookie {
                    ttl: duration(ttl),
                    path: c.path.clone(),
                    attributes: c
                        .attributes
                        .iter()
                        .map(|a| {
                            if a.value.is_empty() {
                                a.name.clone()
                            } else {
                                format!("{}={}", a.name, a.value)
                            }
                        })
                        .collect(),
                }),
            })
        }
        Some(PolicySpecifier::QueryParameter(q)) => HashKey::Query(q.name.clone()),
        Some(PolicySpecifier::FilterState(f)) => {
            return Err(ConfigError::new(
                at,
                format!(
                    "filter_state ({:?}) is not supported: no filter here sets it",
                    f.key
                ),
            ))
        }
        None => return Err(ConfigError::new(at, "names nothing to hash")),
    };
    Ok(Some(HashPolicy {
        key,
        terminal: h.terminal,
    }))
}

/// A route's `upgrade_configs` (`connect_config` refused: CONNECT is not
/// terminated here).
fn route_upgrades(
    list: &[portico_proto::envoy::config::route::v3::route_action::UpgradeConfig],
    at: &str,
) -> Result<super::upgrades::Upgrades, ConfigError> {
    if let Some(i) = list.iter().position(|u| u.connect_config.is_some()) {
        return Err(ConfigError::new(
            &format!("{at} upgrade_configs[{i}]"),
            "connect_config is not supported",
        ));
    }
    super::upgrades::Upgrades::convert(
        list.iter()
            .map(|u| (u.upgrade_type.as_str(), u.enabled.is_none_or(|e| e.value))),
        at,
    )
}

/// Converts `request_mirror_policies` (of a route, a virtual host or a
/// configuration), noting each cluster in `clusters`.
fn mirrors(
    list: &[PbMirrorPolicy],
    at: &str,
    clusters: &mut Vec<Arc<str>>,
) -> Result<Vec<Mirror>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("{at}.request_mirror_policies[{i}]");
            if m.cluster.is_empty() {
                return Err(ConfigError::new(
                    &at,
                    "needs a cluster (cluster_header is not supported)",
                ));
            }
            if !m.request_headers_mutations.is_empty() {
                return Err(ConfigError::new(
                    &at,
                    "request_headers_mutations are not supported",
                ));
            }
            let host = (!m.host_rewrite_literal.is_empty())
                .then(|| {
                    HeaderValue::from_str(&m.host_rewrite_literal).map_err(|_| {
                        ConfigError::new(
                            &at,
                            format!("bad host_rewrite_literal {:?}", m.host_rewrite_literal),
                        )
                    })
                })
                .transpose()?;
            let cluster: Arc<str> = m.cluster.as_str().into();
            clusters.push(cluster.clone());
            Ok(Mirror {
                host,
                cluster,
                fraction: m
                    .runtime_fraction
                    .as_ref()
                    .map(|f| fraction(f, &at))
                    .transpose()?,
                keep_host: m.disable_shadow_host_suffix_append,
            })
        })
        .collect()
}

/// Converts `weighted_clusters`, noting each cluster in `clusters`.
fn weighted(
    w: &WeightedClusterProto,
    at: &str,
    clusters: &mut Vec<Arc<str>>,
) -> Result<Weighted, ConfigError> {
    use portico_proto::envoy::config::route::v3::weighted_cluster::{
        cluster_weight::HostRewriteSpecifier as TargetHost, RandomValueSpecifier,
    };
    let mut targets = Vec::with_capacity(w.clusters.len());
    let mut total = 0u32;
    for (i, c) in w.clusters.iter().enumerate() {
        let cat = format!("{at} weighted_clusters.clusters[{i}]");
        refuse_per_filter_config(&c.typed_per_filter_config, &cat)?;
        if c.name.is_empty() {
            return Err(ConfigError::new(
                &cat,
                "has no name (cluster_header is not supported)",
            ));
        }
        let weight = c.weight.as_ref().map_or(0, |w| w.value);
        total = total
            .checked_add(weight)
            .ok_or_else(|| ConfigError::new(at, "weighted_clusters: the weights overflow"))?;
        let name: Arc<str> = c.name.as_str().into();
        clusters.push(name.clone());
        let edits = Edits::convert(
            &c.request_headers_to_add,
            &c.request_headers_to_remove,
            &c.response_headers_to_add,
            &c.response_headers_to_remove,
            &cat,
        )?;
        let host = match &c.host_rewrite_specifier {
            None => None,
            Some(TargetHost::HostRewriteLiteral(h)) if h.is_empty() => None,
            Some(TargetHost::HostRewriteLiteral(h)) => {
                Some(HeaderValue::from_str(h).map_err(|_| {
                    ConfigError::new(&cat, format!("bad host_rewrite_literal {h:?}"))
                })?)
            }
        };
        targets.push(WeightedTarget {
            name,
            weight,
            edits: (!edits.is_empty()).then(|| Box::new(edits)),
            host,
        });
    }
    if total == 0 {
        return Err(ConfigError::new(
            at,
            "weighted_clusters: the weights sum to 0",
        ));
    }
    let draw = match &w.random_value_specifier {
        None => WeightDraw::Random,
        Some(RandomValueSpecifier::HeaderName(h)) if h.is_empty() => WeightDraw::Random,
        Some(RandomValueSpecifier::HeaderName(h)) => WeightDraw::Header(header_name(
            h,
            &format!("{at} weighted_clusters.header_name"),
        )?),
        Some(RandomValueSpecifier::UseHashPolicy(b)) if b.value => WeightDraw::HashPolicy,
        Some(RandomValueSpecifier::UseHashPolicy(_)) => WeightDraw::Random,
    };
    Ok(Weighted {
        targets,
        total,
        draw,
    })
}

impl Weighted {
    /// The cluster a draw picks (any number: it is taken modulo the total).
    pub fn pick(&self, draw: u64) -> &WeightedTarget {
        let mut x = draw % u64::from(self.total);
        for t in &self.targets {
            if x < u64::from(t.weight) {
                return t;
            }
            x -= u64::from(t.weight);
        }
        // Unreachable: the weights sum to the total.
        &self.targets[self.targets.len() - 1]
    }
}

fn header_name(n: &str, at: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
        .map_err(|_| ConfigError::new(at, format!("bad header name {n:?}")))
}

impl RouteTable {
    /// Converts a route configuration; every error names the place.
    pub fn convert(rc: &RouteConfiguration) -> Result<Self, ConfigError> {
        let at = format!("RouteConfiguration {:?}", rc.name);
        let vhosts = rc
            .virtual_hosts
            .iter()
            .enumerate()
            .map(|(i, vh)| convert_vhost(vh, &vhost_place(&at, i, &vh.name)).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Self::assemble(rc, at, vhosts, Vec::new())
    }

    /// Decodes and converts an encoded route configuration. Virtual hosts
    /// whose encoding is byte for byte one of `previous`'s (the table this
    /// one replaces, and the bytes it came from) are shared with it rather
    /// than converted again: a one-route change to a table of thousands
    /// converts one virtual host. `resource` names the resource in errors
    /// found before its own name is read.
    pub fn decode(
        resource: &str,
        bytes: &[u8],
        previous: Option<(&RouteTable, &[u8])>,
    ) -> Result<Self, ConfigError> {
        let undecodable = |why: String| {
            ConfigError::new(
                &format!("RouteConfiguration {resource:?}"),
                format!("cannot decode: {why}"),
            )
        };
        let fields =
            split_virtual_hosts(bytes).ok_or_else(|| undecodable("malformed protobuf".into()))?;
        // Everything but the virtual hosts, decoded as usual.
        let rc = RouteConfiguration::decode(fields.rest.as_slice())
            .map_err(|e| undecodable(e.to_string()))?;
        let at = format!("RouteConfiguration {:?}", rc.name);
        let mut reusable: Option<HashMap<&[u8], &Arc<VirtualHost>>> = None;
        let mut vhosts = Vec::with_capacity(fields.vhosts.len());
        for (i, span) in fields.vhosts.iter().enumerate() {
            let encoded = &bytes[span.clone()];
            let old = previous.and_then(|(table, old_bytes)| {
                // Same place first (the usual case), then anywhere.
                let same_place = table
                    .spans
                    .get(i)
                    .filter(|s| old_bytes.get((*s).clone()) == Some(encoded))
                    .and_then(|_| table.vhosts.get(i));
                same_place.or_else(|| {
                    reusable
                        .get_or_insert_with(|| {
                            table
                                .spans
                                .iter()
                                .zip(&table.vhosts)
                                .filter_map(|(s, v)| Some((old_bytes.get(s.clone())?, v)))
                                .collect()
                        })
                        .get(encoded)
                        .copied()
                })
            });
            let vh = match old {
                Some(v) => v.clone(),
                None => {
                    let pb = PbVirtualHost::decode(encoded).map_err(|e| {
                        ConfigError::new(
                            &format!("{at} virtual_hosts[{i}]"),
                            format!("cannot decode: {e}"),
                        )
                    })?;
                    Arc::new(convert_vhost(&pb, &vhost_place(&at, i, &pb.name))?)
                }
            };
            vhosts.push(vh);
        }
        Self::assemble(&rc, at, vhosts, fields.vhosts)
    }

    /// The table around converted virtual hosts: the host index, the
    /// table-wide edits, the cluster list.
    fn assemble(
        rc: &RouteConfiguration,
        at: String,
        vhosts: Vec<Arc<VirtualHost>>,
        spans: Vec<Range<usize>>,
    ) -> Result<Self, ConfigError> {
        refuse_per_filter_config(&rc.typed_per_filter_config, &at)?;
        refuse_route_specifiers(!rc.route_specifiers.is_empty(), &at)?;
        if rc.vhds.is_some() {
            return Err(ConfigError::new(&at, "VHDS is not supported"));
        }
        if !rc.cluster_specifier_plugins.is_empty() {
            return Err(ConfigError::new(
                &at,
                "cluster_specifier_plugins are not supported",
            ));
        }
        let mut table = RouteTable {
            name: rc.name.as_str().into(),
            vhosts: Vec::new(),
            spans,
            exact: foldhash::HashMap::default(),
            suffix: Vec::new(),
            prefix: Vec::new(),
            any: None,
            ignore_port: rc.ignore_port_in_host_matching,
            most_specific_wins: rc.most_specific_header_mutations_wins,
            vhost_header: match rc.vhost_header.as_str() {
                "" => None,
                h => Some(header_name(h, &format!("{at} vhost_header"))?),
            },
            ignore_path_parameters: rc.ignore_path_parameters_in_path_matching,
            edits: Edits::convert(
                &rc.request_headers_to_add,
                &rc.request_headers_to_remove,
                &rc.response_headers_to_add,
                &rc.response_headers_to_remove,
                &at,
            )?,
            clusters: Vec::new(),
            validate_clusters: rc.validate_clusters.as_ref().is_none_or(|v| v.value),
            mirrors: Vec::new(),
            internal_only_headers: rc
                .internal_only_headers
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                        ConfigError::new(
                            &at,
                            format!("internal_only_headers[{i}]: {n:?} is not a header name"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        for (i, vh) in vhosts.iter().enumerate() {
            for d in &vh.domains {
                let d = d.to_ascii_lowercase();
                let dup = if d == "*" {
                    table.any.replace(i).is_some()
                } else if let Some(s) = d.strip_prefix('*') {
                    let dup = table.suffix.iter().any(|(x, _)| *x == s);
                    table.suffix.push((s.to_string(), i));
                    dup
                } else if let Some(p) = d.strip_suffix('*') {
                    let dup = table.prefix.iter().any(|(x, _)| *x == p);
                    table.prefix.push((p.to_string(), i));
                    dup
                } else {
                    table.exact.insert(d.clone(), i).is_some()
                };
                if dup {
                    return Err(ConfigError::new(
                        &vhost_place(&at, i, &vh.name),
                        format!("domain {d:?} is used by more than one virtual host"),
                    ));
                }
            }
            table.clusters.extend(vh.clusters.iter().cloned());
        }
        table.vhosts = vhosts;
        table.mirrors = mirrors(&rc.request_mirror_policies, &at, &mut table.clusters)?;
        table
            .suffix
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        table
            .prefix
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        table.clusters.sort();
        table.clusters.dedup();
        Ok(table)
    }

    /// The virtual host for a `Host`/`:authority` value.
    pub fn virtual_host(&self, authority: &str, strip_port: bool) -> Option<&VirtualHost> {
        let mut host = authority;
        if strip_port || self.ignore_port {
            host = strip_host_port(host);
        }
        let lowered;
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            host = &lowered;
        }
        let i = self
            .exact
            .get(host)
            .copied()
            .or_else(|| {
                self.suffix
                    .iter()
                    .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
                    .map(|x| x.1)
            })
            .or_else(|| {
                self.prefix
                    .iter()
                    .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
                    .map(|x| x.1)
            })
            .or(self.any)?;
        self.vhosts.get(i).map(|v| &**v)
    }
}

fn vhost_place(at: &str, i: usize, name: &str) -> String {
    format!("{at} virtual_hosts[{i}] ({name:?})")
}

/// An encoded `RouteConfiguration` split into its virtual hosts (field 2)
/// and everything else.
struct Split {
    /// Where each virtual host's bytes are.
    vhosts: Vec<Range<usize>>,
    /// The other fields, re-encoded as they came.
    rest: Vec<u8>,
}

/// Walks the top level of the encoding; `None` if it is not well-formed.
fn split_virtual_hosts(bytes: &[u8]) -> Option<Split> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut buf = bytes;
    let mut out = Split {
        vhosts: Vec::new(),
        rest: Vec::new(),
    };
    while !buf.is_empty() {
        let start = bytes.len() - buf.len();
        let (tag, wire) = decode_key(&mut buf).ok()?;
        let len = match wire {
            WireType::Varint => {
                decode_varint(&mut buf).ok()?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => usize::try_from(decode_varint(&mut buf).ok()?).ok()?,
            WireType::StartGroup | WireType::EndGroup => return None,
        };
        let body = bytes.len() - buf.len();
        let end = body.checked_add(len).filter(|&e| e <= bytes.len())?;
        if tag == 2 && wire == WireType::LengthDelimited {
            out.vhosts.push(body..end);
        } else {
            out.rest.extend_from_slice(&bytes[start..end]);
        }
        buf = &bytes[end..];
    }
    Some(out)
}

/// `host:port` → `host`, leaving IPv6 literals intact.
fn strip_host_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.find(']').map_or(h, |e| &h[..=e]);
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

/// Per-route configuration of HTTP filters (`typed_per_filter_config`):
/// it can turn on, for a route, a filter the listener disabled (how
/// authentication and CORS are often enabled route by route). No HTTP
/// filter but the router runs here, so ignoring it could skip a check the
/// operator asked for: refused, naming the filter.
fn refuse_per_filter_config<V>(
    m: &std::collections::HashMap<String, V>,
    at: &str,
) -> Result<(), ConfigError> {
    match m.keys().min() {
        None => Ok(()),
        Some(name) => Err(ConfigError::new(
            at,
            format!(
                "typed_per_filter_config ({name}) is not supported: no HTTP filter but the router runs here"
            ),
        )),
    }
}

/// Route specifier extensions may replace or drop the route matched;
/// ignored, requests would go where they say not to.
fn refuse_route_specifiers(set: bool, at: &str) -> Result<(), ConfigError> {
    if set {
        return Err(ConfigError::new(at, "route_specifiers are not supported"));
    }
    Ok(())
}

fn convert_vhost(vh: &PbVirtualHost, at: &str) -> Result<VirtualHost, ConfigError> {
    refuse_per_filter_config(&vh.typed_per_filter_config, at)?;
    refuse_route_specifiers(!vh.route_specifiers.is_empty(), at)?;
    let mut clusters = Vec::new();
    if vh.matcher.is_some() {
        return Err(ConfigError::new(
            at,
            "the matcher tree is not supported; use routes",
        ));
    }
    refuse_hedging(vh.hedge_policy.as_ref(), at)?;
    if vh.retry_policy_typed_config.is_some() {
        return Err(ConfigError::new(
            at,
            "retry_policy_typed_config is not supported; use retry_policy",
        ));
    }
    #[allow(deprecated)]
    let inherit = Inherited {
        retry: vh
            .retry_policy
            .as_ref()
            .map(|p| RetryPolicy::convert(p, at))
            .transpose()?
            .map(Arc::new),
        body_buffer_limit: BodyBufferLimit::convert(
            vh.per_request_buffer_limit_bytes.map(|v| v.value),
            vh.request_body_buffer_limit.map(|v| v.value),
            at,
        )?,
    };
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            // Naming the place costs a string per route; a table has
            // thousands. Convert unnamed, and only when that fails convert
            // again (it fails the same way) to say where.
            convert_route(r, "", &inherit, &mut clusters).or_else(|_| {
                convert_route(
                    r,
                    &format!("{at} routes[{i}] ({:?})", r.name),
                    &inherit,
                    &mut clusters,
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let mirrors = mirrors(&vh.request_mirror_policies, at, &mut clusters)?;
    clusters.sort();
    clusters.dedup();
    Ok(VirtualHost {
        mirrors,
        require_tls: match vh.require_tls {
            0 => RequireTls::No,
            1 => RequireTls::ExternalOnly,
            2 => RequireTls::All,
            n => {
                return Err(ConfigError::new(
                    at,
                    format!("require_tls {n} is not a TLS requirement"),
                ))
            }
        },
        name: vh.name.as_str().into(),
        domains: vh.domains.clone(),
        clusters,
        routes,
        edits: Edits::convert(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
            at,
        )?,
        attempt_count_to_upstream: vh.include_request_attempt_count,
        timeout_retry_header: vh.include_is_timeout_retry_header,
        attempt_count_in_response: vh.include_attempt_count_in_response,
    })
}

/// A hedge policy that hedges on per-try timeouts (keeps the first try
/// running beside the retry) is refused: run as a plain retry, it would
/// cancel the try Envoy keeps. Its other fields Envoy itself does not
/// implement, so they change nothing.
fn refuse_hedging(
    h: Option<&portico_proto::envoy::config::route::v3::HedgePolicy>,
    at: &str,
) -> Result<(), ConfigError> {
    if h.is_some_and(|h| h.hedge_on_per_try_timeout) {
        return Err(ConfigError::new(
            at,
            "hedge_policy.hedge_on_per_try_timeout is not supported",
        ));
    }
    Ok(())
}

/// What a virtual host gives the routes that do not set it themselves.
struct Inherited {
    retry: Option<Arc<RetryPolicy>>,
    body_buffer_limit: Option<BodyBufferLimit>,
}

fn convert_route(
    r: &PbRoute,
    at: &str,
    vh: &Inherited,
    clusters: &mut Vec<Arc<str>>,
) -> Result<Route, ConfigError> {
    refuse_per_filter_config(&r.typed_per_filter_config, at)?;
    refuse_route_specifiers(!r.route_specifiers.is_empty(), at)?;
    let m = r
        .r#match
        .as_ref()
        .ok_or_else(|| ConfigError::new(at, "route has no match"))?;
    let case_sensitive = m.case_sensitive.is_none_or(|b| b.value);
    let fold = |s: &String| {
        if case_sensitive {
            s.clone()
        } else {
            s.to_ascii_lowercase()
        }
    };
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(fold(p)),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(fold(p)),
        Some(PathSpecifier::SafeRegex(re)) => {
            let mut re = re.clone();
            if !case_sensitive {
                re.regex = format!("(?i:{})", re.regex);
            }
            PathMatch::Regex(full_regex(&re, at)?)
        }
        Some(PathSpecifier::PathSeparatedPrefix(p)) => {
            if p.ends_with('/') || p.contains(['?', '#']) {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "path_separated_prefix {p:?} must not end in '/' or contain '?' or '#'"
                    ),
                ));
            }
            PathMatch::SeparatedPrefix(fold(p))
        }
        Some(PathSpecifier::ConnectMatcher(_)) => {
            return Err(ConfigError::new(at, "CONNECT matching is not supported"))
        }
        Some(PathSpecifier::PathMatchPolicy(p)) => {
            return Err(ConfigError::new(
                at,
                format!("path_match_policy {:?} is not supported", p.name),
            ))
        }
        None => return Err(ConfigError::new(at, "route match has no path specifier")),
    };
    if !m.dynamic_metadata.is_empty() || !m.filter_state.is_empty() {
        return Err(ConfigError::new(
            at,
            "dynamic metadata and filter state matchers are not supported",
        ));
    }
    // Every connection is plain until TLS comes: none presents or has a
    // validated client certificate.
    let never = m.tls_context.as_ref().is_some_and(|t| {
        t.presented.is_some_and(|b| b.value) || t.validated.is_some_and(|b| b.value)
    });
    let matcher = RouteMatcher {
        path,
        case_sensitive,
        headers: m
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatch::compile(h, &format!("{at}.match.headers[{i}]")))
            .collect::<Result<_, _>>()?,
        query: m
            .query_parameters
            .iter()
            .enumerate()
            .map(|(i, q)| QueryMatch::compile(q, &format!("{at}.match.query_parameters[{i}]")))
            .collect::<Result<_, _>>()?,
        cookies: m
            .cookies
            .iter()
            .enumerate()
            .map(|(i, c)| CookieMatch::compile(c, &format!("{at}.match.cookies[{i}]")))
            .collect::<Result<_, _>>()?,
        never,
        grpc: m.grpc.is_some(),
        fraction: m
            .runtime_fraction
            .as_ref()
            .map(|f| fraction(f, &format!("{at}.match")))
            .transpose()?,
    };
    let action = match &r.action {
        Some(Action::Route(a)) => {
            let cluster_choice = match &a.cluster_specifier {
                Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                    let c: Arc<str> = c.as_str().into();
                    clusters.push(c.clone());
                    ClusterChoice::One(c)
                }
                Some(ClusterSpecifier::ClusterHeader(h)) => {
                    ClusterChoice::Header(header_name(h, at)?)
                }
                Some(ClusterSpecifier::WeightedClusters(w)) => {
                    ClusterChoice::Weighted(Box::new(weighted(w, at, clusters)?))
                }
                Some(_) | None => return Err(ConfigError::new(
                    at,
                    "route action names no cluster (cluster specifier plugins are not supported)",
                )),
            };
            let host_rewrite = match &a.host_rewrite_specifier {
                None => HostRewrite::Keep,
                Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => {
                    HostRewrite::Literal(HeaderValue::from_str(h).map_err(|_| {
                        ConfigError::new(at, format!("bad host_rewrite_literal {h:?}"))
                    })?)
                }
                Some(HostRewriteSpecifier::AutoHostRewrite(b)) if b.value => HostRewrite::Auto,
                Some(HostRewriteSpecifier::AutoHostRewrite(_)) => HostRewrite::Keep,
                Some(HostRewriteSpecifier::HostRewriteHeader(h)) => {
                    HostRewrite::Header(header_name(h, &format!("{at} host_rewrite_header"))?)
                }
                Some(HostRewriteSpecifier::HostRewritePathRegex(s)) => HostRewrite::PathRegex(
                    Substitution::compile(s, &format!("{at} host_rewrite_path_regex"))?,
                ),
                Some(HostRewriteSpecifier::HostRewrite(_)) => return Err(ConfigError::new(
                    at,
                    "host_rewrite (a formatted host) is not supported; use host_rewrite_literal, \
                         host_rewrite_header or host_rewrite_path_regex",
                )),
            };
            if a.retry_policy_typed_config.is_some() {
                return Err(ConfigError::new(
                    at,
                    "retry_policy_typed_config is not supported; use retry_policy",
                ));
            }
            if a.path_rewrite_policy.is_some() {
                return Err(ConfigError::new(at, "path_rewrite_policy is not supported"));
            }
            if !a.path_rewrite.is_empty() {
                return Err(ConfigError::new(
                    at,
                    "path_rewrite is not supported; use prefix_rewrite or regex_rewrite",
                ));
            }
            // Envoy follows an upstream's redirects itself under either;
            // passing them to the client instead would change answers.
            #[allow(deprecated)]
            let handle_redirects = a.internal_redirect_action
                == portico_proto::envoy::config::route::v3::route_action::InternalRedirectAction::HandleInternalRedirect as i32;
            if a.internal_redirect_policy.is_some() || handle_redirects {
                return Err(ConfigError::new(
                    at,
                    "internal redirects (internal_redirect_policy) are not supported",
                ));
            }
            refuse_hedging(a.hedge_policy.as_ref(), at)?;
            let hash = a
                .hash_policy
                .iter()
                .enumerate()
                .map(|(i, h)| hash_policy(h, &format!("{at} hash_policy[{i}]")))
                .filter_map(Result::transpose)
                .collect::<Result<_, _>>()?;
            let retry = match &a.retry_policy {
                Some(p) => Some(Arc::new(RetryPolicy::convert(p, at)?)),
                None => vh.retry.clone(),
            };
            // Envoy's default route timeout is 15 s; 0 disables it.
            let timeout = match &a.timeout {
                None => Some(Duration::from_secs(15)),
                Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
            };
            let expected_timeout = expected_timeout_ms(
                timeout,
                retry.as_ref().and_then(|r| r.per_try_timeout),
                Duration::ZERO,
            )
            .map(|ms| (ms, HeaderValue::from(ms)));
            RouteAction::Forward(Box::new(Forward {
                clusters: cluster_choice,
                prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
                regex_rewrite: a
                    .regex_rewrite
                    .as_ref()
                    .map(|s| Substitution::compile(s, at))
                    .transpose()?,
                host_rewrite,
                append_x_forwarded_host: a.append_x_forwarded_host,
                timeout,
                retry,
                hash,
                idle_timeout: a
                    .idle_timeout
                    .as_ref()
                    .map(|d| Some(duration(d)).filter(|d| !d.is_zero())),
                max_stream: a.max_stream_duration.as_ref().map(|m| MaxStreamDuration {
                    max: m.max_stream_duration.as_ref().map(duration),
                    grpc_header_max: m.grpc_timeout_header_max.as_ref().map(duration),
                    grpc_header_offset: m.grpc_timeout_header_offset.as_ref().map(duration),
                }),
                #[allow(deprecated)]
                grpc_timeout: a.max_grpc_timeout.as_ref().map(|m| GrpcRouteTimeout {
                    max: duration(m),
                    offset: a.grpc_timeout_offset.as_ref().map(duration),
                }),
                mirrors: mirrors(&a.request_mirror_policies, at, clusters)?,
                #[allow(deprecated)]
                body_buffer_limit: BodyBufferLimit::convert(
                    r.per_request_buffer_limit_bytes.map(|v| v.value),
                    r.request_body_buffer_limit.map(|v| v.value),
                    at,
                )?
                .or(vh.body_buffer_limit),
                cluster_not_found: match a.cluster_not_found_response_code {
                    1 => http::StatusCode::NOT_FOUND,
                    2 => http::StatusCode::INTERNAL_SERVER_ERROR,
                    _ => http::StatusCode::SERVICE_UNAVAILABLE,
                },
                upgrades: route_upgrades(&a.upgrade_configs, at)?,
                expected_timeout,
            }))
        }
        Some(Action::Redirect(rd)) => {
            let status = match RedirectResponseCode::try_from(rd.response_code)
                .unwrap_or(RedirectResponseCode::MovedPermanently)
            {
                RedirectResponseCode::MovedPermanently => 301,
                RedirectResponseCode::Found => 302,
                RedirectResponseCode::SeeOther => 303,
                RedirectResponseCode::TemporaryRedirect => 307,
                RedirectResponseCode::PermanentRedirect => 308,
            };
            let mut redirect = Redirect {
                status: http::StatusCode::from_u16(status)
                    .unwrap_or(http::StatusCode::MOVED_PERMANENTLY),
                scheme: match &rd.scheme_rewrite_specifier {
                    Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".into()),
                    Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
                    _ => None,
                },
                host: (!rd.host_redirect.is_empty()).then(|| rd.host_redirect.clone()),
                port: (rd.port_redirect != 0).then_some(rd.port_redirect as u16),
                path: None,
                prefix: None,
                regex: None,
                strip_query: rd.strip_query,
            };
            match &rd.path_rewrite_specifier {
                Some(PathRewriteSpecifier::PathRedirect(p)) => redirect.path = Some(p.clone()),
                Some(PathRewriteSpecifier::PrefixRewrite(p)) => redirect.prefix = Some(p.clone()),
                Some(PathRewriteSpecifier::RegexRewrite(s)) => {
                    redirect.regex = Some(Substitution::compile(s, at)?)
                }
                Some(PathRewriteSpecifier::PathRewrite(_)) => {
                    return Err(ConfigError::new(
                        at,
                        "redirect path_rewrite is not supported",
                    ))
                }
                None => {}
            }
            RouteAction::Redirect(redirect)
        }
        Some(Action::DirectResponse(d)) => {
            let status = u16::try_from(d.status)
                .ok()
                .and_then(|s| http::StatusCode::from_u16(s).ok())
                .filter(|s| s.as_u16() >= 200)
                .ok_or_else(|| {
                    ConfigError::new(
                        at,
                        format!(
                            "direct_response status {} is not a valid final status",
                            d.status
                        ),
                    )
                })?;
            let body = match d.body.as_ref().filter(|b| b.specifier.is_some()) {
                None => Bytes::new(),
                Some(b) => Bytes::copy_from_slice(inline_bytes(b).ok_or_else(|| {
                    ConfigError::new(
                        at,
                        "direct_response body must be inline (inline_string or inline_bytes)",
                    )
                })?),
            };
            if d.body_format.is_some() {
                return Err(ConfigError::new(
                    at,
                    "direct_response body_format is not supported",
                ));
            }
            RouteAction::Direct { status, body }
        }
        Some(other) => {
            let what = match other {
                Action::FilterAction(_) => "filter_action",
                Action::NonForwardingAction(_) => "non_forwarding_action",
                _ => "this action",
            };
            return Err(ConfigError::new(at, format!("{what} is not supported")));
        }
        None => return Err(ConfigError::new(at, "route has no action")),
    };
    Ok(Route {
        name: r.name.as_str().into(),
        matcher,
        action,
        edits: Edits::convert(
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
            at,
        )?,
    })
}

impl VirtualHost {
    /// The first route matching the request. With `ignore_path_parameters`
    /// (the configuration's `ignore_path_parameters_in_path_matching`),
    /// path matchers see the path up to its first `;`, as Envoy's do;
    /// query and header matchers still see the whole of it.
    pub fn find(&self, req: &RequestHead<'_>, ignore_path_parameters: bool) -> Option<&Route> {
        let (path, query) = match req.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.path, None),
        };
        // The flag first: most configurations do not ask, and the scan
        // would cost every request.
        let cut = if ignore_path_parameters {
            req.path.find(';')
        } else {
            None
        };
        let (full, path) = match cut {
            Some(at) => {
                let full = &req.path[..at];
                (full, full.split_once('?').map_or(full, |(p, _)| p))
            }
            None => (req.path, path),
        };
        self.routes
            .iter()
            .find(|r| r.matcher.matches(full, path, query, req))
    }
}

impl RouteMatcher {
    fn matches(&self, full: &str, path: &str, query: Option<&str>, req: &RequestHead<'_>) -> bool {
        let lowered;
        let (full, path) = if self.case_sensitive {
            (full, path)
        } else {
            lowered = full.to_ascii_lowercase();
            (lowered.as_str(), &lowered[..path.len()])
        };
        let path_ok = match &self.path {
            // Envoy's prefix compares against the whole :path, query included.
            PathMatch::Prefix(p) => full.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::SeparatedPrefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
        };
        path_ok
            && !self.never
            && (!self.grpc
                || req
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")))
            && self.headers.iter().all(|h| h.matches(req))
            && self.query.iter().all(|q| q.matches(query))
            && self.cookies.iter().all(|c| c.matches(req.headers))
            // Drawn last, and only for a route that matches otherwise.
            && self.fraction.is_none_or(|(n, d)| fastrand::u64(..d) < n)
    }
}

/// A `runtime_fraction`'s default value as (numerator, denominator). There
/// is no runtime to look `runtime_key` up in, so the default is the value.
fn fraction(
    f: &portico_proto::envoy::config::core::v3::RuntimeFractionalPercent,
    at: &str,
) -> Result<(u64, u64), ConfigError> {
    let v = f
        .default_value
        .as_ref()
        .ok_or_else(|| ConfigError::new(at, "runtime_fraction has no default_value"))?;
    fractional_percent(v, "runtime_fraction", at)
}

/// A `FractionalPercent` as (numerator, denominator); `what` names it in
/// errors.
pub(crate) fn fractional_percent(
    v: &portico_proto::envoy::r#type::v3::FractionalPercent,
    what: &str,
    at: &str,
) -> Result<(u64, u64), ConfigError> {
    use portico_proto::envoy::r#type::v3::fractional_percent::DenominatorType;
    let d = match DenominatorType::try_from(v.denominator) {
        Ok(DenominatorType::Hundred) => 100,
        Ok(DenominatorType::TenThousand) => 10_000,
        Ok(DenominatorType::Million) => 1_000_000,
        Err(_) => {
            return Err(ConfigError::new(
                at,
                format!("{what} denominator {} is unknown", v.denominator),
            ))
        }
    };
    // Over the denominator is all of them, as in Envoy.
    Ok((u64::from(v.numerator).min(d), d))
}

impl Route {
    /// The length of the prefix this route matched, for `prefix_rewrite`
    /// (Envoy replaces exactly the matched prefix, or the whole path for
    /// exact and regex matches).
    pub fn matched_prefix_len(&self, path: &str) -> usize {
        match &self.matcher.path {
            PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.len(),
            PathMatch::Exact(_) | PathMatch::Regex(_) => path.split('?').next().map_or(0, str::len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_proto::envoy::config::route::v3::{RouteAction as PbRouteAction, RouteMatch};

    fn route(p: PathSpecifier, cluster: &str) -> PbRoute {
        PbRoute {
            r#match: Some(RouteMatch {
                path_specifier: Some(p),
                ..Default::default()
            }),
            action: Some(Action::Route(PbRouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// A configuration of one virtual host for every domain, with `r`.
    fn one_route(r: PbRoute) -> Result<RouteTable, ConfigError> {
        RouteTable::convert(&RouteConfiguration {
            name: "t".into(),
            virtual_hosts: vec![PbVirtualHost {
                name: "v".into(),
                domains: vec!["*".into()],
                routes: vec![r],
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn table(vhosts: Vec<(Vec<&str>, Vec<PbRoute>)>) -> RouteTable {
        RouteTable::convert(&RouteConfiguration {
            name: "t".into(),
            virtual_hosts: vhosts
                .into_iter()
                .enumerate()
                .map(|(i, (d, routes))| PbVirtualHost {
                    name: format!("vh{i}"),
                    domains: d.into_iter().map(String::from).collect(),
                    routes,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .expect("converts")
    }

    #[test]
    fn retry_fields_that_would_change_answers_are_refused_by_name() {
        use portico_proto::envoy::config::route::v3::retry_policy::{
            retry_host_predicate::ConfigType, RetryHostPredicate,
        };
        use portico_proto::google::protobuf::Any;
        let predicate = |url: &str| RetryHostPredicate {
            name: "p".into(),
            config_type: Some(ConfigType::TypedConfig(Any {
                type_url: url.into(),
                value: Vec::new(),
            })),
        };
        let ok = PbRetryPolicy {
            retry_on: "5xx".into(),
            retry_host_predicate: vec![predicate(
                "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
            )],
            host_selection_retry_max_attempts: 3,
            ..Default::default()
        };
        RetryPolicy::convert(&ok, "r").expect("previous_hosts is what retries do");
        for (p, what) in [
            (
                PbRetryPolicy {
                    retry_host_predicate: vec![predicate(
                        "type.googleapis.com/envoy.extensions.retry.host.omit_canary_hosts.v3.OmitCanaryHostsPredicate",
                    )],
                    ..ok.clone()
                },
                "retry_host_predicate[0] (type.googleapis.com/envoy.extensions.retry.host.omit_canary_hosts",
            ),
            (
                PbRetryPolicy {
                    per_try_idle_timeout: Some(portico_proto::google::protobuf::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..ok.clone()
                },
                "per_try_idle_timeout",
            ),
            (
                PbRetryPolicy {
                    refresh_cluster_on_retry: true,
                    ..ok.clone()
                },
                "refresh_cluster_on_retry",
            ),
        ] {
            let msg = RetryPolicy::convert(&p, "r").unwrap_err().to_string();
            assert!(msg.contains(what), "{msg}");
        }
    }

    #[test]
    fn previous_priorities_is_the_retry_priority_taken() {
        use portico_proto::envoy::config::route::v3::retry_policy::{
            retry_priority::ConfigType, RetryPriority,
        };
        use portico_proto::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
        use portico_proto::google::protobuf::Any;
        let with = |config_type| {
            let p = PbRetryPolicy {
                retry_on: "5xx".into(),
                retry_priority: Some(RetryPriority {
                    name: "envoy.retry_priorities.previous_priorities".into(),
                    config_type,
                }),
                ..Default::default()
            };
            RetryPolicy::convert(&p, "r").map(|r| r.previous_priorities)
        };
        let every = |update_frequency| {
            Some(ConfigType::TypedConfig(Any {
                type_url: <PreviousPrioritiesConfig as prost::Name>::type_url(),
                value: prost::Message::encode_to_vec(&PreviousPrioritiesConfig {
                    update_frequency,
                }),
            }))
        };
        assert_eq!(with(every(2)).expect("converts"), Some(2));
        let refused = |c| with(c).unwrap_err().to_string();
        let msg = refused(every(0));
        assert!(
            msg.contains("update_frequency must be above 0, not 0"),
            "{msg}"
        );
        let msg = refused(None);
        assert!(msg.contains("needs a typed_config"), "{msg}");
        let msg = refused(Some(ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/acme.Elsewhere".into(),
            value: Vec::new(),
        })));
        assert!(msg.contains("r retry_policy.retry_priority: type.googleapis.com/acme.Elsewhere is not supported"), "{msg}");
        assert_eq!(
            RetryPolicy::convert(&PbRetryPolicy::default(), "r")
                .expect("converts")
                .previous_priorities,
            None
        );
    }

    #[test]
    fn per_filter_config_is_refused_naming_the_filter() {
        let mut r = route(PathSpecifier::Prefix("/".into()), "c");
        r.typed_per_filter_config.insert(
            "envoy.filters.http.ext_authz".into(),
            portico_proto::google::protobuf::Any::default(),
        );
        let msg = one_route(r).unwrap_err().to_string();
        assert!(
            msg.contains("typed_per_filter_config (envoy.filters.http.ext_authz)"),
            "{msg}"
        );
    }

    /// Envoy's rate-limited back-off: the first reset header whose wait
    /// is within `max_interval` says how long (seconds, or a Unix time),
    /// jittered up to half again; none usable, none said.
    #[test]
    fn reset_headers_say_how_long_to_wait() {
        use portico_proto::envoy::config::route::v3::retry_policy::{
            RateLimitedRetryBackOff, ResetHeader,
        };
        let p = PbRetryPolicy {
            retry_on: "retriable-status-codes".into(),
            retriable_status_codes: vec![429],
            rate_limited_retry_back_off: Some(RateLimitedRetryBackOff {
                reset_headers: vec![
                    ResetHeader {
                        name: "Retry-After".into(),
                        format: 0,
                    },
                    ResetHeader {
                        name: "x-ratelimit-reset".into(),
                        format: 1,
                    },
                ],
                max_interval: Some(portico_proto::google::protobuf::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            }),
            ..Default::default()
        };
        let r = RetryPolicy::convert(&p, "here").expect("converts");
        let wait = |h: &[(&str, String)]| {
            let mut m = HeaderMap::new();
            for (k, v) in h {
                m.insert(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            r.reset_backoff(&m)
        };
        let within = |d: Option<Duration>, lo: u64, hi: u64| {
            d.is_some_and(|d| d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi))
        };
        assert!(within(wait(&[("retry-after", "2".into())]), 2000, 3000));
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // Over the cap: the next header is tried.
        let d = wait(&[
            ("retry-after", "600".into()),
            ("x-ratelimit-reset", (unix + 10).to_string()),
        ]);
        assert!(within(d, 8000, 15000), "{d:?}");
        assert_eq!(wait(&[("retry-after", "600".into())]), None);
        assert_eq!(wait(&[("retry-after", "soon".into())]), None);
        assert_eq!(wait(&[("x-ratelimit-reset", (unix - 5).to_string())]), None);
        assert_eq!(wait(&[]), None);
        let mut bad = p.clone();
        if let Some(rl) = bad.rate_limited_retry_back_off.as_mut() {
            rl.reset_headers.clear();
        }
        let e = RetryPolicy::convert(&bad, "here").unwrap_err().to_string();
        assert!(
            e.contains("rate_limited_retry_back_off") && e.contains("reset_headers"),
            "{e}"
        );
    }

    #[test]
    fn retry_policy_extensions_are_refused_by_name() {
        let mut r = route(PathSpecifier::Prefix("/".into()), "c");
        if let Some(Action::Route(a)) = r.action.as_mut() {
            a.retry_policy_typed_config = Some(Default::default());
        }
        let msg = one_route(r).unwrap_err().to_string();
        assert!(msg.contains("retry_policy_typed_config"), "{msg}");
        // At the virtual host too.
        let vh = PbVirtualHost {
            name: "v".into(),
            domains: vec!["*".into()],
            retry_policy_typed_config: Some(Default::default()),
            ..Default::default()
        };
        let msg = RouteTable::convert(&RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: vec![vh],
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(msg.contains("retry_policy_typed_config"), "{msg}");
    }

    #[test]
    fn internal_only_headers_are_lowercased_and_bad_names_are_named() {
        let mut rc = RouteConfiguration {
            name: "t".into(),
            internal_only_headers: vec!["X-Secret".into(), "x-other".into()],
            ..Default::default()
        };
        let t = RouteTable::convert(&rc).expect("valid");
        assert_eq!(t.internal_only_headers, ["x-secret", "x-other"]);
        rc.internal_only_headers.push("bad name".into());
        let msg = RouteTable::convert(&rc).unwrap_err().to_string();
        assert!(
            msg.contains("internal_only_headers[2]") && msg.contains("\"bad name\""),
            "{msg}"
        );
    }

    #[test]
    fn cluster_not_found_response_code_is_kept() {
        let mut r = route(PathSpecifier::Prefix("/".into()), "c");
        if let Some(Action::Route(a)) = r.action.as_mut() {
            a.cluster_not_found_response_code = 1;
        }
        let t = table(vec![(
            vec!["*"],
            vec![r, route(PathSpecifier::Prefix("/".into()), "d")],
        )]);
        let vh = t.virtual_host("x", true).expect("vhost");
        let codes: Vec<_> = vh
            .routes
            .iter()
            .map(|r| match &r.action {
                RouteAction::Forward(f) => f.cluster_not_found.as_u16(),
                _ => 0,
            })
            .collect();
        assert_eq!(codes, [404, 503]);
    }

    /// A route with a runtime fraction takes about that share of the
    /// requests it matches; the rest fall through to the next route.
    #[test]
    fn runtime_fraction_takes_its_share() {
        use portico_proto::envoy::config::core::v3::RuntimeFractionalPercent;
        use portico_proto::envoy::r#type::v3::{fractional_percent, FractionalPercent};
        let mut canary = route(PathSpecifier::Prefix("/".into()), "canary");
        if let Some(m) = canary.r#match.as_mut() {
            m.runtime_fraction = Some(RuntimeFractionalPercent {
                default_value: Some(FractionalPercent {
                    numerator: 2_500,
                    denominator: fractional_percent::DenominatorType::TenThousand as i32,
                }),
                runtime_key: "canary".into(),
            });
        }
        let t = table(vec![(
            vec!["*"],
            vec![canary, route(PathSpecifier::Prefix("/".into()), "stable")],
        )]);
        let vh = t.virtual_host("x", true).expect("vhost");
        let h = HeaderMap::new();
        let head = RequestHead {
            method: "GET",
            path: "/x",
            authority: "x",
            scheme: "http",
            headers: &h,
        };
        let canaries = (0..10_000)
            .filter(|_| {
                matches!(
                    &vh.find(&head, false).expect("route").action,
                    RouteAction::Forward(f) if matches!(&f.clusters, ClusterChoice::One(c) if &**c == "canary")
                )
            })
            .count();
        // 2,500 expected; 10 standard deviations (about 43 each) apart.
        assert!((2_070..=2_930).contains(&canaries), "{canaries}");
        // A route whose fraction has no default value is refused, named.
        let mut bad = route(PathSpecifier::Prefix("/".into()), "c");
        if let Some(m) = bad.r#match.as_mut() {
            m.runtime_fraction = Some(RuntimeFractionalPercent::default());
        }
        let e = one_route(bad).expect_err("refused");
        assert!(e.to_string().contains("runtime_fraction"), "{e}");
    }

    #[test]
    fn decoding_shares_unchanged_virtual_hosts() {
        let rc = |second: &str| {
            RouteConfiguration {
                name: "t".into(),
                virtual_hosts: ["a.example", "b.example", "c.example"]
                    .into_iter()
                    .map(|d| PbVirtualHost {
                        name: d.into(),
                        domains: vec![d.into()],
                        routes: vec![route(
                            PathSpecifier::Prefix("/".into()),
                            if d == "b.example" { second } else { "c0" },
                        )],
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let cluster = |t: &RouteTable, host: &str| {
            let vh = t.virtual_host(host, true).expect("vhost");
            vh.clusters.clone()
        };
        let (b1, b2) = (rc("c1"), rc("c2"));
        let t1 = RouteTable::decode("t", &b1, None).expect("decodes");
        let t2 = RouteTable::decode("t", &b2, Some((&t1, &b1))).expect("decodes");
        assert!(Arc::ptr_eq(&t1.vhosts[0], &t2.vhosts[0]));
        assert!(!Arc::ptr_eq(&t1.vhosts[1], &t2.vhosts[1]));
        assert!(Arc::ptr_eq(&t1.vhosts[2], &t2.vhosts[2]));
        assert_eq!(cluster(&t2, "b.example"), [Arc::from("c2")]);
        assert_eq!(t2.clusters, [Arc::from("c0"), Arc::from("c2")]);
        // Reordered virtual hosts are still found by content.
        let mut pb = RouteConfiguration::decode(b2.as_slice()).expect("pb");
        pb.virtual_hosts.reverse();
        let b3 = pb.encode_to_vec();
        let t3 = RouteTable::decode("t", &b3, Some((&t2, &b2))).expect("decodes");
        assert!(Arc::ptr_eq(&t2.vhosts[0], &t3.vhosts[2]));
        assert_eq!(cluster(&t3, "b.example"), [Arc::from("c2")]);
        // The same as converting the message whole.
        let whole = RouteTable::convert(&pb).expect("converts");
        for host in ["a.example", "b.example", "c.example"] {
            assert_eq!(cluster(&whole, host), cluster(&t3, host), "{host}");
        }
        assert_eq!(whole.clusters, t3.clusters);
        // Garbage names the resource.
        let e = RouteTable::decode("t", &[0x12, 0xff], None).expect_err("malformed");
        assert_eq!(e.at, "RouteConfiguration \"t\"");
    }

    #[test]
    fn virtual_hosts_follow_envoy_precedence() {
        let t = table(vec![
            (vec!["*"], vec![]),
            (vec!["api.example.com"], vec![]),
            (vec!["*.example.com"], vec![]),
            (vec!["*.b.example.com"], vec![]),
            (vec!["api.*"], vec![]),
        ]);
        let name = |h: &str| t.virtual_host(h, true).map(|v| v.name.to_string());
        assert_eq!(name("api.example.com:8080").as_deref(), Some("vh1"));
        assert_eq!(name("API.Example.com").as_deref(), Some("vh1"));
        assert_eq!(name("x.b.example.com").as_deref(), Some("vh3"));
        assert_eq!(name("x.example.com").as_deref(), Some("vh2"));
        assert_eq!(name("api.other.org").as_deref(), Some("vh4"));
        assert_eq!(name("other.org").as_deref(), Some("vh0"));
        assert_eq!(
            name(".example.com").as_deref(),
            Some("vh0"),
            "a wildcard matches at least one character"
        );
    }

    #[test]
    fn first_matching_route_wins_and_separated_prefix_respects_segments() {
        let t = table(vec![(
            vec!["*"],
            vec![
                route(PathSpecifier::Path("/a".into()), "exact"),
                route(PathSpecifier::PathSeparatedPrefix("/a".into()), "sep"),
                route(
                    PathSpecifier::SafeRegex(
                        portico_proto::envoy::r#type::matcher::v3::RegexMatcher {
                            regex: "/r/[0-9]+".into(),
                            ..Default::default()
                        },
                    ),
                    "re",
                ),
                route(PathSpecifier::Prefix("/".into()), "all"),
            ],
        )]);
        let vh = t.virtual_host("x", true).expect("vhost");
        let h = HeaderMap::new();
        let c = |p: &str| match &vh
            .find(
                &RequestHead {
                    method: "GET",
                    path: p,
                    authority: "x",
                    scheme: "http",
                    headers: &h,
                },
                false,
            )
            .expect("route")
            .action
        {
            RouteAction::Forward(f) => match &f.clusters {
                ClusterChoice::One(c) => c.to_string(),
                _ => unreachable!(),
            },
            _ => unreachable!(),
        };
        assert_eq!(c("/a"), "exact");
        assert_eq!(c("/a?x=1"), "exact");
        assert_eq!(c("/a/b"), "sep");
        assert_eq!(c("/ab"), "all");
        assert_eq!(c("/r/12"), "re");
        assert_eq!(c("/r/12x"), "all");
    }

    #[test]
    fn bad_input_is_named() {
        let mut r = route(
            PathSpecifier::SafeRegex(portico_proto::envoy::r#type::matcher::v3::RegexMatcher {
                regex: "(".into(),
                ..Default::default()
            }),
            "c",
        );
        r.name = "broken".into();
        let err = one_route(r).expect_err("bad regex");
        let msg = err.to_string();
        assert!(
            msg.contains("\"t\"") && msg.contains("\"broken\"") && msg.contains("bad regex"),
            "{msg}"
        );
    }

    /// Route features that would change answers if ignored are refused by
    /// name: internal redirects (either field), hedging on per-try
    /// timeouts (route or virtual host) and the formatted host rewrite;
    /// a host rewrite by header or path needs a good name or pattern.
    #[test]
    fn internal_redirects_and_hedging_are_refused_by_name() {
        use portico_proto::envoy::config::route::v3::{
            route_action::InternalRedirectAction, HedgePolicy, InternalRedirectPolicy,
        };
        let convert = |r: PbRoute, vh_hedge: Option<HedgePolicy>| {
            RouteTable::convert(&RouteConfiguration {
                name: "rc".into(),
                virtual_hosts: vec![PbVirtualHost {
                    name: "v".into(),
                    domains: vec!["*".into()],
                    routes: vec![r],
                    hedge_policy: vh_hedge,
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let with = |f: &dyn Fn(&mut PbRouteAction)| {
            let mut r = route(PathSpecifier::Prefix("/".into()), "c");
            if let Some(Action::Route(a)) = r.action.as_mut() {
                f(a);
            }
            r
        };
        let refused = |r: PbRoute, vh_hedge: Option<HedgePolicy>, what: &str| {
            let msg = convert(r, vh_hedge).expect_err(what).to_string();
            assert!(msg.contains(what) && msg.contains("\"rc\""), "{msg}");
        };
        refused(
            with(&|a| a.internal_redirect_policy = Some(InternalRedirectPolicy::default())),
            None,
            "internal_redirect_policy",
        );
        #[allow(deprecated)]
        refused(
            with(&|a| {
                a.internal_redirect_action = InternalRedirectAction::HandleInternalRedirect as i32
            }),
            None,
            "internal_redirect_policy",
        );
        let hedge = HedgePolicy {
            hedge_on_per_try_timeout: true,
            ..Default::default()
        };
        refused(
            with(&|a| a.hedge_policy = Some(hedge)),
            None,
            "hedge_on_per_try_timeout",
        );
        {
            use portico_proto::envoy::config::route::v3::route_action::HostRewriteSpecifier as H;
            use portico_proto::envoy::r#type::matcher::v3::{
                RegexMatchAndSubstitute, RegexMatcher,
            };
            refused(
                with(&|a| a.host_rewrite_specifier = Some(H::HostRewrite("%REQ(x)%".into()))),
                None,
                "host_rewrite (a formatted host) is not supported",
            );
            refused(
                with(&|a| a.host_rewrite_specifier = Some(H::HostRewriteHeader("bad name".into()))),
                None,
                "host_rewrite_header",
            );
            let pattern = |regex: &str| RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher {
                    regex: regex.into(),
                    ..Default::default()
                }),
                substitution: "x".into(),
            };
            refused(
                with(&|a| a.host_rewrite_specifier = Some(H::HostRewritePathRegex(pattern("(")))),
                None,
                "host_rewrite_path_regex",
            );
            convert(
                with(&|a| {
                    a.host_rewrite_specifier = Some(H::HostRewritePathRegex(pattern("^/(.+)$")))
                }),
                None,
            )
            .expect("a good pattern converts");
            refused(
                with(&|a| {
                    a.request_mirror_policies = vec![PbMirrorPolicy {
                        cluster: "c".into(),
                        request_headers_mutations: vec![Default::default()],
                        ..Default::default()
                    }]
                }),
                None,
                "request_headers_mutations are not supported",
            );
            let upgrade = |kind: &str, connect: bool| {
                use portico_proto::envoy::config::route::v3::route_action::UpgradeConfig;
                vec![UpgradeConfig {
                    upgrade_type: kind.into(),
                    connect_config: connect.then(Default::default),
                    ..Default::default()
                }]
            };
            refused(
                with(&|a| a.upgrade_configs = upgrade("CONNECT", true)),
                None,
                "connect_config is not supported",
            );
            refused(
                with(&|a| a.upgrade_configs = upgrade("connect", false)),
                None,
                "CONNECT upgrades are not supported",
            );
        }
        refused(
            route(PathSpecifier::Prefix("/".into()), "c"),
            Some(hedge),
            "hedge_on_per_try_timeout",
        );
        // Without hedging on timeouts, a hedge policy changes nothing in
        // Envoy either, and passes.
        convert(
            with(&|a| a.hedge_policy = Some(HedgePolicy::default())),
            Some(HedgePolicy::default()),
        )
        .expect("a hedge policy without hedge_on_per_try_timeout");
    }

    #[test]
    fn retry_conditions_on_answer_headers() {
        let policy = |on: &str| {
            RetryPolicy::convert(
                &PbRetryPolicy {
                    retry_on: on.into(),
                    ..Default::default()
                },
                "r",
            )
            .expect("converts")
        };
        let mut limited = HeaderMap::new();
        limited.insert("x-envoy-ratelimited", HeaderValue::from_static("true"));
        let p = policy("envoy-ratelimited");
        assert!(p.retry_status(429, &limited));
        assert!(!p.retry_status(429, &HeaderMap::new()));
        // retriable-headers without any header listed retries nothing.
        assert!(!policy("retriable-headers").retry_status(503, &limited));
        let e = RetryPolicy::convert(
            &PbRetryPolicy {
                retry_on: "5xx,sometimes".into(),
                ..Default::default()
            },
            "r",
        )
        .expect_err("unknown condition");
        assert!(e.to_string().contains("\"sometimes\""), "{e}");
    }

    #[test]
    fn expected_timeout_follows_envoy() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let zero = Duration::ZERO;
        // The route's, or the try's when shorter; none when both are off.
        assert_eq!(expected_timeout_ms(Some(s(15)), None, zero), Some(15_000));
        assert_eq!(
            expected_timeout_ms(Some(s(5)), Some(s(2)), zero),
            Some(2_000)
        );
        assert_eq!(
            expected_timeout_ms(Some(s(5)), Some(s(5)), zero),
            Some(5_000)
        );
        assert_eq!(
            expected_timeout_ms(Some(s(5)), Some(s(9)), zero),
            Some(5_000)
        );
        assert_eq!(expected_timeout_ms(None, Some(s(2)), s(60)), Some(2_000));
        assert_eq!(expected_timeout_ms(None, None, zero), None);
        // What is left of the route's caps the try's; spent, it is 1 ms.
        assert_eq!(
            expected_timeout_ms(Some(s(5)), Some(s(2)), ms(3_500)),
            Some(1_500)
        );
        assert_eq!(expected_timeout_ms(Some(s(5)), None, ms(4_999)), Some(1));
        assert_eq!(expected_timeout_ms(Some(s(5)), None, s(7)), Some(1));
    }

    fn forward(t: &RouteTable) -> &Forward {
        match &t.vhosts[0].routes[0].action {
            RouteAction::Forward(f) => f,
            other => panic!("not forwarded: {other:?}"),
        }
    }

    fn header(k: &str, v: &str) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(portico_proto::envoy::config::core::v3::HeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn weighted_clusters_keep_their_own_edits_host_and_draw() {
        use portico_proto::envoy::config::route::v3::weighted_cluster::{
            cluster_weight::HostRewriteSpecifier as TargetHost, ClusterWeight, RandomValueSpecifier,
        };
        use portico_proto::google::protobuf::UInt32Value;
        let weight = |name: &str, w: u32| ClusterWeight {
            name: name.into(),
            weight: Some(UInt32Value { value: w }),
            ..Default::default()
        };
        let mut r = route(PathSpecifier::Prefix("/".into()), "x");
        let Some(Action::Route(a)) = &mut r.action else {
            unreachable!()
        };
        a.cluster_specifier = Some(ClusterSpecifier::WeightedClusters(WeightedClusterProto {
            clusters: vec![
                ClusterWeight {
                    request_headers_to_add: vec![header("x-canary", "yes")],
                    response_headers_to_remove: vec!["x-debug".into()],
                    host_rewrite_specifier: Some(TargetHost::HostRewriteLiteral(
                        "canary.internal".into(),
                    )),
                    ..weight("canary", 10)
                },
                weight("stable", 90),
            ],
            random_value_specifier: Some(RandomValueSpecifier::HeaderName("X-Draw".into())),
            ..Default::default()
        }));
        let t = one_route(r.clone()).expect("converts");
        let ClusterChoice::Weighted(w) = &forward(&t).clusters else {
            panic!("weighted")
        };
        assert_eq!(w.total, 100);
        assert!(matches!(&w.draw, WeightDraw::Header(h) if h == "x-draw"));
        // Draws are taken modulo the total: 0..10 is the canary's.
        for (draw, name) in [(0, "canary"), (9, "canary"), (10, "stable"), (99, "stable")] {
            assert_eq!(&*w.pick(draw).name, name, "{draw}");
            assert_eq!(&*w.pick(draw + 100 * 7).name, name, "{draw} + 700");
        }
        let canary = w.pick(0);
        assert_eq!(canary.host.as_ref().unwrap(), "canary.internal");
        let edits = canary.edits.as_deref().expect("edits");
        let mut h = HeaderMap::new();
        edits.apply_request(&mut h, None);
        assert_eq!(h["x-canary"], "yes");
        let mut resp = HeaderMap::new();
        resp.insert("x-debug", HeaderValue::from_static("1"));
        edits.apply_response(&mut resp, None);
        assert!(resp.is_empty());
        assert!(w.pick(50).edits.is_none() && w.pick(50).host.is_none());
        assert_eq!(t.clusters.len(), 2);

        // A cluster weight may not set the Host header by an edit.
        let Some(Action::Route(a)) = &mut r.action else {
            unreachable!()
        };
        let Some(ClusterSpecifier::WeightedClusters(wc)) = &mut a.cluster_specifier else {
            unreachable!()
        };
        wc.clusters[1].request_headers_to_add = vec![header("Host", "elsewhere")];
        let msg = one_route(r).expect_err("host edit").to_string();
        assert!(
            msg.contains("weighted_clusters.clusters[1].request_headers_to_add[0]")
                && msg.contains("host"),
            "{msg}"
        );
    }

    #[test]
    fn mirrors_and_buffer_limits_come_from_the_most_specific_level() {
        use portico_proto::google::protobuf::{UInt32Value, UInt64Value};
        let mirror = |c: &str| PbMirrorPolicy {
            cluster: c.into(),
            ..Default::default()
        };
        #[allow(deprecated)]
        let rc = |route_mirrors: Vec<PbMirrorPolicy>, route_limit: Option<u64>| {
            let mut r = route(PathSpecifier::Prefix("/".into()), "c");
            r.request_body_buffer_limit = route_limit.map(|value| UInt64Value { value });
            if let Some(Action::Route(a)) = &mut r.action {
                a.request_mirror_policies = route_mirrors;
            }
            RouteConfiguration {
                name: "t".into(),
                request_mirror_policies: vec![mirror("all")],
                virtual_hosts: vec![PbVirtualHost {
                    name: "v".into(),
                    domains: vec!["*".into()],
                    routes: vec![r],
                    request_mirror_policies: vec![mirror("vh")],
                    per_request_buffer_limit_bytes: Some(UInt32Value { value: 2048 }),
                    ..Default::default()
                }],
                ..Default::default()
            }
        };
        let t = RouteTable::convert(&rc(vec![], None)).expect("converts");
        // The route names none: its virtual host's (the handler picks the
        // most specific non-empty list), and every mirror is a cluster the
        // configuration needs.
        assert!(forward(&t).mirrors.is_empty());
        assert_eq!(&*t.vhosts[0].mirrors[0].cluster, "vh");
        assert_eq!(&*t.mirrors[0].cluster, "all");
        for c in ["all", "c", "vh"] {
            assert!(t.clusters.iter().any(|x| &**x == c), "{c}");
        }
        let limit = forward(&t).body_buffer_limit;
        assert_eq!(limit, Some(BodyBufferLimit::AtMost(2048)));
        assert_eq!(BodyBufferLimit::bytes(limit, 1 << 20), 2048);
        assert_eq!(BodyBufferLimit::bytes(limit, 1024), 1024);

        let t = RouteTable::convert(&rc(vec![mirror("own")], Some(5 << 20))).expect("converts");
        assert_eq!(&*forward(&t).mirrors[0].cluster, "own");
        let limit = forward(&t).body_buffer_limit;
        assert_eq!(BodyBufferLimit::bytes(limit, 1 << 20), 5 << 20);
        assert_eq!(BodyBufferLimit::bytes(None, 1 << 20), 1 << 20);

        // Both limits at one level: refused.
        let mut both = rc(vec![], None);
        both.virtual_hosts[0].request_body_buffer_limit = Some(UInt64Value { value: 1 });
        let msg = RouteTable::convert(&both).expect_err("both").to_string();
        assert!(
            msg.contains("only one of per_request_buffer_limit_bytes"),
            "{msg}"
        );
    }

    #[test]
    fn header_values_take_envoys_command_operators() {
        let opt = |k: &str, v: &str, keep_empty: bool| HeaderValueOption {
            keep_empty_value: keep_empty,
            ..header(k, v)
        };
        let e = Edits::convert(
            &[
                opt(
                    "x-who",
                    "%REQ(X-User)% from %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                    false,
                ),
                opt("x-share", "100%%", false),
                opt("x-none", "%REQ(x-absent)%", false),
                opt("x-kept", "%REQ(x-absent)%", true),
                opt("x-blank", "", false),
            ],
            &[],
            &[opt("x-code", "%RESPONSE_CODE%/%RESP(x-up)%", false)],
            &[],
            "here",
        )
        .expect("converts");
        assert_eq!(e.formatted(), [true, true]);
        let (req, resp) = e.format_headers();
        assert!(req.iter().any(|n| n == "x-user") && resp.iter().any(|n| n == "x-up"));
        let rec = FormatRecord {
            downstream_remote_address: "192.0.2.4:5555".into(),
            headers: vec![
                ("x-user".parse().unwrap(), Some("ann".into())),
                ("x-absent".parse().unwrap(), None),
            ],
            response_code: 201,
            response_headers: vec![("x-up".parse().unwrap(), Some("u1".into()))],
            ..Default::default()
        };
        let mut h = HeaderMap::new();
        e.apply_request(&mut h, Some(&rec));
        assert_eq!(h["x-who"], "ann from 192.0.2.4");
        assert_eq!(h["x-share"], "100%");
        assert!(!h.contains_key("x-none") && !h.contains_key("x-blank"));
        assert_eq!(h["x-kept"], "");
        let mut r = HeaderMap::new();
        e.apply_response(&mut r, Some(&rec));
        assert_eq!(r["x-code"], "201/u1");
        // No record: what is made per request is left out.
        let mut h = HeaderMap::new();
        e.apply_request(&mut h, None);
        assert!(!h.contains_key("x-who") && h["x-share"] == "100%");

        for (v, what) in [
            ("%NO_SUCH_THING%", "%NO_SUCH_THING%"),
            ("50% off", "unterminated"),
        ] {
            let msg = Edits::convert(&[header("x-bad", v)], &[], &[], &[], "here")
                .expect_err(v)
                .to_string();
            assert!(
                msg.contains("request_headers_to_add[0]") && msg.contains(what),
                "{msg}"
            );
        }
    }

    #[test]
    fn route_configuration_options_and_refusals() {
        let mut rc = RouteConfiguration {
            name: "t".into(),
            virtual_hosts: vec![PbVirtualHost {
                name: "v".into(),
                domains: vec!["*".into()],
                routes: vec![route(PathSpecifier::Path("/a".into()), "c")],
                ..Default::default()
            }],
            most_specific_header_mutations_wins: true,
            vhost_header: "X-VHost".into(),
            ignore_path_parameters_in_path_matching: true,
            ..Default::default()
        };
        let t = RouteTable::convert(&rc).expect("converts");
        assert!(t.most_specific_wins && t.ignore_path_parameters);
        assert_eq!(t.vhost_header.as_ref().unwrap(), "x-vhost");
        rc.vhost_header = "bad header".into();
        assert!(RouteTable::convert(&rc)
            .unwrap_err()
            .to_string()
            .contains("vhost_header"));
        rc.vhost_header.clear();

        let mut r = route(PathSpecifier::Prefix("/".into()), "c");
        if let Some(Action::Route(a)) = &mut r.action {
            a.path_rewrite = "/x%REQ(y)%".into();
        }
        assert!(one_route(r)
            .unwrap_err()
            .to_string()
            .contains("path_rewrite"));
        let mut r = route(PathSpecifier::Prefix("/".into()), "c");
        r.route_specifiers = vec![Default::default()];
        assert!(one_route(r)
            .unwrap_err()
            .to_string()
            .contains("route_specifiers"));
        // A route for client certificates never matches a plain request;
        // one for their absence does.
        use portico_proto::envoy::config::route::v3::route_match::TlsContextMatchOptions;
        use portico_proto::google::protobuf::BoolValue;
        let head = |h: &'static HeaderMap| RequestHead {
            method: "GET",
            path: "/x",
            authority: "h",
            scheme: "http",
            headers: h,
        };
        static EMPTY: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);
        for (presented, matches) in [(true, false), (false, true)] {
            let mut r = route(PathSpecifier::Prefix("/".into()), "c");
            if let Some(m) = r.r#match.as_mut() {
                m.tls_context = Some(TlsContextMatchOptions {
                    presented: Some(BoolValue { value: presented }),
                    ..Default::default()
                });
            }
            let t = one_route(r).expect("converts");
            let vh = t.virtual_host("h", false).expect("vh");
            assert_eq!(
                vh.find(&head(&EMPTY), false).is_some(),
                matches,
                "{presented}"
            );
        }
    }

    #[test]
    fn path_parameters_are_ignored_by_path_matchers_only() {
        use portico_proto::envoy::config::route::v3::{
            query_parameter_matcher::QueryParameterMatchSpecifier, QueryParameterMatcher,
        };
        let mut r = route(PathSpecifier::Path("/api".into()), "c");
        if let Some(m) = r.r#match.as_mut() {
            m.query_parameters = vec![QueryParameterMatcher {
                name: "tenant".into(),
                query_parameter_match_specifier: Some(QueryParameterMatchSpecifier::PresentMatch(
                    true,
                )),
            }];
        }
        let t = one_route(r).expect("converts");
        let vh = t.virtual_host("h", false).expect("vh");
        let h = HeaderMap::new();
        let find = |path: &str, ignore| {
            vh.find(
                &RequestHead {
                    method: "GET",
                    path,
                    authority: "h",
                    scheme: "http",
                    headers: &h,
                },
                ignore,
            )
            .is_some()
        };
        assert!(find("/api;v=1?tenant=a", true));
        assert!(!find("/api;v=1?tenant=a", false));
        assert!(find("/api?tenant=a", true));
        assert!(!find("/api;v=1", true), "no query: the query matcher fails");
    }
}
