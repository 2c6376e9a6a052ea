//! Harness for end-to-end tests and benchmarks: starts the real
//! `portico-cp` on an ephemeral loopback port, runs the real `portico`
//! CLI against it, and speaks raw HTTP to it.
//!
//! The binaries must be built first (`cargo build --workspace --bins`,
//! which the test command in the README does).

pub mod dataplane;
pub mod http;
pub mod python;
pub mod rng;
pub mod static_xds;
pub mod upstream;
pub mod workload;
pub mod xds_client;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bench>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` \
         (the README's test command does)",
        path.display()
    );
    path
}

/// Root of the workspace (for `examples/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A running `portico-cp` on a data directory it may share with later
/// instances (for restart tests).
pub struct ControlPlane {
    child: Option<Child>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// `127.0.0.1:PORT` of the admin API.
    pub addr: String,
    /// `127.0.0.1:PORT` of the xDS server.
    pub xds_addr: String,
    /// The admin token.
    pub token: String,
    /// Where the CLI looks for its config (kept empty unless a test writes one).
    pub config_home: PathBuf,
}

impl ControlPlane {
    /// Starts a control plane on `data_dir` and waits until it listens.
    pub fn start(data_dir: &Path) -> ControlPlane {
        Self::start_with(data_dir, &[])
    }

    /// As [`ControlPlane::start`], with extra environment variables.
    pub fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> ControlPlane {
        Self::launch(data_dir, env, "127.0.0.1:0")
    }

    /// As [`ControlPlane::start`] with the xDS server on a given address
    /// (to come back where data planes expect it).
    pub fn start_on(data_dir: &Path, xds_listen: &str) -> ControlPlane {
        Self::launch(data_dir, &[], xds_listen)
    }

    fn launch(data_dir: &Path, env: &[(&str, &str)], xds_listen: &str) -> ControlPlane {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let addr_file = data_dir.join("admin.addr");
        let _ = std::fs::remove_file(&addr_file);
        let _ = std::fs::remove_file(data_dir.join("xds.addr"));
        let log = std::fs::File::create(data_dir.join("cp.log")).expect("log file");
        // PORTICO_CP_WRAPPER runs the control plane under another program,
        // e.g. "valgrind --tool=massif" to profile a benchmark.
        let wrapper: Vec<String> = std::env::var("PORTICO_CP_WRAPPER")
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("portico-cp"));
                c
            }
            None => Command::new(bin("portico-cp")),
        };
        cmd.arg("--data-dir")
            .arg(data_dir)
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--xds-listen")
            .arg(xds_listen)
            .env_remove("PORTICO_ADMIN_TOKEN")
            .env("PORTICO_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn portico-cp");
        let addr = wait_for(Duration::from_secs(120), || {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(data_dir.join("cp.log")).unwrap_or_default();
                panic!("portico-cp exited with {status} before listening:\n{log}");
            }
            std::fs::read_to_string(&addr_file)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .expect("portico-cp did not start listening within 30s");
        let token = match env.iter().find(|(k, _)| *k == "PORTICO_ADMIN_TOKEN") {
            Some((_, t)) => t.to_string(),
            None => std::fs::read_to_string(data_dir.join("admin.token"))
                .expect("admin.token")
                .trim()
                .to_string(),
        };
        let xds_addr = std::fs::read_to_string(data_dir.join("xds.addr"))
            .expect("xds.addr is written before admin.addr")
            .trim()
            .to_string();
        let config_home = data_dir.join("cli-config");
        std::fs::create_dir_all(&config_home).expect("config home");
        ControlPlane {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            addr,
            xds_addr,
            token,
            config_home,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A `portico` command aimed at this control plane with its token, and
    /// no user configuration.
    pub fn cli(&self) -> Command {
        let mut cmd = self.bare_cli();
        cmd.env("PORTICO_SERVER", &self.addr)
            .env("PORTICO_TOKEN", &self.token);
        cmd
    }

    /// A `portico` command with no server or token settings at all.
    pub fn bare_cli(&self) -> Command {
        let mut cmd = Command::new(bin("portico"));
        cmd.env_remove("PORTICO_SERVER")
            .env_remove("PORTICO_TOKEN")
            .env_remove("PORTICO_TOKEN_FILE")
            .env_remove("PORTICO_CONFIG")
            .env("XDG_CONFIG_HOME", &self.config_home)
            .env("HOME", &self.config_home)
            .current_dir(workspace_root());
        cmd
    }

    /// Runs `portico ARGS` with this control plane's server and token.
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.cli().args(args).output().expect("run portico"))
    }

    /// Raw HTTP to the admin API.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> http::Response {
        http::request(&self.addr, method, path, token, body).expect("HTTP request")
    }

    /// Raw HTTP with the admin token.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> http::Response {
        self.http(method, path, Some(&self.token.clone()), body)
    }

    /// The current revision, via the API.
    pub fn revision(&self) -> u64 {
        let r = self.api("GET", "/api/v1/status", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["revision"].as_u64().expect("revision")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The outcome of a CLI run.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Asserts success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        &self.stdout
    }

    /// Asserts failure and returns stderr.
    pub fn failed(&self) -> &str {
        assert_ne!(
            self.code, 0,
            "expected failure\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        &self.stderr
    }
}

/// A one-thread runtime for a test server and its listener on an
/// ephemeral loopback port.
pub(crate) fn loopback_server() -> (
    tokio::runtime::Runtime,
    tokio::net::TcpListener,
    std::net::SocketAddr,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    (rt, listener, addr)
}

/// The complete lines of a log another process appends to. A write that
/// crosses a page of the file can be seen half done, so a last line without
/// its newline yet is left for the next read.
pub fn log_lines(path: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    Some(complete.lines().map(str::to_owned).collect())
}

/// The complete lines of a JSON-lines log, parsed; a complete line that is
/// not JSON fails the test, naming the file and the line.
pub fn json_log_lines(path: &Path) -> Option<Vec<serde_json::Value>> {
    let lines = log_lines(path)?;
    Some(
        lines
            .iter()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("{}: a line that is not JSON ({e}): {l}", path.display())
                })
            })
            .collect(),
    )
}

/// Polls `f` every few milliseconds until it returns `Some`, or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
