//! `Cluster` and `ClusterLoadAssignment` → [`ClusterConfig`] and
//! [`EndpointSpec`]s.

// Envoy's deprecated fields are still sent by control planes; honour them.
#![allow(deprecated)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use portico_proto::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, DnsLookupFamily, LbPolicy},
    Cluster,
};
use portico_proto::envoy::config::core::v3::{
    health_check::HealthChecker, HealthStatus, RoutingPriority,
};
use portico_proto::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment,
};
use portico_proto::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{explicit_http_config::ProtocolConfig, UpstreamProtocolOptions},
    HttpProtocolOptions,
};

use super::{duration, host_port, socket_addr, unpack, ConfigError};

/// How a cluster gets its endpoints.
#[derive(Debug, Clone, PartialEq)]
pub enum Discovery {
    /// From EDS, under this name.
    Eds(Arc<str>),
    /// Listed in the cluster (IP addresses).
    Static(Assignment),
    /// Host names in the cluster, resolved by the proxy.
    Dns(DnsTargets),
}

/// An HTTP/1.1 upstream's settings (its `http_protocol_options`; the
/// options that only concern requests received are not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct H1Client {
    /// Header names go out in proper case, `Content-Type`
    /// (`header_key_format.proper_case_words`; lower case otherwise).
    pub proper_case: bool,
    /// The request line has the absolute URL, `GET http://host/path`
    /// (`send_fully_qualified_url`).
    pub absolute_url: bool,
    /// An answer with both `Content-Length` and `Transfer-Encoding:
    /// chunked` is taken as chunked (`allow_chunked_length`); otherwise it
    /// is a protocol error, as in Envoy.
    pub allow_chunked_length: bool,
}

impl H1Client {
    fn convert(
        o: &portico_proto::envoy::config::core::v3::Http1ProtocolOptions,
        at: &str,
    ) -> Result<Self, ConfigError> {
        use portico_proto::envoy::config::core::v3::http1_protocol_options::header_key_format::HeaderFormat;
        let proper_case = match o.header_key_format.as_ref().and_then(|f| f.header_format.as_ref()) {
            None => false,
            Some(HeaderFormat::ProperCaseWords(_)) => true,
            Some(HeaderFormat::StatefulFormatter(f)) => {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "header_key_format.stateful_formatter {:?} is not supported (proper_case_words is)",
                        f.name
                    ),
                ))
            }
        };
        Ok(H1Client {
            proper_case,
            absolute_url: o.send_fully_qualified_url,
            allow_chunked_length: o.allow_chunked_length,
        })
    }
}

/// What an answer's head may hold (the cluster's
/// `common_http_protocol_options`). An HTTP/1.1 answer over either limit
/// is a protocol error (502, as in Envoy); an HTTP/2 one has its stream
/// reset, as in Envoy, and so is answered as any upstream reset here
/// (502; Envoy's router answers a reset 503). Small: it rides in every
/// request's future.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerHead {
    /// Header fields of an answer (`max_headers_count`, Envoy's 100
    /// unless set; an HTTP/2 answer's `:status` counts, as in Envoy's
    /// HTTP/2 codec). Over 65,535 is taken as 65,535.
    pub fields: u16,
    /// Its size in KiB (`max_response_headers_kb`; unless set, Envoy's
    /// 80 for HTTP/1.1 and 60 for HTTP/2).
    pub kib: Option<std::num::NonZeroU16>,
}

impl Default for AnswerHead {
    fn default() -> Self {
        AnswerHead {
            fields: 100,
            kib: None,
        }
    }
}

impl AnswerHead {
    /// The bytes of field names and values an HTTP/1.1 answer head may
    /// have (Envoy counts those, not the rest of the head).
    pub fn http1_bytes(self) -> usize {
        self.kib.map_or(80, |k| usize::from(k.get())) * 1024
    }

    /// The bytes an HTTP/1.1 answer head may reach unfinished: its fields'
    /// bytes, room for each field's separator and line end, and a status
    /// line of up to 4 KiB. Past that it cannot end within the limit.
    pub fn http1_unfinished_bytes(self) -> usize {
        self.http1_bytes() + 4 * usize::from(self.fields) + 4096
    }

    /// The bytes an HTTP/2 answer's header list may have (counted as
    /// RFC 9113's SETTINGS_MAX_HEADER_LIST_SIZE counts them).
    pub fn http2_bytes(self) -> u32 {
        self.kib.map_or(60, |k| u32::from(k.get())) * 1024
    }
}

/// An HTTP/2 upstream's settings beyond its stream limit (from its
/// `http2_protocol_options`; hyper's defaults for those not given).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct H2Client {
    /// PINGs every so often, the connection closed when one goes
    /// unanswered this long (`connection_keepalive`: its `interval` and
    /// `timeout`; a `connection_idle_interval` alone pings idle
    /// connections at that period, where Envoy pings one idle that long
    /// before a new stream; `interval_jitter` is not applied).
    pub keepalive: Option<(Duration, Duration)>,
    /// `initial_stream_window_size`.
    pub stream_window: Option<u32>,
    /// `initial_connection_window_size`.
    pub connection_window: Option<u32>,
    /// `hpack_table_size`.
    pub header_table: Option<u32>,
}

impl H2Client {
    fn convert(
        o: &portico_proto::envoy::config::core::v3::Http2ProtocolOptions,
        at: &str,
    ) -> Result<Self, ConfigError> {
        if !o.custom_settings_parameters.is_empty() {
            return Err(ConfigError::new(
                at,
                "custom_settings_parameters are not supported",
            ));
        }
        // Envoy's bounds for the windows.
        let window = |v: Option<u32>, field: &str| match v {
            Some(n) if !(65_535..=2_147_483_647).contains(&n) => Err(ConfigError::new(
                at,
                format!("{field} {n} is out of range (65535 to 2147483647)"),
            )),
            v => Ok(v),
        };
        let keepalive = match &o.connection_keepalive {
            None => None,
            Some(k) => super::h2_keepalive(k, at)?,
        };
        Ok(H2Client {
            keepalive,
            stream_window: window(
                o.initial_stream_window_size.as_ref().map(|v| v.value),
                "initial_stream_window_size",
            )?,
            connection_window: window(
                o.initial_connection_window_size.as_ref().map(|v| v.value),
                "initial_connection_window_size",
            )?,
            header_table: o.hpack_table_size.as_ref().map(|v| v.value),
        })
    }
}

/// The order of an endpoint's addresses for the happy eyeballs way of
/// connecting (Envoy's `happy_eyeballs_config`): `count` of the first
/// family, then one of the other, and so on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyOrder {
    /// Whether IPv6 goes first (`None`: the first address's family).
    pub v6_first: Option<bool>,
    /// Addresses of the first family before each of the other
    /// (`first_address_family_count`, 1 unless set).
    pub count: u32,
}

impl Default for FamilyOrder {
    fn default() -> Self {
        FamilyOrder {
            v6_first: None,
            count: 1,
        }
    }
}

impl FamilyOrder {
    fn convert(
        he: Option<&portico_proto::envoy::config::cluster::v3::upstream_connection_options::HappyEyeballsConfig>,
        at: &str,
    ) -> Result<Self, ConfigError> {
        use portico_proto::envoy::config::cluster::v3::upstream_connection_options::FirstAddressFamilyVersion as Version;
        let Some(he) = he else {
            return Ok(FamilyOrder::default());
        };
        let v6_first = match Version::try_from(he.first_address_family_version) {
            Ok(Version::Default) => None,
            Ok(Version::V4) => Some(false),
            Ok(Version::V6) => Some(true),
            Ok(Version::Pipe | Version::Internal) | Err(_) => {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "happy_eyeballs_config.first_address_family_version {} is not an IP family",
                        he.first_address_family_version
                    ),
                ))
            }
        };
        let count = match he.first_address_family_count.as_ref().map(|c| c.value) {
            None => 1,
            Some(0) => {
                return Err(ConfigError::new(
                    at,
                    "happy_eyeballs_config.first_address_family_count must be at least 1",
                ))
            }
            Some(n) => n,
        };
        Ok(FamilyOrder { v6_first, count })
    }
}

/// A DNS cluster's host names and how they are resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsTargets {
    /// Each endpoint's name and where it stands.
    pub hosts: Vec<DnsHost>,
    /// Which addresses of a name are used (`dns_lookup_family`).
    pub family: DnsFamily,
    /// `LOGICAL_DNS`: only the first address of its one name (a single
    /// logical host, connections to whatever it resolves to).
    pub logical: bool,
    /// How often names are resolved again (`dns_refresh_rate`, 5 s).
    /// (`respect_dns_ttl` cannot be honoured: the system's resolver does
    /// not tell a record's TTL.)
    pub refresh: Duration,
    /// Up to this much more, at random, after a resolution that worked
    /// (`dns_jitter`).
    pub jitter: Duration,
    /// After a resolution that failed, the next comes after a backoff
    /// growing from the first interval to the second
    /// (`dns_failure_refresh_rate`; without it, at the refresh rate).
    pub failure_refresh: Option<(Duration, Duration)>,
    /// The load assignment's policy.
    pub policy: LoadPolicy,
}

/// One endpoint of a DNS cluster: a name to resolve, and the weights its
/// addresses take.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsHost {
    /// The name.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The endpoint's weight.
    pub weight: u32,
    /// Its priority (0 the highest).
    pub priority: u32,
    /// Its locality's index and weight (0 when unset), as for
    /// [`EndpointSpec`].
    pub locality: u32,
    /// See `locality`.
    pub locality_weight: u32,
    /// The endpoint's own `hostname`, else the name resolved.
    pub hostname: Arc<str>,
    /// Its health as the control plane gives it (each address resolved
    /// takes it).
    pub health: HealthStatus,
    /// What the ring hashes in its place (`envoy.lb` `hash_key`).
    pub hash_key: Option<Arc<str>>,
    /// Its own health-check settings.
    pub check: Option<Arc<EndpointCheck>>,
}

/// Envoy's `dns_lookup_family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsFamily {
    /// IPv6 addresses if a name has any, else IPv4 (`AUTO`, the default).
    Auto,
    /// IPv4 only.
    V4Only,
    /// IPv6 only.
    V6Only,
    /// IPv4 addresses if a name has any, else IPv6.
    V4Preferred,
    /// Both.
    All,
}

impl DnsFamily {
    /// The addresses of one name this family keeps.
    pub fn keep(self, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let (v4, v6): (Vec<_>, Vec<_>) = addrs.into_iter().partition(SocketAddr::is_ipv4);
        match self {
            DnsFamily::All => v4.into_iter().chain(v6).collect(),
            DnsFamily::V4Only => v4,
            DnsFamily::V6Only => v6,
            DnsFamily::Auto if v6.is_empty() => v4,
            DnsFamily::Auto => v6,
            DnsFamily::V4Preferred if v4.is_empty() => v6,
            DnsFamily::V4Preferred => v4,
        }
    }
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbKind {
    /// Weighted round robin.
    RoundRobin,
    /// The least busy of a few random choices, or weights scaled down by
    /// active requests (see [`LeastRequest`]).
    LeastRequest,
    /// Uniformly random.
    Random,
    /// Consistent hashing on the route's hash policy.
    RingHash,
    /// Consistent hashing on the route's hash policy, by Envoy's Maglev
    /// table (a key reaches the endpoint an Envoy's table gives it).
    Maglev,
}

/// Envoy's default Maglev table size, and its bound.
const MAGLEV_TABLE_DEFAULT: u64 = 65_537;
const MAGLEV_TABLE_LIMIT: u64 = 5_000_011;

/// The Maglev table's size (`maglev_lb_config.table_size`): a prime, at
/// most 5,000,011, 65,537 unless set.
fn maglev_table_size(c: &Cluster, at: &str) -> Result<u64, ConfigError> {
    use portico_proto::envoy::config::cluster::v3::cluster::LbConfig;
    let size = match &c.lb_config {
        Some(LbConfig::MaglevLbConfig(m)) => m
            .table_size
            .as_ref()
            .map_or(MAGLEV_TABLE_DEFAULT, |v| v.value),
        _ => MAGLEV_TABLE_DEFAULT,
    };
    let prime = size >= 2
        && (2..)
            .take_while(|d: &u64| d * d <= size)
            .all(|d| size % d != 0);
    if size > MAGLEV_TABLE_LIMIT || !prime {
        return Err(ConfigError::new(
            at,
            format!(
                "maglev_lb_config.table_size {size} is not a prime of at most {MAGLEV_TABLE_LIMIT}"
            ),
        ));
    }
    Ok(size)
}

/// Envoy's `least_request_lb_config`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeastRequest {
    /// With equal weights, endpoints drawn at random per pick, of which
    /// the one with the fewest active requests is taken (`choice_count`,
    /// 2 unless set).
    pub choice_count: u32,
    /// With unequal weights, each endpoint's share is its weight over
    /// (active requests + 1) to this power (`active_request_bias`, 1.0
    /// unless set; 0 is plain weighted round robin).
    pub active_request_bias: f64,
}

impl Default for LeastRequest {
    fn default() -> Self {
        LeastRequest {
            choice_count: 2,
            active_request_bias: 1.0,
        }
    }
}

/// Envoy's `slow_start_config` (round robin and least request): an
/// endpoint added to a cluster (or found healthy again by its active
/// health check) takes a share that grows over `window`: its weight times
/// `max(min_weight, (elapsed / window) ^ (1 / aggression))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    /// `slow_start_window`.
    pub window: Duration,
    /// `aggression` (1.0: a linear ramp).
    pub aggression: f64,
    /// `min_weight_percent` as a fraction (0.1 unless set).
    pub min_weight: f64,
}

impl SlowStart {
    /// The factor on the weight of an endpoint `elapsed_ms` into its slow
    /// start.
    pub fn factor(&self, elapsed_ms: u64) -> f64 {
        let window = self.window.as_millis() as f64;
        if elapsed_ms as f64 >= window {
            return 1.0;
        }
        let t = elapsed_ms.max(1) as f64 / window;
        let ramp = if self.aggression == 1.0 {
            t
        } else {
            t.powf(1.0 / self.aggression)
        };
        ramp.max(self.min_weight)
    }

    fn convert(
        c: &portico_proto::envoy::config::cluster::v3::cluster::SlowStartConfig,
        at: &str,
    ) -> Result<Option<Self>, ConfigError> {
        let window = c
            .slow_start_window
            .as_ref()
            .map(duration)
            .unwrap_or_default();
        if window.is_zero() {
            return Ok(None);
        }
        let aggression = c.aggression.as_ref().map_or(1.0, |a| a.default_value);
        if !(aggression > 0.0 && aggression.is_finite()) {
            return Err(ConfigError::new(
                at,
                format!("slow_start_config.aggression {aggression} must be above 0"),
            ));
        }
        let min = c.min_weight_percent.as_ref().map_or(10.0, |p| p.value);
        if !(0.0..=100.0).contains(&min) {
            return Err(ConfigError::new(
                at,
                format!("slow_start_config.min_weight_percent {min} is not a percentage"),
            ));
        }
        Ok(Some(SlowStart {
            window,
            aggression,
            min_weight: min / 100.0,
        }))
    }
}

/// Envoy's `ring_hash_lb_config`: bounds on the ring's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSize {
    /// `minimum_ring_size`, 1024 unless set.
    pub min: u64,
    /// `maximum_ring_size`, 8M unless set.
    pub max: u64,
}

/// Envoy's upper bound on both ring sizes.
const RING_SIZE_LIMIT: u64 = 8 * 1024 * 1024;

impl Default for RingSize {
    fn default() -> Self {
        RingSize {
            min: 1024,
            max: RING_SIZE_LIMIT,
        }
    }
}

/// Circuit-breaker limits (default priority).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Open connections to the cluster (all its endpoints together).
    pub max_connections: u32,
    /// Open connections to any one endpoint (`per_host_thresholds`;
    /// unlimited unless set).
    pub max_host_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
    /// Instead of `max_retries`: retries in flight as a share of the
    /// requests in flight (`retry_budget`).
    pub retry_budget: Option<RetryBudget>,
}

/// Envoy's `retry_budget`: retries in flight may be up to `percent` of
/// the requests in flight, and at least `min_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// `budget_percent` (20 unless set).
    pub percent: f64,
    /// `min_retry_concurrency` (3 unless set).
    pub min_concurrency: u32,
}

impl Limits {
    /// Whether one more retry may start, with `retrying` retries and
    /// `active` requests in flight.
    pub fn may_retry(&self, retrying: u32, active: u32) -> bool {
        let max = match self.retry_budget {
            None => self.max_retries,
            Some(b) => ((f64::from(active) * b.percent / 100.0) as u32).max(b.min_concurrency),
        };
        retrying < max
    }
}

/// Active HTTP health checking.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// Path to GET.
    pub path: String,
    /// Endpoints added to the cluster stay out of play until their first
    /// check, even in panic (`common_lb_config.
    /// ignore_new_hosts_until_first_hc`).
    pub exclude_until_checked: bool,
    /// Host header (default: the cluster name).
    pub host: String,
    /// Time between checks of a healthy endpoint (`interval`).
    pub interval: Duration,
    /// Time between checks of an unhealthy endpoint
    /// (`unhealthy_interval`, `interval` unless set).
    pub unhealthy_interval: Duration,
    /// After a failed check of a healthy endpoint that did not yet make it
    /// unhealthy (`unhealthy_edge_interval`, `unhealthy_interval` unless
    /// set). Envoy's rule: the "edge" is the pending change, not the change.
    pub unhealthy_edge_interval: Duration,
    /// After a passed check of an unhealthy endpoint that did not yet make
    /// it healthy (`healthy_edge_interval`, `interval` unless set).
    pub healthy_edge_interval: Duration,
    /// Up to this much is added at random to every wait
    /// (`interval_jitter`)...
    pub interval_jitter: Duration,
    /// ...and up to this percentage of the wait (`interval_jitter_percent`).
    pub interval_jitter_percent: u32,
    /// The first check of each endpoint waits up to this long
    /// (`initial_jitter`).
    pub initial_jitter: Duration,
    /// Time allowed for an answer.
    pub timeout: Duration,
    /// Passes in a row to become healthy.
    pub healthy_threshold: u32,
    /// Failures in a row to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Statuses counted as passing, as [start, end) ranges.
    pub expected: Vec<(u16, u16)>,
    /// Other statuses count toward `unhealthy_threshold` only when in
    /// these ranges (`retriable_statuses`); any other makes the endpoint
    /// unhealthy at once, as in Envoy (failing to connect or to get an
    /// answer in time always counts toward the threshold).
    pub retriable: Vec<(u16, u16)>,
    /// The request's method (`method`, GET unless set).
    pub method: http::Method,
    /// Speak HTTP/2 (prior knowledge) to the endpoint
    /// (`codec_client_type: HTTP2`).
    pub http2: bool,
    /// Each check request's header edits (`request_headers_to_add` with
    /// fixed values, `request_headers_to_remove`).
    pub edits: super::route::Edits,
}

/// Passive outlier detection on consecutive errors.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Consecutive 5xx to eject.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors (502/503/504, connect failures) to eject.
    pub consecutive_gateway: u32,
    /// The chance, in percent, that a detection on consecutive 5xx
    /// ejects (`enforcing_consecutive_5xx`, 100).
    pub enforce_5xx: u32,
    /// The same for consecutive gateway errors
    /// (`enforcing_consecutive_gateway_failure`, 0: `consecutive_gateway`
    /// is then 0).
    pub enforce_gateway: u32,
    /// First ejection length; multiplied by the number of ejections.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most endpoints ejected at once, in percent.
    pub max_ejection_percent: u32,
    /// How often success rates are judged and ejection backoffs decay
    /// (`interval`, 10 s).
    pub interval: Duration,
    /// Success-rate ejection (on unless `enforcing_success_rate` is 0).
    pub success_rate: Option<SuccessRateEjection>,
    /// Failure-percentage ejection (on when `enforcing_failure_percentage`
    /// is above 0).
    pub failure_percentage: Option<FailurePercentageEjection>,
    /// `always_eject_one_host`: one endpoint may be ejected whatever
    /// `max_ejection_percent` allows (off by default, as in Envoy: with
    /// the default 10%, a cluster of fewer than ten endpoints then ejects
    /// none).
    pub always_eject_one: bool,
    /// `max_ejection_time_jitter`: up to this much more on each ejection,
    /// at random, so that proxies do not all bring an endpoint back at once.
    pub ejection_jitter: Duration,
    /// `successful_active_health_check_uneject_host` (on by default): an
    /// ejected endpoint whose active health check finds it healthy is
    /// brought back.
    pub health_check_unejects: bool,
    /// `split_external_local_origin_errors`: failures to connect, resets
    /// and timeouts are judged apart from the answers of the upstream;
    /// `None` counts them as 503/504 answers.
    pub local_origin: Option<LocalOriginEjection>,
}

/// Envoy's outlier detection of local-origin failures (connect failures,
/// resets, timeouts), when split from the answers of the upstream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalOriginEjection {
    /// `consecutive_local_origin_failure` (5).
    pub consecutive: u32,
    /// `enforcing_consecutive_local_origin_failure` (100), in percent.
    pub enforce_consecutive: u32,
    /// Success-rate ejection over local-origin results (a connection that
    /// carried an answer succeeded), enforced with
    /// `enforcing_local_origin_success_rate` (100).
    pub success_rate: Option<SuccessRateEjection>,
    /// Failure-percentage ejection over them, enforced with
    /// `enforcing_failure_percentage_local_origin` (0: off).
    pub failure_percentage: Option<FailurePercentageEjection>,
}

/// Envoy's success-rate outlier ejection: over each interval, among the
/// endpoints that served at least `request_volume` requests (and only
/// when at least `minimum_hosts` did), those whose success rate is below
/// the mean less `stdev_factor` standard deviations are ejected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuccessRateEjection {
    /// `success_rate_minimum_hosts` (5).
    pub minimum_hosts: u32,
    /// `success_rate_request_volume` (100).
    pub request_volume: u32,
    /// `success_rate_stdev_factor` ÷ 1000 (1.9).
    pub stdev_factor: f64,
    /// The chance, in percent, that a detection ejects
    /// (`enforcing_success_rate`, 100).
    pub enforcing: u32,
}

/// Envoy's failure-percentage outlier ejection: endpoints whose share of
/// failures over an interval reaches `threshold` percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailurePercentageEjection {
    /// `failure_percentage_threshold` (85).
    pub threshold: u32,
    /// `failure_percentage_minimum_hosts` (5).
    pub minimum_hosts: u32,
    /// `failure_percentage_request_volume` (50).
    pub request_volume: u32,
    /// The chance, in percent, that a detection ejects
    /// (`enforcing_failure_percentage`).
    pub enforcing: u32,
}

/// A converted cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Resource name.
    pub name: Arc<str>,
    /// Endpoint source.
    pub discovery: Discovery,
    /// Load balancing.
    pub lb: LbKind,
    /// Least request's settings (used when `lb` is `LeastRequest`).
    pub least_request: LeastRequest,
    /// The ring's size bounds (used when `lb` is `RingHash`).
    pub ring_size: RingSize,
    /// The Maglev table's size (used when `lb` is `Maglev`).
    pub maglev_table: u64,
    /// Slow start (round robin and least request only).
    pub slow_start: Option<SlowStart>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Speak HTTP/2 (prior knowledge) upstream.
    pub http2: bool,
    /// Streams per HTTP/2 connection before another is opened.
    pub max_concurrent_streams: u32,
    /// An HTTP/1.1 upstream's settings.
    pub h1: H1Client,
    /// The rest of an HTTP/2 upstream's settings.
    pub h2: H2Client,
    /// Requests (HTTP/2: streams) per connection, after which it takes
    /// no more and closes once its last ends (None: unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// Circuit breakers.
    pub limits: Limits,
    /// Active health checks.
    pub health_check: Option<HealthCheckConfig>,
    /// Outlier detection.
    pub outlier: Option<OutlierConfig>,
    /// Idle upstream connections are closed after this.
    pub idle_timeout: Duration,
    /// Upstream connections take no new request after being open this
    /// long (`common_http_protocol_options.max_connection_duration`).
    pub max_connection_age: Option<Duration>,
    /// How long one upstream stream (a try) may last, answer included
    /// (`common_http_protocol_options.max_stream_duration`; `None` unset
    /// or 0): then it is reset, retried as a reset, else answered 504
    /// (408 while the request is still coming), as Envoy's router does.
    pub max_stream_duration: Option<Duration>,
    /// What an answer head may hold.
    pub answer_head: AnswerHead,
    /// The address upstream connections are made from
    /// (`upstream_bind_config.source_address`; the system's choice unless
    /// set).
    pub source_address: Option<SocketAddr>,
    /// An endpoint the control plane removes goes at once, whatever its
    /// health checks say (`ignore_health_on_host_removal`); otherwise, in
    /// a health-checked cluster, one that passes its checks stays until it
    /// fails one (Envoy's default).
    pub ignore_health_on_removal: bool,
    /// When endpoints are added or removed, the connections to the others
    /// are drained: idle ones closed, busy ones not reused
    /// (`common_lb_config.close_connections_on_host_set_change`).
    pub drain_on_host_change: bool,
    /// TCP keep-alive on upstream connections
    /// (`upstream_connection_options.tcp_keepalive`; off unless set).
    pub keepalive: Option<super::Keepalive>,
    /// The order in which an endpoint's addresses are tried
    /// (`upstream_connection_options.happy_eyeballs_config`).
    pub family_order: FamilyOrder,
    /// Below this share of available endpoints (per cent), every endpoint
    /// takes traffic, available or not (Envoy's panic mode,
    /// Localities are picked by their weights first
    /// (`common_lb_config.locality_weighted_lb_config`); otherwise their
    /// weights do not count.
    pub locality_weighted: bool,
    /// `common_lb_config.healthy_panic_threshold`, 50 unless set; 0 turns
    /// it off).
    pub panic_threshold: f64,
    /// A hash ring places endpoints by their host names, not their
    /// addresses (`common_lb_config.consistent_hashing_lb_config.
    /// use_hostname_for_hashing`; an endpoint without one keeps its
    /// address).
    pub hash_by_hostname: bool,
    /// Consistent hashing with bounded loads: no endpoint takes more than
    /// this per cent of its share of the requests in flight
    /// (`consistent_hashing_lb_config.hash_balance_factor`, 100 or more;
    /// None: unbounded).
    pub hash_balance_factor: Option<u32>,
}

/// One endpoint from a load assignment or a static cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    /// Its address.
    pub addr: SocketAddr,
    /// Its own weight.
    pub weight: u32,
    /// Health as the control plane reported it.
    pub health: HealthStatus,
    /// Which of the assignment's localities it is in.
    pub locality: u32,
    /// That locality's weight (0 when unset), which counts only in a
    /// cluster with `locality_weighted_lb_config`.
    pub locality_weight: u32,
    /// Its locality's priority: 0 takes the traffic while it is healthy
    /// enough, then 1, and so on (Envoy's priority levels).
    pub priority: u32,
    /// Its host name (the endpoint's `hostname`, or a DNS cluster's name
    /// resolved): what `auto_host_rewrite` sets the Host to.
    pub hostname: Option<Arc<str>>,
    /// What a hash ring places it by instead of its address (Envoy's
    /// `envoy.lb` metadata `hash_key`).
    pub hash_key: Option<Arc<str>>,
    /// Its own health-check settings (`health_check_config`).
    pub check: Option<Arc<EndpointCheck>>,
    /// More addresses of the same endpoint (`additional_addresses`, in
    /// order of preference): connections try them too, Envoy's happy
    /// eyeballs way.
    pub also: Arc<[SocketAddr]>,
}

/// An endpoint's own health-check settings (Envoy's
/// `Endpoint.health_check_config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointCheck {
    /// Checked at this address instead of its own (`address`).
    pub address: Option<SocketAddr>,
    /// Or at its own IP on this port (`port_value`).
    pub port: Option<u16>,
    /// The checks' Host, over the cluster's (`hostname`).
    pub host: Option<String>,
    /// Not checked at all: healthy as far as checks go
    /// (`disable_active_health_check`).
    pub disabled: bool,
}

impl EndpointCheck {
    /// Where an endpoint at `addr` is checked: its check address, else
    /// its own, on the check port when there is one (Envoy's).
    pub fn target(&self, addr: SocketAddr) -> SocketAddr {
        let base = self.address.unwrap_or(addr);
        SocketAddr::new(base.ip(), self.port.unwrap_or(base.port()))
    }
}

/// An endpoint's `health_check_config`, when it says anything.
fn endpoint_check(
    ep: &portico_proto::envoy::config::endpoint::v3::Endpoint,
    at: &str,
) -> Result<Option<Arc<EndpointCheck>>, ConfigError> {
    let Some(h) = &ep.health_check_config else {
        return Ok(None);
    };
    let at = format!("{at} health_check_config");
    let port = match h.port_value {
        0 => None,
        p => Some(
            u16::try_from(p)
                .map_err(|_| ConfigError::new(&at, format!("port_value {p} is out of range")))?,
        ),
    };
    let address = h
        .address
        .as_ref()
        .map(|a| super::socket_addr(Some(a), &format!("{at}.address")))
        .transpose()?;
    // It goes in a Host header, or an HTTP/2 check's authority.
    if !h.hostname.is_empty() && h.hostname.parse::<http::uri::Authority>().is_err() {
        return Err(ConfigError::new(
            &at,
            format!("hostname {:?} is not a host name", h.hostname),
        ));
    }
    let check = EndpointCheck {
        address,
        port,
        host: (!h.hostname.is_empty()).then(|| h.hostname.clone()),
        disabled: h.disable_active_health_check,
    };
    let said =
        check.address.is_some() || check.port.is_some() || check.host.is_some() || check.disabled;
    Ok(said.then(|| Arc::new(check)))
}

/// An endpoint's `envoy.lb` metadata `hash_key` (as Envoy, a value that is
/// not a non-empty string is ignored).
fn hash_key(e: &portico_proto::envoy::config::endpoint::v3::LbEndpoint) -> Option<Arc<str>> {
    use portico_proto::google::protobuf::value::Kind;
    let v = e
        .metadata
        .as_ref()?
        .filter_metadata
        .get("envoy.lb")?
        .fields
        .get("hash_key")?;
    match &v.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.as_str().into()),
        _ => None,
    }
}

/// An endpoint's `hostname`, when it has one.
fn hostname(ep: &portico_proto::envoy::config::endpoint::v3::Endpoint) -> Option<Arc<str>> {
    (!ep.hostname.is_empty()).then(|| ep.hostname.as_str().into())
}

#[cfg(test)]
impl EndpointSpec {
    /// A test endpoint at `addr`: weight 1, health unknown, the first
    /// locality (of weight 1), priority 0.
    pub fn at(addr: impl Into<SocketAddr>) -> Self {
        EndpointSpec {
            addr: addr.into(),
            weight: 1,
            health: HealthStatus::Unknown,
            locality: 0,
            locality_weight: 1,
            priority: 0,
            hostname: None,
            hash_key: None,
            check: None,
            also: Arc::new([]),
        }
    }
}

/// A load assignment: endpoints in ascending priority, and its policy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assignment {
    /// The endpoints, those of priority 0 first.
    pub endpoints: Vec<EndpointSpec>,
    /// How traffic spills between priorities, and how much is dropped.
    pub policy: LoadPolicy,
    /// `policy.endpoint_stale_after`: unless another assignment of the
    /// same name arrives within this, the endpoints are dropped (Envoy's
    /// stale assignment; the cluster then has none until one comes).
    pub stale_after: Option<Duration>,
}

/// A load assignment's `policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadPolicy {
    /// `overprovisioning_factor` in percent (140 unless set): a priority
    /// level counts as wholly healthy while its healthy share times this
    /// is at least 100%.
    pub overprovisioning: u32,
    /// `weighted_priority_health`: a level's health by endpoint weights
    /// rather than endpoint counts.
    pub weighted_health: bool,
    /// The share of requests `drop_overloads` drops, per million (each
    /// category applies to what the ones before it let through).
    pub drop_per_million: u32,
}

impl Default for LoadPolicy {
    fn default() -> Self {
        LoadPolicy {
            overprovisioning: 140,
            weighted_health: false,
            drop_per_million: 0,
        }
    }
}

impl LoadPolicy {
    /// Converts a load assignment's policy; errors name the place.
    fn convert(cla: &ClusterLoadAssignment, at: &str) -> Result<Self, ConfigError> {
        let Some(p) = &cla.policy else {
            return Ok(LoadPolicy::default());
        };
        let mut kept = 1.0f64;
        for (i, d) in p.drop_overloads.iter().enumerate() {
            let dat = format!("{at} policy.drop_overloads[{i}]");
            if d.category.is_empty() {
                return Err(ConfigError::new(&dat, "a drop category needs a name"));
            }
            if let Some(f) = &d.drop_percentage {
                let (n, den) = super::route::fractional_percent(f, "drop_percentage", &dat)?;
                kept *= 1.0 - n as f64 / den as f64;
            }
        }
        let overprovisioning = p.overprovisioning_factor.as_ref().map_or(140, |v| v.value);
        if overprovisioning == 0 {
            // Every level would score 0 and take nothing in turn.
            return Err(ConfigError::new(
                &format!("{at} policy.overprovisioning_factor"),
                "must be above 0",
            ));
        }
        Ok(LoadPolicy {
            overprovisioning,
            weighted_health: p.weighted_priority_health,
            drop_per_million: ((1.0 - kept) * 1_000_000.0).round() as u32,
        })
    }
}

/// The policy settings of `lb_config` (a policy's settings that do not
/// match `lb_policy` are ignored, as in Envoy).
fn lb_settings(
    c: &Cluster,
    lb: LbKind,
    at: &str,
) -> Result<(LeastRequest, RingSize, Option<SlowStart>), ConfigError> {
    use portico_proto::envoy::config::cluster::v3::cluster::LbConfig;
    let mut least = LeastRequest::default();
    let mut ring = RingSize::default();
    let mut slow = None;
    match &c.lb_config {
        Some(LbConfig::RoundRobinLbConfig(r)) if lb == LbKind::RoundRobin => {
            if let Some(s) = &r.slow_start_config {
                slow = SlowStart::convert(s, at)?;
            }
        }
        Some(LbConfig::LeastRequestLbConfig(l)) if lb == LbKind::LeastRequest => {
            if let Some(n) = &l.choice_count {
                if n.value < 2 {
                    return Err(ConfigError::new(
                        at,
                        format!(
                            "least_request_lb_config.choice_count {} is below 2",
                            n.value
                        ),
                    ));
                }
                least.choice_count = n.value;
            }
            if let Some(b) = &l.active_request_bias {
                let v = b.default_value;
                if v >= 0.0 {
                    least.active_request_bias = v;
                } else {
                    // Envoy's handling: a warning, and the default.
                    tracing::warn!(
                        cluster = %c.name,
                        bias = v,
                        "least_request_lb_config.active_request_bias is below 0 or not a number; using 1.0"
                    );
                }
            }
            if let Some(s) = &l.slow_start_config {
                slow = SlowStart::convert(s, at)?;
            }
        }
        Some(LbConfig::RingHashLbConfig(r)) if lb == LbKind::RingHash => {
            // Another hash puts every key elsewhere than the Envoys beside
            // this proxy would.
            if r.hash_function != 0 {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "ring_hash_lb_config.hash_function {} is not supported (only XX_HASH)",
                        r.hash_function
                    ),
                ));
            }
            ring.min = r.minimum_ring_size.as_ref().map_or(ring.min, |v| v.value);
            ring.max = r.maximum_ring_size.as_ref().map_or(ring.max, |v| v.value);
            for (name, v) in [
                ("minimum_ring_size", ring.min),
                ("maximum_ring_size", ring.max),
            ] {
                if v > RING_SIZE_LIMIT {
                    return Err(ConfigError::new(
                        at,
                        format!("ring_hash_lb_config.{name} {v} is above {RING_SIZE_LIMIT}"),
                    ));
                }
            }
            if ring.min == 0 {
                // An empty ring: every request would fail (Envoy builds
                // it, and answers 503).
                return Err(ConfigError::new(
                    at,
                    "ring_hash_lb_config.minimum_ring_size 0 makes an empty ring",
                ));
            }
            if ring.min > ring.max {
                return Err(ConfigError::new(
                    at,
                    format!(
                        "ring_hash_lb_config.minimum_ring_size {} is above maximum_ring_size {}",
                        ring.min, ring.max
                    ),
                ));
            }
        }
        _ => {}
    }
    Ok((least, ring, slow))
}

/// A health check's `method` (GET unless set; CONNECT is refused, as in
/// Envoy).
fn health_check_method(m: i32, at: &str) -> Result<http::Method, ConfigError> {
    use portico_proto::envoy::config::core::v3::RequestMethod as M;
    Ok(match M::try_from(m) {
        Ok(M::MethodUnspecified | M::Get) => http::Method::GET,
        Ok(M::Head) => http::Method::HEAD,
        Ok(M::Post) => http::Method::POST,
        Ok(M::Put) => http::Method::PUT,
        Ok(M::Delete) => http::Method::DELETE,
        Ok(M::Options) => http::Method::OPTIONS,
        Ok(M::Trace) => http::Method::TRACE,
        Ok(M::Patch) => http::Method::PATCH,
        Ok(M::Connect) | Err(_) => {
            return Err(ConfigError::new(
                at,
                format!("health check method {m} is not supported"),
            ))
        }
    })
}

/// Endpoints weighted as Envoy's locality-weighted balancing picks them:
/// a locality by its weight, then an endpoint in it by its own, so an
/// endpoint's share is its locality's share times its share of the
/// locality. Localities without a weight take no traffic.
pub fn locality_weighted(specs: &[EndpointSpec]) -> Vec<EndpointSpec> {
    let mut sums: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for s in specs {
        *sums.entry(s.locality).or_default() += u64::from(s.weight);
    }
    // Scaled so that small weights keep their proportions, then brought
    // back down by their common divisor (smaller totals balance more
    // evenly).
    // In u128: a locality weight and an endpoint weight are each up to
    // 2^32, and the scale on top of both.
    let scaled: Vec<u128> = specs
        .iter()
        .map(|s| {
            let sum = u128::from(sums[&s.locality].max(1));
            u128::from(s.locality_weight) * u128::from(s.weight) * 10_080 / sum
        })
        .collect();
    let gcd = scaled.iter().filter(|w| **w > 0).fold(0u128, |a, &b| {
        let (mut a, mut b) = (a, b);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    });
    // All brought down together until the largest fits, keeping ratios.
    let max = scaled.iter().max().copied().unwrap_or(0) / gcd.max(1);
    let shrink = max.div_ceil(u128::from(u32::MAX)).max(1);
    specs
        .iter()
        .zip(scaled)
        .filter(|(s, _)| s.locality_weight > 0)
        .map(|(s, w)| EndpointSpec {
            weight: u32::try_from((w / gcd.max(1) / shrink).max(1)).unwrap_or(u32::MAX),
            ..s.clone()
        })
        .collect()
}

impl ClusterConfig {
    /// Converts a Cluster; every error names the place.
    pub fn convert(c: &Cluster) -> Result<Self, ConfigError> {
        let at = format!("Cluster {:?}", c.name);
        let kind = match &c.cluster_discovery_type {
            None => DiscoveryType::Static,
            Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t)
                .map_err(|_| ConfigError::new(&at, format!("unknown discovery type {t}")))?,
            Some(ClusterDiscoveryType::ClusterType(t)) => {
                return Err(ConfigError::new(
                    &at,
                    format!("custom cluster type {:?} is not supported", t.name),
                ))
            }
        };
        let discovery = match kind {
            DiscoveryType::Eds => {
                let service = c
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.as_str())
                    .filter(|s| !s.is_empty())
                    .unwrap_or(&c.name);
                Discovery::Eds(service.into())
            }
            DiscoveryType::Static => {
                let cla = c.load_assignment.as_ref().ok_or_else(|| {
                    ConfigError::new(&at, "a STATIC cluster needs a load_assignment")
                })?;
                Discovery::Static(assignment(cla, &at)?)
            }
            DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
                let cla = c.load_assignment.as_ref().ok_or_else(|| {
                    ConfigError::new(&at, "a DNS cluster needs a load_assignment")
                })?;
                // Other resolvers could answer differently from the
                // system's, which is what is used here.
                if !c.dns_resolvers.is_empty()
                    || c.typed_dns_resolver_config.is_some()
                    || c.dns_resolution_config.is_some()
                {
                    return Err(ConfigError::new(
                        &at,
                        "DNS resolvers of its own (dns_resolvers, typed_dns_resolver_config, dns_resolution_config) are not supported",
                    ));
                }
                let mut v = Vec::new();
                for (li, l) in cla.endpoints.iter().enumerate() {
                    check_locality(l, &format!("{at} load_assignment.endpoints[{li}]"))?;
                    for (ei, e) in l.lb_endpoints.iter().enumerate() {
                        let eat =
                            format!("{at} load_assignment.endpoints[{li}].lb_endpoints[{ei}]");
                        let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                            return Err(ConfigError::new(&eat, "needs an endpoint"));
                        };
                        let (host, port) = host_port(ep.address.as_ref(), &eat)?;
                        if !ep.additional_addresses.is_empty() {
                            // Envoy takes them for STATIC and EDS only.
                            return Err(ConfigError::new(
                                &eat,
                                "additional_addresses are for STATIC and EDS clusters, not DNS ones",
                            ));
                        }
                        v.push(DnsHost {
                            check: endpoint_check(ep, &eat)?,
                            health: HealthStatus::try_from(e.health_status)
                                .unwrap_or(HealthStatus::Unknown),
                            hostname: hostname(ep).unwrap_or_else(|| host.as_str().into()),
                            hash_key: hash_key(e),
                            host,
                            port,
                            weight: e
                                .load_balancing_weight
                                .as_ref()
                                .map_or(1, |w| w.value.max(1)),
                            priority: l.priority,
                            locality: li as u32,
                            locality_weight: l
                                .load_balancing_weight
                                .as_ref()
                                .map_or(0, |w| w.value),
                        });
                    }
                }
                let logical = kind == DiscoveryType::LogicalDns;
                if logical && v.len() != 1 {
                    return Err(ConfigError::new(
                        &at,
                        format!(
                            "a LOGICAL_DNS cluster needs exactly one endpoint, got {}",
                            v.len()
                        ),
                    ));
                }
                #[allow(deprecated)]
                let family = match DnsLookupFamily::try_from(c.dns_lookup_family) {
                    Ok(DnsLookupFamily::Auto) => DnsFamily::Auto,
                    Ok(DnsLookupFamily::V4Only) => DnsFamily::V4Only,
                    Ok(DnsLookupFamily::V6Only) => DnsFamily::V6Only,
                    Ok(DnsLookupFamily::V4Preferred) => DnsFamily::V4Preferred,
                    Ok(DnsLookupFamily::All) => DnsFamily::All,
                    Err(_) => {
                        return Err(ConfigError::new(
                            &at,
                            format!("dns_lookup_family {} is not a family", c.dns_lookup_family),
                        ))
                    }
                };
                let policy = LoadPolicy::convert(cla, &format!("{at} load_assignment"))?;
                let failure_refresh = match &c.dns_failure_refresh_rate {
                    None => None,
                    Some(r) => {
                        let fat = format!("{at} dns_failure_refresh_rate");
                        let base = r
                            .base_interval
                            .as_ref()
                            .map(duration)
                            .filter(|d| !d.is_zero())
                            .ok_or_else(|| {
                                ConfigError::new(&fat, "base_interval must be set and > 0")
                            })?;
                        let max = r.max_interval.as_ref().map_or(base * 10, duration);
                        if max < base {
                            return Err(ConfigError::new(
                                &fat,
                                "max_interval must not be below base_interval",
                            ));
                        }
                        Some((base, max))
                    }
                };
                Discovery::Dns(DnsTargets {
                    hosts: v,
                    policy,
                    family,
                    logical,
                    refresh: c
                        .dns_refresh_rate
                        .as_ref()
                        .map(duration)
                        .filter(|d| !d.is_zero())
                        .unwrap_or(Duration::from_secs(5))
                        .max(Duration::from_millis(1)),
                    jitter: c.dns_jitter.as_ref().map_or(Duration::ZERO, duration),
                    failure_refresh,
                })
            }
            DiscoveryType::OriginalDst => {
                return Err(ConfigError::new(
                    &at,
                    "ORIGINAL_DST clusters are not supported",
                ))
            }
        };
        let lb = match LbPolicy::try_from(c.lb_policy) {
            Ok(LbPolicy::RoundRobin) => LbKind::RoundRobin,
            Ok(LbPolicy::LeastRequest) => LbKind::LeastRequest,
            Ok(LbPolicy::Random) => LbKind::Random,
            Ok(LbPolicy::RingHash) => LbKind::RingHash,
            Ok(LbPolicy::Maglev) => LbKind::Maglev,
            _ => {
                return Err(ConfigError::new(
                    &at,
                    format!("lb_policy {} is not supported", c.lb_policy),
                ))
            }
        };
        // Subset load balancing picks endpoints by metadata (and by default
        // fails requests no subset matches); balancing over all endpoints
        // instead would send traffic where the config says not to.
        if c.lb_subset_config.is_some() {
            return Err(ConfigError::new(
                &at,
                "lb_subset_config (subset load balancing) is not supported",
            ));
        }
        let (least_request, ring_size, slow_start) = lb_settings(c, lb, &at)?;
        let maglev_table = if lb == LbKind::Maglev {
            maglev_table_size(c, &at)?
        } else {
            MAGLEV_TABLE_DEFAULT
        };
        if c.load_balancing_policy.is_some() {
            return Err(ConfigError::new(
                &at,
                "load_balancing_policy (extension LB) is not supported; use lb_policy",
            ));
        }
        // Each would change how or to what the proxy speaks upstream.
        let refused = [
            (!c.filters.is_empty(), "upstream network filters (filters)"),
            (c.upstream_config.is_some(), "upstream_config"),
            (
                c.protocol_selection != 0,
                "protocol_selection USE_DOWNSTREAM_PROTOCOL",
            ),
            (
                c.connection_pool_per_downstream_connection,
                "connection_pool_per_downstream_connection",
            ),
        ];
        super::refuse(&at, &refused)?;
        if c.transport_socket.is_some()
            || !c.transport_socket_matches.is_empty()
            || c.transport_socket_matcher.is_some()
        {
            return Err(ConfigError::new(
                &at,
                "upstream TLS (transport_socket) is not supported yet",
            ));
        }
        let mut http2 = c.http2_protocol_options.is_some();
        let mut h2opts = c.http2_protocol_options.clone();
        // (The cluster's own field: deprecated, still read, as Envoy does.)
        #[allow(deprecated)]
        let mut h1opts = c.http_protocol_options.clone();
        let mut common = CommonOptions::of(c.common_http_protocol_options.as_ref());
        // Requests per connection: Envoy's current place (the protocol
        // options), else the cluster's deprecated field.
        common.max_requests = common
            .max_requests
            .or(c.max_requests_per_connection.as_ref().map(|v| v.value));
        for (k, any) in &c.typed_extension_protocol_options {
            if k != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
                return Err(ConfigError::new(
                    &at,
                    format!("protocol options {k:?} are not supported"),
                ));
            }
            let oat = format!("{at} typed_extension_protocol_options[{k:?}]");
            let o: HttpProtocolOptions = unpack(any, &oat)?;
            if let Some(f) = o.http_filters.first() {
                // Upstream HTTP filters would change what goes upstream.
                return Err(ConfigError::new(
                    &oat,
                    format!("upstream http_filters ({}) are not supported", f.name),
                ));
            }
            common = CommonOptions::of(o.common_http_protocol_options.as_ref()).over(common);
            match o.upstream_protocol_options {
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                    Some(ProtocolConfig::Http2ProtocolOptions(h)) => {
                        http2 = true;
                        h2opts = Some(h);
                    }
                    Some(ProtocolConfig::HttpProtocolOptions(h)) => {
                        http2 = false;
                        h1opts = Some(h);
                    }
                    None => http2 = false,
                    Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                        return Err(ConfigError::new(&at, "HTTP/3 upstreams are not supported"))
                    }
                },
                // Chosen by ALPN, which needs TLS: without it, HTTP/1.1
                // (Envoy's choice too).
                Some(UpstreamProtocolOptions::AutoConfig(a)) => {
                    if a.http3_protocol_options.is_some() {
                        return Err(ConfigError::new(&oat, "HTTP/3 upstreams are not supported"));
                    }
                    http2 = false;
                    if let Some(h) = a.http_protocol_options {
                        h1opts = Some(h);
                    }
                }
                Some(_) => {
                    return Err(ConfigError::new(
                        &oat,
                        "use_downstream_protocol_config is not supported; use explicit_http_config",
                    ))
                }
                None => {}
            }
        }
        let t = c.circuit_breakers.as_ref().and_then(|cb| {
            cb.thresholds
                .iter()
                .find(|t| t.priority == RoutingPriority::Default as i32)
        });
        let v = |x: Option<&portico_proto::google::protobuf::UInt32Value>, d: u32| {
            x.map_or(d, |v| v.value)
        };
        let per_host = c.circuit_breakers.as_ref().and_then(|cb| {
            cb.per_host_thresholds
                .iter()
                .find(|t| t.priority == RoutingPriority::Default as i32)
        });
        let limits = Limits {
            max_connections: v(t.and_then(|t| t.max_connections.as_ref()), 1024),
            max_host_connections: v(per_host.and_then(|t| t.max_connections.as_ref()), u32::MAX),
            max_pending: v(t.and_then(|t| t.max_pending_requests.as_ref()), 1024),
            max_requests: v(t.and_then(|t| t.max_requests.as_ref()), 1024),
            max_retries: v(t.and_then(|t| t.max_retries.as_ref()), 3),
            retry_budget: t
                .and_then(|t| t.retry_budget.as_ref())
                .map(|b| RetryBudget {
                    percent: b.budget_percent.as_ref().map_or(20.0, |p| p.value),
                    min_concurrency: b.min_retry_concurrency.as_ref().map_or(3, |m| m.value),
                }),
        };
        if t.and_then(|t| t.retry_budget.as_ref())
            .and_then(|b| b.budget_interval.as_ref())
            .is_some_and(|d| !duration(d).is_zero())
        {
            return Err(ConfigError::new(
                &at,
                "retry_budget.budget_interval is not supported",
            ));
        }
        if let Some(b) = limits.retry_budget {
            if !(0.0..=100.0).contains(&b.percent) {
                return Err(ConfigError::new(
                    &at,
                    format!(
                        "retry_budget.budget_percent {} is not a percentage",
                        b.percent
                    ),
                ));
            }
        }
        let health_check = match c.health_checks.as_slice() {
            [] => None,
            [hc] => {
                let hat = format!("{at} health_checks[0]");
                let Some(HealthChecker::HttpHealthCheck(h)) = &hc.health_checker else {
                    return Err(ConfigError::new(
                        &hat,
                        "only HTTP health checks are supported",
                    ));
                };
                let interval = hc
                    .interval
                    .as_ref()
                    .map(duration)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| ConfigError::new(&hat, "interval must be > 0"))?;
                // Optional intervals: when given, more than zero (Envoy's
                // validation rule).
                let optional = |d: &Option<portico_proto::google::protobuf::Duration>,
                                field: &str|
                 -> Result<Option<Duration>, ConfigError> {
                    match d.as_ref().map(duration) {
                        None => Ok(None),
                        Some(d) if d.is_zero() => Err(ConfigError::new(
                            &hat,
                            format!("{field} must be > 0 when set"),
                        )),
                        Some(d) => Ok(Some(d)),
                    }
                };
                let unhealthy_interval =
                    optional(&hc.unhealthy_interval, "unhealthy_interval")?.unwrap_or(interval);
                let timeout = hc
                    .timeout
                    .as_ref()
                    .map(duration)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| ConfigError::new(&hat, "timeout must be > 0"))?;
                if !h.path.starts_with('/') {
                    return Err(ConfigError::new(
                        &hat,
                        format!("path {:?} must start with '/'", h.path),
                    ));
                }
                // Not applied, on purpose (they change when and how a
                // check is made, not what passes): `no_traffic_interval`
                // (Envoy checks a cluster that never had traffic only
                // every 60 s by default; these check at the intervals
                // above from the start, so a dead endpoint is found before
                // a request is sent to it) and `reuse_connection` (each
                // check opens a connection of its own and closes it, so it
                // also proves that new connections can be made).
                //
                // Refused: each would change what passes a check if ignored.
                super::refuse(
                    &hat,
                    &[
                        (h.send.is_some(), "http_health_check.send"),
                        (!h.receive.is_empty(), "http_health_check.receive"),
                        (
                            h.service_name_matcher.is_some(),
                            "http_health_check.service_name_matcher",
                        ),
                    ],
                )?;
                let ranges =
                    |v: &[portico_proto::envoy::r#type::v3::Int64Range]| -> Vec<(u16, u16)> {
                        v.iter()
                            .map(|r| (r.start.clamp(100, 600) as u16, r.end.clamp(100, 600) as u16))
                            .collect()
                    };
                let host = if h.host.is_empty() {
                    c.name.clone()
                } else {
                    h.host.clone()
                };
                // The check request must be one that can be sent: over
                // HTTP/2 the host is the URI's authority.
                let uri = if h.codec_client_type == 1 {
                    format!("http://{host}{}", h.path)
                } else {
                    h.path.clone()
                };
                if uri.parse::<http::Uri>().is_err() || http::HeaderValue::from_str(&host).is_err()
                {
                    return Err(ConfigError::new(
                        &hat,
                        format!(
                            "the check's host {host:?} and path {:?} make no valid request (set http_health_check.host)",
                            h.path
                        ),
                    ));
                }
                let mut expected = ranges(&h.expected_statuses);
                if expected.is_empty() {
                    expected.push((200, 201));
                }
                Some(HealthCheckConfig {
                    exclude_until_checked: c
                        .common_lb_config
                        .as_ref()
                        .is_some_and(|l| l.ignore_new_hosts_until_first_hc),
                    path: h.path.clone(),
                    host,
                    interval,
                    unhealthy_interval,
                    unhealthy_edge_interval: optional(
                        &hc.unhealthy_edge_interval,
                        "unhealthy_edge_interval",
                    )?
                    .unwrap_or(unhealthy_interval),
                    healthy_edge_interval: optional(
                        &hc.healthy_edge_interval,
                        "healthy_edge_interval",
                    )?
                    .unwrap_or(interval),
                    interval_jitter: hc.interval_jitter.as_ref().map_or(Duration::ZERO, duration),
                    interval_jitter_percent: hc.interval_jitter_percent,
                    initial_jitter: hc.initial_jitter.as_ref().map_or(Duration::ZERO, duration),
                    timeout,
                    healthy_threshold: hc.healthy_threshold.as_ref().map_or(1, |v| v.value.max(1)),
                    unhealthy_threshold: hc
                        .unhealthy_threshold
                        .as_ref()
                        .map_or(1, |v| v.value.max(1)),
                    expected,
                    retriable: ranges(&h.retriable_statuses),
                    method: health_check_method(h.method, &hat)?,
                    http2: match h.codec_client_type {
                        0 => false,
                        1 => true,
                        n => {
                            return Err(ConfigError::new(
                                &hat,
                                format!("codec_client_type {n} is not supported (HTTP1 or HTTP2)"),
                            ))
                        }
                    },
                    edits: {
                        let e = super::route::Edits::convert(
                            &h.request_headers_to_add,
                            &h.request_headers_to_remove,
                            &[],
                            &[],
                            &hat,
                        )?;
                        // There is no request for them to read.
                        if e.formatted()[0] {
                            return Err(ConfigError::new(
                                &hat,
                                "command operators are not supported in health check headers",
                            ));
                        }
                        e
                    },
                })
            }
            _ => {
                return Err(ConfigError::new(
                    &at,
                    "only one health check per cluster is supported",
                ))
            }
        };
        // Not applied: `detect_degraded_hosts` (only the control plane
        // makes an endpoint degraded here; one answering
        // `x-envoy-degraded` keeps its share).
        if let Some(o) = &c.outlier_detection {
            if !o.monitors.is_empty() {
                return Err(ConfigError::new(
                    &at,
                    "outlier_detection.monitors are not supported",
                ));
            }
            // Envoy's check: a longest ejection shorter than the first.
            if let (Some(b), Some(m)) = (&o.base_ejection_time, &o.max_ejection_time) {
                let (b, m) = (duration(b), duration(m));
                if m < b {
                    return Err(ConfigError::new(
                        &at,
                        format!(
                            "outlier_detection.max_ejection_time {m:?} is below base_ejection_time {b:?}"
                        ),
                    ));
                }
            }
        }
        let outlier = c.outlier_detection.as_ref().map(|o| {
            // Each detection by rate is on while its enforcement is above 0.
            let success_rate = |enforcing: u32| {
                (enforcing > 0).then(|| SuccessRateEjection {
                    minimum_hosts: v(o.success_rate_minimum_hosts.as_ref(), 5),
                    request_volume: v(o.success_rate_request_volume.as_ref(), 100),
                    stdev_factor: f64::from(v(o.success_rate_stdev_factor.as_ref(), 1900)) / 1000.0,
                    enforcing: enforcing.min(100),
                })
            };
            let failure_percentage = |enforcing: u32| {
                (enforcing > 0).then(|| FailurePercentageEjection {
                    threshold: v(o.failure_percentage_threshold.as_ref(), 85).min(100),
                    minimum_hosts: v(o.failure_percentage_minimum_hosts.as_ref(), 5),
                    request_volume: v(o.failure_percentage_request_volume.as_ref(), 50),
                    enforcing: enforcing.min(100),
                })
            };
            let base = o
                .base_ejection_time
                .as_ref()
                .map(duration)
                .unwrap_or(Duration::from_secs(30));
            OutlierConfig {
                consecutive_5xx: if o
                    .enforcing_consecutive_5xx
                    .as_ref()
                    .is_some_and(|v| v.value == 0)
                {
                    0
                } else {
                    v(o.consecutive_5xx.as_ref(), 5)
                },
                consecutive_gateway: if o
                    .enforcing_consecutive_gateway_failure
                    .as_ref()
                    .is_some_and(|v| v.value > 0)
                {
                    v(o.consecutive_gateway_failure.as_ref(), 5)
                } else {
                    0
                },
                enforce_5xx: v(o.enforcing_consecutive_5xx.as_ref(), 100).min(100),
                enforce_gateway: v(o.enforcing_consecutive_gateway_failure.as_ref(), 0).min(100),
                base_ejection: base,
                max_ejection: o
                    .max_ejection_time
                    .as_ref()
                    .map(duration)
                    .unwrap_or(Duration::from_secs(300))
                    .max(base),
                max_ejection_percent: v(o.max_ejection_percent.as_ref(), 10).min(100),
                interval: o
                    .interval
                    .as_ref()
                    .map(duration)
                    .filter(|d| !d.is_zero())
                    .unwrap_or(Duration::from_secs(10)),
                success_rate: success_rate(v(o.enforcing_success_rate.as_ref(), 100)),
                failure_percentage: failure_percentage(v(
                    o.enforcing_failure_percentage.as_ref(),
                    0,
                )),
                always_eject_one: o.always_eject_one_host.as_ref().is_some_and(|b| b.value),
                ejection_jitter: o
                    .max_ejection_time_jitter
                    .as_ref()
                    .map(duration)
                    .unwrap_or_default(),
                health_check_unejects: o
                    .successful_active_health_check_uneject_host
                    .as_ref()
                    .is_none_or(|b| b.value),
                local_origin: o
                    .split_external_local_origin_errors
                    .then(|| LocalOriginEjection {
                        consecutive: v(o.consecutive_local_origin_failure.as_ref(), 5),
                        enforce_consecutive: v(
                            o.enforcing_consecutive_local_origin_failure.as_ref(),
                            100,
                        )
                        .min(100),
                        success_rate: success_rate(v(
                            o.enforcing_local_origin_success_rate.as_ref(),
                            100,
                        )),
                        failure_percentage: failure_percentage(v(
                            o.enforcing_failure_percentage_local_origin.as_ref(),
                            0,
                        )),
                    }),
            }
        });
        let panic_threshold = match c
            .common_lb_config
            .as_ref()
            .and_then(|l| l.healthy_panic_threshold.as_ref())
        {
            None => 50.0,
            Some(p) if (0.0..=100.0).contains(&p.value) => p.value,
            Some(p) => {
                return Err(ConfigError::new(
                    &at,
                    format!(
                        "common_lb_config.healthy_panic_threshold {} is not a percentage",
                        p.value
                    ),
                ))
            }
        };
        let consistent = c
            .common_lb_config
            .as_ref()
            .and_then(|l| l.consistent_hashing_lb_config.as_ref());
        let hash_balance_factor = match consistent.and_then(|h| h.hash_balance_factor.as_ref()) {
            None => None,
            Some(f) if f.value >= 100 => Some(f.value),
            Some(f) => {
                return Err(ConfigError::new(
                    &at,
                    format!(
                        "common_lb_config.consistent_hashing_lb_config.hash_balance_factor {} is below 100",
                        f.value
                    ),
                ))
            }
        };
        let source_address = (|| match &c.upstream_bind_config {
            None => Ok(None),
            Some(b) => {
                let bat = format!("{at} upstream_bind_config");
                super::refuse(
                    &bat,
                    &[
                        (b.freebind.as_ref().is_some_and(|f| f.value), "freebind"),
                        (!b.socket_options.is_empty(), "socket_options"),
                        (
                            !b.extra_source_addresses.is_empty()
                                || !b.additional_source_addresses.is_empty(),
                            "extra_source_addresses",
                        ),
                        (b.local_address_selector.is_some(), "local_address_selector"),
                    ],
                )?;
                // Without one, the system chooses (as Envoy's).
                let Some(sa) = &b.source_address else {
                    return Ok(None);
                };
                let ip: std::net::IpAddr = sa.address.parse().map_err(|_| {
                    ConfigError::new(
                        &bat,
                        format!("source_address {:?} is not an IP address", sa.address),
                    )
                })?;
                let port = match sa.port_specifier {
                    None => 0,
                    Some(portico_proto::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => {
                        u16::try_from(p).map_err(|_| {
                            ConfigError::new(&bat, format!("source port {p} is out of range"))
                        })?
                    }
                    Some(_) => {
                        return Err(ConfigError::new(&bat, "named source ports are not supported"))
                    }
                };
                Ok(Some(SocketAddr::new(ip, port)))
            }
        })()?;
        let (keepalive, family_order) = match &c.upstream_connection_options {
            None => (None, FamilyOrder::default()),
            Some(o) => {
                let oat = format!("{at} upstream_connection_options");
                let keepalive = match &o.tcp_keepalive {
                    None => None,
                    Some(k) => super::Keepalive::convert(k, &oat)?,
                };
                (
                    keepalive,
                    FamilyOrder::convert(o.happy_eyeballs_config.as_ref(), &oat)?,
                )
            }
        };
        // Kept in 16 bits: a limit over 65,535 fields is taken as 65,535.
        let fields = match common.max_headers {
            None => 100,
            Some(0) => {
                return Err(ConfigError::new(
                    &at,
                    "common_http_protocol_options.max_headers_count must be at least 1",
                ))
            }
            Some(n) => u16::try_from(n).unwrap_or(u16::MAX),
        };
        let kib = match common.max_head_kib {
            None => None,
            Some(n @ 1..=8192) => std::num::NonZeroU16::new(n as u16),
            Some(n) => {
                return Err(ConfigError::new(
                    &at,
                    format!(
                    "common_http_protocol_options.max_response_headers_kb {n} is not between 1 and 8192"
                ),
                ))
            }
        };
        let answer_head = AnswerHead { fields, kib };
        Ok(ClusterConfig {
            ignore_health_on_removal: c.ignore_health_on_host_removal,
            drain_on_host_change: c
                .common_lb_config
                .as_ref()
                .is_some_and(|l| l.close_connections_on_host_set_change),
            source_address,
            keepalive,
            family_order,
            panic_threshold,
            hash_by_hostname: consistent.is_some_and(|h| h.use_hostname_for_hashing),
            hash_balance_factor,
            locality_weighted: c.common_lb_config.as_ref().is_some_and(|l| {
                matches!(
                    l.locality_config_specifier,
                    Some(portico_proto::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
                )
            }),
            name: c.name.as_str().into(),
            discovery,
            lb,
            least_request,
            ring_size,
            maglev_table,
            slow_start,
            connect_timeout: c
                .connect_timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_secs(5)),
            http2,
            max_concurrent_streams: h2opts
                .as_ref()
                .and_then(|o| o.max_concurrent_streams)
                .map_or(100, |v| v.value.clamp(1, 2_147_483_647)),
            h1: h1opts
                .as_ref()
                .map(|o| H1Client::convert(o, &format!("{at} http_protocol_options")))
                .transpose()?
                .unwrap_or_default(),
            h2: h2opts
                .as_ref()
                .map(|o| H2Client::convert(o, &format!("{at} http2_protocol_options")))
                .transpose()?
                .unwrap_or_default(),
            max_requests_per_connection: common.max_requests.filter(|v| *v > 0),
            limits,
            health_check,
            outlier,
            idle_timeout: common
                .idle
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_secs(60)),
            max_connection_age: common.max_age.filter(|d| !d.is_zero()),
            max_stream_duration: common.max_stream.filter(|d| !d.is_zero()),
            answer_head,
        })
    }
}

/// What the common HTTP protocol options say of upstream connections.
#[derive(Debug, Clone, Copy, Default)]
struct CommonOptions {
    /// `idle_timeout`.
    idle: Option<Duration>,
    /// `max_connection_duration`.
    max_age: Option<Duration>,
    /// `max_requests_per_connection`.
    max_requests: Option<u32>,
    /// `max_stream_duration`.
    max_stream: Option<Duration>,
    /// `max_headers_count`.
    max_headers: Option<u32>,
    /// `max_response_headers_kb`.
    max_head_kib: Option<u32>,
}

impl CommonOptions {
    fn of(o: Option<&portico_proto::envoy::config::core::v3::HttpProtocolOptions>) -> Self {
        o.map_or_else(Self::default, |o| CommonOptions {
            idle: o.idle_timeout.as_ref().map(duration),
            max_age: o.max_connection_duration.as_ref().map(duration),
            max_requests: o.max_requests_per_connection.as_ref().map(|v| v.value),
            max_stream: o.max_stream_duration.as_ref().map(duration),
            max_headers: o.max_headers_count.as_ref().map(|v| v.value),
            max_head_kib: o.max_response_headers_kb.as_ref().map(|v| v.value),
        })
    }

    /// These, each falling back to `earlier`'s where unset.
    fn over(self, earlier: Self) -> Self {
        CommonOptions {
            idle: self.idle.or(earlier.idle),
            max_age: self.max_age.or(earlier.max_age),
            max_requests: self.max_requests.or(earlier.max_requests),
            max_stream: self.max_stream.or(earlier.max_stream),
            max_headers: self.max_headers.or(earlier.max_headers),
            max_head_kib: self.max_head_kib.or(earlier.max_head_kib),
        }
    }
}

/// What a locality may not say: a priority above Envoy's bound of 128, or
/// endpoints to be found elsewhere (LEDS, or the deprecated list).
fn check_locality(
    l: &portico_proto::envoy::config::endpoint::v3::LocalityLbEndpoints,
    at: &str,
) -> Result<(), ConfigError> {
    if l.priority > 128 {
        return Err(ConfigError::new(
            at,
            format!("priority {} is above 128", l.priority),
        ));
    }
    if l.lb_config.is_some() {
        return Err(ConfigError::new(
            at,
            "lb_config (LEDS endpoints) is not supported; list lb_endpoints",
        ));
    }
    Ok(())
}

/// A load assignment's endpoints (IP addresses only), in ascending
/// priority, and its policy.
pub fn assignment(cla: &ClusterLoadAssignment, at: &str) -> Result<Assignment, ConfigError> {
    let mut v = Vec::new();
    for (li, l) in cla.endpoints.iter().enumerate() {
        check_locality(l, &format!("{at} endpoints[{li}]"))?;
        let lw = l.load_balancing_weight.as_ref().map_or(0, |w| w.value);
        for (ei, e) in l.lb_endpoints.iter().enumerate() {
            let eat = format!("{at} endpoints[{li}].lb_endpoints[{ei}]");
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return Err(ConfigError::new(
                    &eat,
                    "needs an endpoint (named endpoints are not supported)",
                ));
            };
            v.push(EndpointSpec {
                addr: socket_addr(ep.address.as_ref(), &eat)?,
                weight: e
                    .load_balancing_weight
                    .as_ref()
                    .map_or(1, |w| w.value.max(1)),
                health: HealthStatus::try_from(e.health_status).unwrap_or(HealthStatus::Unknown),
                locality: li as u32,
                locality_weight: lw,
                priority: l.priority,
                hostname: hostname(ep),
                hash_key: hash_key(e),
                check: endpoint_check(ep, &eat)?,
                also: ep
                    .additional_addresses
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        socket_addr(
                            a.address.as_ref(),
                            &format!("{eat} endpoint.additional_addresses[{i}]"),
                        )
                    })
                    .collect::<Result<_, _>>()?,
            });
        }
    }
    // Stable: within a priority, the assignment's order.
    v.sort_by_key(|s| s.priority);
    let stale_after = match cla
        .policy
        .as_ref()
        .and_then(|p| p.endpoint_stale_after.as_ref())
    {
        None => None,
        // Above 0 and a well-formed protobuf duration (at most 10,000
        // years).
        Some(d)
            if (0..=315_576_000_000).contains(&d.seconds)
                && (0..1_000_000_000).contains(&d.nanos)
                && (d.seconds, d.nanos) != (0, 0) =>
        {
            Some(duration(d))
        }
        Some(d) => {
            return Err(ConfigError::new(
                &format!("{at} policy.endpoint_stale_after"),
                format!(
                    "must be a duration above 0 (is {}s {}ns)",
                    d.seconds, d.nanos
                ),
            ))
        }
    };
    Ok(Assignment {
        endpoints: v,
        policy: LoadPolicy::convert(cla, at)?,
        stale_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A load-assignment endpoint at `host:port`.
    fn lb_endpoint(
        host: &str,
        port: u16,
    ) -> portico_proto::envoy::config::endpoint::v3::LbEndpoint {
        use portico_proto::envoy::config::core::v3::{
            address, socket_address::PortSpecifier, Address, SocketAddress,
        };
        use portico_proto::envoy::config::endpoint::v3::{Endpoint, LbEndpoint};
        LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: host.into(),
                        port_specifier: Some(PortSpecifier::PortValue(port.into())),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// Priorities sort the endpoints; drop categories compound (the
    /// proto's own example: 60% then 50% of the rest drops 80%).
    #[test]
    fn load_assignments_keep_priorities_and_compound_drops() {
        use portico_proto::envoy::config::endpoint::v3::cluster_load_assignment::{
            policy::DropOverload, Policy,
        };
        use portico_proto::envoy::config::endpoint::v3::LocalityLbEndpoints;
        use portico_proto::envoy::r#type::v3::FractionalPercent;
        let locality = |port: u16, priority| LocalityLbEndpoints {
            priority,
            lb_endpoints: vec![lb_endpoint("127.0.0.1", port)],
            ..Default::default()
        };
        let drop = |category: &str, numerator, denominator| DropOverload {
            category: category.into(),
            drop_percentage: Some(FractionalPercent {
                numerator,
                denominator,
            }),
        };
        let mut cla = ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: vec![locality(1, 2), locality(2, 0), locality(3, 1)],
            policy: Some(Policy {
                drop_overloads: vec![drop("throttle", 60, 0), drop("lb", 500_000, 2)],
                overprovisioning_factor: Some(portico_proto::google::protobuf::UInt32Value {
                    value: 100,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let a = assignment(&cla, "here").expect("converts");
        let order: Vec<(u16, u32)> = a
            .endpoints
            .iter()
            .map(|e| (e.addr.port(), e.priority))
            .collect();
        assert_eq!(order, vec![(2, 0), (3, 1), (1, 2)]);
        assert_eq!(
            a.policy,
            LoadPolicy {
                overprovisioning: 100,
                weighted_health: false,
                drop_per_million: 800_000
            }
        );
        if let Some(p) = cla.policy.as_mut() {
            p.drop_overloads[1].category.clear();
        }
        let e = assignment(&cla, "here").unwrap_err().to_string();
        assert!(
            e.contains("here policy.drop_overloads[1]") && e.contains("name"),
            "{e}"
        );
        if let Some(p) = cla.policy.as_mut() {
            p.drop_overloads = vec![drop("x", 1, 7)];
        }
        let e = assignment(&cla, "here").unwrap_err().to_string();
        assert!(e.contains("denominator 7"), "{e}");
        if let Some(p) = cla.policy.as_mut() {
            p.drop_overloads.clear();
            p.overprovisioning_factor =
                Some(portico_proto::google::protobuf::UInt32Value { value: 0 });
        }
        let e = assignment(&cla, "here").unwrap_err().to_string();
        assert!(
            e.contains("overprovisioning_factor") && e.contains("above 0"),
            "{e}"
        );
        // endpoint_stale_after: kept when above 0, refused otherwise.
        let stale = |seconds, nanos| Policy {
            endpoint_stale_after: Some(portico_proto::google::protobuf::Duration {
                seconds,
                nanos,
            }),
            ..Default::default()
        };
        cla.policy = Some(stale(0, 250_000_000));
        let a = assignment(&cla, "here").expect("converts");
        assert_eq!(a.stale_after, Some(Duration::from_millis(250)));
        for (s, n) in [
            (0, 0),
            (-1, 0),
            (1, -1),
            (0, 1_000_000_000),
            (315_576_000_001, 0),
        ] {
            cla.policy = Some(stale(s, n));
            let e = assignment(&cla, "here").unwrap_err().to_string();
            assert!(
                e.contains("here policy.endpoint_stale_after") && e.contains("above 0"),
                "{e}"
            );
        }
        cla.policy = None;
        cla.endpoints[0].priority = 129;
        let e = assignment(&cla, "here").unwrap_err().to_string();
        assert!(
            e.contains("here endpoints[0]") && e.contains("above 128"),
            "{e}"
        );
        // An endpoint's other addresses, in order; IP literals only.
        cla.endpoints[0].priority = 0;
        let other =
            |host: &str| portico_proto::envoy::config::endpoint::v3::endpoint::AdditionalAddress {
                address: match lb_endpoint(host, 9).host_identifier {
                    Some(HostIdentifier::Endpoint(e)) => e.address,
                    _ => None,
                },
            };
        if let Some(HostIdentifier::Endpoint(e)) =
            &mut cla.endpoints[0].lb_endpoints[0].host_identifier
        {
            e.additional_addresses = vec![other("::1"), other("127.0.0.9")];
        }
        let a = assignment(&cla, "here").expect("converts");
        let first = a
            .endpoints
            .iter()
            .find(|e| e.addr.port() == 1)
            .expect("endpoint");
        assert_eq!(
            *first.also,
            ["[::1]:9".parse().unwrap(), "127.0.0.9:9".parse().unwrap()]
        );
        if let Some(HostIdentifier::Endpoint(e)) =
            &mut cla.endpoints[0].lb_endpoints[0].host_identifier
        {
            e.additional_addresses.push(other("db.example"));
        }
        let e = assignment(&cla, "here").unwrap_err().to_string();
        assert!(
            e.contains("here endpoints[0].lb_endpoints[0] endpoint.additional_addresses[2]")
                && e.contains("not an IP address"),
            "{e}"
        );
    }

    /// A DNS cluster's endpoints keep the health the control plane gives
    /// them; LEDS localities and transport socket matchers (upstream TLS
    /// chosen per endpoint) are refused, not run as no endpoints or as
    /// plaintext.
    #[test]
    fn dns_health_kept_leds_and_tls_matchers_refused() {
        use portico_proto::envoy::config::endpoint::v3::{
            lb_endpoint::HostIdentifier, locality_lb_endpoints, ClusterLoadAssignment, LbEndpoint,
            LocalityLbEndpoints,
        };
        let endpoint = |host: &str, health: HealthStatus| LbEndpoint {
            health_status: health as i32,
            ..lb_endpoint(host, 80)
        };
        let cla = |eps: Vec<LbEndpoint>| ClusterLoadAssignment {
            cluster_name: "d".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: eps,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut c = Cluster {
            name: "d".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(
                DiscoveryType::StrictDns as i32,
            )),
            load_assignment: Some(cla(vec![
                endpoint("a.example", HealthStatus::Unhealthy),
                endpoint("b.example", HealthStatus::Unknown),
            ])),
            ..Default::default()
        };
        let cfg = ClusterConfig::convert(&c).expect("converts");
        let Discovery::Dns(d) = &cfg.discovery else {
            panic!("a DNS cluster: {:?}", cfg.discovery)
        };
        let seen: Vec<(&str, HealthStatus, &str)> = d
            .hosts
            .iter()
            .map(|h| (h.host.as_str(), h.health, &*h.hostname))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("a.example", HealthStatus::Unhealthy, "a.example"),
                ("b.example", HealthStatus::Unknown, "b.example")
            ]
        );
        if let Some(a) = c.load_assignment.as_mut() {
            a.endpoints[0].lb_config = Some(
                locality_lb_endpoints::LbConfig::LedsClusterLocalityConfig(Default::default()),
            );
        }
        let e = ClusterConfig::convert(&c).unwrap_err().to_string();
        assert!(
            e.contains("load_assignment.endpoints[0]") && e.contains("LEDS"),
            "{e}"
        );
        let e = assignment(c.load_assignment.as_ref().expect("set"), "here")
            .unwrap_err()
            .to_string();
        assert!(e.contains("here endpoints[0]") && e.contains("LEDS"), "{e}");
        // An endpoint's own health-check settings: kept, and checked.
        let checked = |port_value: u32, hostname: &str| {
            let mut e = endpoint("a.example", HealthStatus::Unknown);
            if let Some(HostIdentifier::Endpoint(ep)) = e.host_identifier.as_mut() {
                ep.health_check_config = Some(
                    portico_proto::envoy::config::endpoint::v3::endpoint::HealthCheckConfig {
                        port_value,
                        hostname: hostname.into(),
                        ..Default::default()
                    },
                );
            }
            cla(vec![e])
        };
        c.load_assignment = Some(checked(9901, "hc.internal"));
        let cfg = ClusterConfig::convert(&c).expect("converts");
        let Discovery::Dns(d) = &cfg.discovery else {
            panic!("a DNS cluster")
        };
        let own = d.hosts[0].check.as_deref().expect("its own settings");
        assert_eq!(
            (own.port, own.host.as_deref()),
            (Some(9901), Some("hc.internal"))
        );
        assert_eq!(
            EndpointCheck {
                address: Some(SocketAddr::from(([10, 0, 0, 1], 80))),
                port: Some(9901),
                host: None,
                disabled: false,
            }
            .target(SocketAddr::from(([127, 0, 0, 1], 8080))),
            SocketAddr::from(([10, 0, 0, 1], 9901)),
            "the check address, on the check port"
        );
        for (port, host, why) in [
            (70_000, "", "port_value 70000"),
            (0, "bad\nname", "hostname"),
            (0, "a b", "hostname"),
        ] {
            c.load_assignment = Some(checked(port, host));
            let e = ClusterConfig::convert(&c).unwrap_err().to_string();
            assert!(e.contains("health_check_config") && e.contains(why), "{e}");
        }
        c.load_assignment = Some(cla(vec![endpoint("a.example", HealthStatus::Unknown)]));
        c.transport_socket_matcher = Some(Default::default());
        let e = ClusterConfig::convert(&c).unwrap_err().to_string();
        assert!(e.contains("upstream TLS"), "{e}");
    }

    /// Subset load balancing is refused by name, not run as plain load
    /// balancing over every endpoint.
    #[test]
    fn subset_load_balancing_is_refused_by_name() {
        let mut c = Cluster {
            name: "canary".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        ClusterConfig::convert(&c).expect("a plain EDS cluster");
        c.lb_subset_config = Some(Default::default());
        let msg = ClusterConfig::convert(&c)
            .expect_err("subset LB")
            .to_string();
        assert!(
            msg.contains("canary") && msg.contains("lb_subset_config"),
            "{msg}"
        );
    }

    #[test]
    fn panic_threshold_defaults_to_envoys_and_must_be_a_percentage() {
        use portico_proto::envoy::config::cluster::v3::cluster::CommonLbConfig;
        use portico_proto::envoy::r#type::v3::Percent;
        let mut c = Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        assert_eq!(ClusterConfig::convert(&c).unwrap().panic_threshold, 50.0);
        let at = |v: f64| CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: v }),
            ..Default::default()
        };
        c.common_lb_config = Some(at(0.0));
        assert_eq!(ClusterConfig::convert(&c).unwrap().panic_threshold, 0.0);
        c.common_lb_config = Some(at(150.0));
        let msg = ClusterConfig::convert(&c).unwrap_err().to_string();
        assert!(msg.contains("healthy_panic_threshold 150"), "{msg}");
    }

    #[test]
    fn upstream_protocol_and_filter_fields_are_refused_by_name() {
        let base = Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        let downstream = Cluster {
            protocol_selection: 1,
            ..base.clone()
        };
        let filtered = Cluster {
            filters: vec![Default::default()],
            ..base.clone()
        };
        let per_downstream = Cluster {
            connection_pool_per_downstream_connection: true,
            ..base.clone()
        };
        for (c, what) in [
            (downstream, "protocol_selection"),
            (filtered, "upstream network filters"),
            (per_downstream, "connection_pool_per_downstream_connection"),
        ] {
            let msg = ClusterConfig::convert(&c).unwrap_err().to_string();
            assert!(msg.contains(what), "{msg}");
        }
    }

    /// `happy_eyeballs_config`: a family first and a count, or refused
    /// with the field named.
    #[test]
    fn happy_eyeballs_config_orders_the_families() {
        use portico_proto::envoy::config::cluster::v3::upstream_connection_options::{
            FirstAddressFamilyVersion as Version, HappyEyeballsConfig,
        };
        use portico_proto::envoy::config::cluster::v3::UpstreamConnectionOptions;
        let with = |version: Version, count: Option<u32>| {
            let mut c = dns(DiscoveryType::StrictDns, &["a"]);
            c.upstream_connection_options = Some(UpstreamConnectionOptions {
                happy_eyeballs_config: Some(HappyEyeballsConfig {
                    first_address_family_version: version as i32,
                    first_address_family_count: count
                        .map(|value| portico_proto::google::protobuf::UInt32Value { value }),
                }),
                ..Default::default()
            });
            ClusterConfig::convert(&c)
        };
        let order = with(Version::V6, Some(3)).unwrap().family_order;
        assert_eq!((order.v6_first, order.count), (Some(true), 3));
        let order = with(Version::Default, None).unwrap().family_order;
        assert_eq!(order, FamilyOrder::default());
        for (version, count, what) in [
            (
                Version::V4,
                Some(0),
                "first_address_family_count must be at least 1",
            ),
            (Version::Pipe, None, "is not an IP family"),
        ] {
            let e = with(version, count).unwrap_err().to_string();
            assert!(
                e.contains("upstream_connection_options") && e.contains(what),
                "{e}"
            );
        }
    }

    /// An HTTP/1.1 upstream's options, from the typed protocol options
    /// (or the cluster's own deprecated field): proper case, absolute
    /// URLs, both framings; a stateful header formatter refused.
    #[test]
    #[allow(deprecated)]
    fn http1_upstream_options_are_read() {
        use portico_proto::envoy::config::core::v3::http1_protocol_options::{
            header_key_format::{HeaderFormat, ProperCaseWords},
            HeaderKeyFormat,
        };
        use portico_proto::envoy::config::core::v3::{Http1ProtocolOptions, TypedExtensionConfig};
        let proper = Http1ProtocolOptions {
            header_key_format: Some(HeaderKeyFormat {
                header_format: Some(HeaderFormat::ProperCaseWords(ProperCaseWords {})),
            }),
            send_fully_qualified_url: true,
            ..Default::default()
        };
        let mut c = dns(DiscoveryType::StrictDns, &["a"]);
        c.http_protocol_options = Some(proper);
        let h1 = ClusterConfig::convert(&c).unwrap().h1;
        assert_eq!(
            h1,
            H1Client {
                proper_case: true,
                absolute_url: true,
                allow_chunked_length: false
            }
        );
        // The typed options win over the cluster's own field.
        let typed = portico_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                portico_proto::envoy::extensions::upstreams::http::v3::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions {
                        allow_chunked_length: true,
                        ..Default::default()
                    })),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            portico_proto::google::protobuf::Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
                        .into(),
                value: prost::Message::encode_to_vec(&typed),
            },
        );
        let h1 = ClusterConfig::convert(&c).unwrap().h1;
        assert!(h1.allow_chunked_length && !h1.proper_case, "{h1:?}");
        c.typed_extension_protocol_options.clear();
        c.http_protocol_options = Some(Http1ProtocolOptions {
            header_key_format: Some(HeaderKeyFormat {
                header_format: Some(HeaderFormat::StatefulFormatter(TypedExtensionConfig {
                    name: "preserve_case".into(),
                    typed_config: None,
                })),
            }),
            ..Default::default()
        });
        let e = ClusterConfig::convert(&c).unwrap_err().to_string();
        assert!(
            e.contains("http_protocol_options") && e.contains("stateful_formatter"),
            "{e}"
        );
    }

    fn dns(kind: DiscoveryType, hosts: &[&str]) -> Cluster {
        use portico_proto::envoy::config::endpoint::v3::LocalityLbEndpoints;
        Cluster {
            name: "d".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(kind as i32)),
            load_assignment: Some(ClusterLoadAssignment {
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: hosts.iter().map(|h| lb_endpoint(h, 80)).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn dns_clusters_keep_their_family_rate_and_logical_host() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let both = vec![a("[::1]:80"), a("127.0.0.1:80"), a("[::2]:80")];
        let only4 = vec![a("127.0.0.1:80")];
        assert_eq!(
            DnsFamily::Auto.keep(both.clone()),
            vec![a("[::1]:80"), a("[::2]:80")]
        );
        assert_eq!(DnsFamily::Auto.keep(only4.clone()), only4);
        assert_eq!(DnsFamily::V4Preferred.keep(both.clone()), only4);
        assert_eq!(DnsFamily::V4Only.keep(vec![a("[::1]:80")]), vec![]);
        assert_eq!(DnsFamily::V6Only.keep(only4.clone()), vec![]);
        assert_eq!(DnsFamily::All.keep(both.clone()).len(), 3);

        let mut c = dns(DiscoveryType::StrictDns, &["a.example", "b.example"]);
        c.dns_lookup_family = DnsLookupFamily::V4Only as i32;
        c.dns_refresh_rate = Some(portico_proto::google::protobuf::Duration {
            seconds: 30,
            nanos: 0,
        });
        let Discovery::Dns(d) = ClusterConfig::convert(&c).unwrap().discovery else {
            panic!("DNS")
        };
        assert_eq!(
            (d.hosts.len(), d.family, d.logical, d.refresh),
            (2, DnsFamily::V4Only, false, Duration::from_secs(30))
        );
        let Discovery::Dns(d) = ClusterConfig::convert(&dns(DiscoveryType::LogicalDns, &["a"]))
            .unwrap()
            .discovery
        else {
            panic!("DNS")
        };
        assert_eq!(
            (d.family, d.logical, d.refresh),
            (DnsFamily::Auto, true, Duration::from_secs(5))
        );

        let two = ClusterConfig::convert(&dns(DiscoveryType::LogicalDns, &["a", "b"]));
        assert!(two
            .unwrap_err()
            .to_string()
            .contains("exactly one endpoint"));
        let mut own = dns(DiscoveryType::StrictDns, &["a"]);
        own.dns_resolvers = vec![Default::default()];
        assert!(ClusterConfig::convert(&own)
            .unwrap_err()
            .to_string()
            .contains("dns_resolvers"));
        let mut tiered = dns(DiscoveryType::StrictDns, &["a"]);
        if let Some(cla) = tiered.load_assignment.as_mut() {
            cla.endpoints[0].priority = 1;
        }
        let Discovery::Dns(d) = ClusterConfig::convert(&tiered).unwrap().discovery else {
            panic!("DNS")
        };
        assert_eq!(d.hosts[0].priority, 1);

        // Failure refresh and jitter: the maximum defaults to ten times the
        // base; a missing base or a maximum below it is refused.
        let secs = |seconds| portico_proto::google::protobuf::Duration { seconds, nanos: 0 };
        let mut failing = dns(DiscoveryType::StrictDns, &["a"]);
        failing.dns_jitter = Some(secs(2));
        failing.dns_failure_refresh_rate = Some(
            portico_proto::envoy::config::cluster::v3::cluster::RefreshRate {
                base_interval: Some(secs(1)),
                max_interval: None,
            },
        );
        let Discovery::Dns(d) = ClusterConfig::convert(&failing).unwrap().discovery else {
            panic!("DNS")
        };
        assert_eq!(
            (d.jitter, d.failure_refresh),
            (
                Duration::from_secs(2),
                Some((Duration::from_secs(1), Duration::from_secs(10)))
            )
        );
        for (base, max, what) in [
            (None, None, "base_interval must be set"),
            (
                Some(secs(5)),
                Some(secs(1)),
                "max_interval must not be below",
            ),
        ] {
            failing.dns_failure_refresh_rate = Some(
                portico_proto::envoy::config::cluster::v3::cluster::RefreshRate {
                    base_interval: base,
                    max_interval: max,
                },
            );
            let e = ClusterConfig::convert(&failing).unwrap_err().to_string();
            assert!(
                e.contains("dns_failure_refresh_rate") && e.contains(what),
                "{e}"
            );
        }
    }

    #[test]
    fn retry_budgets_replace_max_retries() {
        use portico_proto::envoy::config::cluster::v3::circuit_breakers::{
            thresholds::RetryBudget as PbBudget, Thresholds,
        };
        use portico_proto::envoy::config::cluster::v3::CircuitBreakers;
        let with = |b: PbBudget| Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            circuit_breakers: Some(CircuitBreakers {
                thresholds: vec![Thresholds {
                    retry_budget: Some(b),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let l = ClusterConfig::convert(&with(PbBudget::default()))
            .unwrap()
            .limits;
        assert_eq!(
            l.retry_budget,
            Some(RetryBudget {
                percent: 20.0,
                min_concurrency: 3
            })
        );
        // At least 3; 20% of 100 requests in flight is 20.
        assert!(l.may_retry(2, 0) && !l.may_retry(3, 0));
        assert!(l.may_retry(19, 100) && !l.may_retry(20, 100));
        let plain = ClusterConfig::convert(&Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        })
        .unwrap()
        .limits;
        assert!(plain.may_retry(2, 1000) && !plain.may_retry(3, 1000));
        let bad = with(PbBudget {
            budget_percent: Some(portico_proto::envoy::r#type::v3::Percent { value: 150.0 }),
            ..Default::default()
        });
        assert!(ClusterConfig::convert(&bad).is_err());
        let interval = with(PbBudget {
            budget_interval: Some(portico_proto::google::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        });
        assert!(ClusterConfig::convert(&interval)
            .unwrap_err()
            .to_string()
            .contains("budget_interval"));
    }

    #[test]
    fn upstream_protocol_options_choose_or_are_refused() {
        use portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
        use portico_proto::envoy::extensions::upstreams::http::v3::http_protocol_options::AutoHttpConfig;
        let with = |o: HttpProtocolOptions| {
            let mut c = Cluster {
                name: "c".into(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
                ..Default::default()
            };
            c.typed_extension_protocol_options.insert(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                portico_proto::google::protobuf::Any {
                    type_url: <HttpProtocolOptions as prost::Name>::type_url(),
                    value: prost::Message::encode_to_vec(&o),
                },
            );
            ClusterConfig::convert(&c)
        };
        // Without TLS there is no ALPN: auto means HTTP/1.1.
        let auto = with(HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::AutoConfig(AutoHttpConfig {
                http2_protocol_options: Some(Default::default()),
                ..Default::default()
            })),
            ..Default::default()
        })
        .unwrap();
        assert!(!auto.http2);
        let filtered = with(HttpProtocolOptions {
            http_filters: vec![HttpFilter {
                name: "envoy.filters.http.header_mutation".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(filtered
            .unwrap_err()
            .to_string()
            .contains("header_mutation"));
        // Requests per connection where Envoy now takes them.
        let capped = with(HttpProtocolOptions {
            common_http_protocol_options: Some(
                portico_proto::envoy::config::core::v3::HttpProtocolOptions {
                    max_requests_per_connection: Some(
                        portico_proto::google::protobuf::UInt32Value { value: 7 },
                    ),
                    max_stream_duration: Some(portico_proto::google::protobuf::Duration {
                        seconds: 2,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(capped.max_requests_per_connection, Some(7));
        assert_eq!(capped.max_stream_duration, Some(Duration::from_secs(2)));
        assert_eq!(
            capped.answer_head,
            AnswerHead::default(),
            "Envoy's defaults"
        );
        assert_eq!(
            (
                capped.answer_head.http1_bytes(),
                capped.answer_head.http2_bytes()
            ),
            (80 * 1024, 60 * 1024)
        );
        let head = |count: Option<u32>, kib: Option<u32>| {
            let v = |value| portico_proto::google::protobuf::UInt32Value { value };
            with(HttpProtocolOptions {
                common_http_protocol_options: Some(
                    portico_proto::envoy::config::core::v3::HttpProtocolOptions {
                        max_headers_count: count.map(v),
                        max_response_headers_kb: kib.map(v),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            })
        };
        assert_eq!(head(Some(250), None).unwrap().answer_head.fields, 250);
        let e = head(Some(0), None).unwrap_err().to_string();
        assert!(e.contains("max_headers_count must be at least 1"), "{e}");
        let h = head(None, Some(8192)).unwrap().answer_head;
        assert_eq!(
            (h.fields, h.http1_bytes(), h.http2_bytes()),
            (100, 8 << 20, 8 << 20)
        );
        assert_eq!(head(None, Some(1)).unwrap().answer_head.http1_bytes(), 1024);
        for kib in [0, 8193] {
            let e = head(None, Some(kib)).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "max_response_headers_kb {kib} is not between 1 and 8192"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn locality_weights_count_only_when_asked_and_share_as_envoys() {
        use portico_proto::envoy::config::cluster::v3::cluster::{
            common_lb_config::{LocalityConfigSpecifier, LocalityWeightedLbConfig},
            CommonLbConfig,
        };
        let spec = |port: u16, weight, locality, locality_weight| EndpointSpec {
            weight,
            health: HealthStatus::Unknown,
            locality,
            locality_weight,
            ..EndpointSpec::at(([127, 0, 0, 1], port))
        };
        // One endpoint in the first locality, two in the second, equal
        // locality weights: half the traffic to the lone one.
        let specs = [
            spec(1, 1, 0, 1),
            spec(2, 1, 1, 1),
            spec(3, 3, 1, 1),
            spec(4, 5, 2, 0),
        ];
        let w: Vec<u32> = locality_weighted(&specs).iter().map(|s| s.weight).collect();
        assert_eq!(w, vec![4, 1, 3], "the unweighted locality takes none");
        // The largest weights the protocol allows: no overflow, ratios kept.
        let big = [
            spec(1, u32::MAX, 0, u32::MAX),
            spec(2, u32::MAX, 1, u32::MAX / 2),
        ];
        let w: Vec<u32> = locality_weighted(&big).iter().map(|s| s.weight).collect();
        assert_eq!(w.len(), 2);
        let ratio = f64::from(w[0]) / f64::from(w[1]);
        assert!((ratio - 2.0).abs() < 1e-6, "{w:?}");

        let mut c = Cluster {
            name: "c".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        assert!(!ClusterConfig::convert(&c).unwrap().locality_weighted);
        c.common_lb_config = Some(CommonLbConfig {
            locality_config_specifier: Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(
                LocalityWeightedLbConfig {},
            )),
            ..Default::default()
        });
        assert!(ClusterConfig::convert(&c).unwrap().locality_weighted);
    }
}
