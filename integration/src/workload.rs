//! Generated desired states of a chosen size, for crash tests and
//! benchmarks.

use serde_json::{json, Value};

/// A valid desired state: one Gateway, `services` Services and `apis`
/// Apis with `routes_per_api` routes each. Every Api carries the
/// annotation `portico.dev/generation: <generation>`, so a test can tell
/// which apply a stored document came from.
pub fn state(apis: usize, routes_per_api: usize, services: usize, generation: u64) -> Vec<Value> {
    let mut docs = vec![json!({
        "apiVersion": "portico.dev/v1", "kind": "Gateway",
        "metadata": {"name": "edge"},
        "spec": {"nodeGroup": "edge", "listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]}
    })];
    for s in 0..services {
        docs.push(json!({
            "apiVersion": "portico.dev/v1", "kind": "Service",
            "metadata": {"name": format!("svc-{s}")},
            "spec": {"endpoints": [{"address": "127.0.0.1", "port": 10000 + s}], "connectTimeout": "1s"}
        }));
    }
    for a in 0..apis {
        let routes: Vec<Value> = (0..routes_per_api)
            .map(|r| {
                json!({
                    "name": format!("r{r}"),
                    "match": {"path": format!("/items{r}"), "methods": ["GET", "POST"]},
                    "action": {"service": format!("svc-{}", (a + r) % services.max(1)), "timeout": "5s"}
                })
            })
            .collect();
        docs.push(json!({
            "apiVersion": "portico.dev/v1", "kind": "Api",
            "metadata": {"name": format!("api-{a}"),
                         "annotations": {"portico.dev/generation": generation.to_string()}},
            "spec": {"version": "v1", "gateways": ["edge"], "hostnames": [format!("api{a}.example.com")],
                     "basePath": format!("/a{a}"), "lifecycle": {"state": "published"}, "routes": routes}
        }));
    }
    docs
}

/// An apply request body for `documents`.
pub fn apply_body(documents: &[Value], message: &str) -> String {
    json!({"documents": documents, "message": message}).to_string()
}
