//! portico-dp configured by a control plane that is not Portico's (a bare
//! SotW ADS server in this test), with Envoy features Portico's renderer
//! does not emit: regex and host rewrites, ring hash with a header hash
//! policy, random balancing, endpoint health status from EDS, retries on
//! connect failure and on reset — and a NACK sent to that server.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpListener;

use portico_integration::dataplane::{free_port, DataPlane};
use portico_integration::static_xds::{resource, StaticXds};
use portico_integration::upstream::Upstream;
use portico_integration::xds_client::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use portico_integration::{json_log_lines, log_lines, wait_for};
use portico_proto::envoy::config::accesslog::v3::{access_log, AccessLog, AccessLogFilter};
use portico_proto::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use portico_proto::envoy::config::cluster::v3::Cluster;
use portico_proto::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, data_source,
    http_protocol_options::HeadersWithUnderscoresAction, socket_address::PortSpecifier,
    substitution_format_string, Address, AggregatedConfigSource, ApiVersion, ConfigSource,
    DataSource, HealthStatus, HttpProtocolOptions, RuntimeFractionalPercent, SocketAddress,
    SubstitutionFormatString,
};
use portico_proto::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use portico_proto::envoy::config::listener::v3::{
    filter, Filter, FilterChain, FilterChainMatch, Listener,
};
use portico_proto::envoy::config::route::v3::{
    route::Action,
    route_action::{
        hash_policy, ClusterSpecifier, HashPolicy, HostRewriteSpecifier, MaxStreamDuration,
        RequestMirrorPolicy, UpgradeConfig,
    },
    route_match::PathSpecifier,
    RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use portico_proto::envoy::extensions::access_loggers::file::v3::{file_access_log, FileAccessLog};
use portico_proto::envoy::extensions::filters::http::router::v3::Router;
use portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{
        PathWithEscapedSlashesAction, RouteSpecifier, ServerHeaderTransformation,
    },
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use portico_proto::envoy::r#type::matcher::v3::{RegexMatchAndSubstitute, RegexMatcher};
use portico_proto::envoy::r#type::v3::FractionalPercent;
use portico_proto::google::protobuf::{Any, UInt32Value};
use prost::{Message, Name};

use super::dp_common::{connect, echo, http1, raw, upgrade, upgrade_to};

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn pack<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn addr(port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: "127.0.0.1".into(),
            port_specifier: Some(PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}

/// The test's listener: `stream_idle` seconds of stream idle timeout (0
/// turns it off); `clean` turns on path normalization and slash merging,
/// and connection limits.
fn listener(
    name: &str,
    port: u16,
    stream_idle: i64,
    clean: bool,
    log: Option<FileAccessLog>,
) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: "foreign".into(),
        // A protocol of its own allowed everywhere (a route may say not).
        upgrade_configs: vec![
            portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::UpgradeConfig {
                upgrade_type: "bar".into(),
                ..Default::default()
            },
        ],
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: "routes".into(),
        })),
        // `clean` suppresses the router's x-envoy-* headers and names
        // itself `calm-gw` in answers that have no server header; the
        // other keeps Envoy's defaults (`server: envoy` on every answer).
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(&Router {
                suppress_envoy_headers: clean,
                ..Default::default()
            }))),
            ..Default::default()
        }],
        server_name: if clean {
            "calm-gw".into()
        } else {
            String::new()
        },
        // `clean` makes no request ids; the other returns them, and
        // appends itself to `via` both ways.
        generate_request_id: clean
            .then_some(portico_proto::google::protobuf::BoolValue { value: false }),
        always_set_request_id_in_response: !clean,
        via: if clean {
            String::new()
        } else {
            "edge-gw".into()
        },
        server_header_transformation: if clean {
            ServerHeaderTransformation::AppendIfAbsent
        } else {
            ServerHeaderTransformation::Overwrite
        } as i32,
        // Without `clean`: an edge behind one trusted proxy, which keeps
        // nothing a client says of its own request id; with it, a
        // listener behind an edge, reading the client from
        // x-forwarded-for.
        use_remote_address: (!clean)
            .then_some(portico_proto::google::protobuf::BoolValue { value: true }),
        xff_num_trusted_hops: if clean { 0 } else { 1 },
        append_x_forwarded_port: !clean,
        // With `clean`, a request forwarded for 10/8 alone is internal, and
        // may steer the router with Envoy's x-envoy-* request headers.
        internal_address_config: clean.then(|| {
            portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::InternalAddressConfig {
                cidr_ranges: vec![portico_proto::envoy::config::core::v3::CidrRange {
                    address_prefix: "10.0.0.0".into(),
                    prefix_len: Some(UInt32Value { value: 8 }),
                }],
                ..Default::default()
            }
        }),
        // Short, so that the test sees connections and streams idle out;
        // with `clean`, connections also end after 3 requests or 2 s.
        // Header names with underscores are dropped (`clean`) or refused;
        // `clean` allows 12 header fields.
        common_http_protocol_options: Some(HttpProtocolOptions {
            headers_with_underscores_action: if clean {
                HeadersWithUnderscoresAction::DropHeader
            } else {
                HeadersWithUnderscoresAction::RejectRequest
            } as i32,
            max_headers_count: clean.then_some(UInt32Value { value: 12 }),
            idle_timeout: Some(portico_proto::google::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            }),
            max_requests_per_connection: clean.then_some(UInt32Value { value: 3 }),
            max_connection_duration: clean.then_some(portico_proto::google::protobuf::Duration {
                seconds: 2,
                nanos: 0,
            }),
            ..Default::default()
        }),
        stream_idle_timeout: Some(portico_proto::google::protobuf::Duration {
            seconds: stream_idle,
            nanos: 0,
        }),
        // HTTP/1.0 is answered 426 (Envoy's default) without `clean`, and
        // served with `clean`, with a Host of its own when it has none.
        http_protocol_options: clean.then(|| {
            portico_proto::envoy::config::core::v3::Http1ProtocolOptions {
                accept_http_10: true,
                default_host_for_http_10: "legacy.example".into(),
                ..Default::default()
            }
        }),
        // Without `clean`: HTTP/2 clients get 3 streams at once and 100 kB
        // windows.
        http2_protocol_options: (!clean).then(|| {
            portico_proto::envoy::config::core::v3::Http2ProtocolOptions {
                max_concurrent_streams: Some(UInt32Value { value: 3 }),
                initial_stream_window_size: Some(UInt32Value { value: 100_000 }),
                initial_connection_window_size: Some(UInt32Value { value: 200_000 }),
                ..Default::default()
            }
        }),
        // Without `clean`: hosts lose a trailing dot and the listener's own
        // port before routing (and upstream).
        strip_trailing_host_dot: !clean,
        strip_matching_host_port: !clean,
        // Without `clean`, 404s of its own say so in JSON.
        local_reply_config: (!clean).then(not_found_in_json),
        // `clean`: a whole request must arrive within 1 s.
        request_timeout: clean.then_some(portico_proto::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        }),
        // Without `clean`, a second log (the first's path + `.picked`, in
        // Envoy's default fields) gets only answers of 500 and over, or
        // requests with an `x-log-me` header.
        access_log: log
            .into_iter()
            .flat_map(|f| {
                let picked = (!clean).then(|| AccessLog {
                    name: "picked".into(),
                    config_type: Some(access_log::ConfigType::TypedConfig(pack(&FileAccessLog {
                        path: format!("{}.picked", f.path),
                        access_log_format: None,
                    }))),
                    filter: Some(picked_filter()),
                });
                [
                    Some(AccessLog {
                        name: "envoy.access_loggers.file".into(),
                        config_type: Some(access_log::ConfigType::TypedConfig(pack(&f))),
                        ..Default::default()
                    }),
                    picked,
                ]
            })
            .flatten()
            .collect(),
        normalize_path: clean.then_some(portico_proto::google::protobuf::BoolValue { value: true }),
        merge_slashes: clean,
        // Escaped slashes: unescaped and redirected (`clean`) or refused.
        path_with_escaped_slashes_action: if clean {
            PathWithEscapedSlashesAction::UnescapeAndRedirect
        } else {
            PathWithEscapedSlashesAction::RejectRequest
        } as i32,
        ..Default::default()
    };
    Listener {
        name: name.into(),
        address: Some(addr(port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A local reply mapper: the proxy's own 404s get a body of their own, in
/// JSON, and an `x-mapped` header.
fn not_found_in_json(
) -> portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::LocalReplyConfig
{
    use portico_proto::envoy::config::accesslog::v3::{
        access_log_filter::FilterSpecifier, comparison_filter::Op, ComparisonFilter,
        StatusCodeFilter,
    };
    use portico_proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption, RuntimeUInt32};
    use portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
        LocalReplyConfig, ResponseMapper,
    };
    let s = |v: &str| portico_proto::google::protobuf::Value {
        kind: Some(portico_proto::google::protobuf::value::Kind::StringValue(
            v.into(),
        )),
    };
    let fields = [("error", "%LOCAL_REPLY_BODY%"), ("code", "%RESPONSE_CODE%")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), s(v)))
        .collect();
    LocalReplyConfig {
        mappers: vec![ResponseMapper {
            filter: Some(AccessLogFilter {
                filter_specifier: Some(FilterSpecifier::StatusCodeFilter(StatusCodeFilter {
                    comparison: Some(ComparisonFilter {
                        op: Op::Eq as i32,
                        value: Some(RuntimeUInt32 {
                            default_value: 404,
                            runtime_key: "k".into(),
                        }),
                    }),
                })),
            }),
            body: Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString("nothing here".into())),
                ..Default::default()
            }),
            body_format_override: Some(SubstitutionFormatString {
                format: Some(substitution_format_string::Format::JsonFormat(
                    portico_proto::google::protobuf::Struct { fields },
                )),
                ..Default::default()
            }),
            headers_to_add: vec![
                HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "x-mapped".into(),
                        value: "yes".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                // Made per request, from a header nothing else reads.
                HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "x-mapped-for".into(),
                        value: "%REQ(x-tenant)%".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        body_format: None,
    }
}

/// Status 500 and over, or an `x-log-me` header.
fn picked_filter() -> AccessLogFilter {
    use portico_proto::envoy::config::accesslog::v3::{
        access_log_filter::FilterSpecifier, comparison_filter::Op, ComparisonFilter, HeaderFilter,
        OrFilter, StatusCodeFilter,
    };
    use portico_proto::envoy::config::core::v3::RuntimeUInt32;
    use portico_proto::envoy::config::route::v3::{header_matcher, HeaderMatcher};
    let status = AccessLogFilter {
        filter_specifier: Some(FilterSpecifier::StatusCodeFilter(StatusCodeFilter {
            comparison: Some(ComparisonFilter {
                op: Op::Ge as i32,
                value: Some(RuntimeUInt32 {
                    default_value: 500,
                    runtime_key: "log.min_status".into(),
                }),
            }),
        })),
    };
    let header = AccessLogFilter {
        filter_specifier: Some(FilterSpecifier::HeaderFilter(HeaderFilter {
            header: Some(HeaderMatcher {
                name: "x-log-me".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(
                    true,
                )),
                ..Default::default()
            }),
        })),
    };
    AccessLogFilter {
        filter_specifier: Some(FilterSpecifier::OrFilter(OrFilter {
            filters: vec![status, header],
        })),
    }
}

fn endpoints(name: &str, eps: &[(u16, HealthStatus)]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: eps
                .iter()
                .map(|(port, health)| LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(addr(*port)),
                        ..Default::default()
                    })),
                    health_status: *health as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Endpoints in two localities of weight 1: `p[0]` alone, `p[1]` and
/// `p[2]` together.
fn zoned(name: &str, p: &[u16]) -> ClusterLoadAssignment {
    let mut a = endpoints(name, &[(p[0], HealthStatus::Unknown)]);
    let b = endpoints(
        name,
        &[(p[1], HealthStatus::Unknown), (p[2], HealthStatus::Unknown)],
    );
    a.endpoints.extend(b.endpoints);
    for l in &mut a.endpoints {
        l.load_balancing_weight = Some(UInt32Value { value: 1 });
    }
    a
}

/// An EDS cluster (endpoints come separately) or a STATIC one.
fn cluster(name: &str, lb: LbPolicy, static_eps: Option<&[u16]>) -> Cluster {
    let mut c = Cluster {
        name: name.into(),
        lb_policy: lb as i32,
        ..Default::default()
    };
    match static_eps {
        Some(ports) => {
            c.cluster_discovery_type =
                Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
            let eps: Vec<_> = ports.iter().map(|p| (*p, HealthStatus::Unknown)).collect();
            c.load_assignment = Some(endpoints(name, &eps));
        }
        None => {
            c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
            c.eds_cluster_config = Some(EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: String::new(),
            });
        }
    }
    c
}

/// A cluster of one endpoint, `localhost:port`, resolved by the proxy
/// (`family`: Envoy's `dns_lookup_family` number).
#[allow(deprecated)]
fn dns_cluster(name: &str, port: u16, kind: DiscoveryType, family: i32) -> Cluster {
    let mut c = cluster(name, LbPolicy::RoundRobin, Some(&[port]));
    c.cluster_discovery_type = Some(ClusterDiscoveryType::Type(kind as i32));
    c.dns_lookup_family = family;
    c.dns_refresh_rate = Some(portico_proto::google::protobuf::Duration {
        seconds: 0,
        nanos: 200_000_000,
    });
    if let Some(cla) = c.load_assignment.as_mut() {
        for l in &mut cla.endpoints {
            for e in &mut l.lb_endpoints {
                if let Some(HostIdentifier::Endpoint(ep)) = &mut e.host_identifier {
                    ep.address = Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "localhost".into(),
                            port_specifier: Some(PortSpecifier::PortValue(port.into())),
                            ..Default::default()
                        })),
                    });
                }
            }
        }
    }
    c
}

fn prefix_route(prefix: &str, cluster: &str, edit: impl FnOnce(&mut RouteAction)) -> Route {
    let mut action = RouteAction {
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    edit(&mut action);
    Route {
        name: prefix.trim_matches('/').into(),
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(prefix.into())),
            ..Default::default()
        }),
        action: Some(Action::Route(action)),
        ..Default::default()
    }
}

fn routes(extra: Vec<Route>) -> RouteConfiguration {
    let retry = |on: &str| {
        Some(RetryPolicy {
            retry_on: on.into(),
            num_retries: Some(UInt32Value { value: 3 }),
            ..Default::default()
        })
    };
    let mut rs = extra;
    rs.extend([
        prefix_route("/rx/", "plain", |a| {
            a.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher {
                    regex: "^/rx/([a-z]+)/([0-9]+)$".into(),
                    ..Default::default()
                }),
                substitution: "/items/\\2/\\1".into(),
            });
        }),
        // 429s retried when their retry-after says (Envoy's rate-limited
        // back-off).
        prefix_route("/polite", "plain", |a| a.retry_policy = polite()),
        // The same within a route timeout of 1 s.
        prefix_route("/brusque", "plain", |a| {
            a.timeout = Some(portico_proto::google::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            });
            a.retry_policy = polite();
        }),
        // Tries of 500 ms, retried.
        prefix_route("/quick-tries", "plain", |a| {
            a.retry_policy = Some(RetryPolicy {
                retry_on: "5xx".into(),
                num_retries: Some(UInt32Value { value: 2 }),
                per_try_timeout: Some(portico_proto::google::protobuf::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                ..Default::default()
            });
        }),
        prefix_route("/tries", "plain", |a| {
            a.timeout = Some(portico_proto::google::protobuf::Duration {
                seconds: 5,
                nanos: 0,
            });
            a.retry_policy = Some(RetryPolicy {
                retry_on: "5xx".into(),
                per_try_timeout: Some(portico_proto::google::protobuf::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..Default::default()
            });
        }),
        // A direct 404: the listener's local_reply_config shapes it too.
        Route {
            name: "gone".into(),
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/gone".into())),
                ..Default::default()
            }),
            action: Some(Action::DirectResponse(
                portico_proto::envoy::config::route::v3::DirectResponseAction {
                    status: 404,
                    body: Some(DataSource {
                        specifier: Some(data_source::Specifier::InlineString("gone".into())),
                        ..Default::default()
                    }),
                    body_format: None,
                },
            )),
            ..Default::default()
        },
        prefix_route("/xfh", "plain", |a| {
            a.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(
                "inner.example".into(),
            ));
            a.append_x_forwarded_host = true;
        }),
        prefix_route("/host", "plain", |a| {
            a.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(
                "rewritten.example".into(),
            ));
        }),
        prefix_route("/hash", "hash", |a| {
            a.hash_policy = vec![HashPolicy {
                policy_specifier: Some(hash_policy::PolicySpecifier::Header(hash_policy::Header {
                    header_name: "x-user".into(),
                    ..Default::default()
                })),
                ..Default::default()
            }];
        }),
        // Sticky sessions: a cookie made on the first answer.
        prefix_route("/sticky", "hash", |a| {
            a.hash_policy = vec![HashPolicy {
                policy_specifier: Some(hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
                    name: "gw-route".into(),
                    ttl: Some(portico_proto::google::protobuf::Duration {
                        seconds: 300,
                        nanos: 0,
                    }),
                    path: "/sticky".into(),
                    ..Default::default()
                })),
                ..Default::default()
            }];
        }),
        prefix_route("/random", "random", |_| {}),
        prefix_route("/zones", "zones", |_| {}),
        prefix_route("/flat", "flat", |_| {}),
        prefix_route("/rated", "rated", |_| {}),
        prefix_route("/checked", "checked", |_| {}),
        // A cookie picks u1; a client certificate would pick u1 too, but
        // no connection has one; the rest go to u2.
        Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/by-cookie".into())),
                cookies: vec![portico_proto::envoy::config::route::v3::CookieMatcher {
                    name: "canary".into(),
                    string_match: Some(
                        portico_proto::envoy::r#type::matcher::v3::StringMatcher {
                            match_pattern: Some(
                                portico_proto::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(
                                    "yes".into(),
                                ),
                            ),
                            ..Default::default()
                        },
                    ),
                    invert_match: false,
                }],
                tls_context: None,
                ..Default::default()
            }),
            ..prefix_route("/by-cookie", "first", |_| {})
        },
        Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Prefix("/by-cookie".into())),
                tls_context: Some(
                    portico_proto::envoy::config::route::v3::route_match::TlsContextMatchOptions {
                        presented: Some(portico_proto::google::protobuf::BoolValue { value: true }),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            }),
            ..prefix_route("/by-cookie", "first", |_| {})
        },
        prefix_route("/by-cookie", "plain", |_| {}),
        Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(PathSpecifier::Path("/exact-params".into())),
                ..Default::default()
            }),
            ..prefix_route("/exact-params", "first", |_| {})
        },
        prefix_route("/dns-v4", "dns-v4", |_| {}),
        prefix_route("/dns-v6", "dns-v6", |_| {}),
        // Envoy's other host rewrites: the endpoint's host name (a DNS
        // cluster's name, an endpoint's `hostname`; none: kept), a request
        // header, the path.
        prefix_route("/auto-dns", "dns-v4", |a| {
            a.host_rewrite_specifier = Some(HostRewriteSpecifier::AutoHostRewrite(
                portico_proto::google::protobuf::BoolValue { value: true },
            ));
            a.append_x_forwarded_host = true;
        }),
        prefix_route("/auto-named", "named", |a| {
            a.host_rewrite_specifier = Some(HostRewriteSpecifier::AutoHostRewrite(
                portico_proto::google::protobuf::BoolValue { value: true },
            ));
        }),
        prefix_route("/auto-plain", "plain", |a| {
            a.host_rewrite_specifier = Some(HostRewriteSpecifier::AutoHostRewrite(
                portico_proto::google::protobuf::BoolValue { value: true },
            ));
            a.append_x_forwarded_host = true;
        }),
        prefix_route("/by-header", "plain", |a| {
            a.host_rewrite_specifier =
                Some(HostRewriteSpecifier::HostRewriteHeader("x-target-host".into()));
            a.append_x_forwarded_host = true;
        }),
        prefix_route("/by-path", "plain", |a| {
            a.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewritePathRegex(
                RegexMatchAndSubstitute {
                    pattern: Some(RegexMatcher {
                        regex: "^/by-path/([^/]+)/.*$".into(),
                        ..Default::default()
                    }),
                    substitution: "\\1".into(),
                },
            ));
        }),
        prefix_route("/budgeted", "budgeted", |a| a.retry_policy = retry("5xx")),
        prefix_route("/health", "health", |_| {}),
        prefix_route("/panicky", "panicky", |_| {}),
        prefix_route("/tiers", "tiers", |_| {}),
        prefix_route("/shed", "shed", |_| {}),
        prefix_route("/connect", "connect", |a| {
            a.retry_policy = retry("connect-failure")
        }),
        prefix_route("/noretry", "resetting", |_| {}),
        prefix_route("/budgetless", "budgetless", |a| {
            a.retry_policy = retry("5xx")
        }),
        prefix_route("/again", "plain", |a| a.retry_policy = retry("5xx")),
        // Retried when the answer names `origin` as its server, and only
        // requests that carry `x-retry-me`.
        prefix_route("/picky", "plain", |a| {
            use portico_proto::envoy::config::route::v3::{header_matcher, HeaderMatcher};
            use portico_proto::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
            let mut p = retry("retriable-headers").expect("a policy");
            p.retriable_headers = vec![HeaderMatcher {
                name: "server".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact("origin".into())),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }];
            p.retriable_request_headers = vec![HeaderMatcher {
                name: "x-retry-me".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(
                    true,
                )),
                ..Default::default()
            }];
            a.retry_policy = Some(p);
        }),
        prefix_route("/on-reset", "resetting", |a| {
            a.retry_policy = retry("reset")
        }),
        // Their own stream idle timeouts: 3 s, and none at all.
        prefix_route("/patient", "plain", |a| {
            a.idle_timeout = Some(portico_proto::google::protobuf::Duration {
                seconds: 3,
                nanos: 0,
            })
        }),
        prefix_route("/forever", "plain", |a| {
            a.idle_timeout = Some(portico_proto::google::protobuf::Duration::default())
        }),
        prefix_route("/brief", "plain", |a| {
            a.idle_timeout = Some(portico_proto::google::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            })
        }),
        // Stream duration limits: a gRPC call's own deadline (uncapped),
        // a fixed 800 ms, and the deprecated max_grpc_timeout.
        prefix_route("/deadline", "plain", |a| {
            a.max_stream_duration = Some(MaxStreamDuration {
                grpc_timeout_header_max: Some(Default::default()),
                ..Default::default()
            })
        }),
        prefix_route("/capped", "h2", |a| {
            a.max_stream_duration = Some(MaxStreamDuration {
                max_stream_duration: Some(portico_proto::google::protobuf::Duration {
                    seconds: 0,
                    nanos: 800_000_000,
                }),
                ..Default::default()
            })
        }),
        #[allow(deprecated)]
        prefix_route("/old-deadline", "plain", |a| {
            a.max_grpc_timeout = Some(Default::default())
        }),
        // Traffic shadowing: every request copied to "first" (u1), with
        // -shadow on its host; half of them to "h2" (u2 over HTTP/2),
        // keeping the host.
        prefix_route("/mirrored", "plain", |a| {
            a.request_mirror_policies = vec![
                RequestMirrorPolicy {
                    cluster: "first".into(),
                    ..Default::default()
                },
                RequestMirrorPolicy {
                    cluster: "h2".into(),
                    disable_shadow_host_suffix_append: true,
                    runtime_fraction: Some(RuntimeFractionalPercent {
                        default_value: Some(FractionalPercent {
                            numerator: 50,
                            denominator: 0,
                        }),
                        runtime_key: String::new(),
                    }),
                    ..Default::default()
                },
            ]
        }),
        // A copy with a host of its own (no -shadow suffix then).
        prefix_route("/mirror-host", "plain", |a| {
            a.request_mirror_policies = vec![RequestMirrorPolicy {
                cluster: "first".into(),
                host_rewrite_literal: "mirror.example".into(),
                ..Default::default()
            }]
        }),
        // Half to u1 (its own header edits and host), half to u2, by the
        // draw in x-draw; the route's edits come after the cluster's.
        Route {
            response_headers_to_add: vec![
                header_option("x-layer", "route", true),
                header_option("x-status", "%RESPONSE_CODE%", false),
            ],
            ..prefix_route("/canary", "plain", |a| {
                use portico_proto::envoy::config::route::v3::weighted_cluster::{
                    cluster_weight::HostRewriteSpecifier as TargetHost, ClusterWeight,
                    RandomValueSpecifier,
                };
                use portico_proto::envoy::config::route::v3::WeightedCluster;
                a.cluster_specifier = Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
                    clusters: vec![
                        ClusterWeight {
                            name: "first".into(),
                            weight: Some(UInt32Value { value: 50 }),
                            request_headers_to_add: vec![
                                header_option("x-canary", "yes", false),
                                header_option("x-drawn", "%REQ(x-draw)%", false),
                            ],
                            response_headers_to_add: vec![header_option(
                                "x-layer", "cluster", false,
                            )],
                            host_rewrite_specifier: Some(TargetHost::HostRewriteLiteral(
                                "canary.internal".into(),
                            )),
                            ..Default::default()
                        },
                        ClusterWeight {
                            name: "plain".into(),
                            weight: Some(UInt32Value { value: 50 }),
                            ..Default::default()
                        },
                    ],
                    random_value_specifier: Some(RandomValueSpecifier::HeaderName("x-draw".into())),
                    ..Default::default()
                }));
            })
        },
        // No endpoint: the router's own 503 gets the route's edits too.
        Route {
            response_headers_to_add: vec![
                header_option("x-route-edit", "yes", false),
                header_option("x-code", "%RESPONSE_CODE%", false),
                header_option("x-flags", "%RESPONSE_FLAGS%", false),
            ],
            ..prefix_route("/nowhere", "empty", |_| {})
        },
        // Values made per request by Envoy's command operators.
        Route {
            request_headers_to_add: vec![
                header_option(
                    "x-client",
                    "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                    false,
                ),
                header_option("x-user-again", "%REQ(X-User)%", false),
                header_option("x-absent", "%REQ(x-nothing)%", false),
                header_option("x-percent", "100%%", false),
            ],
            response_headers_to_add: vec![
                header_option(
                    "x-served",
                    "%UPSTREAM_CLUSTER% %RESPONSE_CODE% %RESP(x-upstream)%",
                    false,
                ),
                header_option("x-host", "%UPSTREAM_HOST%", false),
            ],
            ..prefix_route("/formatted", "plain", |_| {})
        },
        // Retries keep at most 1 KiB of a body here (the listener's 1 MiB
        // elsewhere).
        #[allow(deprecated)]
        Route {
            per_request_buffer_limit_bytes: Some(UInt32Value { value: 1024 }),
            ..prefix_route("/small-buffer", "plain", |a| a.retry_policy = retry("5xx"))
        },
        // WebSocket tunnels: under the listener's stream idle timeout, and
        // under none.
        prefix_route("/ws-idle", "plain", |a| a.upgrade_configs = websocket()),
        // Upgrades to another protocol: allowed, and (the route's word
        // winning over the connection manager's) not.
        prefix_route("/up-foo", "plain", |a| {
            a.upgrade_configs = vec![UpgradeConfig {
                upgrade_type: "foo".into(),
                ..Default::default()
            }]
        }),
        prefix_route("/up-off", "plain", |a| {
            a.upgrade_configs = vec![UpgradeConfig {
                upgrade_type: "bar".into(),
                enabled: Some(portico_proto::google::protobuf::BoolValue { value: false }),
                ..Default::default()
            }]
        }),
        prefix_route("/ws-forever", "plain", |a| {
            a.upgrade_configs = websocket();
            a.idle_timeout = Some(portico_proto::google::protobuf::Duration::default())
        }),
        // ... and under a stream duration limit of 1.5 s.
        prefix_route("/ws-capped", "plain", |a| {
            a.upgrade_configs = websocket();
            a.max_stream_duration = Some(MaxStreamDuration {
                max_stream_duration: Some(portico_proto::google::protobuf::Duration {
                    seconds: 1,
                    nanos: 500_000_000,
                }),
                ..Default::default()
            })
        }),
    ]);
    RouteConfiguration {
        name: "routes".into(),
        virtual_hosts: vec![
            VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: rs,
                include_request_attempt_count: true,
                include_attempt_count_in_response: true,
                include_is_timeout_retry_header: true,
                ..Default::default()
            },
            VirtualHost {
                // Every request copied to "first", though no route says so.
                name: "shadowed".into(),
                domains: vec!["shadowed.test".into()],
                routes: vec![prefix_route("/", "plain", |_| {})],
                request_mirror_policies: vec![RequestMirrorPolicy {
                    cluster: "first".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            VirtualHost {
                // Plain HTTP is sent to https.
                name: "secure".into(),
                domains: vec!["secure.test".into()],
                routes: vec![prefix_route("/", "plain", |_| {})],
                require_tls: 2, // ALL
                ..Default::default()
            },
        ],
        // Requests from outside the trusted network lose it before routing.
        internal_only_headers: vec!["X-Secret".into()],
        // A proxy in front may name the virtual host in a header of its
        // own; paths match without their `;` parameters.
        vhost_header: "x-vhost".into(),
        ignore_path_parameters_in_path_matching: true,
        ..Default::default()
    }
}

/// A header to add: appended, or overwriting what is there.
fn header_option(
    k: &str,
    v: &str,
    overwrite: bool,
) -> portico_proto::envoy::config::core::v3::HeaderValueOption {
    use portico_proto::envoy::config::core::v3::{
        header_value_option::HeaderAppendAction, HeaderValueOption,
    };
    HeaderValueOption {
        header: Some(portico_proto::envoy::config::core::v3::HeaderValue {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }),
        append_action: if overwrite {
            HeaderAppendAction::OverwriteIfExistsOrAdd
        } else {
            HeaderAppendAction::AppendIfExistsOrAdd
        } as i32,
        ..Default::default()
    }
}

/// A retry policy for 429s that waits as their `retry-after` says.
fn polite() -> Option<RetryPolicy> {
    use portico_proto::envoy::config::route::v3::retry_policy::{
        RateLimitedRetryBackOff, ResetHeader,
    };
    Some(RetryPolicy {
        retry_on: "retriable-status-codes".into(),
        retriable_status_codes: vec![429],
        rate_limited_retry_back_off: Some(RateLimitedRetryBackOff {
            reset_headers: vec![ResetHeader {
                name: "retry-after".into(),
                format: 0,
            }],
            max_interval: None,
        }),
        ..Default::default()
    })
}

/// A route's upgrade configs that allow WebSocket.
fn websocket() -> Vec<UpgradeConfig> {
    vec![UpgradeConfig {
        upgrade_type: "websocket".into(),
        ..Default::default()
    }]
}

/// A server that reads a request and closes without answering.
fn resetter() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            drop(s);
        }
    });
    port
}

#[test]
fn foreign_control_plane_envoy_features() {
    let ups: Vec<Upstream> = ["u1", "u2", "u3"]
        .into_iter()
        .map(Upstream::start)
        .collect();
    let p: Vec<u16> = ups.iter().map(|u| u.addr.port()).collect();
    let port = free_port();
    let xds = StaticXds::start();
    xds.set(
        CLUSTER,
        vec![
            resource(
                "plain",
                &cluster("plain", LbPolicy::RoundRobin, Some(&[p[1]])),
            ),
            resource("h2", &{
                let mut c = cluster("h2", LbPolicy::RoundRobin, Some(&[p[1]]));
                #[allow(deprecated)]
                {
                    c.http2_protocol_options = Some(Default::default());
                }
                c
            }),
            resource(
                "first",
                &cluster("first", LbPolicy::RoundRobin, Some(&[p[0]])),
            ),
            resource("named", &{
                let mut c = cluster("named", LbPolicy::RoundRobin, Some(&[p[0]]));
                let la = c.load_assignment.as_mut().expect("static");
                if let Some(HostIdentifier::Endpoint(e)) =
                    &mut la.endpoints[0].lb_endpoints[0].host_identifier
                {
                    e.hostname = "named.example".into();
                }
                c
            }),
            resource("empty", &cluster("empty", LbPolicy::RoundRobin, Some(&[]))),
            // "localhost" resolved by the proxy: its IPv4 address, or
            // only an IPv6 one (none here, or not where u3 listens).
            resource(
                "dns-v4",
                &dns_cluster("dns-v4", p[2], DiscoveryType::StrictDns, 1),
            ),
            resource(
                "dns-v6",
                &dns_cluster("dns-v6", p[2], DiscoveryType::LogicalDns, 2),
            ),
            // Two localities of equal weight, u1 alone in one: with
            // locality-weighted balancing it takes half the traffic; the
            // same endpoints without it take a third each.
            resource("zones", &{
                let mut c = cluster("zones", LbPolicy::RoundRobin, None);
                c.common_lb_config = Some(
                    portico_proto::envoy::config::cluster::v3::cluster::CommonLbConfig {
                        locality_config_specifier: Some(portico_proto::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(Default::default())),
                        ..Default::default()
                    },
                );
                c
            }),
            resource("flat", &cluster("flat", LbPolicy::RoundRobin, None)),
            // Outlier detection by success rate alone, judged every 300 ms
            // over endpoints that served 10 requests.
            resource("rated", &{
                let mut c = cluster("rated", LbPolicy::RoundRobin, Some(&p));
                let n = |value| Some(UInt32Value { value });
                c.outlier_detection = Some(portico_proto::envoy::config::cluster::v3::OutlierDetection {
                    interval: Some(portico_proto::google::protobuf::Duration {
                        seconds: 0,
                        nanos: 300_000_000,
                    }),
                    enforcing_consecutive_5xx: n(0),
                    success_rate_minimum_hosts: n(3),
                    success_rate_request_volume: n(10),
                    success_rate_stdev_factor: n(1000),
                    max_ejection_percent: n(50),
                    ..Default::default()
                });
                c
            }),
            // Health checked by HEAD with a header of its own; a bad status
            // makes an endpoint unhealthy at once, whatever the threshold.
            resource("checked", &{
                use portico_proto::envoy::config::core::v3::{health_check, HealthCheck};
                let mut c = cluster("checked", LbPolicy::RoundRobin, Some(&[p[0], p[1]]));
                c.health_checks = vec![HealthCheck {
                    interval: Some(portico_proto::google::protobuf::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    timeout: Some(portico_proto::google::protobuf::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    unhealthy_threshold: Some(UInt32Value { value: 5 }),
                    healthy_threshold: Some(UInt32Value { value: 1 }),
                    health_checker: Some(health_check::HealthChecker::HttpHealthCheck(
                        health_check::HttpHealthCheck {
                            host: "hc.example".into(),
                            path: "/healthz".into(),
                            method: portico_proto::envoy::config::core::v3::RequestMethod::Head
                                as i32,
                            request_headers_to_add: vec![header_option("x-hc", "yes", false)],
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }];
                c
            }),
            // A retry budget of nothing: no retries, whatever max_retries.
            resource("budgeted", &{
                let mut c = cluster("budgeted", LbPolicy::RoundRobin, Some(&[p[1]]));
                c.circuit_breakers = Some(
                    portico_proto::envoy::config::cluster::v3::CircuitBreakers {
                        thresholds: vec![
                            portico_proto::envoy::config::cluster::v3::circuit_breakers::Thresholds {
                                retry_budget: Some(portico_proto::envoy::config::cluster::v3::circuit_breakers::thresholds::RetryBudget {
                                    budget_percent: Some(portico_proto::envoy::r#type::v3::Percent { value: 0.0 }),
                                    min_retry_concurrency: Some(UInt32Value { value: 0 }),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    },
                );
                c
            }),
            // No retry budget at all.
            resource("budgetless", &{
                let mut c = cluster("budgetless", LbPolicy::RoundRobin, Some(&[p[1]]));
                c.circuit_breakers = Some(
                    portico_proto::envoy::config::cluster::v3::CircuitBreakers {
                        thresholds: vec![
                            portico_proto::envoy::config::cluster::v3::circuit_breakers::Thresholds {
                                max_retries: Some(UInt32Value { value: 0 }),
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    },
                );
                c
            }),
            resource("hash", &cluster("hash", LbPolicy::RingHash, None)),
            resource("random", &cluster("random", LbPolicy::Random, None)),
            // Without panic mode (threshold 0): only available endpoints.
            resource("health", &{
                let mut c = cluster("health", LbPolicy::RoundRobin, None);
                c.common_lb_config = Some(
                    portico_proto::envoy::config::cluster::v3::cluster::CommonLbConfig {
                        healthy_panic_threshold: Some(portico_proto::envoy::r#type::v3::Percent {
                            value: 0.0,
                        }),
                        ..Default::default()
                    },
                );
                c
            }),
            // Envoy's default panic threshold, 50%.
            resource("panicky", &cluster("panicky", LbPolicy::RoundRobin, None)),
            resource("tiers", &cluster("tiers", LbPolicy::RoundRobin, None)),
            resource("shed", &cluster("shed", LbPolicy::RoundRobin, None)),
            resource(
                "connect",
                &cluster("connect", LbPolicy::RoundRobin, Some(&[free_port(), p[0]])),
            ),
            resource(
                "resetting",
                &cluster("resetting", LbPolicy::RoundRobin, Some(&[resetter(), p[2]])),
            ),
        ],
    );
    let all: Vec<_> = p.iter().map(|x| (*x, HealthStatus::Unknown)).collect();
    // Priority 0 is u1 and u2, priority 1 is u3.
    let tiers = |u1: HealthStatus, u2: HealthStatus| {
        let mut a = endpoints("tiers", &[(p[0], u1), (p[1], u2)]);
        let mut backup = endpoints("tiers", &[(p[2], HealthStatus::Unknown)]).endpoints;
        backup[0].priority = 1;
        a.endpoints.extend(backup);
        resource("tiers", &a)
    };
    // Two drop categories: the first drops all there is.
    let shed = {
        use portico_proto::envoy::config::endpoint::v3::cluster_load_assignment::{
            policy::DropOverload, Policy,
        };
        use portico_proto::envoy::r#type::v3::FractionalPercent;
        let drop = |category: &str, numerator| DropOverload {
            category: category.into(),
            drop_percentage: Some(FractionalPercent {
                numerator,
                denominator: 0,
            }),
        };
        let mut a = endpoints("shed", &[(p[0], HealthStatus::Unknown)]);
        a.policy = Some(Policy {
            drop_overloads: vec![drop("throttle", 100), drop("lb", 10)],
            ..Default::default()
        });
        resource("shed", &a)
    };
    let eds = [
        resource("hash", &endpoints("hash", &all)),
        resource("random", &endpoints("random", &all)),
        resource("zones", &zoned("zones", &p)),
        resource("flat", &zoned("flat", &p)),
        resource(
            "health",
            &endpoints(
                "health",
                &[
                    (p[0], HealthStatus::Healthy),
                    (p[1], HealthStatus::Unhealthy),
                    (p[2], HealthStatus::Draining),
                ],
            ),
        ),
        resource(
            "panicky",
            &endpoints(
                "panicky",
                &[
                    (p[0], HealthStatus::Healthy),
                    (p[1], HealthStatus::Unhealthy),
                    (p[2], HealthStatus::Unhealthy),
                ],
            ),
        ),
        shed,
    ];
    xds.set(
        ENDPOINT,
        eds.iter()
            .cloned()
            .chain([tiers(HealthStatus::Healthy, HealthStatus::Unhealthy)])
            .collect(),
    );
    // A second listener, on the same routes, without a stream idle
    // timeout of its own and with path normalization.
    // Their access logs in formats of their own: text, and JSON.
    let calm_port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let (text_log, json_log) = (dir.path().join("calm.log"), dir.path().join("foreign.log"));
    let text_format = |f: &str| FileAccessLog {
        path: text_log.display().to_string(),
        access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
            SubstitutionFormatString {
                format: Some(substitution_format_string::Format::TextFormatSource(
                    DataSource {
                        specifier: Some(data_source::Specifier::InlineString(f.into())),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            },
        )),
    };
    let json_format = {
        let s = |v: &str| portico_proto::google::protobuf::Value {
            kind: Some(portico_proto::google::protobuf::value::Kind::StringValue(
                v.into(),
            )),
        };
        let mut fields = std::collections::HashMap::new();
        fields.insert("code".to_string(), s("%RESPONSE_CODE%"));
        fields.insert("path".to_string(), s("%REQ(:PATH)%"));
        fields.insert("user".to_string(), s("%REQ(X-USER)%"));
        fields.insert("from".to_string(), s("%UPSTREAM_LOCAL_ADDRESS%"));
        fields.insert("client".to_string(), s("%DOWNSTREAM_REMOTE_ADDRESS%"));
        fields.insert("peer".to_string(), s("%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%"));
        fields.insert("grpc".to_string(), s("%GRPC_STATUS%"));
        fields.insert("trailer".to_string(), s("%TRAILER(GRPC-MESSAGE)%"));
        FileAccessLog {
            path: json_log.display().to_string(),
            access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
                SubstitutionFormatString {
                    format: Some(substitution_format_string::Format::JsonFormat(
                        portico_proto::google::protobuf::Struct { fields },
                    )),
                    ..Default::default()
                },
            )),
        }
    };
    let good_listeners = vec![
        resource(
            "foreign",
            &listener("foreign", port, 1, false, Some(json_format.clone())),
        ),
        resource(
            "calm",
            &listener(
                "calm",
                calm_port,
                0,
                true,
                Some(text_format(
                    "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %REQ(X-USER?USER-AGENT)% %UPSTREAM_CLUSTER% %RESPONSE_FLAGS% %RESP(X-UPSTREAM)% %RESPONSE_CODE_DETAILS% %DOWNSTREAM_LOCAL_ADDRESS% %START_TIME(%z)%",
                )),
            ),
        ),
    ];
    // Two more on the same routes, each taking only some connections
    // (filter_chain_match): clients from 10/8 on the first (not this test,
    // on loopback); on the second, clients from this host connecting to
    // its port.
    let (guarded_port, local_port) = (free_port(), free_port());
    let mut good_listeners = good_listeners;
    for (name, at, m) in [
        (
            "guarded",
            guarded_port,
            FilterChainMatch {
                source_prefix_ranges: vec![portico_proto::envoy::config::core::v3::CidrRange {
                    address_prefix: "10.0.0.0".into(),
                    prefix_len: Some(UInt32Value { value: 8 }),
                }],
                ..Default::default()
            },
        ),
        (
            "local",
            local_port,
            FilterChainMatch {
                destination_port: Some(UInt32Value {
                    value: local_port.into(),
                }),
                source_type: portico_proto::envoy::config::listener::v3::filter_chain_match::ConnectionSourceType::SameIpOrLoopback as i32,
                ..Default::default()
            },
        ),
    ] {
        let mut l = listener(name, at, 1, false, None);
        l.filter_chains[0].filter_chain_match = Some(m);
        good_listeners.push(resource(name, &l));
    }
    xds.set(LISTENER, good_listeners.clone());
    xds.set(ROUTE, vec![resource("routes", &routes(Vec::new()))]);
    let dp = DataPlane::start(
        dir.path(),
        "dp-foreign",
        &xds.addr.to_string(),
        "any",
        &["--sotw"],
    );
    let get = |path: &str, headers: &[(&str, &str)]| {
        http1(port, "GET", path, "gw", headers, "").expect("request")
    };

    // Regex rewrite with capture groups, and a literal host rewrite.
    let r = get("/rx/pets/42", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with("GET /items/42/pets\n"), "{}", r.body);
    let r = get("/host", &[]);
    assert!(r.body.contains("\nhost: rewritten.example\n"), "{}", r.body);

    // Host normalization: the listener's port and a trailing dot go,
    // another port stays.
    let host_seen = |host: &str| {
        let r = http1(port, "GET", "/rx/pets/42", host, &[], "").expect("request");
        r.body
            .lines()
            .find_map(|l| l.strip_prefix("host: "))
            .map(str::to_owned)
    };
    assert_eq!(host_seen(&format!("gw.:{port}")).as_deref(), Some("gw"));
    assert_eq!(host_seen("gw:1234").as_deref(), Some("gw:1234"));
    assert_eq!(host_seen("gw.").as_deref(), Some("gw"));
    {
        // Over HTTP/2 the :authority is normalized the same way.
        use super::dp_h2_downstream::{fields, get as h2get, Raw, DATA};
        let mut c = Raw::connect(port, &[]);
        let mut req = h2get("/rx/pets/42");
        req[3].1 = format!("gw.:{port}");
        c.request(1, &fields(&req), None);
        let d = c.until("the echo", |f| f.kind == DATA && f.stream == 1);
        let text = String::from_utf8_lossy(&d.payload).into_owned();
        assert!(text.contains("\nhost: gw\n"), "{text}");
    }

    // The rewritten host's original is appended to x-forwarded-host,
    // unless it is already the last entry.
    let r = get("/xfh", &[("x-forwarded-host", "a.example")]);
    assert!(
        r.body.contains("\nhost: inner.example\n")
            && r.body.contains("\nx-forwarded-host: a.example,gw\n"),
        "{}",
        r.body
    );
    let r = get("/xfh", &[("x-forwarded-host", "a.example,gw")]);
    assert!(
        r.body.contains("\nx-forwarded-host: a.example,gw\n"),
        "{}",
        r.body
    );
    let r = get("/host", &[]);
    assert!(!r.body.contains("x-forwarded-host"), "{}", r.body);

    // The router's x-envoy-* headers, and the server header, as Envoy
    // sets them by default: the original path of a rewritten request and
    // the time the upstream has (the route's 15 s by default, else the
    // per-try timeout) go upstream; the time the upstream took comes back.
    let r = get("/rx/pets/42", &[("x-answer-server", "origin")]);
    assert!(
        r.body.contains("\nx-envoy-original-path: /rx/pets/42\n")
            && r.body.contains("\nx-envoy-expected-rq-timeout-ms: 15000\n"),
        "{}",
        r.body
    );
    let took = r.header("x-envoy-upstream-service-time").unwrap_or("none");
    assert!(took.parse::<u64>().is_ok_and(|ms| ms < 5_000), "{r:?}");
    assert_eq!(r.header("server"), Some("envoy"), "{r:?}");
    let r = get("/tries/x", &[]);
    assert!(
        r.body.contains("\nx-envoy-expected-rq-timeout-ms: 2000\n")
            && !r.body.contains("x-envoy-original-path"),
        "{}",
        r.body
    );
    // A request id is a version 4 UUID, as Envoy makes them.
    let id = r
        .body
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("an x-request-id");
    let b = id.as_bytes();
    assert!(
        b.len() == 36
            && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
            && b[14] == b'4'
            && matches!(b[19], b'8' | b'9' | b'a' | b'b')
            && b.iter()
                .all(|c| *c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(c)),
        "{id}"
    );
    let r = get("/no/such/route", &[]);
    assert_eq!(
        (r.status, r.header("server")),
        (404, Some("envoy")),
        "{r:?}"
    );
    // The listener's local_reply_config maps its own 404s (not the other
    // local replies, nor an upstream's 404).
    assert_eq!(
        (r.header("content-type"), r.header("x-mapped")),
        (Some("application/json"), Some("yes")),
        "{r:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(v, serde_json::json!({"error": "nothing here", "code": 404}));
    assert_eq!(r.header("x-mapped-for"), None, "{r:?}");
    let r = get("/no/such/route", &[("x-tenant", "acme")]);
    assert_eq!(r.header("x-mapped-for"), Some("acme"), "{r:?}");
    let r = get("/host/status/404", &[]);
    assert_eq!((r.status, r.header("x-mapped")), (404, None), "{r:?}");
    let r = get("/gone", &[]);
    assert_eq!(
        (r.status, r.header("x-mapped")),
        (404, Some("yes")),
        "{r:?}"
    );
    assert!(r.body.contains("\"nothing here\""), "{r:?}");
    assert_eq!(r.header("via"), Some("edge-gw"), "{r:?}");
    assert_eq!(r.header("x-request-id").map(str::len), Some(36), "{r:?}");
    // The id the upstream saw comes back; `via` grows by one entry each
    // way; the tries (two 503s, then a 200) are counted both ways.
    let r = get("/again/flaky/ac/2", &[("via", "1.0 first")]);
    assert_eq!(r.status, 200, "{r:?}");
    let seen = r
        .body
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "));
    assert_eq!(seen, r.header("x-request-id"), "{r:?}");
    assert!(
        r.body.contains("\nvia: 1.0 first, edge-gw\n")
            && r.body.contains("\nx-envoy-attempt-count: 3\n")
            && r.body.contains("\nx-envoy-is-timeout-retry: false\n"),
        "{}",
        r.body
    );
    // A retry after a per-try timeout says so; a first try says nothing.
    let timed = get("/quick-tries/sluggish/timed/1/3000", &[]);
    assert!(
        timed.status == 200 && timed.body.contains("\nx-envoy-is-timeout-retry: true\n"),
        "{timed:?}"
    );
    // A 429 that says to come back in a second is retried a second later
    // (not after the 25 ms back-off); on the listener without a stream
    // idle timeout (the other's 1 s would end the wait first).
    let timed_get = |path: &str| {
        let started = std::time::Instant::now();
        let r = http1(calm_port, "GET", path, "gw", &[], "").expect("request");
        (r, started.elapsed())
    };
    let (polite, took) = timed_get("/polite/limited/pk/1/1");
    assert_eq!(polite.status, 200, "{polite:?}");
    assert!(
        took >= std::time::Duration::from_millis(1000)
            && took < std::time::Duration::from_millis(3000),
        "{took:?}"
    );
    // A wait past the route's time ends in its 504, at that time, with
    // no second try sent.
    let (brief, took) = timed_get("/brusque/limited/bk/1/5");
    assert_eq!(brief.status, 504, "{brief:?}");
    assert!(
        took >= std::time::Duration::from_millis(900)
            && took < std::time::Duration::from_millis(2500),
        "{took:?}"
    );
    let tries = ups[1]
        .seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|l| l.starts_with("GET /brusque/limited/bk/"))
        .count();
    assert_eq!(tries, 1, "the back-off outlasted the route: no second try");
    let first = get("/quick-tries/x", &[]);
    assert!(
        !first.body.contains("x-envoy-is-timeout-retry"),
        "{}",
        first.body
    );
    assert_eq!(
        (r.header("via"), r.header("x-envoy-attempt-count")),
        (Some("edge-gw"), Some("3")),
        "{r:?}"
    );
    // Retries on an answer header, for requests with the right header
    // only: four tries (the last answer passes as it is), else one.
    let tries = |headers: &[(&str, &str)]| {
        let r = get("/picky/x", headers);
        assert_eq!(r.status, 200, "{r:?}");
        r.header("x-envoy-attempt-count").map(str::to_owned)
    };
    assert_eq!(
        tries(&[("x-answer-server", "origin"), ("x-retry-me", "1")]).as_deref(),
        Some("4")
    );
    assert_eq!(
        tries(&[("x-answer-server", "origin")]).as_deref(),
        Some("1")
    );
    assert_eq!(
        tries(&[("x-answer-server", "other"), ("x-retry-me", "1")]).as_deref(),
        Some("1")
    );
    // A retry the cluster's budget refuses is not tried, and the answer
    // that would have been retried goes back as it came.
    let r = get("/budgetless/status/503", &[]);
    assert_eq!(
        (r.status, r.header("x-upstream")),
        (503, Some("u2")),
        "{r:?}"
    );
    let calm = |path: &str, headers: &[(&str, &str)]| {
        http1(calm_port, "GET", path, "gw", headers, "").expect("request")
    };
    // Suppressed, no request id made, and the server header only where
    // the answer has none.
    let r = calm("/rx/pets/42", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        !r.body.contains("x-envoy-original-path")
            && !r.body.contains("x-envoy-expected-rq-timeout-ms")
            && !r.body.contains("x-request-id"),
        "{}",
        r.body
    );
    assert_eq!(r.header("x-envoy-upstream-service-time"), None, "{r:?}");
    assert_eq!(r.header("server"), Some("calm-gw"), "{r:?}");
    let r = calm("/rx/pets/42", &[("x-answer-server", "origin")]);
    assert_eq!(r.header("server"), Some("origin"), "{r:?}");
    assert_eq!(
        (r.header("via"), r.header("x-request-id")),
        (None, None),
        "{r:?}"
    );
    let r = calm("/no/such/route", &[]);
    assert_eq!(
        (r.status, r.header("server")),
        (404, Some("calm-gw")),
        "{r:?}"
    );

    // Ring hash on a header: one user always lands on one endpoint, and
    // users spread over more than one.
    let mut by_user: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in 0..60 {
        let user = format!("user-{}", i % 12);
        let r = get("/hash", &[("x-user", &user)]);
        assert_eq!(r.status, 200, "{r:?}");
        by_user
            .entry(user)
            .or_default()
            .insert(r.header("x-upstream").expect("x-upstream").to_string());
    }
    assert!(
        by_user.values().all(|s| s.len() == 1),
        "sticky: {by_user:?}"
    );
    let used: BTreeSet<_> = by_user.values().flatten().collect();
    assert!(used.len() >= 2, "spread: {by_user:?}");
    // A cookie policy with a ttl: the first answer sets the cookie, and
    // the requests that send it back land where the first did.
    let r = get("/sticky", &[]);
    let set = r.header("set-cookie").expect("a cookie").to_string();
    assert!(
        set.starts_with("gw-route=\"") && set.ends_with("; Max-Age=300; Path=/sticky; HttpOnly"),
        "{set}"
    );
    let first = r.header("x-upstream").map(String::from);
    let cookie = set.split(';').next().expect("name=value").to_string();
    for _ in 0..12 {
        let r = get("/sticky", &[("cookie", &cookie)]);
        assert!(r.header("set-cookie").is_none(), "{r:?}");
        assert_eq!(r.header("x-upstream").map(String::from), first, "{r:?}");
    }

    // DNS clusters keep the family they are told to.
    let v4 = wait_for(std::time::Duration::from_secs(10), || {
        let r = get("/dns-v4/x", &[]);
        (r.status == 200).then_some(r)
    })
    .expect("localhost's IPv4 address serves");
    assert_eq!(v4.header("x-upstream"), Some("u3"), "{v4:?}");
    let r = get("/dns-v6/x", &[]);
    assert_eq!(r.status, 503, "no IPv6 address of localhost serves: {r:?}");
    // auto_host_rewrite: the name the DNS cluster resolved, or an
    // endpoint's hostname; an endpoint without one keeps the client's
    // host (and x-forwarded-host tells only of a rewrite).
    let r = get("/auto-dns/x", &[]);
    assert!(
        r.body.contains("\nhost: localhost\n") && r.body.contains("\nx-forwarded-host: gw\n"),
        "{}",
        r.body
    );
    let r = get("/auto-named/x", &[]);
    assert!(r.body.contains("\nhost: named.example\n"), "{}", r.body);
    let r = get("/auto-plain/x", &[]);
    assert!(
        r.body.contains("\nhost: gw\n") && !r.body.contains("x-forwarded-host"),
        "{}",
        r.body
    );
    // host_rewrite_header: the header's value, else the client's host.
    let r = get("/by-header/x", &[("x-target-host", "t.example")]);
    assert!(
        r.body.contains("\nhost: t.example\n") && r.body.contains("\nx-forwarded-host: gw\n"),
        "{}",
        r.body
    );
    let r = get("/by-header/x", &[]);
    assert!(
        r.body.contains("\nhost: gw\n") && !r.body.contains("x-forwarded-host"),
        "{}",
        r.body
    );
    // host_rewrite_path_regex: from the path without its query.
    let r = get("/by-path/p.example/x?to=q.example", &[]);
    assert!(r.body.contains("\nhost: p.example\n"), "{}", r.body);
    let (_, dump) = dp.admin_get("/clusters");
    assert!(
        dump.contains(&format!(
            "named::127.0.0.1:{}::hostname::named.example",
            p[0]
        )),
        "{dump}"
    );
    // A retry budget overrides max_retries: none here.
    let r = get("/budgeted/flaky/budget/1", &[]);
    assert_eq!(r.status, 503, "not retried: {r:?}");
    let r = get("/budgeted/flaky/budget/1", &[]);
    assert_eq!(r.status, 200, "the second try of the key: {r:?}");

    // Cookies pick routes; a route for client certificates never matches
    // a plain connection.
    let r = get("/by-cookie", &[("cookie", "a=1; canary=yes")]);
    assert_eq!(r.header("x-upstream"), Some("u1"), "{r:?}");
    let r = get("/by-cookie", &[("cookie", "canary=no")]);
    assert_eq!(r.header("x-upstream"), Some("u2"), "{r:?}");
    // The path matches without its parameters (and keeps them upstream).
    let r = get("/exact-params;v=1", &[]);
    assert_eq!(r.header("x-upstream"), Some("u1"), "{r:?}");
    assert!(r.body.starts_with("GET /exact-params;v=1\n"), "{}", r.body);
    // The virtual host named by x-vhost, not by Host.
    let r = get("/a", &[("x-vhost", "secure.test")]);
    assert_eq!(r.status, 301, "{r:?}");

    // Locality weights count only where the cluster asks for them.
    for (path, lone) in [("/zones", 60), ("/flat", 40)] {
        let mut n = BTreeMap::<String, usize>::new();
        for _ in 0..120 {
            *n.entry(get(path, &[]).header("x-upstream").unwrap_or("?").into())
                .or_default() += 1;
        }
        assert_eq!(n.get("u1").copied(), Some(lone), "{path}: {n:?}");
    }

    let answered = |path: &str| get(path, &[]).header("x-upstream").map(String::from);
    // Health checks: HEAD with the configured host; a failing status takes
    // u1 out at the first check (the threshold of 5 counts only for
    // checks that get no answer), within about a second.
    let checked = wait_for(std::time::Duration::from_secs(10), || {
        ups[0]
            .seen
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l == "HEAD /healthz hc.example -")
            .then_some(())
    });
    assert!(checked.is_some(), "u1 health checked by HEAD");
    ups[0]
        .unhealthy
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let out = wait_for(std::time::Duration::from_millis(3500), || {
        (0..6)
            .all(|_| answered("/checked") == Some("u2".to_string()))
            .then_some(())
    });
    ups[0]
        .unhealthy
        .store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(out.is_some(), "u1 out after one failed check");

    // Success-rate outlier detection: u3 failing every request, the others
    // none, u3 is ejected at the end of the interval and gets no more.
    ups[2]
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // Batches until one falls within one interval (10 requests each).
    let ejected = wait_for(std::time::Duration::from_secs(20), || {
        for _ in 0..45 {
            answered("/rated/x");
        }
        (dp.stat("cluster.rated.outlier_ejections") >= 1).then_some(())
    });
    ups[2]
        .failing
        .store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(ejected.is_some(), "u3 ejected by its success rate");
    let after: BTreeSet<_> = (0..30).filter_map(|_| answered("/rated/y")).collect();
    assert!(
        !after.contains("u3") && after.len() == 2,
        "traffic avoids u3: {after:?}"
    );

    // Random reaches every endpoint.
    let mut seen = BTreeSet::new();
    for _ in 0..90 {
        seen.insert(get("/random", &[]).header("x-upstream").map(String::from));
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // EDS health status: only the HEALTHY endpoint takes traffic...
    for _ in 0..12 {
        let r = get("/health", &[]);
        assert_eq!(r.header("x-upstream"), Some("u1"), "{r:?}");
    }
    // ...unless fewer than half of the endpoints are available and the
    // cluster keeps Envoy's panic threshold: then all of them do.
    let panics = dp.stat("cluster.panicky.lb_healthy_panic");
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        seen.insert(get("/panicky", &[]).header("x-upstream").map(String::from));
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(dp.stat("cluster.panicky.lb_healthy_panic"), panics + 12);

    // Priorities (Envoy's arithmetic): half of priority 0 is healthy, so
    // it takes 50% × 1.4 = 70% of the traffic and priority 1 the rest.
    let mut by = BTreeMap::new();
    for _ in 0..300 {
        let r = get("/tiers", &[]);
        *by.entry(r.header("x-upstream").map(String::from))
            .or_insert(0u32) += 1;
    }
    let u3 = by.get(&Some("u3".to_string())).copied().unwrap_or(0);
    // 90 expected; six standard deviations (7.9 each) either side.
    assert!(
        by.len() == 2 && by.contains_key(&Some("u1".to_string())) && (43..=137).contains(&u3),
        "{by:?}"
    );
    // With none of priority 0 healthy, priority 1 takes it all (no panic:
    // together the levels are healthy enough).
    xds.set(
        ENDPOINT,
        eds.iter()
            .cloned()
            .chain([tiers(HealthStatus::Unhealthy, HealthStatus::Unhealthy)])
            .collect(),
    );
    wait_for(std::time::Duration::from_secs(10), || {
        (0..12)
            .all(|_| get("/tiers", &[]).header("x-upstream") == Some("u3"))
            .then_some(())
    })
    .expect("priority 1 takes all the traffic");

    // The control plane sheds load: drop_overloads answer 503 before any
    // endpoint is tried, and say so.
    let r = get("/shed", &[]);
    assert_eq!(
        (r.status, r.body.as_str(), r.header("x-envoy-drop-overload")),
        (503, "drop overload\n", Some("true")),
        "{r:?}"
    );
    assert!(dp.stat("cluster.shed.upstream_rq_drop_overload") >= 1);

    // Connect failure and reset retried onto the endpoint that answers;
    // without a retry policy the reset shows.
    for _ in 0..6 {
        let r = get("/connect", &[]);
        assert_eq!(
            (r.status, r.header("x-upstream")),
            (200, Some("u1")),
            "{r:?}"
        );
        let r = get("/on-reset", &[]);
        assert_eq!(
            (r.status, r.header("x-upstream")),
            (200, Some("u3")),
            "{r:?}"
        );
    }
    let statuses: BTreeSet<u16> = (0..6).map(|_| get("/noretry", &[]).status).collect();
    assert!(
        statuses.contains(&502),
        "no retry: the reset shows: {statuses:?}"
    );
    assert!(dp.stat("http.upstream_rq_retry") >= 6);

    // A route to a cluster that does not exist: NACKed to this server with
    // the resource named, and the old routes keep serving.
    xds.set(
        ROUTE,
        vec![resource(
            "routes",
            &routes(vec![prefix_route("/ghost", "no-such-cluster", |_| {})]),
        )],
    );
    let nack = wait_for(std::time::Duration::from_secs(10), || {
        xds.nacks.lock().expect("nacks").last().cloned()
    })
    .expect("a NACK reaches the server");
    assert!(
        nack.contains("RouteConfiguration \"routes\"") && nack.contains("no-such-cluster"),
        "{nack}"
    );
    assert_eq!(get("/host", &[]).status, 200);
    assert_eq!(get("/ghost", &[]).status, 404);
    // The same with validate_clusters off is taken, and the route answers
    // as Envoy's does: 503, cluster not found.
    xds.set(
        ROUTE,
        vec![resource(
            "routes",
            &RouteConfiguration {
                validate_clusters: Some(portico_proto::google::protobuf::BoolValue {
                    value: false,
                }),
                ..routes(vec![prefix_route("/ghost", "no-such-cluster", |_| {})])
            },
        )],
    );
    let ghost = wait_for(std::time::Duration::from_secs(10), || {
        let r = get("/ghost", &[]);
        (r.status == 503).then_some(r)
    })
    .expect("taken without validation");
    assert!(ghost.body.contains("cluster not found"), "{ghost:?}");
    assert_eq!(get("/host", &[]).status, 200);
    // An access log format with an operator this proxy does not have:
    // NACKed, naming the listener and the operator; the old keeps running.
    let nacks = xds.nacks.lock().expect("nacks").len();
    xds.set(
        LISTENER,
        vec![resource(
            "calm",
            &listener("calm", calm_port, 0, true, Some(text_format("%NOPE%"))),
        )],
    );
    let nack = wait_for(std::time::Duration::from_secs(10), || {
        let n = xds.nacks.lock().expect("nacks");
        n[nacks..].iter().find(|m| m.contains("%NOPE%")).cloned()
    })
    .expect("the listener's NACK reaches the server");
    assert!(
        nack.contains("Listener \"calm\"") && nack.contains("%NOPE%"),
        "{nack}"
    );
    xds.set(LISTENER, good_listeners);
    assert_eq!(
        http1(
            calm_port,
            "GET",
            "/host/logged",
            "gw",
            &[("x-user", "ann")],
            ""
        )
        .expect("request")
        .status,
        200
    );
    assert_eq!(get("/host/json", &[("x-user", "bob")]).status, 200);
    let logged = |p: &std::path::Path, want: &str| {
        wait_for(std::time::Duration::from_secs(10), || {
            log_lines(p)?.iter().any(|l| l == want).then_some(())
        })
        .is_some()
    };
    assert!(
        logged(
            &text_log,
            &format!(
                "GET /host/logged 200 ann plain - u2 via_upstream 127.0.0.1:{calm_port} +0000"
            )
        ),
        "{:?}",
        std::fs::read_to_string(&text_log)
    );
    // The upstream connection's local address is the proxy's side of a
    // loopback connection to u2.
    let json_logged = wait_for(std::time::Duration::from_secs(10), || {
        json_log_lines(&json_log)?.into_iter().find_map(|v| {
            let from = v["from"].as_str()?.to_string();
            let rest = serde_json::json!({"code": v["code"], "path": v["path"], "user": v["user"]});
            (rest == serde_json::json!({"code": 200, "path": "/host/json", "user": "bob"}))
                .then_some(from)
        })
    });
    let from = json_logged.unwrap_or_else(|| panic!("{:?}", std::fs::read_to_string(&json_log)));
    // Who a request is from (Envoy's x-forwarded-for rules): at the edge
    // behind one trusted proxy, the last x-forwarded-for entry is the
    // client; the connection's peer is appended; the client may not set
    // x-envoy-* steering, the route configuration's internal-only
    // headers, or its own request id.
    let r = get(
        "/host/whom",
        &[
            ("x-forwarded-for", "198.51.100.7, 10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "mine"),
            ("x-secret", "s"),
            ("x-envoy-retry-on", "5xx"),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    for want in [
        "\nx-forwarded-for: 198.51.100.7, 10.0.0.2, 127.0.0.1\n",
        "\nx-envoy-external-address: 10.0.0.2\n",
        "\nx-forwarded-proto: https\n",
        &format!("\nx-forwarded-port: {port}\n"),
    ] {
        assert!(r.body.contains(want), "{want:?} in {}", r.body);
    }
    for gone in ["x-secret", "x-envoy-retry-on", "mine"] {
        assert!(!r.body.contains(gone), "{gone} gone: {}", r.body);
    }
    let whom = wait_for(std::time::Duration::from_secs(10), || {
        json_log_lines(&json_log)?.into_iter().find_map(|v| {
            (v["path"] == "/host/whom").then(|| (v["client"].clone(), v["peer"].clone()))
        })
    })
    .unwrap_or_else(|| panic!("{:?}", std::fs::read_to_string(&json_log)));
    assert_eq!(whom.0, "10.0.0.2:0", "{whom:?}");
    assert!(
        whom.1.as_str().is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{whom:?}"
    );
    // Behind an edge (no use_remote_address): x-forwarded-for is the
    // edge's to set and stays as it came; the internal-only headers go
    // all the same (no address is internal here).
    let r = http1(
        calm_port,
        "GET",
        "/host/whom",
        "gw",
        &[("x-forwarded-for", "198.51.100.9"), ("x-secret", "s")],
        "",
    )
    .expect("request");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains("\nx-forwarded-for: 198.51.100.9\n")
            && r.body.contains("\nx-forwarded-proto: http\n")
            && !r.body.contains("x-secret")
            && !r.body.contains("x-envoy-external-address"),
        "{}",
        r.body
    );
    // A virtual host that requires TLS redirects plain HTTP.
    let r = http1(port, "GET", "/a?b=1", "secure.test", &[], "").expect("request");
    assert_eq!(
        (r.status, r.header("location")),
        (301, Some("https://secure.test/a?b=1")),
        "{r:?}"
    );
    // The listener's HTTP/2 limits are what its SETTINGS announce, and
    // the connection window is opened to its size.
    {
        use super::dp_h2_downstream::{Raw, SETTINGS, WINDOW_UPDATE};
        let mut c = Raw::connect(port, &[]);
        let s = c.until("the server's SETTINGS", |f| {
            f.kind == SETTINGS && f.flags & 1 == 0 && f.stream == 0
        });
        let announced: BTreeMap<u16, u32> = s
            .payload
            .chunks(6)
            .map(|p| {
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                )
            })
            .collect();
        assert_eq!(
            (announced.get(&3), announced.get(&4)),
            (Some(&3), Some(&100_000)),
            "{announced:?}"
        );
        let w = c.until("the connection's window", |f| {
            f.kind == WINDOW_UPDATE && f.stream == 0
        });
        assert_eq!(
            u32::from_be_bytes([w.payload[0], w.payload[1], w.payload[2], w.payload[3]]),
            200_000 - 65_535
        );
    }

    // HTTP/1.0: refused by default, served where the listener allows it.
    let r = raw(port, b"GET /host HTTP/1.0\r\nHost: gw\r\n\r\n").expect("answer");
    assert_eq!(r.status, 426, "{r:?}");
    let r = raw(calm_port, b"GET /rx/pets/42 HTTP/1.0\r\n\r\n").expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("\nhost: legacy.example\n"), "{}", r.body);

    // Weighted clusters: the draw in x-draw picks (0..50 the first);
    // the first's own request edit and host go upstream, its response
    // edit comes back under the route's (which overwrites it).
    let r = get("/canary/a", &[("x-draw", "7")]);
    assert_eq!(r.header("x-upstream"), Some("u1"), "{r:?}");
    assert!(
        r.body.contains("\nx-canary: yes\n")
            && r.body.contains("\nx-drawn: 7\n")
            && r.body.contains("\nhost: canary.internal\n"),
        "{}",
        r.body
    );
    assert_eq!(
        (r.header("x-layer"), r.header("x-status")),
        (Some("route"), Some("200")),
        "{r:?}"
    );
    let r = get("/canary/a", &[("x-draw", "157")]);
    assert_eq!(r.header("x-upstream"), Some("u2"), "{r:?}");
    assert!(
        !r.body.contains("x-canary") && r.body.contains("\nhost: gw\n"),
        "{}",
        r.body
    );
    // Without a draw, both are picked.
    let picked: BTreeSet<String> = (0..40)
        .filter_map(|_| {
            get("/canary/b", &[])
                .header("x-upstream")
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(picked.len(), 2, "{picked:?}");
    // The router's own answers carry the route's response edits.
    let r = get("/nowhere", &[]);
    assert_eq!(
        (r.status, r.header("x-route-edit")),
        (503, Some("yes")),
        "{r:?}"
    );
    assert_eq!(
        (r.header("x-code"), r.header("x-flags")),
        (Some("503"), Some("UH")),
        "{r:?}"
    );
    // Header values with Envoy's command operators.
    let r = get("/formatted/x", &[("x-user", "ann")]);
    assert!(
        r.body.contains("\nx-client: 127.0.0.1\n")
            && r.body.contains("\nx-user-again: ann\n")
            && r.body.contains("\nx-percent: 100%\n")
            && !r.body.contains("x-absent"),
        "{}",
        r.body
    );
    assert_eq!(r.header("x-served"), Some("plain 200 u2"), "{r:?}");
    let upstream = format!("127.0.0.1:{}", p[1]);
    assert_eq!(r.header("x-host"), Some(upstream.as_str()), "{r:?}");
    // A virtual host's mirrors serve its routes that name none.
    let shadowed = ups[0].seen.lock().expect("lock").len();
    let r = http1(port, "GET", "/vh-mirror", "shadowed.test", &[], "").expect("request");
    assert_eq!(r.header("x-upstream"), Some("u2"), "{r:?}");
    let copied = wait_for(std::time::Duration::from_secs(10), || {
        ups[0].seen.lock().expect("lock")[shadowed..]
            .iter()
            .any(|l| l.starts_with("GET /vh-mirror shadowed.test-shadow "))
            .then_some(())
    });
    assert!(copied.is_some(), "the virtual host's mirror got a copy");
    // A 100 kB body is kept for a retry (Envoy's 1 MiB per connection);
    // a route that keeps 1 KiB does not retry a 2 kB one.
    let big = "x".repeat(100_000);
    let r = http1(port, "POST", "/again/flaky/big/1", "gw", &[], &big).expect("request");
    assert_eq!(r.status, 200, "the 503 retried with the body: {r:?}");
    let sent = ups[1]
        .seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|l| *l == "POST /again/flaky/big/1 gw 100000")
        .count();
    assert_eq!(sent, 2, "both tries carried the body");
    let r = http1(
        port,
        "POST",
        "/small-buffer/flaky/small/1",
        "gw",
        &[],
        &big[..2000],
    )
    .expect("request");
    assert_eq!(r.status, 503, "not kept, not retried: {r:?}");
    // Connections the filter chain does not take are closed unanswered
    // and counted; the other guarded listener serves this host.
    let refused = dp.stat("listener.no_filter_chain_match");
    let closed = http1(guarded_port, "GET", "/host", "gw", &[], "");
    assert!(closed.is_err(), "closed without an answer: {closed:?}");
    assert_eq!(dp.stat("listener.no_filter_chain_match"), refused + 1);
    let r = http1(local_port, "GET", "/host", "gw", &[], "").expect("request");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(dp.stat("listener.no_filter_chain_match"), refused + 1);

    // An internal request steers the router with Envoy's headers (which
    // go no further); the same headers from outside do nothing.
    let steered = |path: &str, internal: bool, headers: &[(&str, &str)]| {
        let mut all = headers.to_vec();
        if internal {
            all.push(("x-forwarded-for", "10.1.2.3"));
        }
        http1(calm_port, "GET", path, "gw", &all, "").expect("request")
    };
    let retry = [("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "3")];
    let r = steered("/host/flaky/steer-in/2", true, &retry);
    assert_eq!(r.status, 200, "two 503s retried: {r:?}");
    assert!(
        r.body.contains("\nx-envoy-internal: true\n") && !r.body.contains("x-envoy-retry-on"),
        "{}",
        r.body
    );
    let r = steered("/host/flaky/steer-out/2", false, &retry);
    assert_eq!(r.status, 503, "not retried from outside: {r:?}");
    let timeout = [("x-envoy-upstream-rq-timeout-ms", "200")];
    let t = std::time::Instant::now();
    let r = steered("/host/slow/3000", true, &timeout);
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        t.elapsed() < std::time::Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    let r = steered(
        "/host/slow/3000",
        true,
        &[
            timeout[0],
            ("x-envoy-upstream-rq-timeout-alt-response", "1"),
        ],
    );
    assert_eq!(r.status, 204, "{r:?}");
    // The filtered log: the budgetless 503 and the marked request, and no
    // other line (of the dozens of 200s and 404s by now).
    let picked_log = dir.path().join("foreign.log.picked");
    let marked = get("/host/marked", &[("x-log-me", "1")]);
    assert_eq!(marked.status, 200);
    let picked = wait_for(std::time::Duration::from_secs(10), || {
        let lines: Vec<(u64, String)> = json_log_lines(&picked_log)?
            .into_iter()
            .map(|v| {
                let code = v["response_code"].as_u64().expect("a code");
                (code, v["path"].as_str().expect("a path").to_string())
            })
            .collect();
        lines
            .iter()
            .any(|(_, p)| p == "/host/marked")
            .then_some(lines)
    })
    .unwrap_or_else(|| panic!("{:?}", std::fs::read_to_string(&picked_log)));
    assert!(
        picked.contains(&(503, "/budgetless/status/503".to_string()))
            && picked.iter().all(|(c, p)| *c >= 500 || p == "/host/marked"),
        "{picked:?}"
    );
    let from: std::net::SocketAddr = from.parse().expect("an address");
    assert!(
        from.ip().is_loopback() && from.port() != ups[1].addr.port(),
        "{from}"
    );

    // The HCM's idle timeout (1 s here) ends idle connections: HTTP/2 with
    // a GOAWAY after its last stream, HTTP/1.1 by closing.
    use super::dp_h2_downstream::{fields, get as h2get, Raw, DATA, END_STREAM, GOAWAY};
    let started = std::time::Instant::now();
    let mut c = Raw::connect(port, &[]);
    c.request(1, &fields(&h2get("/host")), None);
    c.until("the answer", |f| {
        f.kind == DATA && f.flags & END_STREAM != 0
    });
    let g = c.until("GOAWAY", |f| f.kind == GOAWAY);
    assert_eq!(
        &g.payload[..8],
        &[0, 0, 0, 1, 0, 0, 0, 0],
        "NO_ERROR after stream 1"
    );
    let idle = started.elapsed();
    assert!(
        idle >= std::time::Duration::from_millis(900) && idle < std::time::Duration::from_secs(5),
        "idle for about a second: {idle:?}"
    );
    // The stream idle timeout (1 s here): an answer the client never opens
    // its window for is reset, and the connection then idles out.
    use super::dp_h2_downstream::{first_field, HEADERS, RST_STREAM, WINDOW_UPDATE};
    let about_a_second = |waited: std::time::Duration| {
        assert!(
            waited >= std::time::Duration::from_millis(950)
                && waited < std::time::Duration::from_secs(5),
            "after about the stream idle timeout: {waited:?}"
        );
    };
    let started = std::time::Instant::now();
    let mut c = Raw::connect(port, &[(4, 0)]);
    c.request(1, &fields(&h2get("/host")), None);
    c.until("the head", |f| f.kind == HEADERS);
    let r = c.until("RST_STREAM", |f| f.kind == RST_STREAM || f.kind == DATA);
    assert_eq!(
        (r.kind, r.stream, r.payload.as_slice()),
        (RST_STREAM, 1, &[0, 0, 0, 8][..]),
        "CANCEL"
    );
    about_a_second(started.elapsed());
    // An upstream that does not answer for 3 s: 408 after the stream
    // idle timeout, on HTTP/2 and on HTTP/1.1.
    let started = std::time::Instant::now();
    let mut h2 = Raw::connect(port, &[]);
    h2.request(1, &fields(&h2get("/host/slow/3000")), None);
    let h = h2.until("the 408", |f| f.kind == HEADERS);
    assert!(
        h.payload.windows(3).any(|w| w == b"408") && h.flags & END_STREAM != 0,
        "408 ending the stream: {h:?}"
    );
    about_a_second(started.elapsed());
    let started = std::time::Instant::now();
    let r = get("/host/slow/3000", &[]);
    assert_eq!((r.status, r.body.as_str()), (408, "stream timeout\n"));
    about_a_second(started.elapsed());
    // A route's own idle timeout replaces the listener's for its streams
    // (3 s, or 0 for none): their slow answers arrive, on both protocols.
    // On a kept-alive HTTP/1.1 connection the next stream has the
    // listener's again.
    assert_eq!(get("/patient/slow/2000", &[]).status, 200);
    assert_eq!(get("/forever/slow/2500", &[]).status, 200);
    let mut h2 = Raw::connect(port, &[]);
    h2.request(1, &fields(&h2get("/patient/slow/2000")), None);
    h2.request(3, &fields(&h2get("/forever/slow/2500")), None);
    for id in [1, 3] {
        let h = h2.until("an answer", |f| f.kind == HEADERS && f.stream == id);
        assert_eq!(first_field(&h), 0x88, "200 on stream {id}");
    }
    let mut s = connect(port);
    let mut answer = |path: &str| {
        let req = format!("GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n");
        s.write_all(req.as_bytes()).expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().expect("length"))
                    })
                    .expect("content-length");
                if got.len() >= end + 4 + len {
                    return text[9..12].to_string();
                }
            }
        }
    };
    assert_eq!(answer("/forever/slow/1500"), "200");
    let started = std::time::Instant::now();
    assert_eq!(answer("/host/slow/3000"), "408");
    about_a_second(started.elapsed());
    // An HTTP/1.1 client that stops reading a long answer: the connection
    // closes after the stream idle timeout (and is counted as such).
    let idled_out = dp.stat("http.downstream_rq_idle_timeout");
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("connect");
    let mut s = std::net::TcpStream::from(s);
    s.write_all(b"GET /host/bytes/8000000 HTTP/1.1\r\nhost: gw\r\n\r\n")
        .expect("write");
    let started = std::time::Instant::now();
    // Not read for 1.5 s: by then the gateway gave up on the client.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the stalled answer's connection closes: {e}"),
        }
    }
    assert!(got < 8_000_000, "the answer was cut: {got} bytes");
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
    assert_eq!(dp.stat("http.downstream_rq_idle_timeout"), idled_out + 1);
    c.until("GOAWAY", |f| f.kind == GOAWAY);
    let mut s = connect(port);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "an idle HTTP/1.1 connection closes silently"
    );
    drop((c, h2, s));

    // An HTTP/2 client that stops reading its socket, with its windows
    // wide open: the answer's writes stall on the socket, and the server
    // gives the connection up after the stream idle timeout, with the
    // client still not reading.
    let open = |want: u64| {
        wait_for(std::time::Duration::from_secs(8), || {
            (dp.stat("http.downstream_cx_active") == want).then_some(())
        })
        .is_some()
    };
    assert!(open(0), "the test's other connections are gone");
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("connect");
    let mut stalled = Raw::over(std::net::TcpStream::from(sock), &[(4, 0x7fff_ffff)]);
    stalled.send(WINDOW_UPDATE, 0, 0, &0x7fff_0000u32.to_be_bytes());
    stalled.request(1, &fields(&h2get("/host/bytes/8000000")), None);
    let started = std::time::Instant::now();
    assert!(open(1), "the stalled connection is open");
    assert!(open(0), "the stalled connection is given up");
    about_a_second(started.elapsed());
    drop(stalled);

    // A WebSocket tunnel lives while bytes pass (2.4 s of them here, past
    // the 1 s stream idle timeout), and is closed once none passed for
    // the timeout, and counted. A route's 0 keeps a silent one open.
    let idled_out = dp.stat("http.downstream_rq_idle_timeout");
    let mut busy = upgrade(port, "/ws-idle/chat");
    for _ in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(400));
        echo(&mut busy, b"still here");
    }
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    match busy.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a silent tunnel is closed: {other:?}"),
    }
    about_a_second(started.elapsed());
    assert_eq!(dp.stat("http.downstream_rq_idle_timeout"), idled_out + 1);
    // Other protocols are tunnelled where a route allows them (foo) or
    // the connection manager does (bar), unless the route says not (as
    // Envoy's: the route's word wins); elsewhere refused, 403.
    let (head, mut foo) = upgrade_to(port, "/up-foo/x", "Foo");
    assert!(
        head.starts_with("http/1.1 101") && head.contains("upgrade: foo"),
        "{head}"
    );
    echo(&mut foo, b"not websocket");
    let (head, mut bar) = upgrade_to(port, "/host/x", "bar");
    assert!(head.starts_with("http/1.1 101"), "{head}");
    echo(&mut bar, b"the connection manager's");
    for (path, protocol) in [("/up-off/x", "bar"), ("/host/x", "foo")] {
        let (head, _) = upgrade_to(port, path, protocol);
        assert!(
            head.starts_with("http/1.1 403"),
            "{path} {protocol}: {head}"
        );
    }
    let mut calm = upgrade(port, "/ws-forever/chat");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    echo(&mut calm, b"after a long silence");
    // A stream duration limit ends even a busy tunnel, and is counted.
    let limited = dp.stat("http.downstream_rq_max_duration_reached");
    let started = std::time::Instant::now();
    let mut capped = upgrade(port, "/ws-capped/chat");
    let ended = loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let _ = capped.write_all(b"busy");
        let mut b = [0u8; 4];
        match capped.read_exact(&mut b) {
            Ok(()) => assert!(
                started.elapsed() < std::time::Duration::from_millis(2500),
                "still open"
            ),
            Err(_) => break started.elapsed(),
        }
    };
    assert!(
        ended >= std::time::Duration::from_millis(1400)
            && ended < std::time::Duration::from_millis(2500),
        "ended after {ended:?}"
    );
    assert_eq!(
        dp.stat("http.downstream_rq_max_duration_reached"),
        limited + 1
    );

    // With the listener's stream idle timeout off, a slow answer is
    // waited for, except on a route that sets its own (1 s), on both
    // protocols, which then counts as an idle timeout.
    let idled_out = dp.stat("http.downstream_rq_idle_timeout");
    let calm_with = |path: &str, headers: &[(&str, &str)]| {
        http1(calm_port, "GET", path, "gw", headers, "").expect("request")
    };
    let calm = |path: &str| calm_with(path, &[]);
    assert_eq!(calm("/host/slow/1500").status, 200);
    let started = std::time::Instant::now();
    let r = calm("/brief/slow/3000");
    assert_eq!((r.status, r.body.as_str()), (408, "stream timeout\n"));
    about_a_second(started.elapsed());
    let started = std::time::Instant::now();
    let mut h2 = Raw::connect(calm_port, &[]);
    h2.request(1, &fields(&h2get("/host/slow/1500")), None);
    h2.request(3, &fields(&h2get("/brief/slow/3000")), None);
    let h = h2.until("the 408", |f| f.kind == HEADERS && f.stream == 3);
    assert!(h.payload.windows(3).any(|w| w == b"408"), "{h:?}");
    about_a_second(started.elapsed());
    let h = h2.until("the slow answer", |f| f.kind == HEADERS && f.stream == 1);
    assert_eq!(first_field(&h), 0x88, "200 on stream 1");
    assert_eq!(dp.stat("http.downstream_rq_idle_timeout"), idled_out + 2);
    drop(h2);

    // Path normalization on the second listener: dot segments (also
    // escaped ones) and doubled slashes are gone before routing, and the
    // upstream gets the clean path; a malformed escape is a 400. The first
    // listener routes the raw path.
    let r = calm("/public/../rx/pets/42");
    assert!(r.body.starts_with("GET /items/42/pets\n"), "{r:?}");
    let r = calm("/x/%2e%2E//rx//pets/7?q=a//b");
    assert!(r.body.starts_with("GET /items/7/pets?q=a//b\n"), "{r:?}");
    let r = calm("//host/%7Ea");
    assert!(r.body.starts_with("GET /host/~a\n"), "{r:?}");
    assert_eq!(calm("/host/bad%zz").status, 400);
    let r = get("/public/../rx/pets/42", &[]);
    assert!(!r.body.starts_with("GET /items/"), "the raw path: {r:?}");

    // Escaped slashes: the second listener redirects to the path without
    // them (unescaped, then normalized and merged; the query kept), and a
    // gRPC client, which would not follow, gets a refusal; the first
    // listener refuses them. Either case of hex counts.
    let redirected = dp.stat("http.downstream_rq_redirected_with_normalized_path");
    let failed = dp.stat("http.downstream_rq_failed_path_normalization");
    let r = calm("/public%2F..%2fhost%2F%2Fx?y=%2F");
    assert_eq!(r.status, 307, "{r:?}");
    assert_eq!(r.header("location"), Some("/host/x?y=%2F"), "{r:?}");
    let r = http1(
        calm_port,
        "POST",
        "/host%2Fx",
        "gw",
        &[("content-type", "application/grpc")],
        "",
    )
    .expect("request");
    assert_eq!(r.header("grpc-status"), Some("13"), "{r:?}");
    assert_eq!(get("/host%5cx", &[]).status, 400);
    assert_eq!(get("/host%2Fx", &[]).status, 400);
    assert_eq!(
        get("/host?x=%2F", &[]).status,
        200,
        "the query is not the path"
    );
    assert_eq!(
        dp.stat("http.downstream_rq_redirected_with_normalized_path"),
        redirected + 1
    );
    assert_eq!(
        dp.stat("http.downstream_rq_failed_path_normalization"),
        failed + 3
    );

    // Header names with underscores: dropped on the second listener (the
    // upstream sees only `x-user`), refused on the first: 400 over
    // HTTP/1.1, a reset stream over HTTP/2, on a connection that goes on.
    let r = calm_with("/host", &[("x_user", "mallory"), ("x-user", "ann")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("\nx-user: ann\n"), "{r:?}");
    assert!(!r.body.contains("mallory"), "dropped: {r:?}");
    assert_eq!(get("/host", &[("x_user", "mallory")]).status, 400);
    {
        use super::dp_h2_downstream::{first_field, rst_code, HEADERS, INTERNAL_ERROR, RST_STREAM};
        let mut c = Raw::connect(port, &[]);
        let mut bad = h2get("/host");
        bad.push(("x_user", "mallory".into()));
        c.request(1, &fields(&bad), None);
        let f = c.until("RST_STREAM", |f| {
            f.stream == 1 && (f.kind == RST_STREAM || f.kind == HEADERS)
        });
        assert_eq!(f.kind, RST_STREAM, "{f:?}");
        assert_eq!(rst_code(&f), INTERNAL_ERROR, "Envoy's code");
        c.request(3, &fields(&h2get("/host")), None);
        let h = c.until("the next answer", |f| f.kind == HEADERS && f.stream == 3);
        assert_eq!(first_field(&h), 0x88, "200 on stream 3");
    }
    assert_eq!(
        dp.stat("http.requests_rejected_with_underscores_in_headers"),
        2
    );
    assert_eq!(dp.stat("http.dropped_headers_with_underscores"), 1);
    // Trailers too: dropped on the second listener, refused on the first.
    let chunked_with_trailers = |port: u16| {
        let mut s = connect(port);
        s.write_all(
            b"POST /host/t HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx_user: admin\r\nx-ok: yes\r\n\r\n",
        )
        .expect("write");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let answer = chunked_with_trailers(calm_port);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("hello\ntrailer x-ok: yes"), "{answer}");
    assert!(!answer.contains("admin"), "dropped: {answer}");
    let answer = chunked_with_trailers(port);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(
        dp.stat("http.requests_rejected_with_underscores_in_headers"),
        3
    );
    assert_eq!(dp.stat("http.dropped_headers_with_underscores"), 2);

    // At most 12 header fields on the second listener, on both protocols
    // (the HTTP/1.1 client sends Host and Connection itself).
    let ten: Vec<(String, String)> = (0..10)
        .map(|i| (format!("x-{i}"), "v".to_string()))
        .collect();
    let ten: Vec<(&str, &str)> = ten.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(calm_with("/host", &ten).status, 200);
    let eleven = [&ten[..], &[("x-10", "v")]].concat();
    assert_eq!(calm_with("/host", &eleven).status, 431);
    {
        use super::dp_h2_downstream::{first_field, HEADERS, RST_STREAM};
        let mut c = Raw::connect(calm_port, &[]);
        let many = |n: usize| {
            let mut f = h2get("/host");
            f.extend((0..n).map(|i| {
                (
                    [
                        "x-a", "x-b", "x-c", "x-d", "x-e", "x-f", "x-g", "x-h", "x-i", "x-j",
                        "x-k", "x-l", "x-m",
                    ][i],
                    "v".to_string(),
                )
            }));
            f
        };
        // HTTP/2 counts the four pseudo-headers too, and resets a stream
        // over the limit with INTERNAL_ERROR, as Envoy does.
        c.request(1, &fields(&many(8)), None);
        let h = c.until("an answer", |f| f.kind == HEADERS && f.stream == 1);
        assert_eq!(first_field(&h), 0x88, "4 + 8 fields: 200");
        c.request(3, &fields(&many(9)), None);
        let r = c.until("a reset", |f| f.kind == RST_STREAM && f.stream == 3);
        assert_eq!(r.payload, [0, 0, 0, 2], "INTERNAL_ERROR: {r:?}");
        // Cookie crumbs are joined into one field, and count as one.
        let mut crumbs = many(7);
        crumbs.extend((0..4).map(|i| ("cookie", format!("c{i}=v"))));
        c.request(5, &fields(&crumbs), None);
        let h = c.until("an answer", |f| f.kind == HEADERS && f.stream == 5);
        assert_eq!(first_field(&h), 0x88, "4 + 7 fields and one cookie: 200");
    }

    // Connection limits on the second listener: the third request on a
    // connection is its last (HTTP/1.1: `connection: close`; HTTP/2: a
    // GOAWAY naming that stream), and a connection is drained at 2 s of
    // age.
    let (by_count, by_age) = (
        dp.stat("http.downstream_cx_max_requests_reached"),
        dp.stat("http.downstream_cx_max_duration_reached"),
    );
    let read_answer = |s: &mut std::net::TcpStream| {
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: ")?.trim().parse().ok())
                    .expect("content-length");
                if got.len() >= end + 4 + len {
                    return text[..end].to_string();
                }
            }
            let n = s.read(&mut b).expect("read");
            assert!(n > 0, "closed early: {text}");
            got.extend_from_slice(&b[..n]);
        }
    };
    let mut s = connect(calm_port);
    for i in 1..=3 {
        s.write_all(format!("GET /host/n{i} HTTP/1.1\r\nhost: gw\r\n\r\n").as_bytes())
            .expect("write");
        let head = read_answer(&mut s);
        assert_eq!(
            head.contains("connection: close"),
            i == 3,
            "request {i}: {head}"
        );
    }
    assert_eq!(
        s.read(&mut [0u8; 16]).expect("read"),
        0,
        "closed after the third"
    );
    let mut c = Raw::connect(calm_port, &[]);
    for id in [1, 3, 5] {
        c.request(id, &fields(&h2get("/host/x")), None);
    }
    let g = c.until("GOAWAY", |f| f.kind == GOAWAY);
    let last = u32::from_be_bytes([g.payload[0], g.payload[1], g.payload[2], g.payload[3]]);
    assert_eq!(last, 5, "the third stream is the last");
    drop(c);
    // At 2 s of age, with a stream still open (so not idle), an HTTP/2
    // connection gets its GOAWAY, and the stream still its answer.
    let started = std::time::Instant::now();
    let mut c = Raw::connect(calm_port, &[]);
    c.request(1, &fields(&h2get("/host/slow/2600")), None);
    let g = c.until("GOAWAY", |f| f.kind == GOAWAY);
    let age = started.elapsed();
    assert!(
        age >= std::time::Duration::from_millis(1900)
            && age < std::time::Duration::from_millis(2600),
        "GOAWAY at {age:?}: {g:?}"
    );
    let h = c.until("the answer", |f| f.kind == HEADERS && f.stream == 1);
    assert_eq!(first_field(&h), 0x88, "200 on stream 1");
    drop(c);
    // HTTP/1.1 too: a request still in flight at 2 s of age gets its
    // answer, with `connection: close`, and the connection closes.
    let started = std::time::Instant::now();
    let mut s = connect(calm_port);
    s.write_all(b"GET /host/slow/2600 HTTP/1.1\r\nhost: gw\r\n\r\n")
        .expect("write");
    let head = read_answer(&mut s);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("connection: close"),
        "the first request, aged: {head}"
    );
    assert!(started.elapsed() >= std::time::Duration::from_millis(2500));
    assert_eq!(s.read(&mut [0u8; 16]).expect("read"), 0, "closed after it");
    assert_eq!(
        dp.stat("http.downstream_cx_max_requests_reached"),
        by_count + 2
    );
    assert_eq!(
        dp.stat("http.downstream_cx_max_duration_reached"),
        by_age + 2
    );

    // Traffic shadowing: the client gets the primary's answer; the copies
    // arrive at the mirrors (the POST's body with them), and the share
    // drawn for the second mirror is about half.
    let before = |u: &Upstream| u.seen.lock().expect("lock").len();
    let (u1_before, u2_before) = (before(&ups[0]), before(&ups[1]));
    for i in 0..200 {
        let r = get(&format!("/mirrored/n{i}"), &[]);
        assert_eq!(
            (r.status, r.header("x-upstream")),
            (200, Some("u2")),
            "the primary answers"
        );
    }
    let r = http1(port, "POST", "/mirrored/post", "gw", &[], "hello");
    assert_eq!(r.expect("answer").status, 200);
    let copies = |u: &Upstream, from: usize, host: &str| {
        u.seen.lock().expect("lock")[from..]
            .iter()
            .filter(|l| l.starts_with("GET /mirrored/n") && l.contains(&format!(" {host} ")))
            .count()
    };
    let all = wait_for(std::time::Duration::from_secs(10), || {
        (copies(&ups[0], u1_before, "gw-shadow") == 200).then_some(())
    });
    assert!(
        all.is_some(),
        "every request copied to the first mirror: {}",
        copies(&ups[0], u1_before, "gw-shadow")
    );
    // The copy of the POST, sent last, may still be on its way.
    let post_copied = wait_for(std::time::Duration::from_secs(10), || {
        ups[0].seen.lock().expect("lock")[u1_before..]
            .iter()
            .any(|l| l == "POST /mirrored/post gw-shadow 5")
            .then_some(())
    });
    assert!(post_copied.is_some(), "the POST is copied with its body");
    let r = get("/mirror-host/x", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    let rehosted = wait_for(std::time::Duration::from_secs(10), || {
        ups[0].seen.lock().expect("lock")[u1_before..]
            .iter()
            .any(|l| l.starts_with("GET /mirror-host/x mirror.example "))
            .then_some(())
    });
    assert!(rehosted.is_some(), "the copy has the policy's host");
    // u2 sees its 200 primaries (host gw) plus about 100 copies (host gw
    // too: the suffix is turned off), over HTTP/2.
    let half = wait_for(std::time::Duration::from_secs(10), || {
        let n = copies(&ups[1], u2_before, "gw");
        (n >= 200 + 60).then_some(n)
    })
    .unwrap_or_else(|| copies(&ups[1], u2_before, "gw"));
    assert!(
        (260..=340).contains(&half),
        "about 100 copies to the second mirror: {}",
        half - 200
    );

    // Stream duration limits (the HCM's stream idle timeout, 1 s, would
    // answer 408 instead; these end sooner and say so differently).
    use http_body_util::BodyExt;
    let reached = dp.stat("http.downstream_rq_max_duration_reached");
    super::dp_common::rt().block_on(async {
        let mut tx = super::dp_common::h2_sender::<http_body_util::Full<bytes::Bytes>>(port).await;
        let mut call = async |path: &str, deadline: Option<&str>| {
            let mut req = hyper::Request::post(format!("http://gw{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            if let Some(d) = deadline {
                req = req.header("grpc-timeout", d);
            }
            let req = req.body(Default::default()).expect("request");
            let started = std::time::Instant::now();
            let resp = tx.send_request(req).await.expect("response");
            let status = resp.headers().get("grpc-status").cloned();
            (resp, status, started.elapsed())
        };
        // The call's deadline (400 ms) passes before the upstream's answer
        // (3 s): trailers-only DEADLINE_EXCEEDED, no sooner than that.
        let (resp, status, took) = call("/deadline/slow/3000", Some("400m")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            status.as_ref().map(|v| v.as_bytes()),
            Some(&b"4"[..]),
            "{resp:?}"
        );
        assert!(took >= std::time::Duration::from_millis(380), "{took:?}");
        // Without a deadline of its own the call takes what it takes.
        let (resp, status, _) = call("/deadline/slow/300", None).await;
        assert_eq!(
            (resp.status().as_u16(), status),
            (200, None),
            "the echo's head"
        );
        // The deprecated max_grpc_timeout: the deadline is the route
        // timeout, so the answer is the upstream timeout's (UNAVAILABLE).
        let (_, status, took) = call("/old-deadline/slow/3000", Some("300m")).await;
        assert_eq!(status.as_ref().map(|v| v.as_bytes()), Some(&b"14"[..]));
        assert!(took >= std::time::Duration::from_millis(280), "{took:?}");
        // The proxy's own answers to a gRPC call (no route, a direct
        // response) are gRPC statuses, after the listener's
        // local_reply_config has mapped them: 404 is UNIMPLEMENTED, the
        // mapped body the message, the mapper's header kept.
        for path in ["/no/such/route", "/gone"] {
            let (resp, status, _) = call(path, None).await;
            let h = resp.headers();
            assert_eq!(
                (
                    resp.status().as_u16(),
                    status.as_ref().map(|v| v.as_bytes()),
                    h.get("content-type").map(|v| v.as_bytes()),
                    h.get("x-mapped").map(|v| v.as_bytes()),
                ),
                (
                    200,
                    Some(&b"12"[..]),
                    Some(&b"application/grpc"[..]),
                    Some(&b"yes"[..])
                ),
                "{path}: {resp:?}"
            );
            let message = h.get("grpc-message").map(|v| v.to_str().unwrap_or(""));
            assert!(
                message.is_some_and(|m| m.contains("nothing here")),
                "{path}: {resp:?}"
            );
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert!(body.is_empty(), "trailers-only: {body:?}");
        }
        // An answer under way when the limit (800 ms) passes is cut: the
        // echo's head arrives, then the stream is reset.
        let (btx, brx) = tokio::sync::mpsc::channel::<
            Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >(4);
        let mut tx2 = super::dp_common::h2_sender(port).await;
        let req = hyper::Request::post("http://gw/capped/echo.Echo/Chat")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(brx),
            ))
            .expect("request");
        let started = std::time::Instant::now();
        btx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"\0\0\0\0\x02hi",
        ))))
        .await
        .expect("send");
        let resp = tx2.send_request(req).await.expect("the echo's head");
        let mut body = resp.into_body();
        let first = body.frame().await.expect("a frame").expect("the echo");
        assert!(first.is_data());
        let end = loop {
            match body.frame().await {
                Some(Ok(f)) if f.is_data() => continue,
                other => break other,
            }
        };
        assert!(
            matches!(end, Some(Err(_))),
            "the stream is reset, not ended: {end:?}"
        );
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(750), "{took:?}");
        drop(btx);
        // A whole unary call (to the HTTP/2 upstream): its status comes
        // in the echo's trailers.
        let req = hyper::Request::post("http://gw/capped/echo.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\x02hi",
            )))
            .expect("request");
        let resp = tx.send_request(req).await.expect("response");
        let whole = resp.into_body().collect().await.expect("the answer");
        assert_eq!(
            whole.trailers().and_then(|t| t.get("grpc-status")),
            Some(&http::HeaderValue::from_static("0"))
        );
    });
    // The JSON log writes gRPC statuses: from the trailers, and from a
    // trailers-only answer's head.
    let grpc_logged = |path: &str, want: &str| {
        wait_for(std::time::Duration::from_secs(10), || {
            json_log_lines(&json_log)?
                .iter()
                .any(|v| v["path"] == path && v["grpc"] == want)
                .then_some(())
        })
        .unwrap_or_else(|| panic!("{path} {want}: {:?}", std::fs::read_to_string(&json_log)))
    };
    grpc_logged("/capped/echo.Echo/Say", "OK");
    // And a trailer itself (the echo's `grpc-message: ok`).
    let lines = json_log_lines(&json_log).expect("the log");
    assert!(
        lines
            .iter()
            .any(|v| v["path"] == "/capped/echo.Echo/Say" && v["trailer"] == "ok"),
        "{lines:?}"
    );
    grpc_logged("/deadline/slow/3000", "DeadlineExceeded");
    // Over HTTP/1.1, the same 800 ms limit before the answer: a 504.
    let r = get("/capped/slow/3000", &[]);
    assert_eq!(
        (r.status, r.body.as_str()),
        (504, "downstream duration timeout\n")
    );
    // With the request's body still coming, Envoy's 408 instead.
    let mut s = connect(port);
    s.write_all(
        b"POST /capped/slow/3000 HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\nten bytes.",
    )
    .expect("write");
    let head = read_answer(&mut s);
    assert!(head.starts_with("http/1.1 408"), "{head}");
    // And over HTTP/2: a stream whose END_STREAM has not come.
    h2_unfinished_post_gets_408(port, "/capped/slow/3000");
    assert_eq!(
        dp.stat("http.downstream_rq_max_duration_reached"),
        reached + 5
    );

    // The second listener's request timeout (1 s): a body still coming
    // then gets a 408, over HTTP/1.1 and HTTP/2; a body that arrived in
    // time disarms it, however long the answer takes.
    let timed_out = dp.stat("http.downstream_rq_timeout");
    let started = std::time::Instant::now();
    let mut s = connect(calm_port);
    s.write_all(b"POST /host/x HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\nten bytes.")
        .expect("write");
    let head = read_answer(&mut s);
    let took = started.elapsed();
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(
        took >= std::time::Duration::from_millis(900)
            && took < std::time::Duration::from_millis(1900),
        "{took:?}"
    );
    let mut s = connect(calm_port);
    s.write_all(b"POST /host/slow/1500 HTTP/1.1\r\nhost: gw\r\ncontent-length: 5\r\n\r\nhello")
        .expect("write");
    let head = read_answer(&mut s);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    h2_unfinished_post_gets_408(calm_port, "/host/y");
    assert_eq!(dp.stat("http.downstream_rq_timeout"), timed_out + 2);
}

/// An HTTP/2 POST to `path` on `port` whose body never ends (no
/// END_STREAM): the proxy answers it with a 408.
fn h2_unfinished_post_gets_408(port: u16, path: &str) {
    use super::dp_h2_downstream::{block, fields, get as h2get, Raw, DATA, END_HEADERS, HEADERS};
    let mut c = Raw::connect(port, &[]);
    let mut post = h2get(path);
    post[0].1 = "POST".into();
    c.send(HEADERS, END_HEADERS, 1, &block(&fields(&post)));
    c.send(DATA, 0, 1, b"more to come");
    let h = c.until("the 408", |f| f.kind == HEADERS && f.stream == 1);
    assert!(h.payload.windows(3).any(|w| w == b"408"), "{h:?}");
}

/// Envoy's `endpoint_stale_after`: a load assignment not followed by
/// another within it loses its endpoints (503, counted as stale) until
/// one comes, even while the control plane is away; each assignment that
/// arrives, changed or not, starts the time again.
#[test]
fn stale_load_assignments_lose_their_endpoints() {
    use std::time::{Duration, Instant};
    let up = Upstream::start("u1");
    let port = free_port();
    let xds = StaticXds::start();
    let stale_after = Duration::from_secs(3);
    let fresh = || {
        let mut a = endpoints("fresh", &[(up.addr.port(), HealthStatus::Unknown)]);
        a.policy = Some(
            portico_proto::envoy::config::endpoint::v3::cluster_load_assignment::Policy {
                endpoint_stale_after: Some(portico_proto::google::protobuf::Duration {
                    seconds: 3,
                    nanos: 0,
                }),
                ..Default::default()
            },
        );
        vec![resource("fresh", &a)]
    };
    xds.set(
        CLUSTER,
        vec![resource(
            "fresh",
            &cluster("fresh", LbPolicy::RoundRobin, None),
        )],
    );
    xds.set(ENDPOINT, fresh());
    set_routes(&xds, vec![prefix_route("/", "fresh", |_| {})]);
    let mut pushed = Instant::now();
    let (_dir, dp) = serve_foreign(&xds, port, "dp-stale");
    let status = || {
        http1(port, "GET", "/x", "gw", &[], "")
            .map(|r| r.status)
            .unwrap_or(0)
    };
    wait_for(Duration::from_secs(10), || (status() == 200).then_some(()))
        .expect("the assignment serves");
    // They serve on for a while (a second here, of the three)...
    let serving = Instant::now();
    while serving.elapsed() < Duration::from_secs(1) {
        assert_eq!(status(), 200, "not stale before its time");
        std::thread::sleep(Duration::from_millis(50));
    }
    // ... and when nothing new comes, they go, not before their time.
    wait_for(Duration::from_secs(10), || (status() == 503).then_some(()))
        .expect("the stale assignment's endpoints are dropped");
    assert!(pushed.elapsed() >= stale_after, "{:?}", pushed.elapsed());
    assert_eq!(dp.stat("cluster.fresh.assignment_stale"), 1);
    assert!(dp.stat("cluster.fresh.assignment_timeout_received") >= 1);
    let (_, clusters) = dp.admin_get("/clusters");
    assert!(clusters.contains("fresh::no_endpoints"), "{clusters}");
    // The same assignment again serves again; sent again every 500 ms it
    // never goes stale (4 s: longer than its time).
    xds.set(ENDPOINT, fresh());
    wait_for(Duration::from_secs(10), || (status() == 200).then_some(()))
        .expect("a new assignment serves");
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        if pushed.elapsed() >= Duration::from_millis(500) {
            xds.set(ENDPOINT, fresh());
            pushed = Instant::now();
        }
        assert_eq!(status(), 200, "refreshed in time, never stale");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dp.stat("cluster.fresh.assignment_stale"), 1);
    // With the control plane gone, the endpoints go stale all the same.
    drop(xds);
    wait_for(Duration::from_secs(10), || (status() == 503).then_some(()))
        .expect("stale while the control plane is away");
    assert_eq!(dp.stat("cluster.fresh.assignment_stale"), 2);
}

/// One plain listener, `foreign` on `port`, then a data plane (SotW)
/// configured by `xds`, and the directory of its files.
fn serve_foreign(xds: &StaticXds, port: u16, name: &str) -> (tempfile::TempDir, DataPlane) {
    xds.set(
        LISTENER,
        vec![resource(
            "foreign",
            &listener("foreign", port, 0, false, None),
        )],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = DataPlane::start(dir.path(), name, &xds.addr.to_string(), "any", &["--sotw"]);
    (dir, dp)
}

/// Sets a cluster's upstream HTTP options (Envoy's `HttpProtocolOptions`
/// extension): `common`, and HTTP/2 with `h2` where given, else HTTP/1.1
/// (Envoy requires one or the other).
fn upstream_http(
    c: &mut Cluster,
    common: Option<HttpProtocolOptions>,
    h2: Option<portico_proto::envoy::config::core::v3::Http2ProtocolOptions>,
) {
    use portico_proto::envoy::extensions::upstreams::http::v3::http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    };
    c.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        pack(
            &portico_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions {
                common_http_protocol_options: common,
                upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                    ExplicitHttpConfig {
                        protocol_config: Some(match h2 {
                            Some(o) => ProtocolConfig::Http2ProtocolOptions(o),
                            None => ProtocolConfig::HttpProtocolOptions(Default::default()),
                        }),
                    },
                )),
                ..Default::default()
            },
        ),
    );
}

/// Serves `routes` as a one-virtual-host configuration named `routes`.
fn set_routes(xds: &StaticXds, routes: Vec<Route>) {
    let config = RouteConfiguration {
        name: "routes".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    };
    xds.set(ROUTE, vec![resource("routes", &config)]);
}

/// A cluster's own limit on one upstream stream (Envoy's
/// `common_http_protocol_options.max_stream_duration`, 800 ms here; in the
/// cluster's deprecated field for HTTP/1.1, in the HttpProtocolOptions
/// extension for HTTP/2): a try still unanswered is reset and answered
/// 504 (408 while the request is still coming), retried where the route
/// retries resets; an answer under way is cut; quick answers never notice.
/// And `max_requests_per_connection` counts HTTP/2 streams too.
#[test]
fn cluster_protocol_options_limit_streams() {
    use portico_proto::envoy::config::core::v3::Http2ProtocolOptions;
    use std::time::{Duration, Instant};
    let up = Upstream::start("u1");
    let port = free_port();
    let xds = StaticXds::start();
    let limit = || HttpProtocolOptions {
        max_stream_duration: Some(portico_proto::google::protobuf::Duration {
            seconds: 0,
            nanos: 800_000_000,
        }),
        ..Default::default()
    };
    let mut h1 = cluster("capped", LbPolicy::RoundRobin, Some(&[up.addr.port()]));
    #[allow(deprecated)]
    {
        h1.common_http_protocol_options = Some(limit());
    }
    let mut h2 = cluster("capped-h2", LbPolicy::RoundRobin, Some(&[up.addr.port()]));
    upstream_http(
        &mut h2,
        Some(limit()),
        Some(Http2ProtocolOptions::default()),
    );
    // HTTP/2 connections that carry two streams each.
    let mut few = cluster("few-h2", LbPolicy::RoundRobin, Some(&[up.addr.port()]));
    let two = HttpProtocolOptions {
        max_requests_per_connection: Some(UInt32Value { value: 2 }),
        ..Default::default()
    };
    upstream_http(&mut few, Some(two), Some(Http2ProtocolOptions::default()));
    xds.set(
        CLUSTER,
        vec![
            resource("capped", &h1),
            resource("capped-h2", &h2),
            resource("few-h2", &few),
        ],
    );
    set_routes(
        &xds,
        vec![
            prefix_route("/retried", "capped", |a| {
                a.retry_policy = Some(RetryPolicy {
                    retry_on: "reset".into(),
                    num_retries: Some(UInt32Value { value: 1 }),
                    ..Default::default()
                })
            }),
            prefix_route("/h2", "capped-h2", |_| {}),
            prefix_route("/few", "few-h2", |_| {}),
            prefix_route("/", "capped", |_| {}),
        ],
    );
    let (_dir, dp) = serve_foreign(&xds, port, "dp-capped");
    let get = |path: &str| http1(port, "GET", path, "gw", &[], "").expect("request");
    wait_for(Duration::from_secs(10), || {
        (get("/x").status == 200).then_some(())
    })
    .expect("the configuration serves");
    let reached = || dp.stat("cluster.capped.upstream_rq_max_duration_reached");
    assert_eq!(reached(), 0, "quick answers never reach the limit");
    let about_the_limit = |took: Duration| {
        assert!(
            took >= Duration::from_millis(750) && took < Duration::from_millis(2500),
            "{took:?}"
        );
    };

    // Unanswered within the limit: Envoy's 504 and words.
    let started = Instant::now();
    let r = get("/slow/3000");
    about_the_limit(started.elapsed());
    assert_eq!(
        (r.status, r.body.as_str()),
        (504, "upstream max stream duration reached\n")
    );
    assert_eq!(reached(), 1);

    // Retried as a reset: the second try answers at once.
    let started = Instant::now();
    let r = get("/retried/sluggish/once/1/3000");
    about_the_limit(started.elapsed());
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(reached(), 2);
    assert_eq!(dp.stat("cluster.capped.upstream_rq_retry"), 1);

    // The request's body still coming: 408.
    let mut s = connect(port);
    let started = Instant::now();
    s.write_all(b"POST /slow/3000 HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\nten bytes.")
        .expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("an answer");
    about_the_limit(started.elapsed());
    assert_eq!(&head, b"HTTP/1.1 408");
    assert_eq!(reached(), 3);

    // An answer under way (a gRPC echo streaming back what comes, over
    // HTTP/2 upstream) is cut at the limit: its head and first message
    // arrive, then the connection closes without the answer's end.
    let mut s = connect(port);
    let started = Instant::now();
    s.write_all(
        b"POST /h2/echo.Echo/Chat HTTP/1.1\r\nhost: gw\r\ncontent-type: application/grpc\r\n\
          te: trailers\r\ntransfer-encoding: chunked\r\n\r\n7\r\n\0\0\0\0\x02hi\r\n",
    )
    .expect("write");
    let mut got = Vec::new();
    if let Err(e) = s.read_to_end(&mut got) {
        panic!("{e}: {:?} {}", String::from_utf8_lossy(&got), dp.logs());
    }
    about_the_limit(started.elapsed());
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("\0\0\0\0\u{2}hi"), "the first message: {got}");
    assert!(!got.ends_with("0\r\n\r\n"), "cut, not ended: {got}");
    assert_eq!(
        dp.stat("cluster.capped-h2.upstream_rq_max_duration_reached"),
        1
    );
    assert_eq!(dp.stat("http.downstream_rq_max_duration_reached"), 0);
    assert_eq!(get("/x").status, 200);

    // max_requests_per_connection on HTTP/2: five requests, one after
    // another, open three connections (HTTP/2 connections are kept per
    // worker; with the two workers every test runs, 5 = 2+2+1, 4+1 or
    // 3+2 requests a worker take three connections all the same).
    for i in 0..5 {
        assert_eq!(get(&format!("/few/{i}")).status, 200);
    }
    assert_eq!(dp.stat("cluster.few-h2.upstream_cx_total"), 3);
}

/// The circuit breaker's `max_connections` and `max_pending_requests` as
/// Envoy has them: requests past the connection limit wait for a
/// connection (HTTP/1.1: one that comes back idle; HTTP/2: a free
/// stream) and are answered; past the pending limit they get Envoy's 503
/// overflow at once. (Each of the two workers may open its one
/// connection: Envoy's rule for a worker with none.)
#[test]
fn requests_past_the_connection_limit_wait_as_pending() {
    use portico_proto::envoy::config::cluster::v3::{
        circuit_breakers::Thresholds, CircuitBreakers,
    };
    use portico_proto::envoy::config::core::v3::Http2ProtocolOptions;
    use std::time::{Duration, Instant};
    let up = Upstream::start("u1");
    let port = free_port();
    let xds = StaticXds::start();
    let limited = |name: &str, max_pending: Option<u32>| {
        let mut c = cluster(name, LbPolicy::RoundRobin, Some(&[up.addr.port()]));
        c.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: Some(UInt32Value { value: 1 }),
                max_pending_requests: max_pending.map(|value| UInt32Value { value }),
                ..Default::default()
            }],
            ..Default::default()
        });
        c
    };
    let mut h2 = limited("queued-h2", None);
    let one_stream = Http2ProtocolOptions {
        max_concurrent_streams: Some(UInt32Value { value: 1 }),
        ..Default::default()
    };
    upstream_http(&mut h2, None, Some(one_stream));
    xds.set(
        CLUSTER,
        vec![
            resource("queued", &limited("queued", None)),
            resource("queued-h2", &h2),
            resource("tight", &limited("tight", Some(1))),
        ],
    );
    set_routes(
        &xds,
        vec![
            prefix_route("/h2", "queued-h2", |_| {}),
            prefix_route("/tight", "tight", |_| {}),
            prefix_route("/", "queued", |_| {}),
        ],
    );
    let (_dir, dp) = serve_foreign(&xds, port, "dp-pending");
    let get = |path: &str| http1(port, "GET", path, "gw", &[], "").expect("request");
    wait_for(Duration::from_secs(10), || {
        (get("/x").status == 200 && get("/h2/x").status == 200 && get("/tight/x").status == 200)
            .then_some(())
    })
    .expect("the configuration serves");
    // `n` requests for `path` at once: their answers' statuses and bodies,
    // and how long they all took.
    let at_once = |path: &str, n: usize| {
        let started = Instant::now();
        let answers: Vec<(u16, String)> = std::thread::scope(|s| {
            let all: Vec<_> = (0..n)
                .map(|_| s.spawn(|| http1(port, "GET", path, "gw", &[], "").expect("request")))
                .collect();
            all.into_iter()
                .map(|t| t.join().expect("a client"))
                .map(|r| (r.status, r.body))
                .collect()
        });
        (answers, started.elapsed())
    };

    // Six requests of 400 ms over at most two connections (one a worker):
    // all answered, in three rounds at least.
    for (path, name) in [("/slow/400", "queued"), ("/h2/slow/400", "queued-h2")] {
        let (answers, took) = at_once(path, 6);
        assert!(
            answers.iter().all(|(s, _)| *s == 200),
            "{name}: {answers:?}"
        );
        assert!(took >= Duration::from_millis(1190), "{name}: {took:?}");
        let stat = |s: &str| dp.stat(&format!("cluster.{name}.{s}"));
        assert!(stat("upstream_cx_total") <= 2, "{name}: {}", dp.logs());
        assert!(stat("upstream_cx_overflow") >= 4, "{name}");
        assert!(stat("upstream_rq_pending_total") >= 4, "{name}");
        assert_eq!(stat("upstream_rq_pending_overflow"), 0, "{name}");
        assert_eq!(stat("upstream_rq_pending_active"), 0, "{name}");
    }

    // One pending request at most: of eight at once, two at most are
    // under way and one waits; the rest overflow at once.
    let (answers, _) = at_once("/tight/slow/1000", 8);
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!((5..=7).contains(&refused.len()), "{answers:?}");
    for (status, body) in &refused {
        assert_eq!(*status, 503);
        assert!(body.contains("overflow"), "{body}");
    }
    assert_eq!(
        dp.stat("cluster.tight.upstream_rq_pending_overflow"),
        refused.len() as u64
    );
    assert_eq!(dp.stat("cluster.tight.upstream_rq_pending_active"), 0);
    assert_eq!(get("/tight/x").status, 200, "served again");
}

/// Envoy's `previous_priorities` retry priority: retries leave the
/// priority levels already tried (every `update_frequency` tries), where
/// without it every try stays in the level that takes the load. Priority
/// 0 is two failing endpoints, priority 1 one, priority 2 one that
/// answers.
#[test]
fn retries_move_across_priorities() {
    use portico_proto::envoy::config::route::v3::retry_policy::{
        retry_priority::ConfigType, RetryPriority,
    };
    use portico_proto::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
    use std::time::Duration;
    let ups: Vec<Upstream> = ["p0a", "p0b", "p1", "p2"]
        .into_iter()
        .map(Upstream::start)
        .collect();
    ups[0]
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    ups[1]
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let port = free_port();
    let xds = StaticXds::start();
    xds.set(
        CLUSTER,
        vec![resource(
            "tiers",
            &cluster("tiers", LbPolicy::RoundRobin, None),
        )],
    );
    let p: Vec<u16> = ups.iter().map(|u| u.addr.port()).collect();
    let mut a = endpoints(
        "tiers",
        &[(p[0], HealthStatus::Unknown), (p[1], HealthStatus::Unknown)],
    );
    for (priority, port) in [(1, p[2]), (2, p[3])] {
        let mut l = endpoints("tiers", &[(port, HealthStatus::Unknown)]).endpoints;
        l[0].priority = priority;
        a.endpoints.extend(l);
    }
    xds.set(ENDPOINT, vec![resource("tiers", &a)]);
    let retried = |prefix: &str, every: Option<i32>| {
        prefix_route(prefix, "tiers", |a| {
            a.retry_policy = Some(RetryPolicy {
                retry_on: "5xx".into(),
                num_retries: Some(UInt32Value { value: 2 }),
                retry_back_off: Some(
                    portico_proto::envoy::config::route::v3::retry_policy::RetryBackOff {
                        base_interval: Some(portico_proto::google::protobuf::Duration {
                            seconds: 0,
                            nanos: 1_000_000,
                        }),
                        max_interval: None,
                    },
                ),
                retry_priority: every.map(|update_frequency| RetryPriority {
                    name: "envoy.retry_priorities.previous_priorities".into(),
                    config_type: Some(ConfigType::TypedConfig(pack(&PreviousPrioritiesConfig {
                        update_frequency,
                    }))),
                }),
                ..Default::default()
            })
        })
    };
    set_routes(
        &xds,
        vec![
            retried("/each", Some(1)),
            retried("/pairs", Some(2)),
            retried("/stay", None),
        ],
    );
    let (_dir, dp) = serve_foreign(&xds, port, "dp-priorities");
    let count = |u: &Upstream, path: &str| {
        u.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.starts_with(&format!("GET {path} ")))
            .count()
    };
    let get = |path: &str| http1(port, "GET", path, "gw", &[], "").expect("request");
    wait_for(Duration::from_secs(10), || {
        (get("/stay/ready").status != 404).then_some(())
    })
    .expect("the routes serve");
    // Each retry leaves the levels tried: P0 fails, P1 answers.
    for i in 0..10 {
        let path = format!("/each/{i}");
        let r = get(&path);
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(
            count(&ups[0], &path) + count(&ups[1], &path),
            1,
            "{path}: one try at P0"
        );
        assert_eq!(count(&ups[2], &path), 1, "{path}: then P1");
    }
    // Every second try: two tries at P0 (one per endpoint, as a retry
    // leaves the host it tried), then P1.
    for i in 0..5 {
        let path = format!("/pairs/{i}");
        assert_eq!(get(&path).status, 200, "{path}");
        assert_eq!(
            (
                count(&ups[0], &path),
                count(&ups[1], &path),
                count(&ups[2], &path)
            ),
            (1, 1, 1),
            "{path}"
        );
    }
    // Without it, every try goes where the load goes: P0, three times.
    let r = get("/stay/x");
    assert!(r.status >= 500, "{r:?}");
    assert_eq!(count(&ups[0], "/stay/x") + count(&ups[1], "/stay/x"), 3);
    assert_eq!(count(&ups[2], "/stay/x"), 0);
    // With P1 failing too, the second retry leaves both: P2 answers.
    ups[2]
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let r = get("/each/deep");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        [0, 1, 2, 3]
            .map(|i| count(&ups[i], "/each/deep"))
            .iter()
            .sum::<usize>(),
        3
    );
    assert_eq!(count(&ups[2], "/each/deep"), 1);
    assert_eq!(count(&ups[3], "/each/deep"), 1);
    assert!(dp.stat("cluster.tiers.upstream_rq_retry") >= 10 + 10 + 2 + 2);
    // The dump shows the extension's config as Envoy's JSON.
    let (_, dump) = dp.admin_get("/config_dump");
    assert!(dump.contains("\"update_frequency\": 2"), "{dump}");
}

/// The listener's HTTP connection manager, edited in place.
fn edit_hcm(l: &mut Listener, edit: impl FnOnce(&mut HttpConnectionManager)) {
    let f = &mut l.filter_chains[0].filters[0];
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!("a typed HCM");
    };
    let mut hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("an HCM");
    edit(&mut hcm);
    f.config_type = Some(filter::ConfigType::TypedConfig(pack(&hcm)));
}

/// `Expect: 100-continue`: by default (Envoy's) the proxy asks for the
/// body itself and the header goes no further; with the HCM's
/// `proxy_100_continue` the header goes upstream, and the upstream's
/// `100 Continue` is what asks for the body, so an upstream that refuses
/// the request before its body is never sent the body. HTTP/2 clients are
/// asked at once.
#[test]
fn expect_continue_is_answered_or_proxied() {
    use super::dp_h2_downstream::{
        block, fields, first_field, get as h2get, Raw, DATA, END_HEADERS, END_STREAM, HEADERS,
    };
    use std::time::Duration;
    let up = Upstream::start("u1");
    let (own, proxied) = (free_port(), free_port());
    let xds = StaticXds::start();
    let mut l = listener("proxied", proxied, 0, false, None);
    edit_hcm(&mut l, |h| h.proxy_100_continue = true);
    let own_listener = listener("own", own, 0, false, None);
    let _dp = serve_plain(
        &xds,
        &up,
        &[(own, &own_listener), (proxied, &l)],
        "dp-continue",
    );
    let head = read_head;
    let ask = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
        )
    };
    for (port, forwarded) in [(own, false), (proxied, true)] {
        let mut s = connect(port);
        let asked = std::time::Instant::now();
        s.write_all(ask("/echo").as_bytes()).expect("write");
        let h = head(&mut s);
        assert!(h.starts_with("http/1.1 100 continue\r\n"), "{port}: {h}");
        // Proxied, the upstream's own 100 asked: not the proxy's wait of
        // a second for an upstream that says nothing.
        let waited = asked.elapsed();
        assert!(waited < Duration::from_millis(700), "{waited:?}");
        s.write_all(b"abcd").expect("the body");
        let h = head(&mut s);
        assert!(h.starts_with("http/1.1 200"), "{h}");
        let len: usize = h
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("a length");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).expect("the body");
        let body = String::from_utf8_lossy(&body).to_ascii_lowercase();
        assert!(body.ends_with("\nabcd"), "{body}");
        assert_eq!(
            body.contains("\nexpect: 100-continue\n"),
            forwarded,
            "forwarded only where proxied: {body}"
        );
    }
    // An upstream that answers without reading the body: the proxy's own
    // continue went first; proxied, the client is never asked for it.
    let mut s = connect(own);
    s.write_all(ask("/status/413").as_bytes()).expect("write");
    assert!(head(&mut s).starts_with("http/1.1 100 continue\r\n"));
    assert!(head(&mut s).starts_with("http/1.1 413"));
    let mut s = connect(proxied);
    s.write_all(ask("/status/413").as_bytes()).expect("write");
    let h = head(&mut s);
    assert!(h.starts_with("http/1.1 413"), "never asked: {h}");
    // HTTP/2: an interim 100 head at once, then the answer.
    let mut c = Raw::connect(own, &[]);
    let mut post = h2get("/echo");
    post[0].1 = "POST".into();
    post.push(("expect", "100-continue".into()));
    c.send(HEADERS, END_HEADERS, 1, &block(&fields(&post)));
    let h = c.until("the interim head", |f| f.kind == HEADERS && f.stream == 1);
    // `:status 100`, a literal (the encoder indexes nothing), after the
    // first block's table size update.
    assert!(
        h.payload.starts_with(&[0x20, 0x08, 3, b'1', b'0', b'0']),
        "{h:?}"
    );
    assert_eq!(h.flags & END_STREAM, 0, "interim: {h:?}");
    c.send(DATA, END_STREAM, 1, b"abcd");
    let h = c.until("the answer", |f| f.kind == HEADERS && f.stream == 1);
    assert_eq!(first_field(&h), 0x88, "200: {h:?}");
    // Proxied over HTTP/2: the interim head when the upstream asks for
    // the body; none when it answers without it.
    for (path, first) in [
        ("/echo", &[0x20, 0x08, 3, b'1', b'0', b'0'][..]),
        ("/status/413", &[0x20, 0x08, 3, b'4', b'1', b'3'][..]),
    ] {
        let mut c = Raw::connect(proxied, &[]);
        let mut post = h2get(path);
        post[0].1 = "POST".into();
        post.push(("expect", "100-continue".into()));
        c.send(HEADERS, END_HEADERS, 1, &block(&fields(&post)));
        let h = c.until("a head", |f| f.kind == HEADERS && f.stream == 1);
        assert!(h.payload.starts_with(first), "{path}: {h:?}");
    }
}

/// An answer head over its cluster's `max_response_headers_kb` (2 KiB
/// here, from HTTP/1.1 and HTTP/2 upstreams; Envoy's 80 KiB for HTTP/1.1
/// by default) or `max_headers_count` (5 here; an HTTP/2 answer's
/// `:status` counts, as in Envoy) is a protocol error, answered 502;
/// under them, it passes.
#[test]
fn answer_heads_over_the_clusters_limit_are_refused() {
    use portico_proto::envoy::config::core::v3::Http2ProtocolOptions;
    let up = Upstream::start("u1");
    let port = free_port();
    let xds = StaticXds::start();
    let small = |name: &str, h2: bool| {
        let mut c = cluster(name, LbPolicy::RoundRobin, Some(&[up.addr.port()]));
        let limits = HttpProtocolOptions {
            max_response_headers_kb: Some(UInt32Value { value: 2 }),
            max_headers_count: Some(UInt32Value { value: 5 }),
            ..Default::default()
        };
        upstream_http(&mut c, Some(limits), h2.then(Http2ProtocolOptions::default));
        c
    };
    xds.set(
        CLUSTER,
        vec![
            resource("small", &small("small", false)),
            resource("small-h2", &small("small-h2", true)),
            resource(
                "plain",
                &cluster("plain", LbPolicy::RoundRobin, Some(&[up.addr.port()])),
            ),
        ],
    );
    set_routes(
        &xds,
        vec![
            prefix_route("/h1", "small", |_| {}),
            prefix_route("/h2", "small-h2", |_| {}),
            prefix_route("/", "plain", |_| {}),
        ],
    );
    let (_dir, dp) = serve_foreign(&xds, port, "dp-heads");
    let get_with = |path: &str, bytes: usize, server: bool| {
        let n = bytes.to_string();
        let mut h = vec![("x-answer-header-bytes", n.as_str())];
        if server {
            h.push(("x-answer-server", "s"));
        }
        http1(port, "GET", path, "gw", &h, "").expect("request")
    };
    let get = |path: &str, bytes: usize| get_with(path, bytes, false);
    wait_for(std::time::Duration::from_secs(10), || {
        (get("/x", 1).status == 200).then_some(())
    })
    .expect("the configuration serves");
    for path in ["/h1", "/h2"] {
        let r = get(path, 1000);
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.header("x-big").map(str::len), Some(1000));
        let r = get(path, 3000);
        assert_eq!(r.status, 502, "{path}: {r:?}");
    }
    assert_eq!(dp.stat("cluster.small.upstream_rq_total"), 2);
    // The origin's answer: `x-upstream`, `content-length`, `date` and
    // `x-big`, and `server` when asked: 5 fields over HTTP/1.1 pass, 6
    // with HTTP/2's `:status` do not.
    assert_eq!(get_with("/h1", 10, true).status, 200);
    assert_eq!(get_with("/h2", 10, false).status, 200);
    assert_eq!(get_with("/h2", 10, true).status, 502);
    // An upgrade's answer too (hyper's client, held to the limits as near
    // as it counts: the head with its status line).
    let upgrade = |bytes: usize| {
        let mut s = connect(port);
        s.write_all(
            format!(
                "GET /h1/up HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: bar\r\n\
                 x-answer-header-bytes: {bytes}\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("write");
        read_head(&mut s)
    };
    assert!(upgrade(1000).starts_with("http/1.1 101"));
    assert!(upgrade(9000).starts_with("http/1.1 502"));
    // Envoy's default for HTTP/1.1: 80 KiB.
    let r = get("/x", 70 * 1024);
    assert_eq!(r.status, 200, "{:?}", (r.status, &r.body));
    assert_eq!(r.header("x-big").map(str::len), Some(70 * 1024));
    assert_eq!(get("/x", 81 * 1024).status, 502);
}

/// A malformed HTTP/2 request (here a body shorter than its
/// content-length, and an upper-case field name) ends its whole
/// connection with GOAWAY PROTOCOL_ERROR by default, as Envoy's does; on a
/// listener with `stream_error_on_invalid_http_message` only its stream is
/// reset and the connection goes on, unless the HTTP/2 options' override
/// says otherwise.
#[test]
fn malformed_http2_requests_end_their_connection_unless_asked() {
    use super::dp_h2_downstream::{
        fields, first_field, get as h2get, rst_code, Raw, DATA, END_STREAM, HEADERS,
        PROTOCOL_ERROR, RST_STREAM,
    };
    use portico_proto::envoy::config::core::v3::Http2ProtocolOptions;
    use portico_proto::google::protobuf::BoolValue;
    let up = Upstream::start("u1");
    let (strict, lenient, overridden) = (free_port(), free_port(), free_port());
    let xds = StaticXds::start();
    let strict_l = listener("strict", strict, 0, false, None);
    let mut lenient_l = listener("lenient", lenient, 0, false, None);
    edit_hcm(&mut lenient_l, |h| {
        h.stream_error_on_invalid_http_message = Some(BoolValue { value: true })
    });
    let mut overridden_l = listener("overridden", overridden, 0, false, None);
    edit_hcm(&mut overridden_l, |h| {
        h.stream_error_on_invalid_http_message = Some(BoolValue { value: true });
        h.http2_protocol_options = Some(Http2ProtocolOptions {
            override_stream_error_on_invalid_http_message: Some(BoolValue { value: false }),
            ..Default::default()
        });
    });
    let (_dir, dp) = serve_plain(
        &xds,
        &up,
        &[
            (strict, &strict_l),
            (lenient, &lenient_l),
            (overridden, &overridden_l),
        ],
        "dp-malformed",
    );
    let mut short = h2get("/short");
    short[0].1 = "POST".into();
    short.push(("content-length", "10".into()));
    let mut upper = h2get("/upper");
    upper.push(("X-Upper", "1".into()));
    let malformed = |c: &mut Raw, id: u32| {
        c.request(id, &fields(&short), Some(b"abc"));
        c.request(id + 2, &fields(&upper), None);
    };
    for port in [strict, overridden] {
        let mut c = Raw::connect(port, &[]);
        malformed(&mut c, 1);
        assert_eq!(c.goaway(), PROTOCOL_ERROR, "port {port}");
    }
    let mut c = Raw::connect(lenient, &[]);
    malformed(&mut c, 1);
    let mut reset = Vec::new();
    while reset.len() < 2 {
        let f = c.until("RST_STREAM", |f| f.kind == RST_STREAM || f.kind == HEADERS);
        assert_eq!(f.kind, RST_STREAM, "{f:?}");
        assert_eq!(rst_code(&f), PROTOCOL_ERROR);
        reset.push(f.stream);
    }
    reset.sort();
    assert_eq!(reset, [1, 3]);
    c.request(5, &fields(&h2get("/fine")), None);
    let h = c.until("the next answer", |f| f.kind == HEADERS && f.stream == 5);
    assert_eq!(first_field(&h), 0x88, "200 on stream 5");
    c.until("its body", |f| f.kind == DATA && f.flags & END_STREAM != 0);
    // One each on the connections that ended, two on the one that went on.
    assert_eq!(dp.stat("http2.rx_messaging_error"), 4);
}

/// The connection manager's HTTP/2 `connection_keepalive`: the proxy
/// PINGs its clients every interval; one that answers keeps its
/// connection, one that stops answering is cut off after the timeout.
#[test]
fn http2_clients_are_pinged_and_cut_off_when_silent() {
    use super::dp_h2_downstream::Raw;
    use portico_proto::envoy::config::core::v3::{Http2ProtocolOptions, KeepaliveSettings};
    use std::time::{Duration, Instant};
    const PING: u8 = 6;
    let up = Upstream::start("u1");
    let port = free_port();
    let xds = StaticXds::start();
    let ms = |ms: i32| portico_proto::google::protobuf::Duration {
        seconds: 0,
        nanos: ms * 1_000_000,
    };
    let mut l = listener("pinging", port, 0, false, None);
    edit_hcm(&mut l, |h| {
        // (Without the helper's short idle timeout: PINGs do not count as
        // activity, and it would end the connection first.)
        h.common_http_protocol_options = None;
        h.http2_protocol_options = Some(Http2ProtocolOptions {
            connection_keepalive: Some(KeepaliveSettings {
                interval: Some(ms(200)),
                timeout: Some(ms(400)),
                ..Default::default()
            }),
            ..Default::default()
        })
    });
    let _dp = serve_plain(&xds, &up, &[(port, &l)], "dp-ping");
    let mut c = Raw::connect(port, &[]);
    // Three PINGs answered, each about an interval after the last answer.
    let mut last = Instant::now();
    for i in 0..3 {
        let p = c.until("a PING", |f| f.kind == PING && f.flags & 1 == 0);
        let took = last.elapsed();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_millis(1500),
            "PING {i} after {took:?}"
        );
        c.send(PING, 1, 0, &p.payload);
        last = Instant::now();
    }
    // The next one unanswered: the connection ends after the timeout.
    c.until("a PING", |f| f.kind == PING && f.flags & 1 == 0);
    let unanswered = Instant::now();
    while c.frame().is_some() {}
    let took = unanswered.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_millis(2500),
        "cut off after {took:?}"
    );
}

/// `max_connection_duration` on HTTP/1.1: by default an idle connection
/// past its age is closed; with `http1_safe_max_connection_duration` it
/// stays until the next request, whose answer says `Connection: close`
/// (RFC 9112 section 9.6), and then ends.
#[test]
fn aged_http1_connections_end_safely_when_asked() {
    use std::time::Duration;
    let up = Upstream::start("u1");
    let (plain, safe) = (free_port(), free_port());
    let xds = StaticXds::start();
    let aged = |name: &str, port: u16, safe: bool| {
        let mut l = listener(name, port, 0, false, None);
        edit_hcm(&mut l, |h| {
            h.http1_safe_max_connection_duration = safe;
            h.common_http_protocol_options = Some(HttpProtocolOptions {
                max_connection_duration: Some(portico_proto::google::protobuf::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                max_connection_duration_jitter: Some(portico_proto::envoy::r#type::v3::Percent {
                    value: 10.0,
                }),
                ..Default::default()
            });
        });
        l
    };
    let (plain_listener, safe_listener) = (aged("plain", plain, false), aged("safe", safe, true));
    let _dp = serve_plain(
        &xds,
        &up,
        &[(plain, &plain_listener), (safe, &safe_listener)],
        "dp-aged",
    );
    // One answer at a time: its head and its short body.
    let answer = |s: &mut std::net::TcpStream| {
        let head = read_head(s);
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).expect("its body");
        head
    };
    let get = b"GET /x HTTP/1.1\r\nhost: gw\r\n\r\n";
    for (port, safe) in [(plain, false), (safe, true)] {
        let mut s = connect(port);
        s.write_all(get).expect("write");
        assert!(!answer(&mut s).contains("connection: close"));
        // Idle past its age (a second and up to a tenth more).
        std::thread::sleep(Duration::from_millis(2000));
        let mut b = [0u8; 1];
        if !safe {
            assert_eq!(s.read(&mut b).expect("a close"), 0, "closed while idle");
            continue;
        }
        s.write_all(get).expect("still open");
        let head = answer(&mut s);
        assert!(
            head.starts_with("http/1.1 200") && head.contains("connection: close"),
            "{head}"
        );
        assert_eq!(s.read(&mut b).expect("a close"), 0, "closed after it");
    }
}

/// One HTTP/1.1 head from `s`, a byte at a time up to its blank line (so
/// that nothing after it is consumed), lower-cased.
fn read_head(s: &mut std::net::TcpStream) -> String {
    let mut h = Vec::new();
    let mut b = [0u8; 1];
    while !h.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("a head");
        h.push(b[0]);
    }
    String::from_utf8_lossy(&h).to_ascii_lowercase()
}

/// A data plane of its own (SotW, from `xds`) serving `listeners` in front
/// of one cluster, `plain` (the endpoint `up`), every path routed to it;
/// returned once each listener's port answers.
fn serve_plain(
    xds: &StaticXds,
    up: &Upstream,
    listeners: &[(u16, &Listener)],
    node: &str,
) -> (tempfile::TempDir, DataPlane) {
    use std::time::Duration;
    xds.set(
        CLUSTER,
        vec![resource(
            "plain",
            &cluster("plain", LbPolicy::RoundRobin, Some(&[up.addr.port()])),
        )],
    );
    set_routes(xds, vec![prefix_route("/", "plain", |_| {})]);
    xds.set(
        LISTENER,
        listeners
            .iter()
            .map(|(_, l)| resource(&l.name, *l))
            .collect(),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let dp = DataPlane::start(dir.path(), node, &xds.addr.to_string(), "any", &["--sotw"]);
    for (port, _) in listeners {
        wait_for(Duration::from_secs(10), || {
            http1(*port, "GET", "/x", "gw", &[], "")
                .ok()
                .filter(|r| r.status == 200)
        })
        .expect("the listeners serve");
    }
    (dir, dp)
}
