//! The TCP side, one job per file:
//!
//! - this file: the accept loop and the connection limit;
//! - [`connection`]: one connection's loop (read, answer, write, backpressure);
//! - [`framer`]: bytes into lines of bounded length;
//! - [`dispatch`]: one line into its answer, or into a command for another node;
//! - [`owed`]: the answers owed, in request order, some still to come;
//! - `uring` (Linux): io_uring loops that accept, receive and send for many
//!   connections per system call, answering what needs no waiting and
//!   handing a connection to the runtime's loop when a line needs more.
//!
//! A connection is one loop that takes input, answers it and writes. Local
//! commands are answered at once, into the bytes of their read; commands for
//! other nodes are gathered per owner and published at the end of the read,
//! several in one NATS message when a client pipelines, so that pipelined
//! remote requests travel side by side and cost one round trip. Answers go
//! out in request order, one write for all that a read made ready. A bound on
//! what is owed and unwritten is the backpressure: a client that never reads
//! stops being read.

mod connection;
mod dispatch;
mod framer;
mod owed;
#[cfg(all(target_os = "linux", feature = "uring"))]
mod uring;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, warn};

use crate::command::Limits;
use crate::protocol;
use crate::router::Router;
use connection::Connection;

#[cfg(test)]
pub(crate) use dispatch::{Step, answer_frame};
#[cfg(test)]
pub(crate) use framer::{Frame, Framer};
#[cfg(test)]
pub(crate) use owed::{Gathered, Owed};

/// What the TCP front end needs to know besides the router.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Longest line, without its terminator.
    pub max_line_bytes: usize,
    /// Most connections served at once.
    pub max_connections: usize,
    /// How long a connection may send nothing before it is closed.
    pub idle_timeout: Option<Duration>,
    /// Serve connections from io_uring loops where the kernel allows it
    /// (read only where the build has them: Linux, feature `uring`).
    #[cfg_attr(not(all(target_os = "linux", feature = "uring")), allow(dead_code))]
    pub io_uring: bool,
    /// Name and value limits.
    pub sizes: Limits,
}

/// Accepts connections until `shutdown` is cancelled; each connection is a task
/// on `tracker`, so the caller can wait for the requests in flight.
pub async fn run(
    listener: TcpListener,
    router: Arc<Router>,
    limits: ServerLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    #[cfg(all(target_os = "linux", feature = "uring"))]
    let listener = if limits.io_uring && limits.idle_timeout.is_none() {
        match uring::serve(listener, &router, limits, &shutdown, &tracker, &permits) {
            Ok(serving) => return serving.await,
            Err((listener, err)) => {
                tracing::info!(
                    error = %err,
                    "io_uring is not available; serving connections on the runtime"
                );
                listener
            }
        }
    } else {
        listener
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let router = router.clone();
                let shutdown = shutdown.clone();
                // A debug span: at the default level it is off, and entering
                // it on every poll costs nothing.
                let span = debug_span!("conn", %peer);
                tracker.spawn(
                    async move {
                        serve(stream, &router, limits, shutdown).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(_) => {
                debug!(%peer, "refused: too many connections");
                tracker.spawn(refuse(stream));
            }
        }
    }
    debug!("stopped accepting");
}

/// Tells a connection over the limit why it is closed.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(protocol::TOO_MANY_CONNECTIONS).await?;
        stream.shutdown().await
    })
    .await;
}

async fn serve(
    stream: TcpStream,
    router: &Arc<Router>,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    debug!("connected");
    if let Err(err) = stream.set_nodelay(true) {
        debug!(error = %err, "set_nodelay failed");
    }
    let mut conn = Connection::new(router.clone(), limits);
    serve_connection(stream, &mut conn, shutdown).await;
}

/// Runs a connection's loop on the runtime until it closes.
async fn serve_connection(
    mut stream: TcpStream,
    conn: &mut Connection,
    shutdown: CancellationToken,
) {
    let (mut rd, mut wr) = stream.split();
    match conn.run(&mut rd, &mut wr, &shutdown).await {
        Ok(()) => debug!("closed"),
        Err(err) => debug!(error = %err, "closed on error"),
    }
}
