//! Health, metrics and the generated OpenAPI document.

use super::fresh;

#[test]
fn health_metrics_and_openapi() {
    let (_dir, cp) = fresh();
    let h = cp.http("GET", "/healthz", None, None);
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    assert_eq!(cp.http("GET", "/readyz", None, None).status, 200);

    cp.run(&["apply", "-f", "examples/"]).ok();
    let m = cp.http("GET", "/metrics", None, None);
    assert_eq!(m.status, 200);
    assert!(m.body.contains("portico_state_revision 1"), "{}", m.body);
    assert!(
        m.body.contains("portico_state_documents{kind=\"api\"} 2"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("portico_state_writes_total{operation=\"apply\",result=\"committed\"} 1"),
        "{}",
        m.body
    );
    assert!(m.body.contains("portico_admin_requests_total{route=\"/api/v1/apply\",method=\"POST\",status=\"200\"} 1"), "{}", m.body);

    let doc = cp.api("GET", "/api/v1/openapi.json", None).json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/apply",
        "/api/v1/validate",
        "/api/v1/rollback",
        "/api/v1/revisions",
        "/api/v1/revisions/{number}",
        "/api/v1/resources/{kind}/{name}",
        "/api/v1/status",
    ] {
        assert!(paths.contains_key(p), "OpenAPI lacks {p}");
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for s in [
        "ApiSpec",
        "ServiceSpec",
        "GatewaySpec",
        "ErrorResponse",
        "Problem",
    ] {
        assert!(schemas.contains_key(s), "OpenAPI lacks schema {s}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}
