//! `clustermesh`: the command operators drive the mesh with. Subcommands:
//!
//! - `clustermesh apiserver --config FILE`: run a cluster's apiserver (docs/CONFIG.md);
//! - `clustermesh agent --config FILE [--datapath bpf|userspace]`: run a node's agent.

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
    /// Run a node's agent: watch the local apiserver, merge every cluster's state and program
    /// the datapath (eBPF maps, or the same maps in memory).
    Agent {
        /// The configuration file (YAML; see docs/CONFIG.md).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// `bpf` (needs CAP_BPF, CAP_NET_ADMIN, cgroup v2 and bpffs) or `userspace`;
        /// overrides the file's `datapath`.
        #[arg(long, value_name = "KIND")]
        datapath: Option<clustermesh_agent::DatapathKind>,
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

async fn agent(
    config: PathBuf,
    datapath: Option<clustermesh_agent::DatapathKind>,
) -> anyhow::Result<()> {
    let config = clustermesh_agent::Config::load(&config)?;
    let kind = datapath.unwrap_or(config.datapath);
    let running = clustermesh_agent::start(config, kind)
        .await
        .context("starting the agent")?;
    println!("agent admin on {}", running.admin_addr);
    shutdown_signal().await?;
    tracing::info!("shutting down; the datapath stays pinned");
    running.stop().await;
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
            Command::Agent { config, datapath } => agent(config, datapath).await,
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
