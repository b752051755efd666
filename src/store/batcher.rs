//! A queue in front of a few writers, each of which writes whatever is waiting when it becomes
//! free as one group (one transaction, one commit). Used for step completions
//! ([`super::group_commit`]) and checkouts ([`super::checkout_batch`]): on a commit-bound
//! database the cost is the commit (an fsync on SQLite's single writer, a WAL flush and the hot
//! rows' lock hold on PostgreSQL), so many callers sharing one carry more than each paying its own.
//!
//! Nobody waits for a group to fill: an item that arrives when a writer is idle is written at
//! once, alone. Every caller is answered only after its group was written (committed, or failed).
//! With a largest group of 1 there is no queue: each caller writes its own item in its own task.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

/// Writes one group; what the items are and how a group is written is the writer's.
#[async_trait::async_trait]
pub(super) trait GroupWriter: Send + Sync + 'static {
    type Item: Send + 'static;
    type Answer: Send + 'static;
    /// Writes `group` and answers each item, in the same order, after the outcome is final.
    async fn write(&self, group: Vec<Self::Item>) -> Vec<Self::Answer>;
}

type Waiting<W> = (<W as GroupWriter>::Item, oneshot::Sender<<W as GroupWriter>::Answer>);

/// The queue and its writers.
pub(super) struct Batcher<W: GroupWriter> {
    requests: mpsc::Sender<Waiting<W>>,
    writer: Arc<W>,
    grouped: bool,
}

impl<W: GroupWriter> Batcher<W> {
    /// Starts `writers` tasks writing groups of up to `max_batch` items with `writer`
    /// (none when `max_batch` is 1).
    pub(super) fn start(writer: W, max_batch: usize, writers: usize) -> Self {
        let (max_batch, writers) = (max_batch.max(1), writers.max(1));
        let writer = Arc::new(writer);
        let (requests, receiver) = mpsc::channel(max_batch * writers * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let grouped = max_batch > 1;
        if grouped {
            for _ in 0..writers {
                tokio::spawn(run(writer.clone(), receiver.clone(), max_batch));
            }
        }
        Self {
            requests,
            writer,
            grouped,
        }
    }

    /// Writes a group the caller brings whole, now (not through the queue).
    pub(super) async fn write_now(&self, group: Vec<W::Item>) -> Vec<W::Answer> {
        self.writer.write(group).await
    }

    /// Writes `item` in the next group; `None` when the writers have stopped.
    pub(super) async fn submit(&self, item: W::Item) -> Option<W::Answer> {
        if !self.grouped {
            return self.writer.write(vec![item]).await.pop();
        }
        let (reply, answer) = oneshot::channel();
        self.requests.send((item, reply)).await.ok()?;
        answer.await.ok()
    }
}

async fn run<W: GroupWriter>(writer: Arc<W>, receiver: Arc<Mutex<mpsc::Receiver<Waiting<W>>>>, max_batch: usize) {
    loop {
        let (items, replies): (Vec<_>, Vec<_>) = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut group = vec![first];
            while group.len() < max_batch {
                match receiver.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
            group.into_iter().unzip()
        };
        let answers = writer.write(items).await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            // A caller that went away (its request timed out) simply is not told.
            let _ = reply.send(answer);
        }
    }
}
