//! A running `portico-dp` pointed at a control plane.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{bin, wait_for};

/// A data-plane process.
pub struct DataPlane {
    child: Option<Child>,
    /// `127.0.0.1:PORT` of its admin listener.
    pub admin: String,
    /// Its log file.
    pub log: PathBuf,
}

impl DataPlane {
    /// Starts `portico-dp` with `args` added to the admin flags; waits
    /// until the admin listener is up (not until it is ready).
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> DataPlane {
        let addr_file = dir.join(format!("{name}.admin"));
        let _ = std::fs::remove_file(&addr_file);
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(bin("portico-dp"))
            .args(["--admin-listen", "127.0.0.1:0", "--admin-address-path"])
            .arg(&addr_file)
            .args(["--workers", "2"])
            .args(args)
            .env(
                "PORTICO_LOG",
                std::env::var("PORTICO_DP_LOG").unwrap_or("info".into()),
            )
            .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).expect("out file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn portico-dp");
        let admin = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "portico-dp exited with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&addr_file)
                .ok()
                .filter(|s| !s.is_empty())
        })
        .expect("portico-dp admin did not come up");
        DataPlane {
            child: Some(child),
            admin,
            log,
        }
    }

    /// Starts a node of `group` on the control plane at `xds` and waits
    /// until it reports ready.
    pub fn start(dir: &Path, name: &str, xds: &str, group: &str, extra: &[&str]) -> DataPlane {
        let mut args = vec!["--xds", xds, "--node-id", name, "--node-group", group];
        args.extend_from_slice(extra);
        let dp = Self::spawn(dir, name, &args);
        dp.wait_ready();
        dp
    }

    /// Waits for `/ready` to answer 200.
    pub fn wait_ready(&self) {
        wait_for(Duration::from_secs(30), || {
            (self.admin_get("/ready").0 == 200).then_some(())
        })
        .unwrap_or_else(|| panic!("portico-dp not ready:\n{}", self.logs()));
    }

    /// GET on the admin listener: status and body.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        match crate::http::request(&self.admin, "GET", path, None, None) {
            Ok(r) => (r.status, r.body),
            Err(_) => (0, String::new()),
        }
    }

    /// POST on the admin listener: status and body.
    pub fn admin_post(&self, path: &str) -> (u16, String) {
        match crate::http::request(&self.admin, "POST", path, None, None) {
            Ok(r) => (r.status, r.body),
            Err(_) => (0, String::new()),
        }
    }

    /// One counter from `/stats`.
    pub fn stat(&self, name: &str) -> u64 {
        let (_, body) = self.admin_get("/stats");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends it SIGTERM (what an orchestrator sends before a restart).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {}: {status}", self.pid());
    }

    /// Its exit status, once it exited within `timeout`.
    pub fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        wait_for(timeout, || child.try_wait().ok().flatten())
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback port free right now (for Gateway listeners).
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range: a port the OS hands out for
    // `bind(0)` or `connect` (a data plane's admin listener, an upstream
    // connection) could otherwise be this one by the time it is used.
    let floor = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if floor > 12_000 {
        use std::hash::{BuildHasher, RandomState};
        let mut rng = crate::rng::Rng(RandomState::new().hash_one(std::process::id()) | 1);
        for _ in 0..200 {
            let port = 10_000 + rng.below(u64::from(floor - 10_000)) as u16;
            // Free on every address, as a gateway binds 0.0.0.0.
            if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
