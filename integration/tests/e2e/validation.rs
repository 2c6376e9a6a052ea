//! Bad input through the CLI and the API: every problem reported, nothing
//! applied.

use super::{file, fresh};

const SEVERAL_PROBLEMS: &str = r#"
apiVersion: portico.dev/v1
kind: Gateway
metadata: {name: edge}
spec:
  nodeGroup: edge
  listeners: [{name: http, port: 8080, protocol: HTTP}]
---
apiVersion: portico.dev/v1
kind: Service
metadata: {name: pets}
spec:
  endpoints: [{address: 127.0.0.1, port: 0}]
---
apiVersion: portico.dev/v1
kind: Api
metadata: {name: pets}
spec:
  version: v1
  gateways: [edge, nowhere]
  basePath: /pets
  routes:
    - match: {path: /}
      action: {service: pets}
    - match: {path: /a}
      action: {service: pets}
    - match: {path: no-slash}
      action: {service: ghost}
"#;

#[test]
fn several_problems_in_one_file_are_all_reported_and_nothing_applies() {
    let (dir, cp) = fresh();
    let path = file(dir.path(), "bad.yaml", SEVERAL_PROBLEMS);
    for cmd in [vec!["apply", "-f", &path], vec!["validate", "-f", &path]] {
        let run = cp.run(&cmd);
        let err = run.failed();
        for expected in [
            "service/pets: spec.endpoints[0].port: must be between 1 and 65535",
            "api/pets: spec.gateways[1]: gateway \"nowhere\" does not exist",
            "api/pets: spec.routes[2].match.path: must start with '/'",
            "api/pets: spec.routes[2].action.service: service \"ghost\" does not exist",
        ] {
            assert!(
                err.contains(expected),
                "{cmd:?}: missing {expected:?} in:\n{err}"
            );
        }
        assert!(err.contains("4 problem"), "{err}");
    }
    assert_eq!(cp.revision(), 0, "nothing may be applied");
    let r = cp.api("GET", "/api/v1/resources", None);
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 0);
}

#[test]
fn unknown_kind_and_unknown_fields_are_errors() {
    let (dir, cp) = fresh();
    let path = file(
        dir.path(),
        "odd.yaml",
        "apiVersion: portico.dev/v1\nkind: Widget\nmetadata: {name: w}\nspec: {}\n---\n\
         apiVersion: portico.dev/v1\nkind: Gateway\nmetadata: {name: edge}\n\
         spec:\n  nodeGroup: edge\n  listenres: []\n  listeners: [{name: http, port: 80, protocol: HTTP, tls_mode: x}]\n",
    );
    let run = cp.run(&["apply", "-f", &path]);
    let err = run.failed();
    assert!(
        err.contains("odd.yaml#1: kind: unknown kind \"Widget\""),
        "{err}"
    );
    assert!(
        err.contains("gateway/edge: spec.listenres: unknown field"),
        "{err}"
    );
    assert!(
        err.contains("gateway/edge: spec.listeners[0].tls_mode: unknown field"),
        "{err}"
    );
    assert_eq!(cp.revision(), 0);
    // The API says the same with a 400 and every detail.
    let body = r#"{"documents": [{"apiVersion": "portico.dev/v1", "kind": "Gateway", "metadata": {"name": "g"},
                  "spec": {"nodeGroup": "g", "listeners": [], "extra": 1}}]}"#;
    let r = cp.api("POST", "/api/v1/apply", Some(body));
    assert_eq!(r.status, 400, "{}", r.body);
    let e = r.json();
    assert_eq!(e["error"]["code"], "validation_failed");
    let details = e["error"]["details"].as_array().unwrap();
    assert!(details.iter().any(|d| d["path"] == "spec.extra"), "{e}");
    assert!(details.iter().any(|d| d["path"] == "spec.listeners"), "{e}");
}

#[test]
fn a_file_that_is_not_yaml_names_line_and_column() {
    let (dir, cp) = fresh();
    let path = file(
        dir.path(),
        "broken.yaml",
        "apiVersion: portico.dev/v1\nkind: Gateway\nmetadata: {name: [x\n",
    );
    for cmd in [
        vec!["apply", "-f", &path],
        vec!["validate", "-f", &path],
        vec!["diff", "-f", &path],
    ] {
        let run = cp.run(&cmd);
        let err = run.failed();
        assert!(
            err.contains("broken.yaml:4:1: not valid YAML") || err.contains("broken.yaml:3:"),
            "{cmd:?}: {err}"
        );
    }
    let json = file(
        dir.path(),
        "broken.json",
        "{\n  \"kind\": \"Api\",\n  oops\n}\n",
    );
    let err = cp.run(&["validate", "-f", &json]).failed().to_string();
    assert!(err.contains("broken.json:3:3: not valid JSON"), "{err}");
    assert_eq!(cp.revision(), 0);
}

#[test]
fn semantic_errors_are_422_and_bad_bodies_400() {
    let (_dir, cp) = fresh();
    let api = r#"{"documents": [{"apiVersion": "portico.dev/v1", "kind": "Api", "metadata": {"name": "a"},
        "spec": {"version": "v1", "gateways": ["missing"], "routes": [{"match": {"path": "/"}, "action": {"service": "nope"}}]}}]}"#;
    let r = cp.api("POST", "/api/v1/apply", Some(api));
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "semantic_error");
    assert_eq!(r.json()["error"]["details"].as_array().unwrap().len(), 2);

    let r = cp.api("POST", "/api/v1/apply", Some("{not json"));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "bad_request");
    let r = cp.api(
        "POST",
        "/api/v1/apply",
        Some(r#"{"documents": [], "surprise": true}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("surprise"), "{}", r.body);

    let r = cp.api("GET", "/api/v1/resources/widgets", None);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = cp.api("GET", "/api/v1/revisions/7", None);
    assert_eq!(r.status, 404);
    let r = cp.api("GET", "/api/v1/revisions/seven", None);
    assert_eq!(r.status, 400);
    let r = cp.api("POST", "/api/v1/rollback", Some(r#"{"revision": 5}"#));
    assert_eq!(r.status, 404, "{}", r.body);
    let r = cp.api("DELETE", "/api/v1/resources/api/ghost", None);
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(cp.revision(), 0);
}

#[test]
fn two_apis_claiming_one_route_conflict() {
    let (dir, cp) = fresh();
    cp.run(&["apply", "-f", "examples/"]).ok();
    let clash = file(
        dir.path(),
        "clash.yaml",
        "apiVersion: portico.dev/v1\nkind: Api\nmetadata: {name: thief}\n\
         spec:\n  version: v1\n  gateways: [edge]\n  hostnames: [api.example.com]\n  basePath: /pets/v2\n  \
         lifecycle: {state: published}\n  routes:\n    - match: {path: /, pathType: exact, methods: [GET, PUT]}\n      \
         action: {service: pets}\n",
    );
    let err = cp.run(&["apply", "-f", &clash]).failed().to_string();
    assert!(
        err.contains("api/thief: spec.routes[0].match: conflicts with api/pets-v2 spec.routes[0]: both claim GET exact /pets/v2"),
        "{err}"
    );
    assert_eq!(cp.revision(), 1);
}

#[test]
fn offline_validate_needs_no_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(dir.path(), "bad.yaml", SEVERAL_PROBLEMS);
    let cli = || {
        let mut c = std::process::Command::new(portico_integration::bin("portico"));
        c.env("PORTICO_SERVER", "127.0.0.1:1")
            .current_dir(portico_integration::workspace_root());
        c
    };
    let ok = portico_integration::Run::from(
        cli()
            .args(["validate", "-f", "examples/"])
            .output()
            .unwrap(),
    );
    assert!(ok.ok().contains("5 document(s) valid"), "{}", ok.stdout);
    let bad =
        portico_integration::Run::from(cli().args(["validate", "-f", &path]).output().unwrap());
    assert!(
        bad.failed().contains("must start with '/'"),
        "{}",
        bad.stderr
    );
    let unreachable = portico_integration::Run::from(cli().args(["status"]).output().unwrap());
    let err = unreachable.failed();
    assert!(
        err.contains("cannot reach the Portico control plane at http://127.0.0.1:1"),
        "{err}"
    );
}
