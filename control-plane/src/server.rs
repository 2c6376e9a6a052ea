//! Start-up of `portico-cp`: open the store, load the state, make sure an
//! admin token exists, serve the admin API until asked to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState};
use crate::auth::{self, TokenTable};
use crate::state::StateService;
use crate::store::{SqliteStore, Store};

/// Settings of a control plane.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Directory holding the database and the admin token.
    pub data_dir: PathBuf,
    /// Address of the admin API.
    pub admin_listen: SocketAddr,
    /// Admin token given by the operator, instead of a generated one.
    pub admin_token: Option<String>,
}

/// Name of the file, in the data directory, holding the admin API's bound
/// address once it listens (useful with port 0).
pub const ADMIN_ADDR_FILE: &str = "admin.addr";

/// Runs the control plane until `shutdown` completes.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            settings.data_dir.display()
        )
    })?;
    let db_path = settings.data_dir.join("portico.db");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&db_path)
            .with_context(|| format!("cannot open the store {}", db_path.display()))?,
    );
    if let Some(path) =
        auth::ensure_admin_token(&*store, &settings.data_dir, settings.admin_token.as_deref())?
    {
        tracing::info!(path = %path.display(), "created the admin token; pass it as PORTICO_TOKEN or --token");
    }
    let tokens = TokenTable::load(&*store)?;
    let state = Arc::new(
        StateService::load(store)
            .await
            .context("cannot load the desired state")?,
    );
    tracing::info!(revision = %state.snapshot().revision, "desired state loaded");

    let shared = Arc::new(AdminState {
        state,
        tokens,
        metrics: Default::default(),
        started: Instant::now(),
    });
    admin::handlers_update_gauges(&shared);
    let listener = TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the admin API",
                settings.admin_listen
            )
        })?;
    let bound = listener.local_addr()?;
    write_addr_file(&settings.data_dir, bound)?;
    tracing::info!(addr = %bound, "admin API listening");
    axum::serve(listener, admin::router(shared))
        .with_graceful_shutdown(shutdown)
        .await
        .context("admin API server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Writes the bound address atomically so a reader never sees half of it.
fn write_addr_file(dir: &std::path::Path, addr: SocketAddr) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{ADMIN_ADDR_FILE}.tmp"));
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, dir.join(ADMIN_ADDR_FILE))?;
    Ok(())
}
