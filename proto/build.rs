//! Compiles a descriptor set of the Envoy messages a data plane runs, from
//! the `.proto` files the `envoy-types` crate ships, so that admin pages
//! can print resources as Envoy's JSON (prost's generated types carry no
//! reflection). Pure Rust (protox): no system `protoc`.

use std::path::{Path, PathBuf};

/// Packages (directories under `data-plane-api/`) whose messages go in.
const PACKAGES: &[&str] = &[
    "envoy/config/listener/v3",
    "envoy/config/route/v3",
    "envoy/config/cluster/v3",
    "envoy/config/endpoint/v3",
    "envoy/extensions/filters/network/http_connection_manager/v3",
    "envoy/extensions/transport_sockets/tls/v3",
    "envoy/extensions/upstreams/http/v3",
    // The retry extensions the data plane runs.
    "envoy/extensions/retry/host/previous_hosts/v3",
    "envoy/extensions/retry/priority/previous_priorities/v3",
    // The HTTP filters Portico's guide names, and a few common ones.
    "envoy/extensions/filters/http/router/v3",
    "envoy/extensions/filters/http/jwt_authn/v3",
    "envoy/extensions/filters/http/local_ratelimit/v3",
    "envoy/extensions/filters/http/ratelimit/v3",
    "envoy/extensions/filters/http/rbac/v3",
    "envoy/extensions/filters/http/cors/v3",
    "envoy/extensions/filters/http/grpc_json_transcoder/v3",
    "envoy/extensions/filters/http/grpc_web/v3",
    "envoy/extensions/filters/http/ext_authz/v3",
    "envoy/extensions/filters/http/health_check/v3",
    "envoy/extensions/filters/http/buffer/v3",
    "envoy/extensions/filters/http/header_mutation/v3",
];

/// Import roots inside the crate's `proto/` directory.
const INCLUDES: &[&str] = &[
    "data-plane-api",
    "xds",
    "protoc-gen-validate",
    "googleapis",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
    "ratelimit",
];

fn main() {
    let root = envoy_types_protos();
    let api = root.join("data-plane-api");
    let mut files = Vec::new();
    for pkg in PACKAGES {
        let dir = api.join(pkg);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "proto") {
                files.push(p.strip_prefix(&api).expect("under api").to_path_buf());
            }
        }
    }
    files.sort();
    let includes: Vec<PathBuf> = INCLUDES.iter().map(|i| root.join(i)).collect();
    // Encoded by the compiler itself: a round trip through prost_types
    // would drop the options' extensions (udpa.annotations.sensitive, which
    // says which fields to redact).
    let fail = |e: protox::Error| -> ! {
        panic!("compiling Envoy's protos from {}: {e:?}", root.display())
    };
    let mut compiler = protox::Compiler::new(&includes).unwrap_or_else(|e| fail(e));
    compiler.include_imports(true);
    compiler.open_files(&files).unwrap_or_else(|e| fail(e));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(
        out.join("envoy_descriptors.bin"),
        compiler.encode_file_descriptor_set(),
    )
    .expect("write descriptor set");
}

/// The `proto/` directory of the `envoy-types` package this build uses,
/// found through `cargo metadata` (wherever cargo keeps its sources).
fn envoy_types_protos() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--locked",
            "--manifest-path",
        ])
        .arg(&manifest)
        // Only this target's packages: others were never downloaded.
        .arg("--filter-platform")
        .arg(std::env::var("TARGET").expect("TARGET"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let found: Vec<&serde_json::Value> = meta["packages"]
        .as_array()
        .map(|ps| ps.iter().filter(|p| p["name"] == "envoy-types").collect())
        .unwrap_or_default();
    // Two versions would leave it unclear whose protos match the types.
    let [pkg] = found.as_slice() else {
        panic!(
            "expected exactly one envoy-types package in cargo metadata, found {}",
            found.len()
        );
    };
    let dir = Path::new(pkg["manifest_path"].as_str().expect("manifest_path"))
        .parent()
        .expect("package dir")
        .join("proto");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed=build.rs");
    // A new envoy-types version lives in another directory: the lock file
    // is what changes.
    if let Some(ws) = meta["workspace_root"].as_str() {
        println!("cargo:rerun-if-changed={ws}/Cargo.lock");
    }
    dir
}
