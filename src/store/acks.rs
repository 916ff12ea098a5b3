//! JetStream's acknowledgements of the writes, on one subscription of the
//! process's own.
//!
//! A message published with a reply subject is acknowledged on it. The
//! client's own way (one new inbox, one waiting future and one timer per
//! message, the acknowledgement parsed into a general response) cost the
//! node more than the rest of a durable write. Here every message of a
//! batch gets the reply subject `<inbox>.<batch>.<index>` under one inbox
//! subscribed once; a task files each acknowledgement under its batch, and
//! a batch's outcomes come back together, with one timer per batch.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message, StatusCode, Subscriber};
use futures_util::StreamExt;
use hashbrown::HashMap;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use super::writer::Sent;

/// A batch waiting for its acknowledgements.
struct Waiting {
    outcomes: Vec<Option<Sent>>,
    /// Acknowledgements still to come.
    left: usize,
    /// An atomic batch: one acknowledgement (of its last message) for all.
    atomic: bool,
    done: Option<oneshot::Sender<Vec<Option<Sent>>>>,
}

type Table = Arc<Mutex<HashMap<u64, Waiting>>>;

/// The subscription and the batches waiting on it.
pub(super) struct Acks {
    /// `<inbox>.`
    prefix: String,
    waiting: Table,
    next: u64,
    task: AbortHandle,
}

impl Drop for Acks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One batch's acknowledgements to come.
pub(super) struct Expected {
    id: u64,
    /// Messages in the batch: as many outcomes come back, whatever happens.
    count: usize,
    prefix: String,
    waiting: Table,
    rx: oneshot::Receiver<Vec<Option<Sent>>>,
}

impl Acks {
    /// Subscribes to a new inbox of `client`'s and starts filing what
    /// arrives on it.
    pub async fn subscribe(client: &Client, replicated: bool) -> Result<Acks, String> {
        let inbox = client.new_inbox();
        let subscriber = client
            .subscribe(format!("{inbox}.>"))
            .await
            .map_err(|err| err.to_string())?;
        let waiting = Table::default();
        let task = tokio::spawn(file(subscriber, waiting.clone(), replicated)).abort_handle();
        Ok(Acks {
            prefix: format!("{inbox}."),
            waiting,
            next: 0,
            task,
        })
    }

    /// Whether the filing task still runs (it ends with the client).
    pub fn is_open(&self) -> bool {
        !self.task.is_finished()
    }

    /// Expects `count` acknowledgements (one for an atomic batch): call
    /// before publishing, so that none can come first.
    pub fn expect(&mut self, count: usize, atomic: bool) -> Expected {
        self.next += 1;
        let (tx, rx) = oneshot::channel();
        if count == 0 {
            let _ = tx.send(Vec::new());
        } else {
            self.waiting.lock().insert(
                self.next,
                Waiting {
                    outcomes: vec![None; count],
                    left: if atomic { 1 } else { count },
                    atomic,
                    done: Some(tx),
                },
            );
        }
        Expected {
            id: self.next,
            count,
            prefix: self.prefix.clone(),
            waiting: self.waiting.clone(),
            rx,
        }
    }
}

impl Expected {
    /// The reply subject of the batch's message `index`.
    pub fn reply(&self, index: usize) -> String {
        let mut id = itoa::Buffer::new();
        let mut at = itoa::Buffer::new();
        let (id, at) = (id.format(self.id), at.format(index));
        let mut out = String::with_capacity(self.prefix.len() + id.len() + 1 + at.len());
        out.push_str(&self.prefix);
        out.push_str(id);
        out.push('.');
        out.push_str(at);
        out
    }

    /// The message `index` was not published: it has its outcome already.
    pub fn not_published(&self, index: usize, why: &str) {
        let mut table = self.waiting.lock();
        if let Some(waiting) = table.get_mut(&self.id) {
            settle(waiting, index, Sent::Refused(why.to_owned()));
            if waiting.left == 0 {
                finish(&mut table, self.id);
            }
        }
    }

    /// The outcome of every message, once all are known or `timeout` has
    /// passed (then what is still missing is unknown: perhaps stored).
    pub async fn outcomes(mut self, timeout: Duration) -> Vec<Sent> {
        let known = match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok(outcomes)) => outcomes,
            // The filing task ended (the client closed), or time is up:
            // take what came, unless it all came just now.
            _ => match self.waiting.lock().remove(&self.id) {
                Some(waiting) => waiting.outcomes,
                None => self.rx.try_recv().unwrap_or_default(),
            },
        };
        let why = "no acknowledgement from JetStream in time";
        known
            .into_iter()
            .chain(std::iter::repeat(None))
            .take(self.count)
            .map(|o| o.unwrap_or_else(|| Sent::Unknown(why.into())))
            .collect()
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.waiting.lock().remove(&self.id);
    }
}

/// Files every acknowledgement under its batch until the subscription ends.
async fn file(mut subscriber: Subscriber, waiting: Table, replicated: bool) {
    while let Some(message) = subscriber.next().await {
        let Some((id, index)) = batch_and_index(&message.subject) else {
            continue;
        };
        let sent = Sent::of_ack(&message, replicated);
        let mut table = waiting.lock();
        if let Some(batch) = table.get_mut(&id) {
            if batch.atomic {
                for outcome in &mut batch.outcomes {
                    *outcome = Some(sent.clone());
                }
                batch.left = 0;
            } else {
                settle(batch, index, sent);
            }
            if batch.left == 0 {
                finish(&mut table, id);
            }
        }
    }
}

fn settle(batch: &mut Waiting, index: usize, sent: Sent) {
    if let Some(place) = batch.outcomes.get_mut(index)
        && place.is_none()
    {
        *place = Some(sent);
        batch.left = batch.left.saturating_sub(1);
    }
}

fn finish(table: &mut HashMap<u64, Waiting>, id: u64) {
    if let Some(mut batch) = table.remove(&id)
        && let Some(done) = batch.done.take()
    {
        let _ = done.send(batch.outcomes);
    }
}

/// `<inbox>.<batch>.<index>` → (batch, index).
fn batch_and_index(subject: &str) -> Option<(u64, usize)> {
    let (rest, index) = subject.rsplit_once('.')?;
    let (_, id) = rest.rsplit_once('.')?;
    Some((id.parse().ok()?, index.parse().ok()?))
}

/// A JetStream acknowledgement: the sequence, or an error.
#[derive(Deserialize)]
struct Ack<'a> {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    error: Option<AckError<'a>>,
}

#[derive(Deserialize)]
struct AckError<'a> {
    #[serde(default)]
    err_code: u64,
    #[serde(default, borrow)]
    description: Cow<'a, str>,
}

impl Sent {
    /// What an acknowledgement says of its message, as for the client's own
    /// publish: no responders means no stream (not stored); an error is
    /// read by its code ([`Sent::of_error`]).
    pub(super) fn of_ack(message: &Message, replicated: bool) -> Sent {
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            return Sent::Refused("no responders: the store's stream is missing".into());
        }
        match serde_json::from_slice::<Ack>(&message.payload) {
            Ok(Ack {
                error: Some(error_body),
                ..
            }) => Sent::of_error(
                Some(error_body.err_code),
                replicated,
                format!("{} (error {})", error_body.description, error_body.err_code),
            ),
            Ok(Ack {
                seq: Some(sequence),
                error: None,
            }) => Sent::Stored(sequence),
            Ok(_) => Sent::of_error(
                None,
                replicated,
                "an acknowledgement without a sequence".into(),
            ),
            Err(err) => Sent::of_error(
                None,
                replicated,
                format!("an acknowledgement that does not parse: {err}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(payload: &str, status: Option<StatusCode>) -> Message {
        Message {
            subject: "_INBOX.x.1.0".into(),
            reply: None,
            payload: payload.to_owned().into(),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn an_acknowledgement_says_what_became_of_its_message() {
        let stored = ack(r#"{"stream":"KV_kvmesh_foo","seq":7}"#, None);
        assert!(matches!(Sent::of_ack(&stored, false), Sent::Stored(7)));
        assert!(matches!(Sent::of_ack(&stored, true), Sent::Stored(7)));
        let fenced = ack(
            r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 5"},"stream":"KV_kvmesh_foo","seq":0}"#,
            None,
        );
        assert!(matches!(Sent::of_ack(&fenced, false), Sent::Deposed));
        assert!(matches!(Sent::of_ack(&fenced, true), Sent::Deposed));
        let busy = ack(
            r#"{"error":{"code":400,"err_code":10164,"description":"busy"}}"#,
            None,
        );
        assert!(matches!(Sent::of_ack(&busy, true), Sent::Refused(_)));
        let other = ack(
            r#"{"error":{"code":503,"err_code":10077,"description":"no quorum"}}"#,
            None,
        );
        match Sent::of_ack(&other, false) {
            Sent::Refused(why) => assert_eq!(why, "no quorum (error 10077)"),
            sent => panic!("{sent:?}"),
        }
        assert!(matches!(Sent::of_ack(&other, true), Sent::Unknown(_)));
        let nobody = ack("", Some(StatusCode::NO_RESPONDERS));
        assert!(matches!(Sent::of_ack(&nobody, false), Sent::Refused(_)));
        assert!(matches!(Sent::of_ack(&nobody, true), Sent::Refused(_)));
        for garbage in ["", "{", "[]", r#"{"stream":"x"}"#, r#"{"seq":"seven"}"#] {
            let garbage = ack(garbage, None);
            assert!(matches!(Sent::of_ack(&garbage, false), Sent::Refused(_)));
            assert!(matches!(Sent::of_ack(&garbage, true), Sent::Unknown(_)));
        }
    }

    #[test]
    fn reply_subjects_name_batch_and_index() {
        assert_eq!(batch_and_index("_INBOX.kvmesh.foo.abc.12.3"), Some((12, 3)));
        assert_eq!(batch_and_index("_INBOX.abc.12"), None);
        assert_eq!(batch_and_index("_INBOX.abc.x.3"), None);
        assert_eq!(batch_and_index("3"), None);
    }
}
