//! Translation: determinism, group selection, route order, gRFC A27 shape.

use portico_proto::envoy::config::listener::v3::Listener;
use portico_proto::envoy::config::route::v3::{route_match::PathSpecifier, RouteConfiguration};
use portico_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use prost::Message;
use serde_json::{json, Value};

use super::{translate, Translator};
use crate::model::decode::document;
use crate::model::{DesiredState, Kind};
use crate::xds::resources::TypeUrl;
use crate::xds::resources::XdsSnapshot;

/// A resource of the view, decoded (the test fails if it is missing).
fn decoded<M: Message + Default>(view: &crate::xds::resources::View, t: TypeUrl, name: &str) -> M {
    let e = view
        .get(t, name)
        .unwrap_or_else(|| panic!("no {name} in the view"));
    M::decode(&*e.resource.body.value).expect("decodes")
}

fn state(docs: Vec<Value>) -> DesiredState {
    crate::model::decode::test_state(docs)
}

fn base() -> Vec<Value> {
    vec![
        document(
            Kind::Gateway,
            "edge",
            json!({"nodeGroup": "edge", "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]}),
        ),
        document(
            Kind::Gateway,
            "internal",
            json!({"nodeGroup": "internal", "listeners": [{"name": "http", "port": 9090, "protocol": "HTTP"}]}),
        ),
        document(
            Kind::Service,
            "pets",
            json!({"endpoints": [{"address": "10.0.0.1", "port": 80}]}),
        ),
        document(
            Kind::Service,
            "greeter",
            json!({"protocol": "grpc", "endpoints": [{"address": "10.0.0.2", "port": 50051}]}),
        ),
        document(
            Kind::Api,
            "pets",
            json!({"version": "v1", "gateways": ["edge"], "hostnames": ["api.example.com"], "basePath": "/pets",
            "lifecycle": {"state": "published"}, "routes": [
                {"match": {"path": "/"}, "action": {"service": "pets"}},
                {"match": {"path": "/search", "pathType": "exact"}, "action": {"service": "pets"}},
                {"match": {"path": "/food"}, "action": {"service": "pets"}}
            ]}),
        ),
    ]
}

#[test]
fn same_state_same_bytes_and_versions() {
    let a = translate(&state(base()), 1);
    let b = translate(&state(base()), 2);
    for t in TypeUrl::ALL {
        let va: Vec<_> = a
            .view("edge")
            .of(t)
            .values()
            .map(|e| {
                (
                    e.resource.name.clone(),
                    e.resource.version.clone(),
                    e.resource.body.value.clone(),
                )
            })
            .collect();
        let vb: Vec<_> = b
            .view("edge")
            .of(t)
            .values()
            .map(|e| {
                (
                    e.resource.name.clone(),
                    e.resource.version.clone(),
                    e.resource.body.value.clone(),
                )
            })
            .collect();
        assert_eq!(va, vb, "{t}");
    }
}

/// Every resource of every group and the default view: name, version, bytes.
fn everything(s: &XdsSnapshot) -> Vec<(String, String, Vec<u8>)> {
    let mut groups: Vec<&str> = s.groups.keys().map(String::as_str).collect();
    groups.sort_unstable();
    let mut out = Vec::new();
    for t in TypeUrl::ALL {
        for e in s.default_view.of(t).values() {
            out.push((
                "".into(),
                e.resource.version.to_string(),
                e.resource.body.value.clone(),
            ));
        }
        for g in &groups {
            for e in s.view(g).of(t).values() {
                out.push((
                    format!("{g}/{}", e.resource.name),
                    e.resource.version.to_string(),
                    e.resource.body.value.clone(),
                ));
            }
        }
    }
    out
}

/// Replaces one document the way an apply does: a new `Arc` for it, the
/// others shared with the previous revision.
fn with_doc(prev: &DesiredState, doc: Value) -> DesiredState {
    let mut next = prev.clone();
    for (k, v) in state(vec![doc]) {
        next.insert(k, v);
    }
    next
}

#[test]
fn cached_rendering_equals_a_fresh_one() {
    let mut t = Translator::default();
    let mut s = state(base());
    s = with_doc(
        &s,
        document(
            Kind::Api,
            "everywhere",
            json!({"version": "v1", "gateways": ["edge"], "basePath": "/all",
            "lifecycle": {"state": "published"}, "routes": [{"match": {"path": "/"}, "action": {"service": "pets"}}]}),
        ),
    );
    s = with_doc(
        &s,
        document(
            Kind::Api,
            "shop",
            json!({"version": "v1", "gateways": ["edge"], "hostnames": ["shop.example.com"], "basePath": "/shop",
            "lifecycle": {"state": "published"}, "routes": [{"match": {"path": "/"}, "action": {"service": "pets"}}]}),
        ),
    );
    let first = t.render(&s, 1);
    assert_eq!(everything(&first), everything(&translate(&s, 1)));
    let edits = [
        // One route of one Api changes.
        document(
            Kind::Api,
            "shop",
            json!({"version": "v1", "gateways": ["edge"], "hostnames": ["shop.example.com"], "basePath": "/shop",
            "lifecycle": {"state": "published"}, "routes": [{"match": {"path": "/"}, "action": {"service": "pets", "timeout": "3s"}}]}),
        ),
        // A Service's default timeout, which every route to it inherits.
        document(
            Kind::Service,
            "pets",
            json!({"requestTimeout": "7s", "endpoints": [{"address": "10.0.0.1", "port": 80}]}),
        ),
        // The host-less Api, which joins every virtual host.
        document(
            Kind::Api,
            "everywhere",
            json!({"version": "v1", "gateways": ["edge"], "basePath": "/every",
            "lifecycle": {"state": "published"}, "routes": [{"match": {"path": "/"}, "action": {"service": "pets"}}]}),
        ),
    ];
    let mut before = everything(&first);
    for (i, doc) in edits.into_iter().enumerate() {
        s = with_doc(&s, doc);
        let cached = everything(&t.render(&s, 2 + i as u64));
        assert_eq!(cached, everything(&translate(&s, 2 + i as u64)), "edit {i}");
        assert_ne!(cached, before, "edit {i} shows");
        before = cached;
    }
}

#[test]
fn groups_get_only_what_they_select() {
    let snap = translate(&state(base()), 1);
    let edge = snap.view("edge");
    let internal = snap.view("internal");
    let wildcard = |v: &crate::xds::resources::View, t| {
        v.of(t)
            .iter()
            .filter(|(_, e)| e.in_wildcard)
            .map(|(n, _)| n.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(wildcard(&edge, TypeUrl::Listener), vec!["edge/http"]);
    assert_eq!(wildcard(&edge, TypeUrl::Cluster), vec!["pets"]);
    assert_eq!(
        wildcard(&internal, TypeUrl::Listener),
        vec!["internal/http"]
    );
    assert!(wildcard(&internal, TypeUrl::Cluster).is_empty());
    // The proxyless gRPC listener is there for anyone who names it.
    assert!(internal
        .get(TypeUrl::Listener, "greeter")
        .is_some_and(|e| !e.in_wildcard));
    assert!(snap
        .view("unknown-group")
        .get(TypeUrl::Cluster, "greeter")
        .is_some());
    assert!(snap
        .view("unknown-group")
        .get(TypeUrl::Listener, "edge/http")
        .is_none());
}

#[test]
fn routes_are_most_specific_first_and_prefixes_respect_segments() {
    let snap = translate(&state(base()), 1);
    let view = snap.view("edge");
    let rc = decoded::<RouteConfiguration>(&view, TypeUrl::Route, "edge/http");
    let vh = &rc.virtual_hosts[0];
    assert_eq!(vh.domains, vec!["api.example.com"]);
    let paths: Vec<_> = vh
        .routes
        .iter()
        .map(|r| r.r#match.as_ref().unwrap().path_specifier.clone().unwrap())
        .collect();
    assert_eq!(
        paths,
        vec![
            PathSpecifier::Path("/pets/search".into()),
            PathSpecifier::PathSeparatedPrefix("/pets/food".into()),
            PathSpecifier::PathSeparatedPrefix("/pets".into()),
        ]
    );
}

#[test]
fn grpc_services_follow_grfc_a27() {
    let snap = translate(&state(base()), 1);
    let view = snap.view("anything");
    let l = decoded::<Listener>(&view, TypeUrl::Listener, "greeter");
    assert_eq!(l.name, "greeter");
    let any = l.api_listener.unwrap().api_listener.unwrap();
    let hcm = HttpConnectionManager::decode(&*any.value).unwrap();
    assert_eq!(
        hcm.http_filters.last().unwrap().name,
        "envoy.filters.http.router"
    );
    let rc = decoded::<RouteConfiguration>(&view, TypeUrl::Route, "greeter");
    assert_eq!(rc.virtual_hosts[0].domains, vec!["greeter"]);
    use portico_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
    let cla = decoded::<ClusterLoadAssignment>(&view, TypeUrl::Endpoint, "greeter");
    assert_eq!(
        cla.endpoints[0]
            .load_balancing_weight
            .as_ref()
            .unwrap()
            .value,
        1
    );
}

/// A Service's slow start becomes its balancer's `slow_start_config`.
#[test]
fn slow_start_reaches_the_balancer() {
    use portico_proto::envoy::config::cluster::v3::{cluster::LbConfig, Cluster};
    let mut docs = base();
    docs.retain(|d| d["metadata"]["name"] != "pets" || d["kind"] != "Service");
    docs.push(document(
        Kind::Service,
        "pets",
        json!({"endpoints": [{"address": "10.0.0.1", "port": 80}],
               "loadBalancing": "least_request", "slowStart": "30s"}),
    ));
    let snap = translate(&state(docs), 1);
    let c = decoded::<Cluster>(&snap.view("edge"), TypeUrl::Cluster, "pets");
    let Some(LbConfig::LeastRequestLbConfig(lr)) = c.lb_config else {
        panic!("{:?}", c.lb_config)
    };
    let window = lr.slow_start_config.unwrap().slow_start_window.unwrap();
    assert_eq!((window.seconds, window.nanos), (30, 0));
}

/// A Service's health check becomes its cluster's, and an endpoint taken
/// out of the Service leaves at once (not Envoy's default of staying while
/// its checks pass).
#[test]
fn health_checked_endpoints_leave_when_removed() {
    use portico_proto::envoy::config::cluster::v3::Cluster;
    let mut docs = base();
    let plain = decoded::<Cluster>(
        &translate(&state(docs.clone()), 1).view("edge"),
        TypeUrl::Cluster,
        "pets",
    );
    assert!(plain.health_checks.is_empty() && !plain.ignore_health_on_host_removal);
    docs.retain(|d| d["metadata"]["name"] != "pets" || d["kind"] != "Service");
    docs.push(document(
        Kind::Service,
        "pets",
        json!({"endpoints": [{"address": "10.0.0.1", "port": 80}],
               "healthCheck": {"path": "/healthz"}}),
    ));
    let c = decoded::<Cluster>(
        &translate(&state(docs), 1).view("edge"),
        TypeUrl::Cluster,
        "pets",
    );
    assert_eq!(c.health_checks.len(), 1);
    assert!(c.ignore_health_on_host_removal);
}

/// Failover tiers become Envoy's priorities, one locality each (in no
/// other priority, as gRPC clients require).
#[test]
fn endpoint_priorities_are_localities_of_their_own() {
    use portico_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
    let mut docs = base();
    docs.push(document(
        Kind::Service,
        "tiered",
        json!({"endpoints": [
            {"address": "10.0.1.1", "port": 80, "priority": 1},
            {"address": "10.0.0.1", "port": 80},
            {"address": "10.0.0.2", "port": 80, "weight": 3}
        ]}),
    ));
    docs.push(document(
        Kind::Api,
        "tiered",
        json!({"version": "v1", "gateways": ["edge"], "basePath": "/tiered",
        "lifecycle": {"state": "published"}, "routes": [
            {"match": {"path": "/"}, "action": {"service": "tiered"}}
        ]}),
    ));
    let snap = translate(&state(docs), 1);
    let view = snap.view("edge");
    let cla = decoded::<ClusterLoadAssignment>(&view, TypeUrl::Endpoint, "tiered");
    let tiers: Vec<(u32, String, usize)> = cla
        .endpoints
        .iter()
        .map(|l| {
            (
                l.priority,
                l.locality.clone().unwrap_or_default().sub_zone,
                l.lb_endpoints.len(),
            )
        })
        .collect();
    assert_eq!(
        tiers,
        vec![(0, String::new(), 2), (1, "priority-1".to_string(), 1)]
    );
}

#[test]
fn no_domain_is_in_two_virtual_hosts() {
    let mut docs = base();
    docs[0] = document(
        Kind::Gateway,
        "edge",
        json!({"nodeGroup": "edge", "listeners": [
        {"name": "http", "port": 8080, "protocol": "HTTP", "hostnames": ["api.example.com", "*.example.com"]}]}),
    );
    docs.push(document(Kind::Api, "any", json!({"version": "v1", "gateways": ["edge"], "basePath": "/any",
        "lifecycle": {"state": "published"}, "routes": [{"match": {"path": "/"}, "action": {"service": "pets"}}]})));
    let snap = translate(&state(docs), 1);
    let view = snap.view("edge");
    let rc = decoded::<RouteConfiguration>(&view, TypeUrl::Route, "edge/http");
    let mut domains: Vec<&String> = rc.virtual_hosts.iter().flat_map(|v| &v.domains).collect();
    let n = domains.len();
    domains.sort();
    domains.dedup();
    assert_eq!(domains.len(), n, "{:?}", rc.virtual_hosts);
    // The host-agnostic Api is served on the specific host too.
    let api_host = rc
        .virtual_hosts
        .iter()
        .find(|v| v.domains == ["api.example.com"])
        .unwrap();
    assert!(api_host.routes.iter().any(|r| r.name.starts_with("any/")));
    assert!(rc
        .virtual_hosts
        .iter()
        .any(|v| v.domains == ["*.example.com"]));
}
