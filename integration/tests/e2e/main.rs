//! End-to-end tests: the real `portico-cp` and `portico` binaries over
//! real loopback sockets. One binary, several modules, so the suite links
//! once.

mod admin_api;
mod auth;
mod crash;
mod demo;
mod dp_common;
mod dp_foreign;
mod dp_fuzz;
mod dp_h1_downstream;
mod dp_h1_upstream;
mod dp_h2_downstream;
mod dp_resilience;
mod dp_routing;
mod dp_upstreams;
mod grpc_proxyless;
mod state_cli;
mod validation;
mod xds_delta;
mod xds_property;
mod xds_sotw;

use portico_integration::ControlPlane;

/// A fresh control plane on its own temporary data directory.
pub fn fresh() -> (tempfile::TempDir, ControlPlane) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = ControlPlane::start(dir.path());
    (dir, cp)
}

/// Writes `text` to a file in `dir` and returns its path as a string.
pub fn file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p.display().to_string()
}

/// Polls an admin API path until `ok` holds for its JSON (or 10 s pass).
pub fn wait_json(
    cp: &ControlPlane,
    path: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    portico_integration::wait_for(std::time::Duration::from_secs(10), || {
        last = cp.api("GET", path, None).json();
        ok(&last).then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("{path} never satisfied the condition; last: {last}"))
}
