//! Sending a reply: a single body, or a batch's answers in messages that fit
//! the server's `max_payload`. A reply too large for one message comes as
//! several, each `{"ok":true,"replies":[..]}` with the next answers in order.

use std::time::Instant;

use async_nats::{Client, Subject};
use tracing::debug;

use super::service::Registration;
use crate::error::KvError;
use crate::wire;

/// Published bytes of one batch reply after which the client's buffer is
/// flushed before more is published: the bound on what a batch holds.
const FLUSH_EVERY: usize = 4 * 1024 * 1024;

/// The reply to one request under way: a single body, or a batch's answers
/// gathered into messages of at most `max_payload` bytes.
pub(super) struct Reply {
    client: Client,
    /// The requester's reply subject.
    to: Subject,
    /// Counts the request once its reply is out.
    registration: Registration,
    issued: Instant,
    max: usize,
    /// The message being filled: `{"ok":true,"replies":[` and answers.
    body: Vec<u8>,
    members: usize,
    /// Bytes published since the client's buffer was last flushed.
    unflushed: usize,
}

const BATCH_OPEN: &[u8] = br#"{"ok":true,"replies":["#;
const BATCH_CLOSE: &[u8] = b"]}";

impl Reply {
    pub(super) fn new(client: &Client, to: Subject, registration: Registration) -> Self {
        Self {
            max: client.max_payload(),
            client: client.clone(),
            to,
            registration,
            issued: Instant::now(),
            body: Vec::new(),
            members: 0,
            unflushed: 0,
        }
    }

    /// Sends the reply to a single request, or an error if it would not fit
    /// one NATS message.
    pub(super) async fn single(self, mut body: Vec<u8>) {
        if body.len() > self.max {
            body = too_large();
        }
        self.send_last(body).await;
    }

    /// Sends the last (or only) message of a reply, and counts the request.
    async fn send_last(self, body: Vec<u8>) {
        if let Err(err) = self.client.publish(self.to, body.into()).await {
            debug!(error = %err, "could not send a reply");
        }
        self.registration.count(self.issued.elapsed());
    }

    /// Adds a batch member's answer, sending the message so far first if the
    /// answer would not fit in it.
    pub(super) async fn push(&mut self, mut part: Vec<u8>) {
        if BATCH_OPEN.len() + part.len() + BATCH_CLOSE.len() > self.max {
            part = too_large();
        }
        if self.members > 0 && self.body.len() + 1 + part.len() + BATCH_CLOSE.len() > self.max {
            let body = self.close();
            self.unflushed += body.len();
            if let Err(err) = self.client.publish(self.to.clone(), body.into()).await {
                debug!(error = %err, "could not send a reply");
            }
            if self.unflushed > FLUSH_EVERY {
                self.unflushed = 0;
                if let Err(err) = self.client.flush().await {
                    debug!(error = %err, "could not flush replies");
                }
            }
        }
        if self.members == 0 {
            self.body.extend_from_slice(BATCH_OPEN);
        } else {
            self.body.push(b',');
        }
        self.body.extend_from_slice(&part);
        self.members += 1;
    }

    /// The message so far, closed; the next one starts empty.
    fn close(&mut self) -> Vec<u8> {
        if self.members == 0 {
            self.body.extend_from_slice(BATCH_OPEN);
        }
        self.body.extend_from_slice(BATCH_CLOSE);
        self.members = 0;
        std::mem::take(&mut self.body)
    }

    /// Sends the last message of a batch reply.
    pub(super) async fn finish(mut self) {
        let body = self.close();
        self.send_last(body).await;
    }
}

fn too_large() -> Vec<u8> {
    wire::encode_reply(&Err(KvError::internal("reply too large for NATS")))
}
