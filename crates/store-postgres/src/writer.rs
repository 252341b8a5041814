//! The group commit: every append of every caller goes through one bounded channel to
//! the writer task, which takes everything queued (up to [`MAX_BATCH_MESSAGES`] or
//! [`MAX_BATCH_BYTES`]) and writes it as ONE statement: one multi-row upsert of the
//! topics' rows (their offsets and times assigned by PostgreSQL) and one multi-row
//! insert of the messages from `unnest` arrays, committed as one transaction. Each
//! caller's future resolves after that commit, with its own consecutive offsets.
//!
//! Order: within a batch, a topic's messages are numbered in the order their appends
//! were called. Up to [`WRITERS`] batches are committed at once (while one waits for its
//! commit's WAL flush, the next can run), but never two holding the same topic: a batch
//! with a topic still being committed waits for that commit, so a topic's offsets
//! follow the order of its appends across batches too.
//!
//! Filling: callers that wait for each append come back together right after their
//! commit. Taking only the first of them would split the load into two halves that
//! take turns (half the rows per commit); so when fewer appends are queued than the
//! last commit carried, the writer waits up to [`FILL_WAIT`] for that many.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use herald_core::{Appended, Message, NewMessage, StoreError, TopicName};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::topics::{kind_code, unsigned};
use crate::{clamp, Fail, Shared};

/// Most messages one commit takes (more wait for the next; an append larger than this
/// goes alone).
pub(crate) const MAX_BATCH_MESSAGES: usize = 1024;
/// Most payload bytes one commit takes.
pub(crate) const MAX_BATCH_BYTES: usize = 4 << 20;
/// Longest a commit waits for appends to fill it up to the size of the one before.
const FILL_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
/// Commits in flight at once, each on its own pooled connection.
pub(crate) const WRITERS: usize = 2;

/// One caller's batch and where its result goes.
pub(crate) struct AppendReq {
    pub(crate) topic: TopicName,
    pub(crate) batch: Vec<NewMessage>,
    pub(crate) done: oneshot::Sender<Result<Appended, StoreError>>,
}

/// What the writer is asked.
pub(crate) enum WriteOp {
    Append(AppendReq),
    /// Answered once every append queued before it is committed (or failed).
    Flush(oneshot::Sender<()>),
}

/// The appends of one commit.
#[derive(Default)]
struct Batch {
    appends: Vec<AppendReq>,
    topics: HashSet<TopicName>,
    messages: usize,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, append: AppendReq) {
        self.messages += append.batch.len();
        self.bytes += append.batch.iter().map(|m| m.payload.len()).sum::<usize>();
        self.topics.insert(append.topic.clone());
        self.appends.push(append);
    }

    fn full(&self) -> bool {
        self.messages >= MAX_BATCH_MESSAGES || self.bytes >= MAX_BATCH_BYTES
    }

    /// Whether `append` may join without passing the caps (a first one always may).
    fn fits(&self, append: &AppendReq) -> bool {
        let bytes = append.batch.iter().map(|m| m.payload.len()).sum::<usize>();
        self.appends.is_empty()
            || (self.messages + append.batch.len() <= MAX_BATCH_MESSAGES && self.bytes + bytes <= MAX_BATCH_BYTES)
    }
}

/// A commit on its way, and the topics it holds.
struct InFlight {
    commit: JoinHandle<()>,
    topics: HashSet<TopicName>,
}

/// Takes batches off the channel and commits them, until every sender is gone and
/// everything taken is committed.
pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<WriteOp>) {
    let mut in_flight: Vec<InFlight> = Vec::with_capacity(WRITERS);
    // An operation taken off the channel that must wait for the next round.
    let mut held: Option<WriteOp> = None;
    // How many appends the last commit carried.
    let mut fill_target = 0;
    loop {
        let op = match held.take() {
            Some(op) => op,
            None => match rx.recv().await {
                Some(op) => op,
                None => break,
            },
        };
        let first = match op {
            WriteOp::Flush(done) => {
                for f in in_flight.drain(..) {
                    let _ = f.commit.await;
                }
                let _ = done.send(());
                continue;
            }
            WriteOp::Append(append) => append,
        };
        let mut batch = Batch::default();
        batch.push(first);
        // Wait for a free writer, and for any commit holding this batch's topic.
        loop {
            in_flight.retain(|f| !f.commit.is_finished());
            let blocking = in_flight
                .iter()
                .position(|f| !f.topics.is_disjoint(&batch.topics))
                .or_else(|| (in_flight.len() >= WRITERS).then_some(0));
            match blocking {
                Some(i) => {
                    let _ = in_flight.swap_remove(i).commit.await;
                }
                None => break,
            }
        }
        // Everything else queued by now, in order, up to the caps; a flush, an append past
        // the caps or one to a topic still being committed ends the batch (and starts
        // the next round).
        while !batch.full() {
            match rx.try_recv() {
                Ok(WriteOp::Append(a)) if batch.fits(&a) && !in_flight.iter().any(|f| f.topics.contains(&a.topic)) => {
                    batch.push(a)
                }
                Ok(op) => {
                    held = Some(op);
                    break;
                }
                Err(_) => break,
            }
        }
        // Fewer appends queued than the last commit carried: its callers are likely about
        // to append again (a caller that waits for each append), so wait a moment for
        // them rather than commit a fraction of the load and leave the rest for the next
        // commit. The target follows what actually came, so it shrinks with the load.
        if batch.appends.len() < fill_target && held.is_none() {
            let deadline = tokio::time::Instant::now() + FILL_WAIT;
            while batch.appends.len() < fill_target && !batch.full() {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(WriteOp::Append(a)))
                        if batch.fits(&a) && !in_flight.iter().any(|f| f.topics.contains(&a.topic)) =>
                    {
                        batch.push(a)
                    }
                    Ok(Some(op)) => {
                        held = Some(op);
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        fill_target = batch.appends.len();
        let topics = batch.topics.clone();
        in_flight.push(InFlight { commit: tokio::spawn(commit(shared.clone(), batch)), topics });
    }
    for f in in_flight {
        let _ = f.commit.await;
    }
}

/// Writes one batch in one statement and answers each caller.
async fn commit(shared: Arc<Shared>, batch: Batch) {
    let started = Instant::now();
    // Topics in name order (their rows are locked in that order: no deadlock between
    // nodes sharing the schema), numbered from 1 as `WITH ORDINALITY` numbers them.
    let mut per_topic: BTreeMap<TopicName, (i64, i64)> = BTreeMap::new();
    for a in &batch.appends {
        per_topic.entry(a.topic.clone()).or_default().1 += a.batch.len() as i64;
    }
    for (i, entry) in per_topic.values_mut().enumerate() {
        entry.0 = i as i64 + 1;
    }
    let names: Vec<&str> = per_topic.keys().map(TopicName::as_str).collect();
    let counts: Vec<i64> = per_topic.values().map(|e| e.1).collect();
    let mut ordinal = Vec::with_capacity(batch.messages);
    let mut place = Vec::with_capacity(batch.messages);
    let mut kinds = Vec::with_capacity(batch.messages);
    let mut ttls = Vec::with_capacity(batch.messages);
    let mut payloads: Vec<&[u8]> = Vec::with_capacity(batch.messages);
    // Each append's first place among its topic's messages in this batch.
    let mut starts = Vec::with_capacity(batch.appends.len());
    let mut taken: BTreeMap<&str, i64> = BTreeMap::new();
    for a in &batch.appends {
        let topic = a.topic.as_str();
        let i = per_topic.get(&a.topic).map_or(0, |e| e.0);
        let next = taken.entry(topic).or_default();
        starts.push(*next);
        for m in &a.batch {
            ordinal.push(i);
            place.push(*next);
            kinds.push(kind_code(m.kind));
            ttls.push(m.ttl_ms.map(clamp));
            payloads.push(m.payload.as_ref());
            *next += 1;
        }
    }
    let now = clamp(shared.clock.now_ms());
    let first_epoch: &str = &shared.first_epoch;
    let result = shared
        .db("append", async {
            let client = shared.pool.get().await?;
            let stmt = client.prepare_cached(&shared.sql.append).await?;
            let rows = client
                .query(&stmt, &[&names, &counts, &first_epoch, &now, &ordinal, &place, &kinds, &ttls, &payloads])
                .await?;
            let mut heads = BTreeMap::new();
            for row in rows {
                let name: String = row.try_get(0)?;
                let epoch: String = row.try_get(1)?;
                let next = unsigned(row.try_get(2)?, "next offset")?;
                let ts = unsigned(row.try_get(3)?, "ts")?;
                heads.insert(name, (Arc::<str>::from(epoch), next, ts));
            }
            Ok::<_, Fail>(heads)
        })
        .await;
    drop((ordinal, place, kinds, ttls, payloads, names, counts));
    let heads = match result {
        Ok(heads) => heads,
        Err(e) => {
            for a in batch.appends {
                let _ = a.done.send(Err(e.clone()));
            }
            return;
        }
    };
    let commits = &shared.commits;
    commits.seconds.observe(started.elapsed().as_secs_f64());
    commits.writes.observe(batch.appends.len() as f64);
    commits.rows.observe(batch.messages as f64);
    for (a, start) in batch.appends.into_iter().zip(starts) {
        let n = per_topic.get(&a.topic).map_or(0, |e| e.1) as u64;
        let answer = match heads.get(a.topic.as_str()) {
            Some((epoch, next, ts)) => {
                let first = next - n + start as u64;
                let messages = a
                    .batch
                    .into_iter()
                    .enumerate()
                    .map(|(j, new)| {
                        // The stored expiry saturates at i64::MAX; say the same.
                        let ttl_ms = new.ttl_ms.map(|t| t.min((i64::MAX as u64).saturating_sub(*ts)));
                        Arc::new(Message::new(a.topic.clone(), first + j as u64, *ts, NewMessage { ttl_ms, ..new }))
                    })
                    .collect();
                Ok(Appended { epoch: epoch.clone(), messages })
            }
            None => Err(StoreError::Unavailable(format!("postgres append: no row came back for {}", a.topic))),
        };
        let _ = a.done.send(answer);
    }
}
