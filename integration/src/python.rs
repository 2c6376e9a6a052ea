//! Outside peers written in Python: a virtual environment under the target
//! directory, with packages installed from PyPI on first use. A test that
//! needs one fails loudly if it cannot be installed; it never skips.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

static INSTALL: Mutex<()> = Mutex::new(());

/// The venv's `python`, with `packages` installed (pip is skipped when an
/// import check shows they are there).
pub fn python_with(packages: &[&str], import_check: &str) -> PathBuf {
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let target = crate::bin("portico-cp")
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf();
    let venv = target.join("py-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .expect("python3 is needed for the proxyless gRPC test; install Python 3");
        assert!(
            out.status.success(),
            "cannot create a Python venv at {}: {}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let have = Command::new(&python)
        .args(["-c", import_check])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages)
            .output()
            .expect("run pip");
        assert!(
            out.status.success(),
            "cannot install {packages:?} from PyPI (needed by this test, which does not skip): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    python
}
