//! Tokens: required everywhere under /api/v1, stored hashed.

use super::{file, fresh};

#[test]
fn missing_or_wrong_token_is_401_and_changes_nothing() {
    let (dir, cp) = fresh();
    let body = r#"{"documents": [{"apiVersion": "portico.dev/v1", "kind": "Gateway", "metadata": {"name": "g"},
        "spec": {"nodeGroup": "g", "listeners": [{"name": "h", "port": 80, "protocol": "HTTP"}]}}]}"#;
    for token in [None, Some("wrong"), Some("")] {
        for (method, path, body) in [
            ("POST", "/api/v1/apply", Some(body)),
            ("GET", "/api/v1/resources", None),
            ("GET", "/api/v1/openapi.json", None),
            ("DELETE", "/api/v1/resources/gateway/g", None),
            ("POST", "/api/v1/rollback", Some(r#"{"revision": 1}"#)),
        ] {
            let r = cp.http(method, path, token, body);
            assert_eq!(r.status, 401, "{method} {path} with {token:?}: {}", r.body);
            assert_eq!(r.json()["error"]["code"], "unauthorized");
        }
    }
    assert_eq!(cp.revision(), 0);

    // The CLI explains what to do.
    let gw = file(dir.path(), "gw.yaml", "apiVersion: portico.dev/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {nodeGroup: g, listeners: [{name: h, port: 80, protocol: HTTP}]}\n");
    let no_token = portico_integration::Run::from(
        cp.bare_cli()
            .env("PORTICO_SERVER", &cp.addr)
            .args(["apply", "-f", &gw])
            .output()
            .unwrap(),
    );
    let err = no_token.failed();
    assert!(
        err.contains("rejected the request (401)") && err.contains("missing bearer token"),
        "{err}"
    );
    let wrong = portico_integration::Run::from(
        cp.bare_cli()
            .env("PORTICO_SERVER", &cp.addr)
            .env("PORTICO_TOKEN", "ptc_wrong")
            .args(["apply", "-f", &gw])
            .output()
            .unwrap(),
    );
    assert!(
        wrong.failed().contains("the bearer token is not valid"),
        "{}",
        wrong.stderr
    );
    assert_eq!(cp.revision(), 0);
}

#[test]
fn the_token_file_is_private_and_the_store_keeps_only_a_hash() {
    let (_dir, cp) = fresh();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cp.data_dir.join("admin.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(cp.token.starts_with("ptc_") && cp.token.len() > 40);
    let db = std::fs::read(cp.data_dir.join("portico.db")).unwrap();
    let wal = std::fs::read(cp.data_dir.join("portico.db-wal")).unwrap_or_default();
    let needle = cp.token.as_bytes();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the token is stored in clear"
        );
    }
}

#[test]
fn a_token_from_the_environment_replaces_the_generated_one() {
    let dir = tempfile::tempdir().unwrap();
    let cp = portico_integration::ControlPlane::start_with(
        dir.path(),
        &[("PORTICO_ADMIN_TOKEN", "ops-secret-123")],
    );
    assert!(!dir.path().join("admin.token").exists());
    assert_eq!(
        cp.http("GET", "/api/v1/status", Some("ops-secret-123"), None)
            .status,
        200
    );
    assert_eq!(
        cp.http("GET", "/api/v1/status", Some("other"), None).status,
        401
    );
}
