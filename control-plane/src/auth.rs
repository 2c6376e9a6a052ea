//! Admin API tokens: generated, stored hashed, checked per request.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError, TokenRecord};

/// The name recorded as author for the bootstrap token.
pub const ADMIN_TOKEN_NAME: &str = "admin";

/// `sha256:<hex>` of a token: what the store keeps instead of the token.
pub fn hash_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A new random token: `ptc_` and 64 hex digits (256 bits).
pub fn generate_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut out = String::from("ptc_");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    Ok(out)
}

/// Errors while setting up the admin token.
#[derive(Debug, thiserror::Error)]
pub enum TokenSetupError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The token file could not be written.
    #[error("cannot write the admin token to {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Makes sure an admin token exists. With `given` (from the environment)
/// that token becomes the admin token; otherwise, on first start, a token
/// is generated and written to `<data_dir>/admin.token` with mode 0600.
/// Returns the file written, if any.
pub fn ensure_admin_token(
    store: &dyn Store,
    data_dir: &Path,
    given: Option<&str>,
) -> Result<Option<PathBuf>, TokenSetupError> {
    if let Some(token) = given {
        store.put_token(&TokenRecord {
            name: ADMIN_TOKEN_NAME.into(),
            hash: hash_token(token),
        })?;
        return Ok(None);
    }
    if !store.tokens()?.is_empty() {
        return Ok(None);
    }
    let path = data_dir.join("admin.token");
    let file_err = |source| TokenSetupError::File {
        path: path.clone(),
        source,
    };
    let token = generate_token().map_err(file_err)?;
    write_private(&path, &format!("{token}\n")).map_err(file_err)?;
    // The file first, then the hash: a crash in between leaves a file whose
    // token is not yet valid, and the next start simply makes a new one.
    store.put_token(&TokenRecord {
        name: ADMIN_TOKEN_NAME.into(),
        hash: hash_token(&token),
    })?;
    Ok(Some(path))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Token hashes and their names, loaded once at start-up.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    by_hash: HashMap<String, String>,
}

impl TokenTable {
    /// Loads every token from the store.
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        Ok(TokenTable {
            by_hash: store
                .tokens()?
                .into_iter()
                .map(|t| (t.hash, t.name))
                .collect(),
        })
    }

    /// The name of the token, if it is valid. Only hashes are compared, so
    /// lookup timing reveals nothing usable about stored tokens.
    pub fn authenticate(&self, token: &str) -> Option<&str> {
        self.by_hash.get(&hash_token(token)).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 68);
        assert!(hash_token(&a).starts_with("sha256:"));
        assert_ne!(hash_token(&a), hash_token(&b));
    }
}
