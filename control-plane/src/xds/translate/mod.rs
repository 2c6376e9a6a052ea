//! Desired state → Envoy v3 resources, per node group.
//!
//! Deterministic by construction: inputs are ordered maps, outputs are
//! built in a fixed order, and every version is a hash of the encoded
//! bytes, so an apply that changes nothing changes no version and pushes
//! nothing.

mod cluster;
mod listener;
mod proxyless;
mod route;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use portico_proto::envoy::config::core::v3::{
    config_source::ConfigSourceSpecifier, AggregatedConfigSource, ApiVersion, ConfigSource,
};
use portico_proto::google::protobuf::{Duration as PbDuration, UInt32Value};

use super::resources::{TypeUrl, View, XdsResource, XdsSnapshot};
use crate::model::{DesiredState, Spec};

/// Builds the xDS snapshot of a desired state from scratch.
pub fn translate(state: &DesiredState, revision: u64) -> XdsSnapshot {
    Translator::default().render(state, revision)
}

/// Renders successive desired states, reusing what an earlier rendering
/// built from the same documents (see [`route::RouteCache`]). The output is
/// byte for byte what [`translate`] gives.
#[derive(Default)]
pub struct Translator {
    routes: route::RouteCache,
}

impl Translator {
    /// Builds the xDS snapshot of `state`.
    pub fn render(&mut self, state: &DesiredState, revision: u64) -> XdsSnapshot {
        let mut next_routes = route::RouteCache::default();
        let out = render(state, revision, &self.routes, &mut next_routes);
        self.routes = next_routes;
        out
    }
}

fn render(
    state: &DesiredState,
    revision: u64,
    previous: &route::RouteCache,
    next: &mut route::RouteCache,
) -> XdsSnapshot {
    // Clusters and endpoints are the same for every group that uses them:
    // build each once.
    let mut clusters: BTreeMap<&str, cluster::Built> = BTreeMap::new();
    for (key, res) in state {
        if let Spec::Service(svc) = &res.spec {
            clusters.insert(key.name.as_str(), cluster::build(&key.name, svc));
        }
    }
    let proxyless = proxyless::build(state, &clusters);

    let mut groups: BTreeMap<&str, View> = BTreeMap::new();
    for (key, res) in state {
        let Spec::Gateway(gw) = &res.spec else {
            continue;
        };
        let view = groups.entry(gw.node_group.as_str()).or_default();
        let mut used: BTreeSet<&str> = BTreeSet::new();
        for l in &gw.listeners {
            let name = format!("{}/{}", key.name, l.name);
            let (routes, services) = route::build(&name, &key.name, l, state, previous, next);
            used.extend(services);
            view.insert(TypeUrl::Route, routes, true);
            view.insert(TypeUrl::Listener, listener::build(&name, l), true);
        }
        for svc in used {
            if let Some(built) = clusters.get(svc) {
                built.add_to(view, true);
            }
        }
    }
    let mut out = XdsSnapshot {
        revision,
        groups: HashMap::new(),
        default_view: Arc::new({
            let mut v = View::default();
            proxyless.add_to(&mut v);
            v
        }),
    };
    for (group, mut view) in groups {
        proxyless.add_to(&mut view);
        out.groups.insert(group.to_string(), Arc::new(view));
    }
    out
}

/// `ConfigSource` pointing back at the ADS stream.
pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// A validated duration string as protobuf.
pub(crate) fn duration(text: &str) -> Option<PbDuration> {
    humantime::parse_duration(text).ok().map(pb_duration)
}

pub(crate) fn pb_duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub(crate) fn u32v(value: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value })
}

/// Resources built for one cluster, shared by every view that needs them.
pub(crate) type Shared = Arc<XdsResource>;

#[cfg(test)]
mod tests;
