//! `clustermesh`: the command operators drive the mesh with. Subcommands:
//!
//! - `clustermesh apiserver --config FILE`: run a cluster's apiserver (docs/CONFIG.md).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// A multi-cluster control plane for Kubernetes, in the family of Cilium ClusterMesh.
#[derive(Parser)]
#[command(name = "clustermesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a cluster's apiserver: read its manifests, write its state into the kvstore and
    /// serve it to other clusters and to its agents over mTLS gRPC.
    Apiserver {
        /// The configuration file (YAML; see docs/CONFIG.md).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn apiserver(config: PathBuf) -> anyhow::Result<()> {
    let config = clustermesh_apiserver::Config::load(&config)?;
    let running = clustermesh_apiserver::start(config)
        .await
        .context("starting the apiserver")?;
    println!(
        "export listening on {}, health on {}",
        running.export_addr, running.health_addr
    );
    shutdown_signal().await?;
    tracing::info!("shutting down");
    running.stop().await.context("stopping the apiserver")?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The one crypto provider of the process: ring (no aws-lc, no openssl).
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a rustls crypto provider was already installed");
        return std::process::ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime failed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Apiserver { config } => apiserver(config).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
