//! Wiring: a [`Node`] is a configuration brought to life — a bound listener, a
//! router over this node's registry, the accept loop — and the way to stop it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::command::Limits;
use crate::config::{Durability, RoutesFrom, Settings};
use crate::mesh::{self, Listing, Mesh, MeshError};
use crate::registry::Registry;
use crate::router::Router;
use crate::routes::{self, Routes};
use crate::secret::redact_url;
use crate::server::{self, ServerLimits};
use crate::store::{Role, Store, StoreOptions};

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
    on_nats: Option<OnNats>,
    store: Option<Store>,
    /// Moves buckets when the live table changes.
    _mover: Option<Arc<routes::moves::Mover>>,
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
        let durable = config.durability == Durability::Jetstream;
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
        // Several durable processes may share a name (one active); a memory
        // node's name is its own.
        let listing = match &mesh {
            Some(mesh) => Some(Arc::new(mesh.register(&config.node, !durable).await?)),
            None => None,
        };
        let registry = Registry::with_max_buckets(config.max_buckets);
        // A durable node loads its store before it answers anything.
        let store = match (&mesh, &listing) {
            (Some(mesh), Some(listing)) if durable => {
                listing.set_role("standby");
                let options = StoreOptions {
                    node: config.node.clone(),
                    process: listing.id().to_owned(),
                    listen: addr.to_string(),
                    replicas: config.replicas as usize,
                    timeout: Duration::from_millis(config.request_timeout_ms),
                    failover_after: Duration::from_millis(config.failover_after_ms),
                };
                Some(Store::open(mesh.client(), options, registry.clone()).await)
            }
            _ => None,
        };
        // A live table is read before anything is answered: a node must not
        // serve bytes it may have given away.
        let live = config.routes_from == RoutesFrom::Jetstream;
        let (routes, mover) = match &mesh {
            Some(mesh) if live => {
                let routes = Routes::new(&config.node, table.clone());
                let timeout = Duration::from_millis(config.request_timeout_ms);
                let kv = routes::live::follow(
                    mesh.client(),
                    routes.clone(),
                    table,
                    config.replicas as usize,
                    timeout,
                )
                .await;
                let mover = routes::moves::Mover::start(
                    mesh.client(),
                    kv,
                    routes.clone(),
                    registry.clone(),
                    store.clone(),
                    Limits {
                        max_value_bytes: config.max_value_bytes,
                    },
                    timeout,
                );
                (routes, Some(mover))
            }
            _ => (Routes::new(&config.node, table), None),
        };
        if let Some(listing) = &listing {
            listing.set_routes_revision(routes.current().revision);
            if live {
                let listing = listing.clone();
                let routes = routes.clone();
                let mut changes = routes.subscribe();
                tokio::spawn(async move {
                    while changes.changed().await.is_ok() {
                        listing.set_routes_revision(routes.current().revision);
                    }
                });
            }
        }
        let mut router = Router::new(
            &config.node,
            routes,
            registry,
            mesh.clone(),
            config.max_hops,
            Duration::from_millis(config.request_timeout_ms),
        );
        if let Some(store) = store.clone() {
            router = router.with_store(store);
        }
        let router = Arc::new(router);
        tokio::spawn(router.clone().run_gate());
        let limits = ServerLimits {
            max_line_bytes: config.max_line_bytes,
            max_connections: config.max_connections,
            idle_timeout: config.idle_timeout_secs.map(Duration::from_secs),
            io_uring: config.io_uring,
            sizes: Limits {
                max_value_bytes: config.max_value_bytes,
            },
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let on_nats = match (mesh, listing) {
            (Some(mesh), Some(listing)) => {
                mesh.check_value_limit(config.max_value_bytes);
                let serve = ServeArgs {
                    mesh: mesh.clone(),
                    listing: listing.clone(),
                    router: router.clone(),
                    limits: limits.sizes,
                    tracker: tracker.clone(),
                };
                let serving = match &store {
                    None => Serving::Always(Box::new(serve.start().await?)),
                    Some(store) => Serving::WhileActive(serve_while_active(serve, store).await?),
                };
                Some(OnNats {
                    mesh,
                    listing,
                    serving,
                })
            }
            _ => None,
        };
        let accept_loop = tokio::spawn(server::run(
            listener,
            router,
            limits,
            shutdown.clone(),
            tracker.clone(),
        ));
        let deposed = match &on_nats {
            Some(OnNats {
                serving: Serving::Always(serving),
                ..
            }) => serving.deposed(),
            _ => CancellationToken::new(),
        };
        info!(node = %config.node, %addr, "kvmesh node ready");
        Ok(Node {
            deposed,
            name: config.node,
            addr,
            shutdown,
            tracker,
            accept_loop,
            on_nats,
            store,
            _mover: mover,
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
    /// (for up to ten seconds), hands a durable node's store over to a
    /// standby, drains the NATS connection, and returns.
    pub async fn shutdown(self) {
        info!(node = %self.name, "shutting down");
        self.shutdown.cancel();
        let _ = self.accept_loop.await;
        let on_nats = match self.on_nats {
            Some(OnNats {
                mesh,
                listing,
                serving,
            }) => {
                serving.stop().await;
                Some((mesh, listing))
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
        if let Some(store) = &self.store {
            store.release().await;
        }
        if let Some((mesh, listing)) = on_nats {
            listing.leave();
            mesh.drain().await;
        }
        info!(node = %self.name, "stopped");
    }
}

/// A node's life on NATS.
struct OnNats {
    mesh: Mesh,
    listing: Arc<Listing>,
    serving: Serving,
}

/// How a node serves `kv.node.<name>`.
enum Serving {
    /// A memory node: always.
    Always(Box<mesh::Serving>),
    /// A durable node: while it is the active process of its node.
    WhileActive(RoleTask),
}

impl Serving {
    async fn stop(self) {
        match self {
            Serving::Always(serving) => serving.stop().await,
            Serving::WhileActive(task) => {
                task.stop.cancel();
                let _ = task.handle.await;
            }
        }
    }
}

/// The task that serves on NATS while this process is active.
struct RoleTask {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

/// What serving `kv.node.<name>` takes.
#[derive(Clone)]
struct ServeArgs {
    mesh: Mesh,
    listing: Arc<Listing>,
    router: Arc<Router>,
    limits: Limits,
    tracker: TaskTracker,
}

impl ServeArgs {
    async fn start(&self) -> Result<mesh::Serving, MeshError> {
        let handler = self.router.clone();
        self.mesh
            .serve(&self.listing, handler, self.limits, self.tracker.clone())
            .await
    }
}

/// Serves `kv.node.<name>` while the store says this process is the
/// active one, and shows the role in the service API. Returns once the
/// first role is in force (serving, when active).
async fn serve_while_active(args: ServeArgs, store: &Store) -> Result<RoleTask, MeshError> {
    let mut roles = store.roles();
    let first = roles.borrow_and_update().clone();
    args.listing.set_role(first.name());
    let mut serving = match first {
        Role::Active(_) => Some(args.start().await?),
        Role::Standby(_) => None,
    };
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let handle = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stopped.cancelled() => break,
                changed = roles.changed() => if changed.is_err() { break },
            }
            let role = roles.borrow_and_update().clone();
            match role {
                Role::Active(_) if serving.is_none() => match args.start().await {
                    Ok(started) => serving = Some(started),
                    Err(err) => error!(error = %err, "cannot serve on NATS as the active process"),
                },
                Role::Standby(_) => {
                    if let Some(serving) = serving.take() {
                        serving.stop().await;
                    }
                }
                Role::Active(_) => {}
            }
            args.listing.set_role(role.name());
        }
        if let Some(serving) = serving.take() {
            serving.stop().await;
        }
    });
    Ok(RoleTask { stop, handle })
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
