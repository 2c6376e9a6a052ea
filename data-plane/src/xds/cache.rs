//! The last good configuration on disk, so a proxy that boots while the
//! control plane is unreachable serves what it served before.
//!
//! The file is a sequence of length-delimited `DiscoveryResponse`s, one per
//! type, written to a temporary file and renamed into place.

use std::path::{Path, PathBuf};

use portico_proto::envoy::service::discovery::v3::DiscoveryResponse;
use prost::Message;

use super::state::{State, Ty};

/// A saved resource: name, version, body.
pub type Resource = (String, String, portico_proto::google::protobuf::Any);

/// Writes the state; errors are logged, never fatal.
pub fn save(path: &Path, state: &State) {
    let mut buf = Vec::new();
    for ty in Ty::ALL {
        let resp = DiscoveryResponse {
            type_url: ty.url().into(),
            resources: state
                .raw(ty)
                .into_iter()
                .map(|(_, _, a, _)| (*a).clone())
                .collect(),
            version_info: state
                .raw(ty)
                .iter()
                .map(|(n, v, _, _)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            ..Default::default()
        };
        if resp.encode_length_delimited(&mut buf).is_err() {
            return;
        }
    }
    let tmp: PathBuf = path.with_extension("tmp");
    let r = std::fs::write(&tmp, &buf).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), error = %e, "cannot save the config cache");
    }
}

/// Reads the saved responses (resources with their per-resource versions).
pub fn load(path: &Path) -> std::io::Result<Vec<(Ty, Vec<Resource>)>> {
    let bytes = std::fs::read(path)?;
    let mut buf = bytes.as_slice();
    let mut out = Vec::new();
    while !buf.is_empty() {
        let resp = DiscoveryResponse::decode_length_delimited(&mut buf).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        let Some(ty) = Ty::from_url(&resp.type_url) else {
            continue;
        };
        let versions: std::collections::HashMap<&str, &str> = resp
            .version_info
            .split(',')
            .filter_map(|kv| kv.rsplit_once('='))
            .collect();
        let mut items = Vec::new();
        for any in resp.resources {
            let name = super::client::resource_name(ty, &any).unwrap_or_default();
            let version = versions
                .get(name.as_str())
                .copied()
                .unwrap_or("")
                .to_string();
            items.push((name, version, any));
        }
        out.push((ty, items));
    }
    Ok(out)
}
