//! SotW ADS, rule by rule, with a raw client (rule numbers as in the
//! project's xDS notes).

use std::time::Duration;

use portico_integration::xds_client::{
    channel, names, node, Sotw, CLUSTER, ENDPOINT, LISTENER, ROUTE,
};
use portico_integration::ControlPlane;
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_millis(300);

pub fn gateway(group: &str, name: &str, port: u16) -> Value {
    json!({"apiVersion": "portico.dev/v1", "kind": "Gateway", "metadata": {"name": name},
           "spec": {"nodeGroup": group, "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}]}})
}

pub fn service(name: &str, port: u16) -> Value {
    json!({"apiVersion": "portico.dev/v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"endpoints": [{"address": "127.0.0.1", "port": port}]}})
}

pub fn api(name: &str, gateway: &str, service: &str, timeout: &str) -> Value {
    json!({"apiVersion": "portico.dev/v1", "kind": "Api", "metadata": {"name": name},
           "spec": {"version": "v1", "gateways": [gateway], "basePath": format!("/{name}"), "lifecycle": {"state": "published"},
                    "routes": [{"match": {"path": "/"}, "action": {"service": service, "timeout": timeout}}]}})
}

/// Applies documents and waits until the xDS server serves the result.
pub fn apply(cp: &ControlPlane, docs: &[Value]) {
    let r = cp.api(
        "POST",
        "/api/v1/apply",
        Some(&json!({"documents": docs}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_served(cp, r.json()["revision"].as_u64().unwrap());
}

/// Deletes a document and waits until the xDS server serves the result.
pub fn delete(cp: &ControlPlane, kind: &str, name: &str) {
    let r = cp.api("DELETE", &format!("/api/v1/resources/{kind}/{name}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    wait_served(cp, r.json()["revision"].as_u64().unwrap());
}

fn wait_served(cp: &ControlPlane, revision: u64) {
    super::wait_json(cp, "/api/v1/status", |s| {
        s["xdsRevision"].as_u64() >= Some(revision)
    });
}

pub fn edge_state() -> Vec<Value> {
    vec![
        gateway("edge", "edge", 8080),
        service("pets", 9001),
        api("pets", "edge", "pets", "5s"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_state_gets_valid_empty_responses() {
    let (_dir, cp) = super::fresh();
    let mut s = Sotw::open(channel(&cp.xds_addr).await, node("n1", "edge")).await;
    s.request(LISTENER, &[], "", "", None).await;
    let r = s.recv().await;
    assert_eq!((r.type_url.as_str(), r.resources.len()), (LISTENER, 0));
    assert!(!r.nonce.is_empty() && !r.version_info.is_empty());
    s.request(CLUSTER, &[], "", "", None).await;
    assert_eq!(s.recv().await.resources.len(), 0);
    // ACK at the current version: no response (5).
    s.ack(&r, &[]).await;
    s.silent(QUIET).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn full_flow_in_make_before_break_order_and_only_for_the_group() {
    let (_dir, cp) = super::fresh();
    let ch = channel(&cp.xds_addr).await;
    let mut s = Sotw::open(ch.clone(), node("n1", "edge")).await;
    let mut other = Sotw::open(ch, node("n2", "elsewhere")).await;
    for c in [&mut s, &mut other] {
        c.request(CLUSTER, &[], "", "", None).await;
        let cds = c.recv().await;
        c.ack(&cds, &[]).await;
        c.request(LISTENER, &[], "", "", None).await;
        let lds = c.recv().await;
        c.ack(&lds, &[]).await;
    }
    s.request(ENDPOINT, &["pets"], "", "", None).await;
    s.request(ROUTE, &["edge/http"], "", "", None).await;
    s.silent(QUIET).await; // nothing exists yet (9)

    apply(&cp, &edge_state());
    // One push, in order: CDS, EDS (after CDS, 21), LDS, RDS (20).
    let cds = s.recv().await;
    assert_eq!(
        (cds.type_url.as_str(), names(&cds)),
        (CLUSTER, vec!["pets".to_string()])
    );
    let eds = s.recv().await;
    assert_eq!(
        (eds.type_url.as_str(), names(&eds)),
        (ENDPOINT, vec!["pets".to_string()])
    );
    let lds = s.recv().await;
    assert_eq!(
        (lds.type_url.as_str(), names(&lds)),
        (LISTENER, vec!["edge/http".to_string()])
    );
    let rds = s.recv().await;
    assert_eq!(
        (rds.type_url.as_str(), names(&rds)),
        (ROUTE, vec!["edge/http".to_string()])
    );
    let nonces = [&cds.nonce, &eds.nonce, &lds.nonce, &rds.nonce];
    let unique: std::collections::BTreeSet<_> = nonces.iter().collect();
    assert_eq!(unique.len(), 4, "nonces are unique within a stream (3)");
    for r in [&cds, &eds, &lds, &rds] {
        let n: Vec<String> = names(r);
        let n: Vec<&str> = n.iter().map(String::as_str).collect();
        s.ack(
            r,
            if r.type_url == CLUSTER || r.type_url == LISTENER {
                &[]
            } else {
                &n
            },
        )
        .await;
    }
    // The node of another group hears nothing.
    other.silent(QUIET).await;

    // An apply that changes nothing pushes nothing.
    apply(&cp, &edge_state());
    s.silent(QUIET).await;

    // One route's timeout: only RDS moves, with a new version.
    apply(&cp, &[api("pets", "edge", "pets", "9s")]);
    let rds2 = s.recv().await;
    assert_eq!(rds2.type_url, ROUTE);
    assert_ne!(rds2.version_info, rds.version_info);
    s.ack(&rds2, &["edge/http"]).await;
    s.silent(QUIET).await;

    // Deleting the Api: routes first, then the cluster nobody uses goes,
    // last (20) — CDS says so with the full, now empty, set (6).
    delete(&cp, "api", "pets");
    let rds3 = s.recv().await;
    assert_eq!(rds3.type_url, ROUTE);
    s.ack(&rds3, &["edge/http"]).await;
    let cds3 = s.recv().await;
    assert_eq!((cds3.type_url.as_str(), cds3.resources.len()), (CLUSTER, 0));
    s.ack(&cds3, &[]).await;
    // Deleting the last listener: an empty LDS response, not silence (6).
    delete(&cp, "gateway", "edge");
    let lds3 = s.recv().await;
    assert_eq!(
        (lds3.type_url.as_str(), lds3.resources.len()),
        (LISTENER, 0)
    );
    s.ack(&lds3, &[]).await;
    s.silent(QUIET).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nack_keeps_the_old_version_is_shown_and_never_loops() {
    let (_dir, cp) = super::fresh();
    apply(&cp, &edge_state());
    let mut s = Sotw::open(channel(&cp.xds_addr).await, node("nacker", "edge")).await;
    s.request(LISTENER, &[], "", "", None).await;
    let good = s.recv().await;
    s.ack(&good, &[]).await;
    apply(&cp, &[gateway("edge", "edge", 8081)]);
    let bad = s.recv().await;
    assert_ne!(bad.version_info, good.version_info);
    // NACK: version_info is the last good one, error_detail says why.
    s.request(
        LISTENER,
        &[],
        &good.version_info,
        &bad.nonce,
        Some("port 8081 is taken"),
    )
    .await;
    s.silent(QUIET).await; // never resent (5)
    let nodes = cp.api("GET", "/api/v1/nodes", None).json();
    let lds = &nodes["items"][0]["types"]["lds"];
    assert_eq!(lds["ackedVersion"], good.version_info.as_str(), "{nodes}");
    assert!(
        lds["nack"].as_str().unwrap().contains("port 8081 is taken"),
        "{nodes}"
    );
    let status = cp.run(&["status"]).ok().to_string();
    assert!(
        status.contains("NACK  nacker lds: port 8081 is taken"),
        "{status}"
    );
    // The next change comes as a new response, and an ACK clears the NACK.
    apply(&cp, &[gateway("edge", "edge", 8082)]);
    let next = s.recv().await;
    s.ack(&next, &[]).await;
    let nodes = super::wait_json(&cp, "/api/v1/nodes", |n| {
        n["items"][0]["types"]["lds"]["nack"].is_null()
    });
    assert_eq!(
        nodes["items"][0]["types"]["lds"]["ackedVersion"],
        next.version_info.as_str()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wildcard_sequence_and_names_that_appear_later() {
    let (_dir, cp) = super::fresh();
    apply(
        &cp,
        &[gateway("edge", "a", 8080), gateway("edge", "b", 8081)],
    );
    let mut s = Sotw::open(channel(&cp.xds_addr).await, node("n", "edge")).await;
    // Unset on the first request: wildcard (8).
    s.request(LISTENER, &[], "", "", None).await;
    let r = s.recv().await;
    assert_eq!(names(&r), vec!["a/http", "b/http"]);
    // An ACK with no names keeps the legacy wildcard.
    s.ack(&r, &[]).await;
    s.silent(QUIET).await;
    // ["*", "ghost"]: wildcard plus a name that does not exist yet.
    s.request(LISTENER, &["*", "ghost"], &r.version_info, &r.nonce, None)
        .await;
    let r = s.recv().await;
    assert_eq!(names(&r), vec!["a/http", "b/http"]);
    // ["a/http"]: only that one.
    s.request(LISTENER, &["a/http"], &r.version_info, &r.nonce, None)
        .await;
    let r = s.recv().await;
    assert_eq!(names(&r), vec!["a/http"]);
    // Then unset: nothing, not wildcard.
    s.request(LISTENER, &[], &r.version_info, &r.nonce, None)
        .await;
    let r = s.recv().await;
    assert!(r.resources.is_empty());

    // RDS for a name that does not exist yet is answered when it appears.
    s.request(ROUTE, &["c/http"], "", "", None).await;
    s.silent(QUIET).await;
    apply(&cp, &[gateway("edge", "c", 8082)]);
    let r = s.recv().await;
    assert_eq!(
        (r.type_url.as_str(), names(&r)),
        (ROUTE, vec!["c/http".to_string()])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_nonces_are_ignored_and_new_names_always_sent() {
    let (_dir, cp) = super::fresh();
    apply(
        &cp,
        &[gateway("edge", "a", 8080), gateway("edge", "b", 8081)],
    );
    let mut s = Sotw::open(channel(&cp.xds_addr).await, node("n", "edge")).await;
    s.request(ROUTE, &["a/http"], "", "", None).await;
    let first = s.recv().await;
    s.ack(&first, &["a/http"]).await;
    s.request(
        ROUTE,
        &["a/http", "b/http"],
        &first.version_info,
        &first.nonce,
        None,
    )
    .await;
    let second = s.recv().await;
    assert_eq!(
        names(&second),
        vec!["a/http", "b/http"],
        "newly named resources are sent with the set (9)"
    );
    // A request carrying the older nonce is stale and changes nothing (12).
    s.request(ROUTE, &["b/http"], &first.version_info, &first.nonce, None)
        .await;
    s.silent(QUIET).await;
    // So is one echoing a nonce never sent, on a type never answered.
    s.request(CLUSTER, &[], "", "0", None).await;
    s.silent(QUIET).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_clear_status_and_others_are_unaffected() {
    let (_dir, cp) = super::fresh();
    apply(&cp, &edge_state());
    let ch = channel(&cp.xds_addr).await;
    let mut good = Sotw::open(ch.clone(), node("good", "edge")).await;
    good.request(LISTENER, &[], "", "", None).await;
    let r = good.recv().await;
    good.ack(&r, &[]).await;

    let mut no_node = Sotw::open(ch.clone(), node("x", "edge")).await;
    no_node
        .raw(
            portico_proto::envoy::service::discovery::v3::DiscoveryRequest {
                type_url: LISTENER.into(),
                ..Default::default()
            },
        )
        .await;
    let st = no_node.error().await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("must carry node"), "{st}");

    let mut empty_type = Sotw::open(ch.clone(), node("y", "edge")).await;
    empty_type.request("", &[], "", "", None).await;
    let st = empty_type.error().await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("type_url is empty"), "{st}");

    let mut unknown = Sotw::open(ch.clone(), node("z", "edge")).await;
    unknown
        .request("type.googleapis.com/envoy.config.Nope", &[], "", "", None)
        .await;
    let st = unknown.error().await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("unknown type URL"), "{st}");

    // A subscription beyond any real configuration is refused, not stored.
    let mut greedy = Sotw::open(ch.clone(), node("greedy", "edge")).await;
    let many: Vec<String> = (0..100_001).map(|i| format!("r{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    greedy.request(ROUTE, &many, "", "", None).await;
    let st = greedy.error().await;
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st}");

    // A flood of subscription changes is answered in order and ends right.
    let mut flood = Sotw::open(ch.clone(), node("flood", "edge")).await;
    flood.request(ROUTE, &["edge/http"], "", "", None).await;
    let mut last = flood.recv().await;
    for i in 0..200 {
        let names: &[&str] = if i % 2 == 0 {
            &["nope"]
        } else {
            &["edge/http"]
        };
        flood
            .request(ROUTE, names, &last.version_info, &last.nonce, None)
            .await;
        if i % 2 == 1 {
            last = flood.recv().await;
        }
    }
    assert_eq!(names(&last), vec!["edge/http"]);

    // The good node still gets every change.
    apply(&cp, &[gateway("edge", "edge", 9999)]);
    let r = good.recv().await;
    assert_eq!(r.type_url, LISTENER);

    // The metrics saw all of it.
    let m = cp.http("GET", "/metrics", None, None).body;
    for needle in [
        "portico_xds_streams{service=\"ads\",variant=\"sotw\"}",
        "portico_xds_pushes_total{type=\"lds\"}",
        "portico_xds_push_to_ack_seconds_count{type=\"lds\"} 1",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_does_not_hold_up_others() {
    let (_dir, cp) = super::fresh();
    apply(&cp, &edge_state());
    let ch = channel(&cp.xds_addr).await;
    // This client subscribes and then never reads a response.
    let mut stuck = Sotw::open(ch.clone(), node("stuck", "edge")).await;
    stuck.request(LISTENER, &[], "", "", None).await;
    stuck.request(CLUSTER, &[], "", "", None).await;
    stuck.request(ROUTE, &["edge/http"], "", "", None).await;
    let mut good = Sotw::open(channel(&cp.xds_addr).await, node("good", "edge")).await;
    good.request(ROUTE, &["edge/http"], "", "", None).await;
    let mut r = good.recv().await;
    for i in 0..30 {
        apply(&cp, &[api("pets", "edge", "pets", &format!("{}s", 10 + i))]);
        good.ack(&r, &["edge/http"]).await;
        r = good.recv().await;
        assert_eq!(r.type_url, ROUTE);
    }
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread")]
async fn per_type_service_and_csds() {
    use portico_proto::envoy::service::listener::v3::listener_discovery_service_client::ListenerDiscoveryServiceClient;
    use portico_proto::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
    let (_dir, cp) = super::fresh();
    apply(&cp, &edge_state());
    let ch = channel(&cp.xds_addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut lds = ListenerDiscoveryServiceClient::new(ch.clone())
        .stream_listeners(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(
        portico_proto::envoy::service::discovery::v3::DiscoveryRequest {
            node: Some(node("lds-only", "edge")),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = lds.message().await.unwrap().unwrap();
    assert_eq!(names(&r), vec!["edge/http"]);
    tx.send(
        portico_proto::envoy::service::discovery::v3::DiscoveryRequest {
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    super::wait_json(&cp, "/api/v1/nodes", |n| {
        n["items"][0]["types"]["lds"]["ackedVersion"].is_string()
    });
    let status = ClientStatusDiscoveryServiceClient::new(ch)
        .fetch_client_status(
            portico_proto::envoy::service::status::v3::ClientStatusRequest::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let cfg = &status.config[0];
    assert_eq!(cfg.node.as_ref().unwrap().id, "lds-only");
    let g = &cfg.generic_xds_configs[0];
    assert_eq!(
        (g.type_url.as_str(), g.name.as_str()),
        (LISTENER, "edge/http")
    );
    assert_eq!(
        g.client_status,
        portico_proto::envoy::admin::v3::ClientResourceStatus::Acked as i32
    );
}
