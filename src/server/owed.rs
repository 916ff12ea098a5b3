//! What a connection owes its client, in request order: answers formatted
//! already, and answers still to come from other nodes.
//!
//! A read's requests are answered into a [`Gathered`] first: local answers
//! as bytes, remote commands grouped per owner. When the read is done (or a
//! group is full) the groups are forwarded and everything joins the
//! connection's [`Owed`] queue in request order. Requests for one owner keep
//! their order inside their group, and groups are forwarded in the order they
//! began, so every request still takes effect after the one before it on the
//! same node.

use std::collections::VecDeque;

use bytes::BytesMut;

use crate::command::{Command, Reply};
use crate::error::KvError;
use crate::mesh::{Coming, MAX_BATCH, Via};
use crate::protocol;
use crate::router::Router;

/// Answers are formatted into blocks of this size, a read's worth at a time...
const OUT_BLOCK: usize = 4096;
/// ...and a new block starts when less than this is left of the last one.
const OUT_MIN_ROOM: usize = 512;

/// One item owed, in request order.
enum Item {
    /// Answers formatted already.
    Ready(BytesMut),
    /// The answer to command `index` of forwarded group `group`.
    Remote { group: u64, index: usize },
}

/// A group of commands forwarded together, and its answers once they come.
struct Group {
    /// Sent to this node's store (not to another node).
    store: bool,
    coming: Option<Coming>,
    answers: Vec<Option<Result<Reply, KvError>>>,
    /// Items of the queue that still refer to it.
    left: usize,
}

/// The answers a connection owes, in request order.
#[derive(Default)]
pub(crate) struct Owed {
    items: VecDeque<Item>,
    /// Bytes of the `Ready` items.
    bytes: usize,
    /// Forwarded groups, by id from `first_group` on.
    groups: VecDeque<Group>,
    first_group: u64,
}

impl Owed {
    /// Answers owed.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether some of the answers owed wait for this node's store.
    pub(super) fn waits_for_store(&self) -> bool {
        self.groups.iter().any(|g| g.store && g.coming.is_some())
    }

    /// Bytes of answers formatted and owed.
    #[inline]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Owes `bytes`, already formatted.
    pub(super) fn push_ready(&mut self, bytes: BytesMut) {
        self.bytes += bytes.len();
        self.items.push_back(Item::Ready(bytes));
    }

    /// Whether the first answer owed waits for another node.
    pub(super) fn head_waits(&self) -> bool {
        matches!(self.items.front(), Some(Item::Remote { .. }))
    }

    fn group(&mut self, id: u64) -> Option<&mut Group> {
        let at = id.checked_sub(self.first_group)?;
        self.groups.get_mut(at as usize)
    }

    /// Waits until the answers the first item needs are in.
    pub(super) async fn wait_head(&mut self) {
        let Some(Item::Remote { group, .. }) = self.items.front() else {
            return;
        };
        let group = *group;
        if let Some(g) = self.group(group)
            && let Some(coming) = g.coming.as_mut()
        {
            let answers = coming.await;
            g.coming = None;
            g.answers = answers.into_iter().map(Some).collect();
        }
    }

    /// Moves the answers whose turn has come to `out`.
    pub(super) fn move_ready(&mut self, out: &mut BytesMut) {
        while let Some(front) = self.items.front_mut() {
            match front {
                Item::Ready(bytes) => {
                    self.bytes -= bytes.len();
                    if out.is_empty() {
                        std::mem::swap(out, bytes);
                    } else {
                        out.extend_from_slice(bytes);
                    }
                }
                Item::Remote { group, index } => {
                    let (group, index) = (*group, *index);
                    let Some(g) = self.group(group) else { return };
                    if g.coming.is_some() {
                        return;
                    }
                    let answer = g.answers.get_mut(index).and_then(Option::take);
                    g.left -= 1;
                    let missing = || Err(KvError::internal("no answer in batch"));
                    protocol::write_result(out, &answer.unwrap_or_else(missing));
                    while self.groups.front().is_some_and(|g| g.left == 0) {
                        self.groups.pop_front();
                        self.first_group += 1;
                    }
                }
            }
            self.items.pop_front();
        }
    }
}

/// What one read's worth of requests produced, before it joins the queue:
/// local answers, and remote commands grouped by owner.
pub(crate) struct Gathered {
    /// Answers being formatted.
    pub(crate) out: BytesMut,
    items: Vec<GatheredItem>,
    /// Bytes of the `Ready` items.
    held: usize,
    /// Commands per target: another node, or (`None`) this node's store.
    groups: Vec<(Option<String>, Vec<Command>)>,
}

enum GatheredItem {
    Ready(BytesMut),
    Remote { group: usize, index: usize },
}

impl Gathered {
    pub(crate) fn new() -> Self {
        Self {
            out: BytesMut::new(),
            items: Vec::new(),
            held: 0,
            groups: Vec::new(),
        }
    }

    /// Bytes of answers formatted here.
    #[inline]
    pub(super) fn bytes(&self) -> usize {
        self.held + self.out.len()
    }

    /// The answers written so far. The rest of the buffer stays for the next
    /// ones (both share one allocation), so answering a read costs no
    /// allocation of its own: a new block comes only every few kilobytes.
    pub(super) fn take_out(&mut self) -> BytesMut {
        let ready = self.out.split();
        if self.out.capacity() < OUT_MIN_ROOM {
            self.out.reserve(OUT_BLOCK);
        }
        ready
    }

    /// Whether commands of this read wait to be forwarded (to another node
    /// or to this node's store).
    #[cfg(all(target_os = "linux", feature = "uring"))]
    pub(super) fn holds_work(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Whether a command of this read waits for this node's store: a read
    /// after it must wait its turn too.
    pub(super) fn holds_store_work(&self) -> bool {
        self.groups.iter().any(|(owner, _)| owner.is_none())
    }

    /// Adds a command for another node (`Some(owner)`) or for this node's
    /// store (`None`); true when its group is full.
    pub(super) fn forward(&mut self, owner: Option<&str>, command: Command) -> bool {
        if !self.out.is_empty() {
            let ready = self.take_out();
            self.held += ready.len();
            self.items.push(GatheredItem::Ready(ready));
        }
        let group = match self.groups.iter().position(|(o, _)| o.as_deref() == owner) {
            Some(g) => g,
            None => {
                self.groups.push((owner.map(str::to_owned), Vec::new()));
                self.groups.len() - 1
            }
        };
        let commands = &mut self.groups[group].1;
        commands.push(command);
        self.items.push(GatheredItem::Remote {
            group,
            index: commands.len() - 1,
        });
        commands.len() >= MAX_BATCH
    }

    /// Forwards the groups and adds everything to `owed`, in order.
    pub(super) async fn flush(&mut self, router: &Router, owed: &mut Owed) {
        let base = owed.first_group + owed.groups.len() as u64;
        for (owner, commands) in self.groups.drain(..) {
            let len = commands.len();
            let store = owner.is_none();
            let coming = match owner {
                Some(owner) => router.forward(&owner, commands, Via::default()).await,
                None => router.store_submit(commands).await,
            };
            owed.groups.push_back(Group {
                store,
                coming: Some(coming),
                answers: Vec::new(),
                left: len,
            });
        }
        self.held = 0;
        for item in self.items.drain(..) {
            match item {
                GatheredItem::Ready(bytes) => owed.push_ready(bytes),
                GatheredItem::Remote { group, index } => owed.items.push_back(Item::Remote {
                    group: base + group as u64,
                    index,
                }),
            }
        }
        if !self.out.is_empty() {
            let ready = self.take_out();
            owed.push_ready(ready);
        }
    }
}
