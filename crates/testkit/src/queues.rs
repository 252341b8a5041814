//! The queue conformance suite: the semantics every [`QueueService`] keeps (docs/protocol.md,
//! "Queues"), checked the same way against a single node's engine and against queues
//! shared by the nodes of a cluster.
//!
//! A [`QueueBackend`] opens nodes; every node opened from one backend shares its queues
//! (a single node's engine is its only node), and all of them read one [`ManualClock`],
//! so leases, delays and TTLs end exactly when a case moves the clock. Cases alternate
//! their calls between two nodes. [`queue_conformance!`] turns the list into one test
//! per case.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald_core::{
    Delivery, Kind, ManualClock, NewMessage, QueueConfig, QueueError, QueueName, QueueService, QueueStats,
};

use crate::conformance::Result;

/// A node's queues, opened.
pub type Node = Arc<dyn QueueService>;

/// What [`QueueBackend::open`] returns.
pub type Opening<'a> = Pin<Box<dyn Future<Output = Result<Node>> + Send + 'a>>;

/// Queue services under test.
pub trait QueueBackend: Send + Sync {
    /// Opens one node's queues with `config` on `clock`. Nodes opened from one backend
    /// share their queues.
    fn open<'a>(&'a self, config: QueueConfig, max_message_bytes: usize, clock: Arc<ManualClock>) -> Opening<'a>;
}

/// The time every case starts at (ms since the Unix epoch).
const START_MS: u64 = 1_700_000_000_000;

async fn nodes(
    backend: &dyn QueueBackend,
    config: QueueConfig,
    max_bytes: usize,
) -> Result<(Node, Node, Arc<ManualClock>)> {
    let clock = Arc::new(ManualClock::new(START_MS));
    let a = backend.open(config, max_bytes, clock.clone()).await?;
    let b = backend.open(config, max_bytes, clock.clone()).await?;
    Ok((a, b, clock))
}

fn queue(name: &str) -> Result<QueueName> {
    Ok(QueueName::parse(name)?)
}

fn text(s: &str) -> NewMessage {
    NewMessage::new(Kind::Text, Bytes::copy_from_slice(s.as_bytes()))
}

fn payload(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.payload).into_owned()
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result {
    if ok {
        Ok(())
    } else {
        Err(what().into())
    }
}

fn same<T: PartialEq + std::fmt::Debug>(got: T, want: T, step: &str) -> Result {
    ensure(got == want, || format!("{step}: got {got:?}, want {want:?}"))
}

async fn fetch(node: &Node, q: &QueueName, max: usize, visibility_ms: u64) -> Result<Vec<Delivery>> {
    Ok(node.fetch_wait(q, max, visibility_ms, Duration::ZERO).await?)
}

fn stats(ready: u64, in_flight: u64, delayed: u64, dead: u64) -> QueueStats {
    QueueStats { ready, in_flight, delayed, dead }
}

/// Enqueue, lease, ack, requeue with a delay, extend, redelivery at a lease end,
/// attempts counted across nodes, dead letters after `max_attempts`, the dead-letter
/// queue served like any queue; each step on the other node than the one before.
pub async fn leases_requeues_and_dead_letters(backend: &dyn QueueBackend) -> Result {
    let config = QueueConfig { max_attempts: 2, ..QueueConfig::default() };
    let (a, b, clock) = nodes(backend, config, 1 << 20).await?;
    let (q, dlq) = (queue("conf.jobs")?, queue("conf.jobs.dlq")?);
    let mut ids = Vec::new();
    for job in ["a", "b", "c"] {
        ids.push(a.enqueue(&q, text(job), 0).await?);
    }
    ensure(ids.windows(2).all(|w| w[0] < w[1]), || format!("ids grow: {ids:?}"))?;
    same(b.stats(&q).await?, stats(3, 0, 0, 0), "three ready")?;
    let first = fetch(&b, &q, 1, 1000).await?;
    same(first.iter().map(payload).collect::<Vec<_>>(), vec!["a".to_owned()], "fetch takes the oldest")?;
    same((first[0].message_id, first[0].attempt, first[0].ts), (ids[0], 1, START_MS), "id, attempt, time")?;
    a.ack(&q, &first[0].id).await?;
    same(
        b.ack(&q, &first[0].id).await.map_err(|e| e.to_string()),
        Err(QueueError::NotFound(first[0].id.clone()).to_string()),
        "a second ack of one delivery",
    )?;
    let bj = fetch(&a, &q, 1, 1000).await?;
    same((payload(&bj[0]), bj[0].attempt), ("b".to_owned(), 1), "second job, first attempt")?;
    b.requeue(&q, &bj[0].id, 500).await?;
    same(a.stats(&q).await?, stats(1, 0, 1, 0), "requeued with a delay")?;
    let c = fetch(&b, &q, 1, 1000).await?;
    same(payload(&c[0]), "c".to_owned(), "third job")?;
    a.extend(&q, &c[0].id, 3000).await?;
    clock.advance(499);
    same(fetch(&a, &q, 5, 1000).await?.len(), 0, "nothing ready before b's delay ends")?;
    clock.advance(501);
    same(b.stats(&q).await?, stats(1, 1, 0, 0), "b ready after its delay; c's extended lease holds")?;
    let b2 = fetch(&a, &q, 1, 1000).await?;
    same((payload(&b2[0]), b2[0].attempt), ("b".to_owned(), 2), "b again, second attempt")?;
    clock.advance(2000); // c's extended lease and b's second lease end
    same(a.stats(&q).await?, stats(1, 0, 0, 1), "c ready again, b dead-lettered after max_attempts")?;
    let c2 = fetch(&b, &q, 1, 1000).await?;
    same((payload(&c2[0]), c2[0].attempt), ("c".to_owned(), 2), "c redelivered with its attempts")?;
    same(
        a.extend(&q, &c[0].id, 1000).await.map_err(|e| e.to_string()),
        Err(QueueError::NotFound(c[0].id.clone()).to_string()),
        "a delivery whose lease ended is not current",
    )?;
    let dead = fetch(&a, &dlq, 10, 1000).await?;
    same(dead.iter().map(payload).collect::<Vec<_>>(), vec!["b".to_owned()], "the dead letter")?;
    same((dead[0].attempt, dead[0].ts), (1, START_MS + 2000), "a dead letter starts over, dated when b's lease ended")?;
    b.requeue(&dlq, &dead[0].id, 0).await?;
    same(a.stats(&dlq).await?, stats(1, 0, 0, 0), "a requeued dead letter stays in the dead-letter queue")?;
    b.requeue(&q, &c2[0].id, 0).await?;
    same(b.stats(&q).await?, stats(0, 0, 0, 2), "c dead-lettered by its requeue")?;
    let dead = fetch(&b, &dlq, 10, 1000).await?;
    same(dead.iter().map(payload).collect::<Vec<_>>(), vec!["b".to_owned(), "c".to_owned()], "dead letters in order")?;
    for d in &dead {
        a.ack(&dlq, &d.id).await?;
    }
    same(b.stats(&q).await?, stats(0, 0, 0, 0), "all done")?;
    let id = a.enqueue(&q, text("d"), 0).await?;
    ensure(id > ids[2], || format!("a new job reused id {id}"))?;
    Ok(())
}

/// TTLs (ready or leased), delays, a dead letter at a lease end on an idle queue, and
/// the refusals: full queue, too large, enqueue into a dead-letter queue, unknown and
/// malformed delivery ids. A queue never used counts zero.
pub async fn ttls_delays_and_refusals(backend: &dyn QueueBackend) -> Result {
    let config = QueueConfig { max_attempts: 1, max_queue_messages: 3, ..QueueConfig::default() };
    let (a, b, clock) = nodes(backend, config, 16).await?;
    let q = queue("conf.limits")?;
    same(a.stats(&queue("conf.never")?).await?, stats(0, 0, 0, 0), "a queue never used")?;
    let brief = NewMessage { ttl_ms: Some(100), ..text("brief") };
    a.enqueue(&q, brief.clone(), 0).await?;
    a.enqueue(&q, brief, 0).await?;
    let leased = fetch(&b, &q, 1, 1000).await?;
    a.enqueue(&q, text("later"), 200).await?;
    let full = b.enqueue(&q, text("x"), 0).await;
    ensure(matches!(full, Err(QueueError::Full { max: 3, .. })), || format!("a fourth message: {full:?}"))?;
    same(a.stats(&q).await?, stats(1, 1, 1, 0), "one ready, one leased, one delayed")?;
    clock.advance(100);
    same(b.stats(&q).await?, stats(0, 0, 1, 0), "both TTLs passed, the leased one's too")?;
    ensure(matches!(a.ack(&q, &leased[0].id).await, Err(QueueError::NotFound(_))), || "ack after the TTL".into())?;
    clock.advance(100);
    let later = fetch(&a, &q, 5, 500).await?;
    same(later.iter().map(payload).collect::<Vec<_>>(), vec!["later".to_owned()], "ready when its delay ended")?;
    clock.advance(500); // its only allowed lease ends, on an idle queue
    let dead = fetch(&b, &queue("conf.limits.dlq")?, 5, 500).await?;
    same(dead.iter().map(payload).collect::<Vec<_>>(), vec!["later".to_owned()], "dead-lettered at its lease end")?;
    let big = a.enqueue(&q, text("seventeen bytes!!"), 0).await;
    ensure(matches!(big, Err(QueueError::TooLarge { size: 17, max: 16 })), || format!("too large: {big:?}"))?;
    let into_dlq = a.enqueue(&queue("conf.limits.dlq")?, text("x"), 0).await;
    ensure(matches!(into_dlq, Err(QueueError::DeadLetterQueue(_))), || format!("into a DLQ: {into_dlq:?}"))?;
    for bad in ["1-1-abc", "zz-1-1", "", "-"] {
        let got = b.requeue(&q, bad, 0).await;
        ensure(matches!(got, Err(QueueError::NotFound(_))), || format!("requeue {bad:?}: {got:?}"))?;
    }
    Ok(())
}

/// Four workers, two per node, fetching in batches: every job delivered exactly once.
pub async fn workers_on_two_nodes_take_each_job_once(backend: &dyn QueueBackend) -> Result {
    const JOBS: usize = 300;
    let (a, b, _clock) = nodes(backend, QueueConfig::default(), 1 << 20).await?;
    let q = queue("conf.work")?;
    for i in 0..JOBS {
        let node = if i % 2 == 0 { &a } else { &b };
        node.enqueue(&q, text(&format!("job-{i}")), 0).await?;
    }
    let seen = Arc::new(Mutex::new(BTreeMap::<String, u32>::new()));
    let workers: Vec<_> = [&a, &b, &a, &b]
        .into_iter()
        .map(|node| {
            let (node, q, seen) = (node.clone(), q.clone(), seen.clone());
            tokio::spawn(async move {
                loop {
                    let got = node.fetch_wait(&q, 7, 60_000, Duration::ZERO).await?;
                    if got.is_empty() {
                        return Result::Ok(());
                    }
                    for d in got {
                        *seen.lock().map_err(|_| "poisoned")?.entry(payload(&d)).or_default() += 1;
                        node.ack(&q, &d.id).await?;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let seen = seen.lock().map_err(|_| "poisoned")?.clone();
    same(seen.len(), JOBS, "every job delivered")?;
    ensure(seen.values().all(|&n| n == 1), || "a job was delivered twice".into())?;
    same(a.stats(&q).await?, stats(0, 0, 0, 0), "all acked")?;
    let acked = |n: &Node| n.counters().acked.load(Ordering::Relaxed);
    // Each node counts its own acks (one engine serving as both nodes counts them once).
    let counted = if std::ptr::eq(a.counters(), b.counters()) { acked(&a) } else { acked(&a) + acked(&b) };
    same(counted, JOBS as u64, "acks counted")?;
    Ok(())
}

/// A long poll on one node returns as soon as a message is enqueued on the other.
pub async fn a_long_poll_wakes_on_enqueue_from_another_node(backend: &dyn QueueBackend) -> Result {
    let (a, b, _clock) = nodes(backend, QueueConfig::default(), 1 << 20).await?;
    let q = queue("conf.poll")?;
    for round in 0..3 {
        let poll = {
            let (b, q) = (b.clone(), q.clone());
            tokio::spawn(async move { b.fetch_wait(&q, 1, 1000, Duration::from_secs(30)).await })
        };
        // Wait until the poll is parked (its counter is up), then enqueue elsewhere.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while b.counters().waiting.load(Ordering::Acquire) == 0 {
            ensure(tokio::time::Instant::now() < deadline, || "the long poll never waited".into())?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        a.enqueue(&q, text(&format!("wake-{round}")), 0).await?;
        let got = tokio::time::timeout(Duration::from_secs(10), poll).await.map_err(|_| "not woken")???;
        same(got.iter().map(payload).collect::<Vec<_>>(), vec![format!("wake-{round}")], "woken with the job")?;
        b.ack(&q, &got[0].id).await?;
    }
    Ok(())
}

/// Admin actions: purge removes ready and delayed messages and leaves leased ones with
/// their worker; redrive moves the dead-letter queue's ready messages back, oldest
/// first, as new messages on their first attempt, no more than `max` and than the
/// queue has room for; a dead-letter queue can be purged but not redriven.
pub async fn purge_and_redrive(backend: &dyn QueueBackend) -> Result {
    let config = QueueConfig { max_attempts: 1, max_queue_messages: 4, ..QueueConfig::default() };
    let (a, b, clock) = nodes(backend, config, 1 << 20).await?;
    let (q, dlq) = (queue("conf.admin")?, queue("conf.admin.dlq")?);
    // Three jobs fail once each: dead letters d0, d1, d2 (in that order).
    for i in 0..3 {
        a.enqueue(&q, text(&format!("d{i}")), 0).await?;
        clock.advance(1);
    }
    for d in fetch(&b, &q, 3, 1000).await? {
        a.requeue(&q, &d.id, 0).await?;
    }
    same(b.stats(&q).await?, stats(0, 0, 0, 3), "three dead letters")?;
    // Three jobs: the first leased, one delayed, one ready.
    b.enqueue(&q, text("first"), 0).await?;
    b.enqueue(&q, text("later"), 60_000).await?;
    a.enqueue(&q, text("second"), 0).await?;
    clock.advance(1);
    let leased = fetch(&a, &q, 1, 1000).await?;
    same(leased.iter().map(payload).collect::<Vec<_>>(), vec!["first".to_owned()], "the oldest ready job")?;
    same(a.purge(&q).await?, 2, "purged: the delayed and the ready job")?;
    same(b.stats(&q).await?, stats(0, 1, 0, 3), "the leased job stays")?;
    a.ack(&q, &leased[0].id).await?;
    same(fetch(&b, &q, 1, 1000).await?.len(), 0, "nothing ready after the purge")?;

    // Redrive: at most `max`, and no more than the queue has room for (4 messages).
    same(b.redrive(&q, 1).await?, 1, "one moved: max")?;
    clock.advance(1);
    a.enqueue(&q, text("f0"), 0).await?;
    a.enqueue(&q, text("f1"), 0).await?;
    clock.advance(1);
    same(a.redrive(&q, 10).await?, 1, "one more: the room left")?;
    same(b.stats(&q).await?, stats(4, 0, 0, 1), "full, one dead letter left")?;
    let got = fetch(&a, &q, 10, 1000).await?;
    let order: Vec<_> = got.iter().map(|d| (payload(d), d.attempt)).collect();
    let want = [("d0", 1), ("f0", 1), ("f1", 1), ("d1", 1)].map(|(p, n)| (p.to_owned(), n));
    same(order, want.to_vec(), "oldest first, dead letters on their first attempt again")?;
    for d in &got {
        b.ack(&q, &d.id).await?;
    }
    same(a.redrive(&q, 10).await?, 1, "the last one")?;
    same(b.redrive(&q, 10).await?, 0, "nothing left to redrive")?;
    ensure(matches!(b.redrive(&dlq, 1).await, Err(QueueError::Unsupported(_))), || {
        "a dead-letter queue redriven".into()
    })?;
    // A dead-letter queue can be purged: d2 fails again (its one attempt spent).
    let last = fetch(&b, &q, 1, 1000).await?;
    same(last.iter().map(payload).collect::<Vec<_>>(), vec!["d2".to_owned()], "d2 back")?;
    a.requeue(&q, &last[0].id, 0).await?;
    same(a.stats(&q).await?, stats(0, 0, 0, 1), "a dead letter again")?;
    same(b.purge(&dlq).await?, 1, "the dead-letter queue purged")?;
    same(a.stats(&q).await?, stats(0, 0, 0, 0), "nothing left")?;
    Ok(())
}

/// List: every queue enqueued into, in name order, with its counts, filtered by prefix,
/// `after` and the caller's `visible`, paged by `limit`; never a dead-letter queue (its
/// queue's `dead` counts it), never a name only fetched from; an emptied queue stays.
pub async fn list_names_queues_in_order(backend: &dyn QueueBackend) -> Result {
    let config = QueueConfig { max_attempts: 1, ..QueueConfig::default() };
    let (a, b, _clock) = nodes(backend, config, 1 << 20).await?;
    let (qa, qb, qc) = (queue("conf.list.a")?, queue("conf.list.b")?, queue("conf.list.c")?);
    b.enqueue(&qc, text("c1"), 0).await?;
    a.enqueue(&qa, text("a1"), 0).await?;
    a.enqueue(&qa, text("a2"), 60_000).await?;
    b.enqueue(&qb, text("b1"), 0).await?;
    a.enqueue(&queue("conf.listx")?, text("x"), 0).await?;
    a.enqueue(&queue("conf.lis")?, text("y"), 0).await?;
    same(fetch(&a, &queue("conf.list.never")?, 1, 1000).await?.len(), 0, "a queue only fetched from")?;
    // b1 fails its one attempt: a dead letter in conf.list.b.dlq.
    for d in fetch(&b, &qb, 1, 1000).await? {
        a.requeue(&qb, &d.id, 0).await?;
    }
    let _leased = fetch(&a, &qc, 1, 1000).await?;
    let all = |_: &QueueName| true;
    let names = |listed: &[herald_core::ListedQueue]| listed.iter().map(|l| l.queue.to_string()).collect::<Vec<_>>();

    let listed = b.list("conf.list.", None, 100, &all).await?;
    let want: Vec<herald_core::ListedQueue> =
        [(&qa, stats(1, 0, 1, 0)), (&qb, stats(0, 0, 0, 1)), (&qc, stats(0, 1, 0, 0))]
            .into_iter()
            .map(|(q, stats)| herald_core::ListedQueue { queue: q.clone(), stats })
            .collect();
    same(listed, want, "three queues with their counts, by name")?;
    same(
        names(&a.list("conf.lis", None, 100, &all).await?),
        vec!["conf.lis".into(), "conf.list.a".into(), "conf.list.b".into(), "conf.list.c".into(), "conf.listx".into()],
        "a wider prefix",
    )?;

    // Paging: after the last name of a page, until an empty page.
    let first = a.list("conf.list.", None, 2, &all).await?;
    same(names(&first), vec!["conf.list.a".to_owned(), "conf.list.b".to_owned()], "page 1")?;
    let second = b.list("conf.list.", Some("conf.list.b"), 2, &all).await?;
    same(names(&second), vec!["conf.list.c".to_owned()], "page 2")?;
    same(a.list("conf.list.", Some("conf.list.c"), 2, &all).await?.len(), 0, "past the end")?;
    same(
        names(&b.list("conf.list.", Some("conf"), 1, &all).await?),
        vec!["conf.list.a".to_owned()],
        "after before the prefix",
    )?;

    // Only visible names count, also toward the limit.
    let not_a = |q: &QueueName| !q.as_str().ends_with(".a");
    same(names(&a.list("conf.list.", None, 1, &not_a).await?), vec!["conf.list.b".to_owned()], "a hidden")?;
    let none = |_: &QueueName| false;
    same(b.list("", None, 100, &none).await?.len(), 0, "nothing visible")?;

    // Emptied, a queue is still listed.
    same(a.purge(&qa).await?, 2, "conf.list.a purged")?;
    let listed = b.list("conf.list.a", None, 100, &all).await?;
    same(listed.first().map(|l| l.stats), Some(stats(0, 0, 0, 0)), "an empty queue stays listed")?;
    Ok(())
}

/// A batch enqueue: ids in the batch's order (1000 entries, so a store that hands
/// entries on concurrently must not let them overtake one another), delays and TTLs
/// kept, fetched oldest first; a batch past the queue's room stores what fits and
/// refuses the rest, entry by entry; a batch ack acks each current delivery and names
/// the stale ones.
pub async fn batches_keep_order_and_report_each_entry(backend: &dyn QueueBackend) -> Result {
    let config = QueueConfig { max_queue_messages: 1000, ..QueueConfig::default() };
    let (a, b, clock) = nodes(backend, config, 1024).await?;
    let big = queue("conf.batch.big")?;
    let entries = (0..1000).map(|i| (text(&format!("job {i}")), 0)).collect();
    let ids = a.enqueue_batch(&big, entries).await.into_iter().collect::<std::result::Result<Vec<u64>, _>>()?;
    let inversions = ids.windows(2).filter(|w| w[0] >= w[1]).count();
    ensure(ids.len() == 1000 && inversions == 0, || {
        format!("1000 ids in the entries' order: {inversions} inversions")
    })?;
    let head = fetch(&b, &big, 3, 1000).await?;
    same(head.iter().map(payload).collect::<Vec<_>>(), ["job 0", "job 1", "job 2"].map(String::from).to_vec(), "head")?;

    let mut deliveries: Vec<String> = head.iter().map(|d| d.id.clone()).collect();
    deliveries.insert(1, "1-1-stale".to_owned());
    let acked = a.ack_batch(&big, &deliveries).await;
    ensure(
        acked.len() == 4
            && acked.iter().enumerate().all(|(i, r)| (i == 1) == matches!(r, Err(QueueError::NotFound(_)))),
        || format!("acks, the second stale: {acked:?}"),
    )?;
    // Room for the three acked: the fourth entry is refused on its own.
    let part = b.enqueue_batch(&big, (0..4).map(|_| (text("more"), 0)).collect()).await;
    ensure(
        part.len() == 4 && part[..3].iter().all(|r| r.is_ok()) && matches!(part[3], Err(QueueError::Full { .. })),
        || format!("a batch past the room: {part:?}"),
    )?;

    let q = queue("conf.batch")?;
    let batch = vec![
        (text("one"), 0),
        (text("two"), 0),
        (text("later"), 100),
        (NewMessage { ttl_ms: Some(50), ..text("brief") }, 0),
    ];
    let ids = b.enqueue_batch(&q, batch).await.into_iter().collect::<std::result::Result<Vec<u64>, _>>()?;
    ensure(ids.len() == 4 && ids.windows(2).all(|w| w[0] < w[1]), || format!("ids in order: {ids:?}"))?;
    same(a.stats(&q).await?, stats(3, 0, 1, 0), "three ready, one delayed")?;
    clock.advance(100);
    let got = fetch(&a, &q, 10, 1000).await?;
    let order: Vec<(u64, String)> = got.iter().map(|d| (d.message_id, payload(d))).collect();
    let want = vec![(ids[0], "one".to_owned()), (ids[1], "two".to_owned()), (ids[2], "later".to_owned())];
    same(order, want, "fetched oldest first, the TTL's one gone")
}

/// A fetch that acks: the deliveries named are acked (each once: a repeat or a stale
/// one is `not_found`) while the fetch takes the next job; a lease that ended is not
/// acked and its job is delivered again, also to the fetch that named it.
pub async fn a_fetch_acks_the_deliveries_it_names(backend: &dyn QueueBackend) -> Result {
    let config = QueueConfig { max_attempts: 2, ..QueueConfig::default() };
    let (a, b, clock) = nodes(backend, config, 1024).await?;
    let (q, dlq) = (queue("conf.ackfetch")?, queue("conf.ackfetch.dlq")?);
    for job in ["one", "two", "three"] {
        a.enqueue(&q, text(job), 0).await?;
    }
    let first = fetch(&b, &q, 1, 1000).await?;
    let named = [first[0].id.clone(), "1-1-stale".to_owned(), first[0].id.clone()];
    let (acked, got) = a.ack_and_fetch(&q, &named, 1, 1000).await;
    let got = got?;
    ensure(matches!(acked.as_slice(), [Ok(()), Err(QueueError::NotFound(_)), Err(QueueError::NotFound(_))]), || {
        format!("the first acked, the stale one and the repeat not found: {acked:?}")
    })?;
    same(got.iter().map(payload).collect::<Vec<_>>(), vec!["two".to_owned()], "the next job")?;
    let (acked, got) = b.ack_and_fetch(&q, std::slice::from_ref(&got[0].id), 5, 100).await;
    let got = got?;
    ensure(matches!(acked.as_slice(), [Ok(())]), || format!("the second acked: {acked:?}"))?;
    same(got.iter().map(payload).collect::<Vec<_>>(), vec!["three".to_owned()], "the last job")?;
    same(a.stats(&q).await?, stats(0, 1, 0, 0), "one in flight")?;
    // Its lease ends: the ack comes too late, and the same fetch gets the job again.
    clock.advance(100);
    let (acked, again) = a.ack_and_fetch(&q, std::slice::from_ref(&got[0].id), 1, 1000).await;
    let again = again?;
    ensure(matches!(acked.as_slice(), [Err(QueueError::NotFound(_))]), || format!("a late ack: {acked:?}"))?;
    same(
        again.iter().map(|d| (payload(d), d.attempt)).collect::<Vec<_>>(),
        vec![("three".to_owned(), 2)],
        "delivered again",
    )?;
    let (acked, none) = b.ack_and_fetch(&q, std::slice::from_ref(&again[0].id), 1, 1000).await;
    ensure(matches!(acked.as_slice(), [Ok(())]), || format!("the redelivery acked: {acked:?}"))?;
    same(none?.len(), 0, "nothing left")?;
    same(a.stats(&q).await?, stats(0, 0, 0, 0), "all done")?;

    // On a dead-letter queue too (where a fetch first collects the dead letters due).
    a.enqueue(&q, text("poison"), 0).await?;
    for _ in 0..2 {
        same(fetch(&b, &q, 1, 100).await?.len(), 1, "a delivery of the poison")?;
        clock.advance(100);
    }
    let dead = fetch(&a, &dlq, 1, 1000).await?;
    same(dead.iter().map(payload).collect::<Vec<_>>(), vec!["poison".to_owned()], "dead-lettered")?;
    let (acked, none) = b.ack_and_fetch(&dlq, std::slice::from_ref(&dead[0].id), 1, 1000).await;
    ensure(matches!(acked.as_slice(), [Ok(())]), || format!("the dead letter acked: {acked:?}"))?;
    same(none?.len(), 0, "no other dead letter")?;
    same(a.stats(&dlq).await?, stats(0, 0, 0, 0), "the dead-letter queue empty")
}

/// One `#[tokio::test]` per queue conformance case for the backend `$make` builds.
#[macro_export]
macro_rules! queue_conformance {
    ($make:expr) => {
        $crate::queue_conformance!(@cases $make;
            leases_requeues_and_dead_letters,
            ttls_delays_and_refusals,
            workers_on_two_nodes_take_each_job_once,
            a_long_poll_wakes_on_enqueue_from_another_node,
            purge_and_redrive,
            list_names_queues_in_order,
            batches_keep_order_and_report_each_entry,
            a_fetch_acks_the_deliveries_it_names
        );
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() -> $crate::conformance::Result {
                let backend = $make;
                $crate::queues::$case(&backend).await
            }
        )*
    };
}
