//! `Cluster` and `ClusterLoadAssignment` → [`ClusterConfig`] and
//! [`EndpointSpec`]s.

// Envoy's deprecated fields are still sent by control planes; honour them.
#![allow(deprecated)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use portico_proto::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy},
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
    Static(Vec<EndpointSpec>),
    /// Host names in the cluster, resolved by the proxy.
    Dns(Vec<(String, u16, u32)>),
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbKind {
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices on active requests.
    LeastRequest,
    /// Uniformly random.
    Random,
    /// Consistent hashing on the route's hash policy.
    RingHash,
}

/// Circuit-breaker limits (default priority).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections to the cluster.
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
}

/// Active HTTP health checking.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// Path to GET.
    pub path: String,
    /// Host header (default: the cluster name).
    pub host: String,
    /// Time between checks.
    pub interval: Duration,
    /// Time allowed for an answer.
    pub timeout: Duration,
    /// Passes in a row to become healthy.
    pub healthy_threshold: u32,
    /// Failures in a row to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Statuses counted as passing, as [start, end) ranges.
    pub expected: Vec<(u16, u16)>,
}

/// Passive outlier detection on consecutive errors.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Consecutive 5xx to eject.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors (502/503/504, connect failures) to eject.
    pub consecutive_gateway: u32,
    /// First ejection length; multiplied by the number of ejections.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most endpoints ejected at once, in percent.
    pub max_ejection_percent: u32,
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
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Speak HTTP/2 (prior knowledge) upstream.
    pub http2: bool,
    /// Streams per HTTP/2 connection before another is opened.
    pub max_concurrent_streams: u32,
    /// Requests per connection before it is closed (None: unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// Circuit breakers.
    pub limits: Limits,
    /// Active health checks.
    pub health_check: Option<HealthCheckConfig>,
    /// Outlier detection.
    pub outlier: Option<OutlierConfig>,
    /// Idle upstream connections are closed after this.
    pub idle_timeout: Duration,
    /// Below this share of available endpoints (per cent), every endpoint
    /// takes traffic, available or not (Envoy's panic mode,
    /// `common_lb_config.healthy_panic_threshold`, 50 unless set; 0 turns
    /// it off).
    pub panic_threshold: f64,
}

/// One endpoint from a load assignment or a static cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    /// Its address.
    pub addr: SocketAddr,
    /// Its weight (endpoint weight times locality weight).
    pub weight: u32,
    /// Health as the control plane reported it.
    pub health: HealthStatus,
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
                Discovery::Static(endpoints(cla, &at)?)
            }
            DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
                let cla = c.load_assignment.as_ref().ok_or_else(|| {
                    ConfigError::new(&at, "a DNS cluster needs a load_assignment")
                })?;
                let mut v = Vec::new();
                for (li, l) in cla.endpoints.iter().enumerate() {
                    for (ei, e) in l.lb_endpoints.iter().enumerate() {
                        let eat =
                            format!("{at} load_assignment.endpoints[{li}].lb_endpoints[{ei}]");
                        let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                            return Err(ConfigError::new(&eat, "needs an endpoint"));
                        };
                        let (host, port) = host_port(ep.address.as_ref(), &eat)?;
                        v.push((
                            host,
                            port,
                            e.load_balancing_weight
                                .as_ref()
                                .map_or(1, |w| w.value.max(1)),
                        ));
                    }
                }
                Discovery::Dns(v)
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
            Ok(LbPolicy::RingHash | LbPolicy::Maglev) => LbKind::RingHash,
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
        ];
        if let Some((_, name)) = refused.iter().find(|(set, _)| *set) {
            return Err(ConfigError::new(&at, format!("{name} is not supported")));
        }
        if c.transport_socket.is_some() || !c.transport_socket_matches.is_empty() {
            return Err(ConfigError::new(
                &at,
                "upstream TLS (transport_socket) is not supported yet",
            ));
        }
        let mut http2 = c.http2_protocol_options.is_some();
        let mut h2opts = c.http2_protocol_options.clone();
        let mut idle = c
            .common_http_protocol_options
            .as_ref()
            .and_then(|o| o.idle_timeout.as_ref())
            .map(duration);
        for (k, any) in &c.typed_extension_protocol_options {
            if k != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
                return Err(ConfigError::new(
                    &at,
                    format!("protocol options {k:?} are not supported"),
                ));
            }
            let o: HttpProtocolOptions = unpack(
                any,
                &format!("{at} typed_extension_protocol_options[{k:?}]"),
            )?;
            idle = o
                .common_http_protocol_options
                .as_ref()
                .and_then(|o| o.idle_timeout.as_ref())
                .map(duration)
                .or(idle);
            match o.upstream_protocol_options {
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                    Some(ProtocolConfig::Http2ProtocolOptions(h)) => {
                        http2 = true;
                        h2opts = Some(h);
                    }
                    Some(ProtocolConfig::HttpProtocolOptions(_)) | None => http2 = false,
                    Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                        return Err(ConfigError::new(&at, "HTTP/3 upstreams are not supported"))
                    }
                },
                Some(_) => {
                    return Err(ConfigError::new(
                        &at,
                        "only explicit_http_config upstream protocol options are supported",
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
        let limits = Limits {
            max_connections: v(t.and_then(|t| t.max_connections.as_ref()), 1024),
            max_pending: v(t.and_then(|t| t.max_pending_requests.as_ref()), 1024),
            max_requests: v(t.and_then(|t| t.max_requests.as_ref()), 1024),
            max_retries: v(t.and_then(|t| t.max_retries.as_ref()), 3),
        };
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
                let mut expected: Vec<(u16, u16)> = h
                    .expected_statuses
                    .iter()
                    .map(|r| (r.start.clamp(100, 600) as u16, r.end.clamp(100, 600) as u16))
                    .collect();
                if expected.is_empty() {
                    expected.push((200, 201));
                }
                Some(HealthCheckConfig {
                    path: h.path.clone(),
                    host: if h.host.is_empty() {
                        c.name.clone()
                    } else {
                        h.host.clone()
                    },
                    interval,
                    timeout,
                    healthy_threshold: hc.healthy_threshold.as_ref().map_or(1, |v| v.value.max(1)),
                    unhealthy_threshold: hc
                        .unhealthy_threshold
                        .as_ref()
                        .map_or(1, |v| v.value.max(1)),
                    expected,
                })
            }
            _ => {
                return Err(ConfigError::new(
                    &at,
                    "only one health check per cluster is supported",
                ))
            }
        };
        let outlier = c.outlier_detection.as_ref().map(|o| {
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
                base_ejection: base,
                max_ejection: o
                    .max_ejection_time
                    .as_ref()
                    .map(duration)
                    .unwrap_or(Duration::from_secs(300))
                    .max(base),
                max_ejection_percent: v(o.max_ejection_percent.as_ref(), 10).min(100),
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
        Ok(ClusterConfig {
            panic_threshold,
            name: c.name.as_str().into(),
            discovery,
            lb,
            connect_timeout: c
                .connect_timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_secs(5)),
            http2,
            max_concurrent_streams: h2opts
                .and_then(|o| o.max_concurrent_streams)
                .map_or(100, |v| v.value.clamp(1, 2_147_483_647)),
            max_requests_per_connection: c
                .max_requests_per_connection
                .as_ref()
                .map(|v| v.value)
                .filter(|v| *v > 0),
            limits,
            health_check,
            outlier,
            idle_timeout: idle
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_secs(60)),
        })
    }
}

/// The endpoints of a load assignment (IP addresses only).
pub fn endpoints(cla: &ClusterLoadAssignment, at: &str) -> Result<Vec<EndpointSpec>, ConfigError> {
    let mut v = Vec::new();
    for (li, l) in cla.endpoints.iter().enumerate() {
        // Priorities other than 0 are failover tiers; serving them as equals
        // would send traffic where the operator said not to.
        if l.priority != 0 {
            return Err(ConfigError::new(
                &format!("{at} endpoints[{li}]"),
                "priorities other than 0 are not supported",
            ));
        }
        let lw = l
            .load_balancing_weight
            .as_ref()
            .map_or(1, |w| w.value.max(1));
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
                    .map_or(1, |w| w.value.max(1))
                    .saturating_mul(lw),
                health: HealthStatus::try_from(e.health_status).unwrap_or(HealthStatus::Unknown),
            });
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for (c, what) in [
            (downstream, "protocol_selection"),
            (filtered, "upstream network filters"),
        ] {
            let msg = ClusterConfig::convert(&c).unwrap_err().to_string();
            assert!(msg.contains(what), "{msg}");
        }
    }
}
