//! gRPC Services for proxyless gRPC clients (gRFC A27): a client dialling
//! `xds:///NAME` asks for a Listener named exactly `NAME` whose
//! `api_listener` holds a connection manager, then its routes, cluster and
//! endpoints.

use std::collections::BTreeMap;

use portico_proto::envoy::config::listener::v3::{ApiListener, Listener};
use portico_proto::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};

use super::cluster::{pack, Built};
use super::listener::hcm;
use super::Shared;
use crate::model::service::UpstreamProtocol;
use crate::model::{DesiredState, Spec};
use crate::xds::resources::{TypeUrl, View, XdsResource};

/// What every node may ask for by name.
pub(crate) struct Proxyless<'a> {
    services: Vec<(Shared, Shared, &'a Built)>,
}

impl Proxyless<'_> {
    /// Adds the resources to a view. Only a node that names them gets them:
    /// an Envoy with a wildcard LDS subscription must not receive
    /// `api_listener`s. Their clusters join the wildcard set only if the
    /// view already serves them.
    pub fn add_to(&self, view: &mut View) {
        for (listener, routes, cluster) in &self.services {
            view.insert(TypeUrl::Listener, listener.clone(), false);
            view.insert(TypeUrl::Route, routes.clone(), false);
            if view.get(TypeUrl::Cluster, &cluster.cluster.name).is_none() {
                cluster.add_to(view, false);
            }
        }
    }
}

pub(crate) fn build<'a>(
    state: &DesiredState,
    clusters: &'a BTreeMap<&str, Built>,
) -> Proxyless<'a> {
    let mut services = Vec::new();
    for (key, res) in state {
        let Spec::Service(svc) = &res.spec else {
            continue;
        };
        let Some(built) = clusters.get(key.name.as_str()) else {
            continue;
        };
        // Proxyless clients need EDS with IP endpoints.
        if svc.protocol != UpstreamProtocol::Grpc || !built.eds {
            continue;
        }
        let name = key.name.as_str();
        let listener = Listener {
            name: name.to_string(),
            api_listener: Some(ApiListener {
                api_listener: Some(pack(&hcm(name, name))),
            }),
            ..Default::default()
        };
        let routes = RouteConfiguration {
            name: name.to_string(),
            virtual_hosts: vec![VirtualHost {
                name: name.to_string(),
                domains: vec![name.to_string()],
                routes: vec![Route {
                    name: format!("{name}/all"),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(PathSpecifier::Prefix(String::new())),
                        ..Default::default()
                    }),
                    action: Some(Action::Route(RouteAction {
                        cluster_specifier: Some(ClusterSpecifier::Cluster(name.to_string())),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        services.push((
            XdsResource::new(name, &listener),
            XdsResource::new(name, &routes),
            built,
        ));
    }
    Proxyless { services }
}
