//! `kind: Service` — an upstream and how to reach it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::gateway::SecretRef;

/// A Service's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The protocol spoken to the endpoints; `http1` unless set.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Where the Service runs.
    pub endpoints: Vec<Endpoint>,
    /// How requests are spread over endpoints; `round_robin` unless set.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Slow start, e.g. `30s`: an endpoint added to the Service (or back
    /// after failing its health check) takes a share of traffic that grows
    /// from 10% to all of it over this window, so that a cold instance is
    /// not flooded. `round_robin` and `least_request` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<String>,
    /// Time allowed to open a connection, e.g. `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// Default time allowed for a whole request, e.g. `15s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    /// Active health checking of endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Limits that shed load instead of queueing without bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Passive health checking: eject endpoints that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS to the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
}

/// Envoy's outlier detection on consecutive 5xx answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx answers that eject an endpoint; 5 unless set; 1-1000.
    #[serde(
        default,
        rename = "consecutive5xx",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx: Option<u32>,
    /// Time between ejection sweeps; `10s` unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Base time an endpoint stays ejected; `30s` unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// At most this percentage of endpoints ejected at once (but always
    /// one); 10 unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// One endpoint of a Service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// IP address or DNS name.
    pub address: String,
    /// TCP port, 1-65535.
    pub port: u16,
    /// Relative share of traffic, 1-1000; 1 unless set.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Failover tier, 0-10; 0 (the first) unless set. Tier 0 takes the
    /// traffic while enough of it is healthy; then the next tier takes
    /// what it cannot (Envoy's priority levels).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: u32,
}

fn default_weight() -> u32 {
    1
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Protocols spoken to upstream endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    #[default]
    Http1,
    /// HTTP/2 (h2c, or h2 with TLS).
    Http2,
    /// gRPC over HTTP/2.
    Grpc,
    /// SOAP over HTTP/1.1.
    Soap,
}

/// Load-balancing policies, as Envoy names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest active requests among two random choices.
    LeastRequest,
    /// Uniformly random.
    Random,
    /// Consistent hashing (the hash key comes from the route).
    RingHash,
}

/// Active HTTP health checking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Path requested on each endpoint, e.g. `/healthz`.
    pub path: String,
    /// Time between checks; `10s` unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Time between checks of an endpoint that is unhealthy (Envoy's
    /// `unhealthy_interval`); `interval` unless set. A longer one spares a
    /// dead endpoint; a shorter one finds its recovery sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_interval: Option<String>,
    /// Time allowed for one check; `1s` unless set; less than `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Passing checks before an endpoint is healthy again; 1-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    /// Failing checks before an endpoint is unhealthy; 1-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Statuses counted as healthy; `[200]` unless set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
}

/// Envoy's circuit-breaker thresholds for the default priority.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Connections open to the whole Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// TLS from the gateway to the endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// Server name sent in SNI and verified; the endpoint address unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// CA bundle that must have signed the endpoint's certificate; the
    /// system roots unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate_ref: Option<SecretRef>,
    /// Client certificate for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_ref: Option<SecretRef>,
    /// Skip verification of the endpoint's certificate. For tests only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}
