//! Delta ADS, rule by rule (rule numbers as in the project's xDS notes).

use std::time::Duration;

use portico_integration::xds_client::{
    channel, delta_versions, node, Delta, CLUSTER, ENDPOINT, LISTENER, ROUTE,
};

use super::xds_sotw::{api, apply, delete, edge_state, gateway, service};

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread")]
async fn wildcard_then_only_changes_then_removals() {
    let (_dir, cp) = super::fresh();
    let mut d = Delta::open(channel(&cp.xds_addr).await, node("d1", "edge")).await;
    // Legacy wildcard with nothing to send still gets an answer (15).
    d.request(LISTENER, &[], &[], "", &[]).await;
    let r = d.recv().await;
    assert!(r.resources.is_empty() && r.removed_resources.is_empty());
    d.ack(&r).await;
    d.request(ROUTE, &["edge/http"], &[], "", &[]).await;
    let r = d.recv().await;
    assert_eq!(
        r.removed_resources,
        vec!["edge/http"],
        "a name that does not exist is answered as removed (14)"
    );
    d.ack(&r).await;

    apply(
        &cp,
        &[
            gateway("edge", "edge", 8080),
            gateway("edge", "edge2", 8081),
        ],
    );
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let r = d.recv().await;
        seen.insert(r.type_url.clone(), delta_versions(&r));
        d.ack(&r).await;
    }
    assert_eq!(
        seen[LISTENER].keys().collect::<Vec<_>>(),
        vec!["edge/http", "edge2/http"]
    );
    assert_eq!(seen[ROUTE].keys().collect::<Vec<_>>(), vec!["edge/http"]);

    // One listener changes: exactly one resource (19).
    apply(&cp, &[gateway("edge", "edge2", 8082)]);
    let r = d.recv().await;
    assert_eq!(r.type_url, LISTENER);
    assert_eq!(
        delta_versions(&r).keys().collect::<Vec<_>>(),
        vec!["edge2/http"]
    );
    d.ack(&r).await;
    d.silent(QUIET).await;

    // A deletion is a removal.
    delete(&cp, "gateway", "edge2");
    let r = d.recv().await;
    assert_eq!((r.type_url.as_str(), r.resources.len()), (LISTENER, 0));
    assert_eq!(r.removed_resources, vec!["edge2/http"]);
    d.ack(&r).await;
    d.silent(QUIET).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnect_with_initial_versions_sends_only_what_differs() {
    let (_dir, cp) = super::fresh();
    apply(
        &cp,
        &[
            gateway("edge", "a", 8080),
            gateway("edge", "b", 8081),
            gateway("edge", "c", 8082),
        ],
    );
    let ch = channel(&cp.xds_addr).await;
    let mut d = Delta::open(ch.clone(), node("d", "edge")).await;
    d.request(LISTENER, &["*"], &[], "", &[]).await;
    let all = delta_versions(&d.recv().await);
    assert_eq!(all.len(), 3);
    drop(d);
    // While away: b changes, c goes.
    apply(&cp, &[gateway("edge", "b", 9081)]);
    delete(&cp, "gateway", "c");
    let mut d = Delta::open(ch, node("d", "edge")).await;
    let initial: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    d.request(LISTENER, &["*"], &[], "", &initial).await;
    let r = d.recv().await;
    assert_eq!(
        delta_versions(&r).keys().collect::<Vec<_>>(),
        vec!["b/http"],
        "only what differs (18)"
    );
    assert_eq!(r.removed_resources, vec!["c/http"]);
    d.ack(&r).await;
    d.silent(QUIET).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn explicit_names_are_always_answered_and_unsubscribe_rules() {
    let (_dir, cp) = super::fresh();
    apply(
        &cp,
        &[gateway("edge", "a", 8080), gateway("edge", "b", 8081)],
    );
    let mut d = Delta::open(channel(&cp.xds_addr).await, node("d", "edge")).await;
    d.request(ROUTE, &["a/http"], &[], "", &[]).await;
    let r = d.recv().await;
    assert_eq!(
        delta_versions(&r).keys().collect::<Vec<_>>(),
        vec!["a/http"]
    );
    d.ack(&r).await;
    // Subscribing again to a name the client has: answered anyway (16).
    d.request(ROUTE, &["a/http"], &[], &r.nonce, &[]).await;
    let again = d.recv().await;
    assert_eq!(
        delta_versions(&again).keys().collect::<Vec<_>>(),
        vec!["a/http"]
    );
    // Unsubscribing a name never subscribed: not an error, no answer (17).
    d.request(ROUTE, &[], &["never"], &again.nonce, &[]).await;
    d.silent(QUIET).await;

    // Wildcard plus an explicit name: unsubscribing the name is answered
    // with the resource while the wildcard still covers it (17).
    d.request(LISTENER, &["*", "a/http"], &[], "", &[]).await;
    let r = d.recv().await;
    assert_eq!(r.resources.len(), 2);
    d.ack(&r).await;
    d.request(LISTENER, &[], &["a/http"], &r.nonce, &[]).await;
    let r = d.recv().await;
    assert_eq!(
        delta_versions(&r).keys().collect::<Vec<_>>(),
        vec!["a/http"]
    );

    // A stale nonce still carries subscription changes (12).
    d.request(ROUTE, &["b/http"], &[], "stale-nonce", &[]).await;
    let r = d.recv().await;
    assert_eq!(
        delta_versions(&r).keys().collect::<Vec<_>>(),
        vec!["b/http"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clusters_then_endpoints_then_listeners_then_routes_and_nack() {
    let (_dir, cp) = super::fresh();
    let mut d = Delta::open(channel(&cp.xds_addr).await, node("d", "edge")).await;
    for (t, names) in [
        (CLUSTER, &[][..]),
        (ENDPOINT, &["pets", "pets2"][..]),
        (LISTENER, &[][..]),
        (ROUTE, &["edge/http"][..]),
    ] {
        d.request(t, names, &[], "", &[]).await;
        let r = d.recv().await;
        d.ack(&r).await;
    }
    apply(&cp, &edge_state());
    let order: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let r = d.recv().await;
            v.push(r.type_url.clone());
            d.ack(&r).await;
        }
        v
    };
    assert_eq!(order, vec![CLUSTER, ENDPOINT, LISTENER, ROUTE]);

    // Moving the Api to another Service: the new cluster comes first, the
    // old one is removed last (20).
    apply(
        &cp,
        &[service("pets2", 9002), api("pets", "edge", "pets2", "5s")],
    );
    let mut seq = Vec::new();
    for _ in 0..5 {
        let r = d.recv().await;
        seq.push((
            r.type_url.clone(),
            delta_versions(&r).into_keys().collect::<Vec<_>>(),
            r.removed_resources.clone(),
        ));
        d.ack(&r).await;
    }
    assert_eq!(
        seq[0],
        (CLUSTER.to_string(), vec!["pets2".to_string()], vec![])
    );
    assert_eq!(seq[1].0, ENDPOINT);
    assert_eq!(seq[2].0, ROUTE);
    assert_eq!(
        seq[3],
        (CLUSTER.to_string(), vec![], vec!["pets".to_string()])
    );
    assert_eq!(
        seq[4],
        (ENDPOINT.to_string(), vec![], vec!["pets".to_string()])
    );

    // A NACK is recorded and the same version is not sent again.
    apply(&cp, &[api("pets", "edge", "pets2", "7s")]);
    let r = d.recv().await;
    assert_eq!(r.type_url, ROUTE);
    d.nack(&r, "route rejected for the test").await;
    d.silent(QUIET).await;
    super::wait_json(&cp, "/api/v1/nodes", |n| {
        n["items"][0]["types"]["rds"]["nack"]
            .as_str()
            .is_some_and(|m| m.contains("route rejected for the test"))
    });
}
