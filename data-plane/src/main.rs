//! `portico-dp`: the data-plane proxy binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use portico_dp::bootstrap::Bootstrap;
use portico_dp::config::listener::LogTarget;
use portico_dp::snapshot::Shared;
use portico_dp::xds::client::{node, Client, ClientConfig};

/// Portico's data plane: a proxy configured only by xDS.
#[derive(Parser, Debug)]
#[command(name = "portico-dp", version)]
struct Args {
    /// Envoy bootstrap file (node, ads_config, the xDS cluster, admin).
    #[arg(long)]
    bootstrap: Option<PathBuf>,
    /// xDS server, host:port (overrides the bootstrap).
    #[arg(long, env = "PORTICO_XDS")]
    xds: Option<String>,
    /// Node id (overrides the bootstrap).
    #[arg(long)]
    node_id: Option<String>,
    /// Node group, sent as node.cluster (overrides the bootstrap).
    #[arg(long)]
    node_group: Option<String>,
    /// Use SotW ADS instead of Delta.
    #[arg(long)]
    sotw: bool,
    /// Admin listener address (default 127.0.0.1:9901; port 0 picks one).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Write the admin listener's bound address to this file.
    #[arg(long)]
    admin_address_path: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Pin each worker thread to a CPU of its own: the CPUs the process may
    /// run on, in turn (as nginx's `worker_cpu_affinity auto`).
    #[arg(long)]
    cpu_affinity: bool,
    /// Write a JSON access log line per request here ("-" for stdout), on
    /// every listener (listeners may also name their own in the config).
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// Keep the last good configuration here and boot from it when the
    /// control plane is unreachable.
    #[arg(long)]
    config_cache: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PORTICO_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let boot = match &args.bootstrap {
        Some(p) => Some(Bootstrap::load(p)?),
        None => None,
    };
    let server = args
        .xds
        .clone()
        .or_else(|| boot.as_ref().map(|b| b.xds_server.clone()));
    let id = args
        .node_id
        .clone()
        .or_else(|| boot.as_ref().map(|b| b.node_id.clone()));
    let group = args
        .node_group
        .clone()
        .or_else(|| boot.as_ref().map(|b| b.node_cluster.clone()));
    let (Some(server), Some(id), Some(group)) = (server, id, group) else {
        bail!("need --xds, --node-id and --node-group (or --bootstrap FILE)");
    };
    let delta = !args.sotw && boot.as_ref().is_none_or(|b| b.delta);
    let admin_addr = args
        .admin_listen
        .or(boot.as_ref().and_then(|b| b.admin))
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9901)));

    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // The control thread runs the xDS client, health checks and DNS; the
    // workers run only listeners and requests.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let cpus = if args.cpu_affinity {
        let allowed = portico_dp::affinity::allowed_cpus()
            .context("--cpu-affinity: reading the CPUs this process may run on")?;
        if workers > allowed.len() {
            tracing::warn!(
                workers,
                cpus = allowed.len(),
                "--cpu-affinity: more workers than CPUs; some workers share a CPU"
            );
        }
        portico_dp::affinity::plan(&allowed, workers)
    } else {
        Vec::new()
    };
    portico_dp::upstream::pool::set_workers(workers);
    let mut handles = Vec::with_capacity(workers);
    for i in 0..workers {
        let (tx, rx) = std::sync::mpsc::channel();
        let cpu = cpus.get(i).copied();
        std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = portico_dp::affinity::pin_current_thread(cpu) {
                        let _ = tx.send(Err(std::io::Error::new(
                            e.kind(),
                            format!("--cpu-affinity: pinning worker {i} to CPU {cpu}: {e}"),
                        )));
                        return;
                    }
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                portico_dp::upstream::pool::set_worker(i);
                let _ = tx.send(Ok(rt.handle().clone()));
                // A timer that is always due within a second: registering a
                // request's timeout (seconds away) then never moves the
                // timer wheel's next wake earlier, which would cost a
                // self-wake (an eventfd write) whenever the worker had gone
                // idle between requests.
                rt.block_on(async {
                    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                    }
                });
            })
            .context("starting a worker thread")?;
        handles.push(
            rx.recv()
                .context("worker thread died")?
                .context("starting a worker")?,
        );
    }
    let shared = Arc::new(Shared::default());
    let admin = portico_dp::admin::start(admin_addr, shared.clone())
        .with_context(|| format!("admin listener on {admin_addr}"))?;
    tracing::info!(%admin, "admin listening");
    if let Some(p) = &args.admin_address_path {
        std::fs::write(p, admin.to_string()).with_context(|| format!("writing {}", p.display()))?;
    }
    let cfg = ClientConfig {
        server,
        node: node(&id, &group),
        delta,
        cache: args.config_cache.clone(),
        access_logs: args
            .access_log
            .iter()
            .map(|p| {
                if p.as_os_str() == "-" {
                    LogTarget::Stdout
                } else {
                    LogTarget::File(p.clone())
                }
            })
            .collect(),
    };
    tracing::info!(node = %id, group = %group, server = %cfg.server, delta, workers, cpus = ?cpus, "starting");
    rt.block_on(async move {
        tokio::spawn(Client::new(cfg, shared.clone(), portico_dp::proxy::Workers(handles)).run());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        // Drain every listener first (bounded by their drain timeouts); a
        // second signal cuts that short.
        tracing::info!("draining listeners before exit (a second signal exits at once)");
        shared.shutdown.begin();
        tokio::select! {
            () = shared.shutdown.finished() => tracing::info!("drained; exiting"),
            _ = tokio::signal::ctrl_c() => tracing::info!("exiting before the drain ended"),
            _ = term.recv() => tracing::info!("exiting before the drain ended"),
        }
        Ok::<_, anyhow::Error>(())
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
