//! `portico-cp`: the Portico control plane.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use portico_cp::server::{self, Settings};

/// The Portico control plane: desired state, history and the admin API.
#[derive(Debug, Parser)]
#[command(name = "portico-cp", version, about)]
struct Args {
    /// Directory for the database and the admin token [default: the
    /// per-user data directory, e.g. ~/.local/share/portico].
    #[arg(long, env = "PORTICO_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Address of the admin API.
    #[arg(long, env = "PORTICO_ADMIN_LISTEN", default_value = "127.0.0.1:7700")]
    admin_listen: SocketAddr,

    /// Address of the xDS (gRPC, ADS) server for data-plane nodes.
    #[arg(long, env = "PORTICO_XDS_LISTEN", default_value = "127.0.0.1:18000")]
    xds_listen: SocketAddr,

    /// Log format: `text` or `json`.
    #[arg(long, env = "PORTICO_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(&args.log_format);
    let Some(data_dir) = args
        .data_dir
        .or_else(|| dirs::data_dir().map(|d| d.join("portico")))
    else {
        eprintln!("portico-cp: no per-user data directory on this system; pass --data-dir or PORTICO_DATA_DIR");
        return std::process::ExitCode::from(2);
    };
    // Read from the environment only: a flag would show the secret in `ps`.
    let admin_token = std::env::var("PORTICO_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let settings = Settings {
        data_dir,
        admin_listen: args.admin_listen,
        xds_listen: args.xds_listen,
        admin_token: admin_token.map(|t| t.trim().to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portico-cp: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(settings, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portico-cp: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTICO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
