//! A real proxyless gRPC client (Python grpcio) dials `xds:///greeter`
//! through the configuration Portico serves and reaches a real gRPC server.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::json;

use super::xds_sotw::apply;

#[test]
fn python_grpcio_client_calls_through_portico_xds() {
    let python = portico_integration::python::python_with(&["grpcio"], "import grpc");
    let script = portico_integration::workspace_root().join("integration/tests/py/grpc_xds.py");
    let mut server = Command::new(&python)
        .arg(&script)
        .arg("server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python gRPC server");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("server printed {line:?}"));

    let (dir, cp) = super::fresh();
    apply(
        &cp,
        &[
            json!({"apiVersion": "portico.dev/v1", "kind": "Service", "metadata": {"name": "greeter"},
                 "spec": {"protocol": "grpc", "endpoints": [{"address": "127.0.0.1", "port": port}]}}),
        ],
    );
    let bootstrap = dir.path().join("xds-bootstrap.json");
    std::fs::write(
        &bootstrap,
        json!({
            "xds_servers": [{"server_uri": cp.xds_addr, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
            "node": {"id": "python-client", "cluster": "proxyless", "locality": {}}
        })
        .to_string(),
    )
    .unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .args(["client", "greeter", "hello"])
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .output()
        .unwrap();
    drop(server.stdin.take());
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "echo: hello",
        "client failed\nstdout: {stdout}\nstderr: {stderr}"
    );
}
