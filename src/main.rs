//! The `kvmesh` binary: parse flags, load the configuration, run a node until
//! SIGINT or SIGTERM.

#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kvmesh::{Config, Node, Overrides};
use tracing_subscriber::EnvFilter;

/// A distributed, in-memory key-value store. `nc 127.0.0.1 4040` is a client.
#[derive(Debug, Parser)]
#[command(name = "kvmesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    node: NodeArgs,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "KVMESH_LOG_FORMAT")]
    log_format: LogFormat,
}

/// The configuration layers given on the command line.
#[derive(Debug, clap::Args)]
struct NodeArgs {
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
}

impl NodeArgs {
    fn overrides(self) -> Overrides {
        Overrides {
            config_file: self.config,
            node: self.node,
            listen: self.listen,
            nats_url: self.nats_url,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Drive one or more nodes with load, check every answer, report rate and latency.
    Bench(BenchArgs),
    /// Check that a node answers PING on its TCP port (exit 0 on PONG).
    Ping {
        /// The node's TCP address [default: the configured `listen`
        /// (KVMESH_LISTEN, KVMESH_CONFIG), on loopback when it is 0.0.0.0 or ::;
        /// else 127.0.0.1:4040].
        #[arg(long)]
        addr: Option<String>,
        /// How long to wait, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Validate the configuration and print it, with where each value came from.
    CheckConfig {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show or change the live routing table (routes_from = "jetstream"),
    /// over the NATS of the configuration.
    Routes {
        #[command(subcommand)]
        action: RoutesAction,
    },
}

#[derive(Debug, Subcommand)]
enum RoutesAction {
    /// Print the table in force, with its revision (as a file `set` takes).
    Show {
        #[command(flatten)]
        config: NodeArgs,
    },
    /// Replace the table with the [[routes]] of a TOML file, if it is still at
    /// the revision read (the file's `revision`, else the one in force now).
    Set {
        /// A TOML file of [[routes]] entries.
        file: PathBuf,
        #[command(flatten)]
        config: NodeArgs,
    },
    /// Give a range of first bytes (`a-m`, `x`, `*`) to a node; its buckets move.
    Move {
        /// The range.
        range: String,
        /// The node that will own it.
        owner: String,
        #[command(flatten)]
        config: NodeArgs,
    },
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// What to drive: kvmesh nodes, Redis (over RESP, for comparison), a bare
    /// NATS request/reply responder run by the benchmark (the floor of a routed
    /// request), or a JetStream KV bucket (what a durable node is compared with).
    #[arg(long, value_enum, default_value_t = BenchTarget::Kvmesh)]
    target: BenchTarget,
    /// Address (host:port; a NATS URL for --target nats and jetstream); repeat to spread
    /// connections over several nodes.
    #[arg(long = "addr", default_value = "127.0.0.1:4040")]
    addrs: Vec<String>,
    /// Connections.
    #[arg(long, default_value_t = 50)]
    conns: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Total requests (default 100000 unless --duration is given).
    #[arg(long)]
    requests: Option<u64>,
    /// Run for this many seconds instead of a request count.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Operation mix in percent.
    #[arg(long, default_value = "get=80,put=20")]
    mix: String,
    /// Comma-separated buckets to spread keys over (created first).
    #[arg(long, default_value = "bench", value_delimiter = ',')]
    buckets: Vec<String>,
    /// Distinct keys per bucket.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 16)]
    value_size: usize,
    /// Write every key once before measuring.
    #[arg(long)]
    prefill: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// With --target nats: the subject of a responder in its own process
    /// (instead of one inside the benchmark).
    #[arg(long)]
    subject: Option<String>,
    /// How the client drives TCP connections (kvmesh, Redis): from io_uring
    /// rings, one thread per two cores (where the kernel allows it), or on
    /// the async runtime.
    #[arg(long, value_enum, default_value_t = BenchIo::Uring)]
    io: BenchIo,
    /// With --target nats and --subject: be that responder (answer requests
    /// on the subject until stopped) instead of driving load.
    #[arg(long)]
    respond: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BenchTarget {
    Kvmesh,
    Redis,
    Nats,
    Jetstream,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BenchIo {
    Uring,
    Runtime,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The checked configuration and a runtime (with worker threads for a
/// node, one thread for a command); the exit code when either fails, said
/// on stderr (2: a bad configuration).
fn settings_and_runtime(
    overrides: &Overrides,
    workers: bool,
) -> Result<(kvmesh::config::Settings, tokio::runtime::Runtime), ExitCode> {
    let settings = Config::load(overrides).map_err(|err| {
        eprintln!("kvmesh: {err}");
        ExitCode::from(2)
    })?;
    let mut builder = if workers {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder.enable_all().build().map_err(|err| {
        eprintln!("kvmesh: cannot start the runtime: {err}");
        ExitCode::FAILURE
    })?;
    Ok((settings, runtime))
}

/// `kvmesh routes ...`: one line on stderr and exit 1 when refused.
fn routes(action: RoutesAction) -> ExitCode {
    use kvmesh::routes::cli::{RoutesCommand, run};
    let (command, config) = match action {
        RoutesAction::Show { config } => (RoutesCommand::Show, config),
        RoutesAction::Set { file, config } => (RoutesCommand::Set(file), config),
        RoutesAction::Move {
            range,
            owner,
            config,
        } => (RoutesCommand::Move { range, node: owner }, config),
    };
    let (settings, runtime) = match settings_and_runtime(&config.overrides(), false) {
        Ok(both) => both,
        Err(code) => return code,
    };
    match runtime.block_on(run(command, &settings)) {
        Ok(text) => {
            out(&text);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("kvmesh routes: {err}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(
        cli.log_format,
        matches!(
            cli.command,
            Some(Cmd::Routes { .. } | Cmd::CheckConfig { .. })
        ),
    );
    match cli.command {
        Some(Cmd::Bench(args)) => return bench(args),
        Some(Cmd::Ping { addr, timeout_ms }) => {
            let addr = addr.unwrap_or_else(configured_listen);
            return match kvmesh::ping::ping(&addr, Duration::from_millis(timeout_ms)) {
                Ok(()) => {
                    out(&format!("PONG from {addr}\n"));
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("kvmesh ping: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::Routes { action }) => return routes(action),
        Some(Cmd::CheckConfig { node }) => {
            let overrides = node.overrides();
            return match kvmesh::config::describe(&overrides) {
                Ok(text) => {
                    out(&text);
                    // A live table: the one in force, with its revision.
                    if let Ok(settings) = Config::load(&overrides)
                        && settings.config.routes_from == kvmesh::config::RoutesFrom::Jetstream
                        && let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                    {
                        out(&rt.block_on(kvmesh::routes::cli::in_force_line(&settings)));
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("kvmesh: {err}");
                    ExitCode::from(2)
                }
            };
        }
        None => {}
    }
    let (settings, runtime) = match settings_and_runtime(&cli.node.overrides(), true) {
        Ok(both) => both,
        Err(code) => return code,
    };
    raise_file_limit(settings.config.max_connections);
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
        let node = match Node::start(settings).await {
            Ok(node) => node,
            Err(err) => {
                eprintln!("kvmesh: {err}");
                return ExitCode::FAILURE;
            }
        };
        let status = tokio::select! {
            signal = signals.recv() => {
                tracing::info!(signal, "signal received");
                ExitCode::SUCCESS
            }
            () = node.deposed() => {
                tracing::error!("stopping: another process serves this node's name");
                ExitCode::FAILURE
            }
        };
        node.shutdown().await;
        status
    })
}

fn bench(args: BenchArgs) -> ExitCode {
    let get_percent = match kvmesh::bench::parse_mix(&args.mix) {
        Ok(p) => p,
        Err(err) => {
            eprintln!("kvmesh bench: --mix: {err}");
            return ExitCode::from(2);
        }
    };
    let duration = match args.duration.map(Duration::try_from_secs_f64) {
        Some(Err(_)) => {
            eprintln!("kvmesh bench: --duration must be a positive number of seconds");
            return ExitCode::from(2);
        }
        other => other.and_then(Result::ok),
    };
    let opts = kvmesh::bench::BenchOptions {
        target: match args.target {
            BenchTarget::Kvmesh => kvmesh::bench::Target::Kvmesh,
            BenchTarget::Redis => kvmesh::bench::Target::Redis,
            BenchTarget::Nats => kvmesh::bench::Target::Nats,
            BenchTarget::Jetstream => kvmesh::bench::Target::Jetstream,
        },
        addrs: args.addrs,
        conns: args.conns,
        pipeline: args.pipeline.max(1),
        requests: args.requests.or(duration.is_none().then_some(100_000)),
        duration,
        get_percent,
        buckets: args.buckets,
        keys: args.keys,
        value_size: args.value_size.max(1),
        prefill: args.prefill,
        subject: args.subject.clone(),
        io: match args.io {
            BenchIo::Uring => kvmesh::bench::ClientIo::Uring,
            BenchIo::Runtime => kvmesh::bench::ClientIo::Runtime,
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("kvmesh bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if args.respond {
        let (Some(subject), Some(url)) = (&opts.subject, opts.addrs.first()) else {
            eprintln!("kvmesh bench: --respond needs --subject and --addr (a NATS URL)");
            return ExitCode::from(2);
        };
        return match runtime.block_on(kvmesh::bench::respond(url, subject, opts.value_size)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("kvmesh bench: {err}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(kvmesh::bench::run(opts)) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(json) => out(&format!("{json}\n")),
                    Err(err) => eprintln!("kvmesh bench: {err}"),
                }
            } else {
                out(&format!("{report}\n"));
            }
            if report.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("kvmesh bench: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr. The default filter hides async-nats's own lines: the
/// node reports every NATS event itself (see `mesh.rs`), once.
fn init_tracing(format: LogFormat, quiet: bool) {
    // A one-shot command says only what goes wrong.
    let default = if quiet {
        "error,async_nats=off"
    } else {
        "info,async_nats=off"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// SIGTERM and SIGINT, the two ways to ask a node to stop; and SIGHUP,
/// which a closing terminal or a habit of "reload" sends, and which the node
/// ignores (with a log line) instead of dying without a word.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for a signal to stop.
    async fn recv(mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => tracing::info!(
                    "SIGHUP received and ignored: the configuration is read only at start; \
                     stop the node with SIGTERM"
                ),
            }
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

/// Where this machine's configured node listens, as an address to connect
/// to: `0.0.0.0` and `::` become loopback. The default when the
/// configuration cannot be read.
fn configured_listen() -> String {
    let listen = Config::load(&Overrides::default())
        .map(|settings| settings.config.listen)
        .unwrap_or_else(|_| Config::default().listen);
    match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, addr.port()).to_string()
        }
        _ => listen,
    }
}

/// Writes to stdout; a closed pipe (`kvmesh bench | head`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}
