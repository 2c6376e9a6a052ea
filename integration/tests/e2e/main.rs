//! End-to-end tests: the real `portico-cp` and `portico` binaries over
//! real loopback sockets. One binary, several modules, so the suite links
//! once.

mod admin_api;
mod auth;
mod crash;
mod demo;
mod state_cli;
mod validation;

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
