//! Where the CLI finds its control plane and token: flags, then the
//! environment (`PORTICO_SERVER`, `PORTICO_TOKEN`, `PORTICO_TOKEN_FILE`),
//! then the config file (`$PORTICO_CONFIG`, or `portico/config.yaml` in the
//! user's config directory), then `http://127.0.0.1:7700`.

use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;

/// The default admin API address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7700";

/// The config file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileConfig {
    server: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

/// A resolved connection target.
#[derive(Debug)]
pub struct Target {
    /// `http://host:port`.
    pub server: String,
    /// The bearer token, if any.
    pub token: Option<String>,
}

/// Resolves the target. `server`, `token` and `token_file` come from clap,
/// which already applied flags over the environment.
pub fn resolve(
    server: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
) -> anyhow::Result<Target> {
    let file = load_file()?;
    let server = server
        .or(file.server)
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let server = if server.contains("://") {
        server
    } else {
        format!("http://{server}")
    };
    let token = match (token, token_file) {
        (Some(t), _) => Some(t),
        (None, Some(path)) => Some(read_token(&path)?),
        (None, None) => match (file.token, file.token_file) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => Some(read_token(&path)?),
            (None, None) => None,
        },
    };
    Ok(Target {
        server,
        token: token
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    })
}

fn read_token(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))
}

fn load_file() -> anyhow::Result<FileConfig> {
    let explicit = std::env::var_os("PORTICO_CONFIG").map(PathBuf::from);
    let path = match explicit
        .clone()
        .or_else(|| dirs::config_dir().map(|d| d.join("portico").join("config.yaml")))
    {
        Some(p) => p,
        None => return Ok(FileConfig::default()),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
            return Ok(FileConfig::default())
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the config file {}", path.display()))
        }
    };
    serde_yaml_ng::from_str(&text).with_context(|| format!("config file {}", path.display()))
}
