//! Start-up of `portico-cp`: open the store, load the state, make sure an
//! admin token exists, serve the admin API until asked to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState};
use crate::auth::{self, TokenTable};
use crate::state::StateService;
use crate::store::{SqliteStore, Store};
use crate::xds::{self, registry::Registry};

/// Settings of a control plane.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Directory holding the database and the admin token.
    pub data_dir: PathBuf,
    /// Address of the admin API.
    pub admin_listen: SocketAddr,
    /// Address of the xDS (gRPC) server.
    pub xds_listen: SocketAddr,
    /// Admin token given by the operator, instead of a generated one.
    pub admin_token: Option<String>,
}

/// Name of the file, in the data directory, holding the admin API's bound
/// address once it listens (useful with port 0).
pub const ADMIN_ADDR_FILE: &str = "admin.addr";

/// Likewise for the xDS server.
pub const XDS_ADDR_FILE: &str = "xds.addr";

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

    let metrics = Arc::new(crate::metrics::Metrics::default());
    let registry = Arc::new(Registry::default());
    let rendered = xds::spawn_translator(&state);
    let xds_shared = Arc::new(xds::stream::Shared::new(
        rendered.clone(),
        registry.clone(),
        metrics.clone(),
    ));
    let shared = Arc::new(AdminState {
        state,
        tokens,
        metrics,
        registry,
        xds: rendered,
        started: Instant::now(),
    });
    admin::handlers_update_gauges(&shared);

    let xds_listener = TcpListener::bind(settings.xds_listen)
        .await
        .with_context(|| format!("cannot listen on {} for xDS", settings.xds_listen))?;
    let xds_bound = xds_listener.local_addr()?;
    let listener = TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the admin API",
                settings.admin_listen
            )
        })?;
    let bound = listener.local_addr()?;
    write_addr_file(&settings.data_dir, XDS_ADDR_FILE, xds_bound)?;
    write_addr_file(&settings.data_dir, ADMIN_ADDR_FILE, bound)?;
    tracing::info!(admin = %bound, xds = %xds_bound, "listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let routes = xds::service::XdsService::new(xds_shared.clone()).routes();
    let xds_task = tokio::spawn(xds::grpc::serve(
        xds_listener,
        xds_shared,
        routes,
        stop_rx.clone(),
    ));
    let mut admin_stop = stop_rx;
    let admin_task = tokio::spawn(async move {
        axum::serve(
            listener,
            admin::router(shared).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = admin_stop.wait_for(|s| *s).await;
        })
        .await
    });
    shutdown.await;
    let _ = stop_tx.send(true);
    // Streams never end by themselves: give in-flight work a moment, then go.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = admin_task.await;
        let _ = xds_task.await;
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// Writes the bound address atomically so a reader never sees half of it.
fn write_addr_file(dir: &std::path::Path, name: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}
