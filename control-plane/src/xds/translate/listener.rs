//! Gateway listener → `Listener` with an HTTP connection manager using RDS.

use portico_proto::envoy::config::core::v3::{
    transport_socket, Http1ProtocolOptions, TransportSocket,
};
use portico_proto::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use portico_proto::envoy::extensions::filters::http::router::v3::Router;
use portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::UpgradeConfig,
    http_connection_manager::{CodecType, RouteSpecifier},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use portico_proto::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext,
};
use portico_proto::google::protobuf::BoolValue;

use super::cluster::{pack, sds, socket};
use super::{ads, Shared};
use crate::model::gateway::{Listener as GwListener, ListenerProtocol};
use crate::xds::resources::XdsResource;

/// The HTTP filter chain, router last. Policy filters slot in before it.
///
/// The router adds none of Envoy's `x-envoy-*` headers: a gateway at the
/// edge does not tell clients its upstreams' timings nor hand upstreams
/// headers only Envoys read (Envoy Gateway's default too).
pub(crate) fn http_filters() -> Vec<HttpFilter> {
    vec![HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack(&Router {
            suppress_envoy_headers: true,
            ..Default::default()
        }))),
        ..Default::default()
    }]
}

/// A connection manager that takes its routes from RDS over ADS.
pub(crate) fn hcm(stat_prefix: &str, route_config_name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        codec_type: CodecType::Auto as i32,
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config_name.to_string(),
        })),
        http_filters: http_filters(),
        // Answers name the gateway, not Envoy, and not the upstream's
        // server software.
        server_name: "portico".into(),
        ..Default::default()
    }
}

pub(crate) fn build(name: &str, l: &GwListener) -> Shared {
    let manager = HttpConnectionManager {
        // A gateway is the edge: the client's address is the peer's, and
        // x-forwarded-for gets it appended.
        use_remote_address: Some(BoolValue { value: true }),
        // An API's clients correlate their calls by their own request ids;
        // Envoy would replace them at the edge.
        preserve_external_request_id: true,
        // Old clients and probes still speak HTTP/1.0; Envoy would answer
        // them 426.
        http_protocol_options: Some(Http1ProtocolOptions {
            accept_http_10: true,
            ..Default::default()
        }),
        upgrade_configs: vec![UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        ..hcm(&name.replace('/', "_"), name)
    };
    let mut chain = FilterChain {
        filters: vec![Filter {
            name: "envoy.filters.network.http_connection_manager".into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack(&manager))),
        }],
        ..Default::default()
    };
    if let (ListenerProtocol::Https, Some(tls)) = (l.protocol, &l.tls) {
        let ctx = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: tls
                    .certificate_refs
                    .iter()
                    .map(|c| sds(&c.name))
                    .collect(),
                alpn_protocols: vec!["h2".into(), "http/1.1".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        chain.transport_socket = Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&ctx))),
        });
    }
    let listener = Listener {
        name: name.to_string(),
        address: Some(socket("0.0.0.0", l.port)),
        filter_chains: vec![chain],
        ..Default::default()
    };
    XdsResource::new(name, &listener)
}
