//! apply, get, diff, history, rollback, delete and status through the CLI.

use serde_json::Value;

use super::{file, fresh};

#[test]
fn apply_get_diff_history_rollback_through_the_cli() {
    let (dir, cp) = fresh();
    let out = cp
        .run(&["apply", "-f", "examples/", "-m", "initial"])
        .ok()
        .to_string();
    assert!(out.contains("api/pets-v2 created"), "{out}");
    assert!(out.contains("applied as revision 1"), "{out}");

    // Applying the same files again changes nothing and makes no revision.
    let out = cp.run(&["apply", "-f", "examples/"]).ok().to_string();
    assert!(out.contains("no changes; revision 1 is current"), "{out}");

    // get: table, yaml and json.
    let table = cp.run(&["get", "apis"]).ok().to_string();
    assert!(table.lines().next().unwrap().starts_with("API"), "{table}");
    assert!(
        table.contains("pets-v1") && table.contains("deprecated"),
        "{table}"
    );
    assert!(
        table.lines().all(|l| l.chars().count() <= 80),
        "wider than 80 columns:\n{table}"
    );
    let json: Value =
        serde_json::from_str(cp.run(&["get", "api", "pets-v2", "-o", "json"]).ok()).unwrap();
    assert_eq!(json["spec"]["version"], "v2");
    let yaml = cp
        .run(&["get", "service", "pets", "-o", "yaml"])
        .ok()
        .to_string();
    assert!(
        yaml.contains("kind: Service") && yaml.contains("name: pets"),
        "{yaml}"
    );
    let list: Value = serde_json::from_str(cp.run(&["get", "svc", "-o", "json"]).ok()).unwrap();
    assert_eq!(list["revision"], 1);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let missing = cp.run(&["get", "api", "nope"]);
    assert!(
        missing.failed().contains("api/nope does not exist"),
        "{}",
        missing.stderr
    );

    // diff -f against the current state, then apply the change.
    let apis = std::fs::read_to_string(
        portico_integration::workspace_root().join("examples/petstore/apis.yaml"),
    )
    .unwrap();
    let changed = file(
        dir.path(),
        "apis.yaml",
        &apis.replace("timeout: 5s", "timeout: 9s"),
    );
    let diff = cp.run(&["diff", "-f", &changed]).ok().to_string();
    assert!(
        diff.contains("-      timeout: 5s") && diff.contains("+      timeout: 9s"),
        "{diff}"
    );
    assert_eq!(cp.revision(), 1, "diff must not apply");
    cp.run(&["apply", "-f", &changed, "-m", "longer timeouts"])
        .ok();
    assert_eq!(cp.revision(), 2);

    // diff --revision shows what revision 2 did.
    let diff = cp.run(&["diff", "--revision", "2"]).ok().to_string();
    assert!(diff.contains("longer timeouts"), "{diff}");
    assert!(diff.contains("+++ api/pets-v1 (revision 2)"), "{diff}");

    // delete, then history, then rollback to revision 2.
    let refused = cp.run(&["delete", "service", "pets"]);
    assert!(
        refused.failed().contains("still used by api/pets-v1"),
        "{}",
        refused.stderr
    );
    cp.run(&["delete", "api", "pets-v1"]).ok();
    assert_eq!(cp.revision(), 3);
    let history = cp.run(&["history"]).ok().to_string();
    let revs: Vec<&str> = history
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(revs, ["3", "2", "1"], "{history}");
    assert!(history.contains("longer timeouts"), "{history}");

    let out = cp.run(&["rollback", "1"]).ok().to_string();
    assert!(out.contains("as revision 4"), "{out}");
    let v1: Value =
        serde_json::from_str(cp.run(&["get", "api", "pets-v1", "-o", "json"]).ok()).unwrap();
    assert_eq!(
        v1["spec"]["routes"][0]["action"]["timeout"], "5s",
        "rollback restores revision 1's content"
    );
    let rev4: Value = cp.api("GET", "/api/v1/revisions/4", None).json();
    assert_eq!(rev4["revision"]["operation"], "rollback");
    assert_eq!(rev4["revision"]["rollbackOf"], 1);

    let status = cp.run(&["status"]).ok().to_string();
    assert!(status.contains("revision       4"), "{status}");
    assert!(status.contains("sqlite:"), "{status}");
    let status: Value = serde_json::from_str(cp.run(&["status", "-o", "json"]).ok()).unwrap();
    assert_eq!(status["resources"]["api"], 2);
}

#[test]
fn expect_revision_detects_a_concurrent_apply() {
    let (_dir, cp) = fresh();
    cp.run(&["apply", "-f", "examples/petstore/gateway.yaml"])
        .ok();
    cp.run(&[
        "apply",
        "-f",
        "examples/petstore/services.yaml",
        "--expect-revision",
        "1",
    ])
    .ok();
    // Someone else applied revision 2; an operator still at 1 is refused.
    let stale = cp.run(&[
        "apply",
        "-f",
        "examples/petstore/apis.yaml",
        "--expect-revision",
        "1",
    ]);
    let err = stale.failed();
    assert!(err.contains("at revision 2, not 1"), "{err}");
    assert_eq!(cp.revision(), 2, "nothing applied");
    let r = cp.api(
        "POST",
        "/api/v1/rollback",
        Some(r#"{"revision": 1, "expectRevision": 1}"#),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "revision_conflict");
    let stale_delete = cp.run(&["delete", "service", "pets", "--expect-revision", "1"]);
    assert!(
        stale_delete.failed().contains("not 1"),
        "{}",
        stale_delete.stderr
    );
    cp.run(&[
        "apply",
        "-f",
        "examples/petstore/apis.yaml",
        "--expect-revision",
        "2",
    ])
    .ok();
    assert_eq!(cp.revision(), 3);
}

#[test]
fn standard_input_and_dry_run() {
    let (_dir, cp) = fresh();
    let text = std::fs::read_to_string(
        portico_integration::workspace_root().join("examples/petstore/gateway.yaml"),
    )
    .unwrap();
    let mut child = cp
        .cli()
        .args(["apply", "-f", "-", "--dry-run"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let run = portico_integration::Run::from(child.wait_with_output().unwrap());
    assert!(run.ok().contains("gateway/edge created"), "{}", run.stdout);
    assert!(run.stdout.contains("dry run"), "{}", run.stdout);
    assert_eq!(cp.revision(), 0, "a dry run applies nothing");
}

#[test]
fn server_and_token_come_from_the_config_file_and_flags_win() {
    let (_dir, cp) = fresh();
    let cfg_dir = cp.config_home.join("portico");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::write(
        cfg_dir.join("config.yaml"),
        format!("server: {}\ntoken: {}\n", cp.addr, cp.token),
    )
    .unwrap();
    let run = portico_integration::Run::from(cp.bare_cli().args(["status"]).output().unwrap());
    assert!(run.ok().contains("revision       0"), "{}", run.stdout);
    // The environment overrides the file, and a flag overrides both.
    let bad_env = portico_integration::Run::from(
        cp.bare_cli()
            .env("PORTICO_TOKEN", "wrong")
            .args(["status"])
            .output()
            .unwrap(),
    );
    assert!(bad_env.failed().contains("401"), "{}", bad_env.stderr);
    let flag = portico_integration::Run::from(
        cp.bare_cli()
            .env("PORTICO_TOKEN", "wrong")
            .args(["status", "--token", &cp.token])
            .output()
            .unwrap(),
    );
    flag.ok();
    let token_file = cp.data_dir.join("admin.token");
    let from_file = portico_integration::Run::from(
        cp.bare_cli()
            .env("PORTICO_SERVER", &cp.addr)
            .args(["get", "apis", "--token-file", token_file.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert!(
        from_file.ok().contains("no documents"),
        "{}",
        from_file.stdout
    );
}
