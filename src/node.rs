//! Wiring: a [`Node`] is a configuration brought to life — a bound listener, a
//! router over this node's registry, the accept loop — and the way to stop it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::command::Limits;
use crate::config::{Durability, Settings};
use crate::mesh::{Mesh, MeshError, Serving};
use crate::registry::Registry;
use crate::router::Router;
use crate::secret::redact_url;
use crate::server::{self, ServerLimits};
use crate::store::Store;

/// Pending connections the kernel queues for us. The usual 128 drops connects
/// during a burst of a thousand; the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// How long a stopping node waits for requests in flight before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The mesh could not be joined.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// The TCP address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// Why.
        source: io::Error,
    },
}

/// A running node.
pub struct Node {
    name: String,
    addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    accept_loop: tokio::task::JoinHandle<()>,
    mesh: Option<(Mesh, Serving)>,
    /// Cancelled when another process serving this node's name was found
    /// first, and this one stopped serving.
    deposed: CancellationToken,
}

impl Node {
    /// Binds the configured address and starts serving. Returns once the
    /// node accepts connections.
    pub async fn start(settings: Settings) -> Result<Node, StartError> {
        let Settings {
            config,
            table,
            nats_servers: servers,
            security,
        } = settings;
        let listener = bind(&config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let nats = match &servers {
            Some(servers) => servers
                .iter()
                .map(|s| redact_url(s))
                .collect::<Vec<_>>()
                .join(","),
            None => "not needed (this node owns every routed bucket)".to_string(),
        };
        let durability = match config.durability {
            Durability::Memory => "memory".to_string(),
            Durability::Jetstream => format!(
                "jetstream (store {}, {} replicas)",
                crate::store::store_name(&config.node),
                config.replicas
            ),
        };
        info!(node = %config.node, %addr, routes = %table, %nats, %durability, "kvmesh node starting");
        let mesh = match &servers {
            Some(servers) => Some(
                Mesh::connect(
                    servers,
                    &config.node,
                    Duration::from_millis(config.request_timeout_ms),
                    &security,
                )
                .await?,
            ),
            None => None,
        };
        let registry = Registry::with_max_buckets(config.max_buckets);
        // A durable node loads its store before it answers anything.
        let store = match (&mesh, config.durability) {
            (Some(mesh), Durability::Jetstream) => Some(
                Store::open(
                    mesh.client(),
                    &config.node,
                    config.replicas as usize,
                    registry.clone(),
                    Duration::from_millis(config.request_timeout_ms),
                )
                .await,
            ),
            _ => None,
        };
        let mut router = Router::new(&config.node, table, registry, mesh.clone(), config.max_hops);
        if let Some(store) = store {
            router = router.with_store(store);
        }
        let router = Arc::new(router);
        let limits = ServerLimits {
            max_line_bytes: config.max_line_bytes,
            max_connections: config.max_connections,
            idle_timeout: config.idle_timeout_secs.map(Duration::from_secs),
            sizes: Limits {
                max_value_bytes: config.max_value_bytes,
            },
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mesh = match mesh {
            Some(mesh) => {
                mesh.check_value_limit(config.max_value_bytes);
                let serving = mesh
                    .serve(&config.node, router.clone(), limits.sizes, tracker.clone())
                    .await?;
                Some((mesh, serving))
            }
            None => None,
        };
        let accept_loop = tokio::spawn(server::run(
            listener,
            router,
            limits,
            shutdown.clone(),
            tracker.clone(),
        ));
        let deposed = match &mesh {
            Some((_, serving)) => serving.deposed(),
            None => CancellationToken::new(),
        };
        info!(node = %config.node, %addr, "kvmesh node ready");
        Ok(Node {
            deposed,
            name: config.node,
            addr,
            shutdown,
            tracker,
            accept_loop,
            mesh,
        })
    }

    /// The address the text front end listens on (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resolves when this node found another process serving its name since
    /// before it started, and stopped serving that name; the node should
    /// then be shut down.
    pub async fn deposed(&self) {
        self.deposed.cancelled().await;
    }

    /// Stops accepting (on TCP and NATS), lets the requests in flight finish
    /// (for up to ten seconds), drains the NATS connection, and returns.
    pub async fn shutdown(self) {
        info!(node = %self.name, "shutting down");
        self.shutdown.cancel();
        let _ = self.accept_loop.await;
        let mesh = match self.mesh {
            Some((mesh, serving)) => {
                serving.stop().await;
                Some(mesh)
            }
            None => None,
        };
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                connections = self.tracker.len(),
                "connections still busy after the grace period; closing them"
            );
        }
        if let Some(mesh) = mesh {
            mesh.drain().await;
        }
        info!(node = %self.name, "stopped");
    }
}

/// Binds with a deep accept backlog.
async fn bind(listen: &str) -> io::Result<TcpListener> {
    let addr = tokio::net::lookup_host(listen)
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
