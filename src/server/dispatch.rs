//! One framed line in, its answer (or its forwarding) out: the per-line step
//! of a connection, shared with the fuzz tests.

use bytes::{BufMut, BytesMut};

use super::framer::Frame;
use super::owed::{Gathered, Owed};
use crate::command::{Command, Limits};
use crate::protocol::{self, LineError, Request};
use crate::registry::BucketCache;
use crate::router::{Router, Target};

/// What a line asks of the connection after it was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Go on.
    Next,
    /// A group for another node is full: forward it before the next line.
    Forward,
    /// `QUIT`: answer what is owed, say goodbye, close.
    Quit,
}

/// Answers one frame: into `gathered.out` when it can be answered here, or
/// as a command for another node or for this node's store. A read waits its
/// turn behind this connection's writes to the store, `owed` or gathered.
#[inline]
pub(crate) fn answer_frame(
    frame: Frame<'_>,
    router: &Router,
    limits: &Limits,
    cache: &mut BucketCache,
    gathered: &mut Gathered,
    owed: &Owed,
) -> Step {
    match frame {
        Frame::TooLong => protocol::write_line_error(&mut gathered.out, &LineError::TooLong),
        Frame::Line(line) => match protocol::parse(line, limits) {
            Ok(Request::Ping) => gathered.out.put_slice(protocol::PONG),
            Ok(Request::Quit) => return Step::Quit,
            Ok(Request::Op(command)) => match router.target(&command, 0) {
                Ok(Target::Local)
                    if router.must_wait_for_store(&command, |_| {
                        owed.waits_for_store() || gathered.holds_store_work()
                    }) =>
                {
                    if gathered.forward(None, command.owned()) {
                        return Step::Forward;
                    }
                }
                Ok(Target::Local) => answer_local(router, command, &mut gathered.out, cache),
                Ok(Target::Moving) => {
                    if gathered.forward(None, command.owned()) {
                        return Step::Forward;
                    }
                }
                Ok(Target::Remote(owner)) => {
                    if gathered.forward(Some(&owner), command.owned()) {
                        return Step::Forward;
                    }
                }
                Err(err) => protocol::write_result(&mut gathered.out, &Err(err)),
            },
            Err(err) => protocol::write_line_error(&mut gathered.out, &err),
        },
    }
    Step::Next
}

/// Runs a local command and appends its answer to `out`; a GET's value goes
/// from the registry straight into the answer.
#[inline]
fn answer_local(
    router: &Router,
    command: Command<&str>,
    out: &mut BytesMut,
    cache: &mut BucketCache,
) {
    match command {
        Command::Get { bucket, key } => {
            if let Err(err) = router.registry().get(bucket, key, cache, |value| {
                protocol::write_value(out, value)
            }) {
                protocol::write_result(out, &Err(err));
            }
        }
        Command::Where { .. } => protocol::write_result(out, &router.execute_local(command)),
        other => protocol::write_result(out, &router.registry().apply_cached(other, cache)),
    }
}
