//! Whole-state validation: each rule, and that every problem is reported.

use serde_json::{json, Value};

use super::validate_state;
use crate::model::decode::document;
use crate::model::{DesiredState, Kind};
use crate::problem::{Problem, ProblemClass};

fn state(docs: Vec<Value>) -> DesiredState {
    crate::model::decode::test_state(docs)
}

fn gateway() -> Value {
    document(
        Kind::Gateway,
        "edge",
        json!({"nodeGroup": "edge", "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]}),
    )
}

fn service(name: &str) -> Value {
    document(
        Kind::Service,
        name,
        json!({"endpoints": [{"address": "127.0.0.1", "port": 9000}]}),
    )
}

fn api(name: &str, base: &str, routes: Value) -> Value {
    document(
        Kind::Api,
        name,
        json!({"version": "v1", "gateways": ["edge"], "hostnames": ["api.example.com"],
               "basePath": base, "lifecycle": {"state": "published"}, "routes": routes}),
    )
}

fn texts(problems: &[Problem]) -> Vec<String> {
    problems.iter().map(|p| p.to_string()).collect()
}

#[test]
fn a_good_state_has_no_problems() {
    let s = state(vec![
        gateway(),
        service("pets"),
        api(
            "pets",
            "/pets",
            json!([{"match": {"path": "/"}, "action": {"service": "pets"}}]),
        ),
    ]);
    assert_eq!(validate_state(&s), vec![]);
}

#[test]
fn every_problem_is_reported_with_document_and_path() {
    let s = state(vec![
        gateway(),
        service("pets"),
        api(
            "pets",
            "/pets",
            json!([
                {"match": {"path": "/ok"}, "action": {"service": "pets"}},
                {"match": {"path": "no-slash"}, "action": {"service": "pets"}},
                {"match": {"path": "/x", "methods": ["FETCH"]}, "action": {"service": "ghost"}},
                {"match": {"path": "/y"}, "action": {"service": "pets", "timeout": "soon"}},
            ]),
        ),
    ]);
    let t = texts(&validate_state(&s));
    assert!(
        t.contains(&"api/pets: spec.routes[1].match.path: must start with '/'".to_string()),
        "{t:#?}"
    );
    assert!(
        t.iter()
            .any(|p| p.starts_with("api/pets: spec.routes[2].match.methods[0]:")),
        "{t:#?}"
    );
    assert!(
        t.contains(
            &"api/pets: spec.routes[2].action.service: service \"ghost\" does not exist"
                .to_string()
        ),
        "{t:#?}"
    );
    assert!(
        t.iter()
            .any(|p| p.starts_with("api/pets: spec.routes[3].action.timeout:")),
        "{t:#?}"
    );
    assert_eq!(t.len(), 4, "{t:#?}");
}

#[test]
fn references_alone_are_semantic_problems() {
    let s = state(vec![api(
        "pets",
        "/pets",
        json!([{"match": {"path": "/"}, "action": {"service": "pets"}}]),
    )]);
    let problems = validate_state(&s);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems.iter().all(|p| p.class == ProblemClass::Reference));
}

#[test]
fn two_apis_cannot_claim_the_same_route() {
    let routes =
        json!([{"match": {"path": "/", "methods": ["GET"]}, "action": {"service": "pets"}}]);
    let s = state(vec![
        gateway(),
        service("pets"),
        api("a", "/pets", routes.clone()),
        api("b", "/pets", routes),
    ]);
    let t = texts(&validate_state(&s));
    assert_eq!(t.len(), 1, "{t:#?}");
    assert!(
        t[0].starts_with("api/b: spec.routes[0].match: conflicts with api/a spec.routes[0]"),
        "{t:#?}"
    );

    // Different methods, a different base path, or a draft: no conflict.
    let get = json!([{"match": {"path": "/", "methods": ["GET"]}, "action": {"service": "pets"}}]);
    let post =
        json!([{"match": {"path": "/", "methods": ["POST"]}, "action": {"service": "pets"}}]);
    let s = state(vec![
        gateway(),
        service("pets"),
        api("a", "/pets", get.clone()),
        api("b", "/pets", post),
    ]);
    assert_eq!(validate_state(&s), vec![]);
    let s = state(vec![
        gateway(),
        service("pets"),
        api("a", "/pets", get.clone()),
        api("b", "/pets/v2", get.clone()),
    ]);
    assert_eq!(validate_state(&s), vec![]);
    let mut draft = api("b", "/pets", get.clone());
    draft["spec"]["lifecycle"]["state"] = json!("draft");
    let s = state(vec![
        gateway(),
        service("pets"),
        api("a", "/pets", get),
        draft,
    ]);
    assert_eq!(validate_state(&s), vec![]);
}

#[test]
fn gateway_rules() {
    let bad = document(
        Kind::Gateway,
        "edge",
        json!({"nodeGroup": "", "listeners": [
            {"name": "a", "port": 80, "protocol": "HTTPS"},
            {"name": "a", "port": 80, "protocol": "HTTP", "tls": {"certificateRefs": [{"name": "c"}]}}
        ]}),
    );
    let t = texts(&validate_state(&state(vec![bad])));
    for expected in [
        "gateway/edge: spec.nodeGroup: must not be empty",
        "gateway/edge: spec.listeners[0].tls: an HTTPS listener needs tls.certificateRefs",
        "gateway/edge: spec.listeners[1].name: duplicate listener name \"a\"",
        "gateway/edge: spec.listeners[1].port: port 80 is already used by spec.listeners[0]",
        "gateway/edge: spec.listeners[1].tls: an HTTP listener cannot have tls; use protocol HTTPS",
    ] {
        assert!(
            t.contains(&expected.to_string()),
            "missing {expected:?} in {t:#?}"
        );
    }
}

#[test]
fn service_rules() {
    let bad = document(
        Kind::Service,
        "s",
        json!({"endpoints": [{"address": "not a host", "port": 0, "weight": 0}],
               "connectTimeout": "0s",
               "healthCheck": {"path": "/h", "interval": "1s", "timeout": "2s", "unhealthyInterval": "0s"},
               "circuitBreaker": {"maxRequests": 0}}),
    );
    let t = texts(&validate_state(&state(vec![bad])));
    assert_eq!(t.len(), 7, "{t:#?}");
    assert!(
        t.contains(
            &"service/s: spec.healthCheck.unhealthyInterval: must be longer than zero".to_string()
        ),
        "{t:#?}"
    );
}

#[test]
fn slow_start_needs_a_balancer_that_weighs() {
    let svc = |lb: &str, window: &str| {
        document(
            Kind::Service,
            "s",
            json!({"endpoints": [{"address": "10.0.0.1", "port": 80}], "loadBalancing": lb, "slowStart": window}),
        )
    };
    assert!(texts(&validate_state(&state(vec![svc("least_request", "30s")]))).is_empty());
    assert_eq!(
        texts(&validate_state(&state(vec![svc("ring_hash", "30s")]))),
        vec!["service/s: spec.slowStart: slow start applies to round_robin and least_request load balancing only"]
    );
    assert_eq!(
        texts(&validate_state(&state(vec![svc("round_robin", "0s")]))),
        vec!["service/s: spec.slowStart: must be longer than zero"]
    );
}

#[test]
fn endpoint_priorities_are_tiers_from_zero() {
    let svc = |eps: Value| document(Kind::Service, "s", json!({ "endpoints": eps }));
    let t = texts(&validate_state(&state(vec![svc(json!([
        {"address": "10.0.0.1", "port": 80},
        {"address": "10.0.0.2", "port": 80, "priority": 2}
    ]))])));
    assert_eq!(
        t,
        vec!["service/s: spec.endpoints: priorities must start at 0 and skip none: no endpoint has priority 1"]
    );
    let t = texts(&validate_state(&state(vec![svc(json!([
        {"address": "10.0.0.1", "port": 80},
        {"address": "10.0.0.2", "port": 80, "priority": 11}
    ]))])));
    assert_eq!(
        t,
        vec!["service/s: spec.endpoints[1].priority: must be between 0 and 10"]
    );
    let t = texts(&validate_state(&state(vec![svc(json!([
        {"address": "10.0.0.1", "port": 80},
        {"address": "10.0.0.2", "port": 80, "priority": 1}
    ]))])));
    assert!(t.is_empty(), "{t:#?}");
}

#[test]
fn lifecycle_rules() {
    let mut a = api(
        "a",
        "/a",
        json!([{"match": {"path": "/"}, "action": {"directResponse": {"status": 200}}}]),
    );
    a["spec"]["lifecycle"] = json!({"state": "deprecated", "sunsetAt": "2020-01-01T00:00:00Z"});
    let t = texts(&validate_state(&state(vec![gateway(), a])));
    assert_eq!(
        t,
        vec!["api/a: spec.lifecycle.deprecatedAt: a deprecated Api needs deprecatedAt (RFC 3339)"]
    );
}
