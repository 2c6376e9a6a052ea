//! The README's first command, `examples/demo.sh`, runs as written.

#[test]
fn the_demo_script_runs_end_to_end() {
    let root = portico_integration::workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = portico_integration::bin("portico")
        .parent()
        .unwrap()
        .to_path_buf();
    let out = std::process::Command::new("bash")
        .arg(root.join("examples/demo.sh"))
        .arg("--once")
        .env("PORTICO_BIN_DIR", &bin_dir)
        .env("PORTICO_DATA_DIR", dir.path())
        .env("PORTICO_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PORTICO_XDS_LISTEN", "127.0.0.1:0")
        .env("PORTICO_DP_ADMIN_LISTEN", "127.0.0.1:0")
        .env_remove("PORTICO_TOKEN")
        .output()
        .unwrap();
    let run = portico_integration::Run::from(out);
    let stdout = run.ok();
    assert!(stdout.contains("5 document(s) valid"), "{stdout}");
    assert!(stdout.contains("applied as revision 1"), "{stdout}");
    assert!(
        stdout.contains("pets-v2") && stdout.contains("GATEWAY"),
        "{stdout}"
    );
    assert!(stdout.contains("revision       1"), "{stdout}");
    assert!(
        stdout.contains(r#""service": "pets", "method": "GET", "path": "/pets""#),
        "a request went through the gateway to the upstream: {stdout}"
    );
    assert!(stdout.contains("demo-1"), "status lists the node: {stdout}");
}
