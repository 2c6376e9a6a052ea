//! `Service` → `Cluster` (+ `ClusterLoadAssignment`).

use std::collections::HashMap;
use std::net::IpAddr;

use portico_proto::envoy::config::cluster::v3::{
    circuit_breakers::Thresholds, cluster::ClusterDiscoveryType, cluster::DiscoveryType,
    cluster::DnsLookupFamily, cluster::EdsClusterConfig, cluster::LbConfig, cluster::LbPolicy,
    cluster::LeastRequestLbConfig, cluster::RoundRobinLbConfig, cluster::SlowStartConfig,
    CircuitBreakers, Cluster, OutlierDetection,
};
use portico_proto::envoy::config::core::v3::Http2ProtocolOptions;
use portico_proto::envoy::config::core::v3::{
    address, health_check, socket_address::PortSpecifier, transport_socket, Address, HealthCheck,
    Locality, SocketAddress, TransportSocket,
};
use portico_proto::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint,
    LocalityLbEndpoints,
};
use portico_proto::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, CommonTlsContext, SdsSecretConfig,
    UpstreamTlsContext,
};
use portico_proto::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    },
    HttpProtocolOptions,
};
use portico_proto::envoy::r#type::v3::Int64Range;
use portico_proto::google::protobuf::{Any, BoolValue};
use prost::{Message, Name};

use super::{ads, duration, u32v, Shared};
use crate::model::service::{LoadBalancing, ServiceSpec, UpstreamProtocol};
use crate::xds::resources::{TypeUrl, View, XdsResource};

/// A Service's cluster and, for EDS clusters, its endpoints.
pub(crate) struct Built {
    pub cluster: Shared,
    pub endpoints: Option<Shared>,
    /// Whether proxyless gRPC clients can use it (EDS with IP endpoints).
    pub eds: bool,
}

impl Built {
    pub fn add_to(&self, view: &mut View, in_wildcard: bool) {
        view.insert(TypeUrl::Cluster, self.cluster.clone(), in_wildcard);
        if let Some(e) = &self.endpoints {
            view.insert(TypeUrl::Endpoint, e.clone(), in_wildcard);
        }
    }
}

pub(crate) fn build(name: &str, svc: &ServiceSpec) -> Built {
    let cla = load_assignment(name, svc);
    // EDS needs IP literals; a Service addressed by host names is resolved
    // by the proxy itself (STRICT_DNS) with its endpoints inline.
    let eds = svc
        .endpoints
        .iter()
        .all(|e| e.address.parse::<IpAddr>().is_ok());
    let mut cluster = Cluster {
        name: name.to_string(),
        connect_timeout: svc
            .connect_timeout
            .as_deref()
            .and_then(duration)
            .or(Some(super::pb_duration(std::time::Duration::from_secs(5)))),
        lb_policy: match svc.load_balancing {
            LoadBalancing::RoundRobin => LbPolicy::RoundRobin,
            LoadBalancing::LeastRequest => LbPolicy::LeastRequest,
            LoadBalancing::Random => LbPolicy::Random,
            LoadBalancing::RingHash => LbPolicy::RingHash,
        } as i32,
        // No traffic to endpoints health checks or outlier detection took
        // out, however few are left: a Service with none answers 503 with
        // a reason. (Envoy's default, panic below 50%, would send it to
        // them all.)
        common_lb_config: Some(
            portico_proto::envoy::config::cluster::v3::cluster::CommonLbConfig {
                healthy_panic_threshold: Some(portico_proto::envoy::r#type::v3::Percent {
                    value: 0.0,
                }),
                ..Default::default()
            },
        ),
        lb_config: svc
            .slow_start
            .as_deref()
            .and_then(duration)
            .and_then(|window| {
                let slow_start_config = Some(SlowStartConfig {
                    slow_start_window: Some(window),
                    ..Default::default()
                });
                match svc.load_balancing {
                    LoadBalancing::RoundRobin => {
                        Some(LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
                            slow_start_config,
                        }))
                    }
                    LoadBalancing::LeastRequest => {
                        Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
                            slow_start_config,
                            ..Default::default()
                        }))
                    }
                    // Refused by validation.
                    LoadBalancing::Random | LoadBalancing::RingHash => None,
                }
            }),
        ..Default::default()
    };
    if eds {
        cluster.cluster_discovery_type =
            Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
        cluster.eds_cluster_config = Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        });
    } else {
        cluster.cluster_discovery_type =
            Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
        // A name's IPv4 addresses when it has any (Envoy's default would
        // take only the IPv6 ones: `localhost` as ::1).
        cluster.dns_lookup_family = DnsLookupFamily::V4Preferred as i32;
        cluster.load_assignment = Some(cla.clone());
    }
    if let Some(hc) = &svc.health_check {
        // An endpoint taken out of the Service leaves at once, where
        // Envoy's default keeps it while it passes its checks (Contour and
        // Envoy Gateway set this too).
        cluster.ignore_health_on_host_removal = true;
        cluster.health_checks.push(HealthCheck {
            timeout: Some(
                hc.timeout
                    .as_deref()
                    .and_then(duration)
                    .unwrap_or(super::pb_duration(std::time::Duration::from_secs(1))),
            ),
            interval: Some(
                hc.interval
                    .as_deref()
                    .and_then(duration)
                    .unwrap_or(super::pb_duration(std::time::Duration::from_secs(10))),
            ),
            unhealthy_interval: hc.unhealthy_interval.as_deref().and_then(duration),
            // Up to a tenth more on every wait, so a fleet of nodes given
            // the same config at once does not check in step.
            interval_jitter_percent: 10,
            healthy_threshold: u32v(hc.healthy_threshold.unwrap_or(1)),
            unhealthy_threshold: u32v(hc.unhealthy_threshold.unwrap_or(3)),
            health_checker: Some(health_check::HealthChecker::HttpHealthCheck(
                health_check::HttpHealthCheck {
                    path: hc.path.clone(),
                    expected_statuses: hc
                        .expected_statuses
                        .iter()
                        .map(|s| Int64Range {
                            start: *s as i64,
                            end: *s as i64 + 1,
                        })
                        .collect(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        });
    }
    if let Some(cb) = &svc.circuit_breaker {
        cluster.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: cb.max_connections.and_then(u32v),
                max_pending_requests: cb.max_pending_requests.and_then(u32v),
                max_requests: cb.max_requests.and_then(u32v),
                max_retries: cb.max_retries.and_then(u32v),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if let Some(od) = &svc.outlier_detection {
        cluster.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: u32v(od.consecutive_5xx.unwrap_or(5)),
            interval: od.interval.as_deref().and_then(duration),
            base_ejection_time: od.base_ejection_time.as_deref().and_then(duration),
            max_ejection_percent: od.max_ejection_percent.and_then(u32v),
            // One endpoint may always be ejected: without this, Envoy (and
            // portico-dp, which follows it) ejects none from a Service of
            // fewer than ten endpoints at the default 10%.
            always_eject_one_host: Some(BoolValue { value: true }),
            ..Default::default()
        });
    }
    if matches!(
        svc.protocol,
        UpstreamProtocol::Http2 | UpstreamProtocol::Grpc
    ) {
        let opts = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        // One entry only: prost encodes maps in iteration order, and a
        // single entry keeps the bytes (and so the version) deterministic.
        cluster.typed_extension_protocol_options = HashMap::from([(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack(&opts),
        )]);
    }
    if let Some(tls) = &svc.tls {
        let mut common = CommonTlsContext::default();
        if let Some(ca) = &tls.ca_certificate_ref {
            common.validation_context_type = Some(
                ValidationContextType::ValidationContextSdsSecretConfig(sds(&ca.name)),
            );
        }
        if let Some(cert) = &tls.client_certificate_ref {
            common
                .tls_certificate_sds_secret_configs
                .push(sds(&cert.name));
        }
        let ctx = UpstreamTlsContext {
            common_tls_context: Some(common),
            sni: tls.sni.clone().unwrap_or_default(),
            ..Default::default()
        };
        cluster.transport_socket = Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&ctx))),
        });
    }
    Built {
        cluster: XdsResource::new(name, &cluster),
        endpoints: eds.then(|| XdsResource::new(name, &cla)),
        eds,
    }
}

/// One locality per priority in use (validation made them 0..n).
fn load_assignment(name: &str, svc: &ServiceSpec) -> ClusterLoadAssignment {
    let tiers: std::collections::BTreeSet<u32> = svc.endpoints.iter().map(|e| e.priority).collect();
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: tiers
            .into_iter()
            .map(|priority| LocalityLbEndpoints {
                // gRFC A27: proxyless clients need a locality, with its
                // weight set, and one locality is in one priority only.
                locality: Some(Locality {
                    sub_zone: if priority == 0 {
                        String::new()
                    } else {
                        format!("priority-{priority}")
                    },
                    ..Default::default()
                }),
                load_balancing_weight: u32v(1),
                priority,
                lb_endpoints: svc
                    .endpoints
                    .iter()
                    .filter(|e| e.priority == priority)
                    .map(|e| LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(PbEndpoint {
                            address: Some(socket(&e.address, e.port)),
                            ..Default::default()
                        })),
                        load_balancing_weight: u32v(e.weight),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A TCP socket address.
pub(crate) fn socket(address: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: address.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(port as u32)),
            ..Default::default()
        })),
    }
}

/// A secret fetched over ADS by name.
pub(crate) fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads()),
    }
}

/// Packs a message into `Any`.
pub(crate) fn pack<M: Message + Name>(msg: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: msg.encode_to_vec(),
    }
}
