//! The `kvmesh` binary: parse flags, load the configuration, run a node until
//! SIGINT or SIGTERM.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use kvmesh::{Config, Node, Overrides};
use tracing_subscriber::EnvFilter;

/// A distributed, in-memory key-value store. `nc 127.0.0.1 4040` is a client.
#[derive(Debug, Parser)]
#[command(name = "kvmesh", version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, env = kvmesh::config::CONFIG_ENV, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's name (serves kv.node.<NAME>).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// TCP address of the text protocol.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// NATS server URL, or a comma-separated list.
    #[arg(long, value_name = "URLS")]
    nats_url: Option<String>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "KVMESH_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let overrides = Overrides {
        config_file: cli.config,
        node: cli.node,
        listen: cli.listen,
        nats_url: cli.nats_url,
    };
    let config = match Config::load(&overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("kvmesh: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kvmesh: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    raise_file_limit(config.max_connections);
    runtime.block_on(async {
        // Signal handlers go in before the node starts, so that a signal sent as
        // soon as the node answers is never taken with the default action.
        let signals = match Signals::install() {
            Ok(signals) => signals,
            Err(err) => {
                eprintln!("kvmesh: cannot install signal handlers: {err}");
                return ExitCode::FAILURE;
            }
        };
        let node = match Node::start(config).await {
            Ok(node) => node,
            Err(err) => {
                eprintln!("kvmesh: {err}");
                return ExitCode::FAILURE;
            }
        };
        let signal = signals.recv().await;
        tracing::info!(signal, "signal received");
        node.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// SIGTERM and SIGINT, the two ways to ask a node to stop.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Each connection is a file descriptor: ask for enough of them for
/// `max_connections` plus room for NATS and the log, and say so when the
/// system refuses.
fn raise_file_limit(max_connections: usize) {
    let wanted = max_connections as u64 + 256;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => tracing::warn!(
            limit = got,
            max_connections,
            "the open-file limit is below max_connections; connections past it will fail"
        ),
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit"),
    }
}
