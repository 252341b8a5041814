//! The queue engine against a reference model: random sequences of enqueue, fetch, ack,
//! requeue, extend and clock advances, on a queue and its dead-letter queue, must give
//! the same deliveries, outcomes and counts as a simple model of the semantics.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::config::RetentionConfig;
use crate::memory::MemoryStore;
use crate::message::ManualClock;
use crate::store::QueueSnapshot;

const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, PartialEq)]
enum State {
    Ready { since: u64 },
    Delayed { until: u64 },
    Leased { deadline: u64, delivery: String },
}

#[derive(Debug, Clone)]
struct Msg {
    attempt: u32,
    expires_at: Option<u64>,
    state: State,
}

/// One queue, modelled plainly: a map of messages and a scan for everything.
#[derive(Debug, Default)]
struct ModelQueue {
    next_id: u64,
    msgs: BTreeMap<u64, Msg>,
}

impl ModelQueue {
    fn new() -> Self {
        Self { next_id: 1, msgs: BTreeMap::new() }
    }

    fn add(&mut self, now: u64, delay: u64, ttl: Option<u64>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let state = if delay > 0 { State::Delayed { until: now + delay } } else { State::Ready { since: now } };
        self.msgs.insert(id, Msg { attempt: 0, expires_at: ttl.map(|t| now + t), state });
        id
    }

    fn stats(&self) -> (u64, u64, u64) {
        let count = |f: fn(&State) -> bool| self.msgs.values().filter(|m| f(&m.state)).count() as u64;
        (
            count(|s| matches!(s, State::Ready { .. })),
            count(|s| matches!(s, State::Leased { .. })),
            count(|s| matches!(s, State::Delayed { .. })),
        )
    }

    fn find(&self, delivery: &str) -> Option<u64> {
        self.msgs
            .iter()
            .find(|(_, m)| matches!(&m.state, State::Leased { delivery: d, .. } if d == delivery))
            .map(|(id, _)| *id)
    }
}

struct Model {
    now: u64,
    queue: ModelQueue,
    dlq: ModelQueue,
}

impl Model {
    /// Applies due events in time order: expiry, then delay end, then lease end on the
    /// same instant; ties by message id.
    fn settle(&mut self) {
        for dlq in [false, true] {
            loop {
                let q = if dlq { &self.dlq } else { &self.queue };
                let mut next: Option<(u64, u8, u64)> = None;
                for (id, m) in &q.msgs {
                    let mut events = vec![];
                    if let Some(at) = m.expires_at {
                        events.push((at, 0, *id));
                    }
                    match m.state {
                        State::Delayed { until } => events.push((until, 1, *id)),
                        State::Leased { deadline, .. } => events.push((deadline, 2, *id)),
                        State::Ready { .. } => {}
                    }
                    for e in events {
                        if e.0 <= self.now && next.is_none_or(|n| e < n) {
                            next = Some(e);
                        }
                    }
                }
                let Some((at, kind, id)) = next else { break };
                match kind {
                    0 => {
                        let q = if dlq { &mut self.dlq } else { &mut self.queue };
                        q.msgs.remove(&id);
                    }
                    1 => {
                        let q = if dlq { &mut self.dlq } else { &mut self.queue };
                        if let Some(m) = q.msgs.get_mut(&id) {
                            m.state = State::Ready { since: at };
                        }
                    }
                    _ => self.release(dlq, id, at, 0),
                }
            }
        }
    }

    fn release(&mut self, dlq: bool, id: u64, at: u64, delay: u64) {
        let q = if dlq { &mut self.dlq } else { &mut self.queue };
        let attempt = q.msgs.get(&id).map_or(0, |m| m.attempt);
        if !dlq && attempt >= MAX_ATTEMPTS {
            self.queue.msgs.remove(&id);
            self.dlq.add(at, 0, None);
        } else if let Some(m) = q.msgs.get_mut(&id) {
            m.state = if delay > 0 { State::Delayed { until: at + delay } } else { State::Ready { since: at } };
        }
    }

    fn fetch(&mut self, dlq: bool, max: usize, vis: u64) -> Vec<(u64, u32)> {
        self.settle();
        let now = self.now;
        let q = if dlq { &mut self.dlq } else { &mut self.queue };
        let mut ready: Vec<(u64, u64)> = q
            .msgs
            .iter()
            .filter_map(|(id, m)| match m.state {
                State::Ready { since } => Some((since, *id)),
                _ => None,
            })
            .collect();
        ready.sort_unstable();
        ready
            .into_iter()
            .take(max)
            .filter_map(|(_, id)| {
                let m = q.msgs.get_mut(&id)?;
                m.attempt += 1;
                m.state = State::Leased { deadline: now + vis, delivery: String::new() };
                Some((id, m.attempt))
            })
            .collect()
    }

    fn stats(&self) -> QueueStats {
        let (ready, in_flight, delayed) = self.queue.stats();
        QueueStats { ready, in_flight, delayed, dead: self.dlq.msgs.len() as u64 }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue { delay: u64, ttl: Option<u64> },
    Fetch { dlq: bool, max: usize, vis: u64 },
    Ack { pick: usize },
    Requeue { pick: usize, delay: u64 },
    Extend { pick: usize, vis: u64 },
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (prop_oneof![Just(0u64), 1..50u64], prop::option::weighted(0.2, 0..100u64))
            .prop_map(|(delay, ttl)| Op::Enqueue { delay, ttl }),
        3 => (prop::bool::weighted(0.2), 1..4usize, 1..60u64).prop_map(|(dlq, max, vis)| Op::Fetch { dlq, max, vis }),
        2 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        2 => (any::<usize>(), prop_oneof![Just(0u64), 1..30u64]).prop_map(|(pick, delay)| Op::Requeue { pick, delay }),
        1 => (any::<usize>(), 1..60u64).prop_map(|(pick, vis)| Op::Extend { pick, vis }),
        3 => (0..40u64).prop_map(Op::Advance),
    ]
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let clock = Arc::new(ManualClock::new(1_000));
    let store = Arc::new(MemoryStore::new(RetentionConfig::default()));
    let config = QueueConfig { max_attempts: MAX_ATTEMPTS, ..QueueConfig::default() };
    let queues = Queues::new(store, clock.clone(), config, 1 << 20);
    let name = QueueName::parse("jobs").expect("name");
    let dlq_name = name.dlq().expect("dlq");
    let mut model = Model { now: 1_000, queue: ModelQueue::new(), dlq: ModelQueue::new() };
    // Every delivery id ever handed out, with its queue: acks may name stale ones.
    let mut seen: Vec<(bool, String)> = Vec::new();

    for op in ops {
        match op {
            Op::Enqueue { delay, ttl } => {
                model.settle();
                let want = model.queue.add(model.now, delay, ttl);
                model.settle();
                let msg = NewMessage { kind: Kind::Text, payload: Bytes::from_static(b"x"), ttl_ms: ttl };
                let got =
                    rt.block_on(queues.enqueue(&name, msg, delay)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, want);
            }
            Op::Fetch { dlq, max, vis } => {
                let want = model.fetch(dlq, max, vis);
                let got = queues.fetch(if dlq { &dlq_name } else { &name }, max, vis);
                let got_ids: Vec<(u64, u32)> = got.iter().map(|d| (d.message_id, d.attempt)).collect();
                prop_assert_eq!(&got_ids, &want);
                for d in got {
                    let q = if dlq { &mut model.dlq } else { &mut model.queue };
                    if let Some(Msg { state: State::Leased { delivery, .. }, .. }) = q.msgs.get_mut(&d.message_id) {
                        delivery.clone_from(&d.id);
                    }
                    seen.push((dlq, d.id));
                }
            }
            Op::Ack { pick } | Op::Requeue { pick, .. } | Op::Extend { pick, .. } if seen.is_empty() => {
                let _ = pick;
            }
            Op::Ack { pick } => {
                let (dlq, id) = seen[pick % seen.len()].clone();
                model.settle();
                let q = if dlq { &mut model.dlq } else { &mut model.queue };
                let want = q.find(&id).map(|m| q.msgs.remove(&m)).is_some();
                let got = queues.ack(if dlq { &dlq_name } else { &name }, &id);
                prop_assert_eq!(got.is_ok(), want, "ack {}", id);
            }
            Op::Requeue { pick, delay } => {
                let (dlq, id) = seen[pick % seen.len()].clone();
                model.settle();
                let q = if dlq { &model.dlq } else { &model.queue };
                let want = q.find(&id);
                if let Some(m) = want {
                    let now = model.now;
                    model.release(dlq, m, now, delay);
                }
                let got = queues.requeue(if dlq { &dlq_name } else { &name }, &id, delay);
                prop_assert_eq!(got.is_ok(), want.is_some(), "requeue {}", id);
            }
            Op::Extend { pick, vis } => {
                let (dlq, id) = seen[pick % seen.len()].clone();
                model.settle();
                let now = model.now;
                let q = if dlq { &mut model.dlq } else { &mut model.queue };
                let want = q.find(&id);
                if let Some(m) = want.and_then(|m| q.msgs.get_mut(&m)) {
                    if let State::Leased { deadline, .. } = &mut m.state {
                        *deadline = now + vis;
                    }
                }
                let got = queues.extend(if dlq { &dlq_name } else { &name }, &id, vis);
                prop_assert_eq!(got.is_ok(), want.is_some(), "extend {}", id);
            }
            Op::Advance(ms) => {
                clock.advance(ms);
                model.now += ms;
            }
        }
        model.settle();
        // The dead-letter queue first: its stats must already show what lease ends on
        // the parent dead-lettered, without the parent being touched (stats on the
        // parent settle it).
        let (ready, in_flight, delayed) = model.dlq.stats();
        prop_assert_eq!(queues.stats(&dlq_name), QueueStats { ready, in_flight, delayed, dead: 0 });
        prop_assert_eq!(queues.stats(&name), model.stats());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn queue_engine_matches_the_model(ops in prop::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}

fn queues(clock: Arc<ManualClock>) -> (Queues, QueueName) {
    let store = Arc::new(MemoryStore::new(RetentionConfig::default()));
    let config = QueueConfig { max_attempts: 2, max_queue_messages: 3, max_waiters_per_queue: 1 };
    (Queues::new(store, clock, config, 16), QueueName::parse("q").expect("name"))
}

fn text(s: &'static str) -> NewMessage {
    NewMessage::new(Kind::Text, Bytes::from_static(s.as_bytes()))
}

#[tokio::test]
async fn dead_letters_after_max_attempts_and_stale_ids_are_not_found() -> Result<(), QueueError> {
    let clock = Arc::new(ManualClock::new(0));
    let (q, name) = queues(clock.clone());
    q.enqueue(&name, text("job"), 0).await?;
    let first = q.fetch(&name, 1, 100);
    clock.advance(100); // lease ends: delivered again
    assert!(matches!(q.ack(&name, &first[0].id), Err(QueueError::NotFound(_))), "stale id");
    let second = q.fetch(&name, 1, 100);
    assert_eq!(second[0].attempt, 2);
    q.requeue(&name, &second[0].id, 0)?; // second delivery given back: max_attempts reached
    assert_eq!(q.stats(&name), QueueStats { ready: 0, in_flight: 0, delayed: 0, dead: 1 });
    let dlq = name.dlq().expect("dlq");
    let dead = q.fetch(&dlq, 1, 100);
    assert_eq!((dead[0].attempt, dead[0].ts, &dead[0].payload[..]), (1, 100, &b"job"[..]));
    assert!(matches!(q.enqueue(&dlq, text("no"), 0).await, Err(QueueError::DeadLetterQueue(_))));
    Ok(())
}

#[tokio::test]
async fn limits_full_queue_too_large_and_waiters() -> Result<(), QueueError> {
    let clock = Arc::new(ManualClock::new(0));
    let (q, name) = queues(clock);
    for _ in 0..3 {
        q.enqueue(&name, text("x"), 0).await?;
    }
    assert!(matches!(q.enqueue(&name, text("x"), 0).await, Err(QueueError::Full { .. })));
    let big = NewMessage::new(Kind::Binary, vec![0u8; 17]);
    assert!(matches!(q.enqueue(&name, big, 0).await, Err(QueueError::TooLarge { .. })));
    let empty = QueueName::parse("empty").expect("name");
    let waiting = q.fetch_wait(&empty, 1, 10, Duration::from_secs(60));
    tokio::pin!(waiting);
    // Poll the first waiter once so it registers, then a second one is refused.
    assert!(futures_poll(&mut waiting).is_none());
    assert!(matches!(q.fetch_wait(&empty, 1, 10, Duration::from_secs(60)).await, Err(QueueError::TooManyWaiters(_))));
    Ok(())
}

fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

#[tokio::test]
async fn a_long_poll_wakes_on_enqueue() -> Result<(), QueueError> {
    let clock = Arc::new(ManualClock::new(0));
    let store = Arc::new(MemoryStore::new(RetentionConfig::default()));
    let q = Arc::new(Queues::new(store, clock, QueueConfig::default(), 1024));
    let name = QueueName::parse("lp").expect("name");
    let waiter = {
        let (q, name) = (q.clone(), name.clone());
        tokio::spawn(async move { q.fetch_wait(&name, 1, 1000, Duration::from_secs(3600)).await })
    };
    tokio::task::yield_now().await;
    q.enqueue(&name, text("wake"), 0).await?;
    let got = waiter.await.map_err(|_| QueueError::Store(StoreError::Closed))??;
    assert_eq!(got.len(), 1);
    Ok(())
}

/// Milliseconds of tokio's clock, so that a paused runtime moves the queues' time too.
struct TokioClock(tokio::time::Instant);

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        1_000 + self.0.elapsed().as_millis() as u64
    }
}

#[tokio::test]
async fn a_dead_letter_is_in_the_dlq_when_the_lease_ends() -> Result<(), QueueError> {
    let clock = Arc::new(ManualClock::new(0));
    let (q, name) = queues(clock.clone());
    let dlq = name.dlq().expect("dlq");
    q.enqueue(&name, text("job"), 0).await?;
    assert_eq!(q.fetch(&name, 1, 100)[0].attempt, 1);
    clock.advance(100);
    assert_eq!(q.fetch(&name, 1, 100)[0].attempt, 2, "the last allowed delivery");
    clock.advance(150); // its lease ended at 200; nothing touches `q` from here on
    assert_eq!(q.stats(&dlq), QueueStats { ready: 1, in_flight: 0, delayed: 0, dead: 0 });
    let dead = q.fetch(&dlq, 1, 100);
    assert_eq!((dead.len(), dead[0].ts, &dead[0].payload[..]), (1, 200, &b"job"[..]), "ts = the lease end");
    assert_eq!(q.stats(&name), QueueStats { ready: 0, in_flight: 0, delayed: 0, dead: 1 });
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_dlq_long_poll_wakes_when_the_parent_lease_ends() -> Result<(), QueueError> {
    let clock = Arc::new(TokioClock(tokio::time::Instant::now()));
    let store = Arc::new(MemoryStore::new(RetentionConfig::default()));
    let config = QueueConfig { max_attempts: 1, ..QueueConfig::default() };
    let q = Arc::new(Queues::new(store, clock, config, 1024));
    let name = QueueName::parse("idle").expect("name");
    q.enqueue(&name, text("job"), 0).await?;
    assert_eq!(q.fetch(&name, 1, 100).len(), 1, "the only allowed delivery, leased for 100 ms");
    let start = tokio::time::Instant::now();
    let dlq = name.dlq().expect("dlq");
    let got = q.fetch_wait(&dlq, 1, 1000, Duration::from_secs(60)).await?;
    assert_eq!(got.len(), 1);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(100) && waited < Duration::from_secs(1), "{waited:?}: not the lease end");
    Ok(())
}

/// What a [`Scripted`] store's held appends resolve to, once the test decides.
type Release = tokio::sync::watch::Sender<Option<Result<(), StoreError>>>;

/// A store double around `MemoryStore`: `queue_load` returns the snapshots the test gave,
/// in that order; queue appends (when issued and when done) and removals are logged in
/// order; appends to the `held` queue stay pending until the test releases them.
struct Scripted {
    inner: MemoryStore,
    load: Vec<QueueSnapshot>,
    held: Option<QueueName>,
    release: tokio::sync::watch::Receiver<Option<Result<(), StoreError>>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    fn new(load: Vec<QueueSnapshot>, held: Option<&str>) -> (Arc<Self>, Release, Arc<Mutex<Vec<String>>>) {
        let (release, rx) = tokio::sync::watch::channel(None);
        let log = Arc::new(Mutex::new(Vec::new()));
        let held = held.map(|h| QueueName::parse(h).expect("name"));
        let store =
            Self { inner: MemoryStore::new(RetentionConfig::default()), load, held, release: rx, log: log.clone() };
        (Arc::new(store), release, log)
    }
}

fn note(log: &Mutex<Vec<String>>, what: String) {
    lock(log).push(what);
}

impl Store for Scripted {
    fn append(
        &self,
        topic: &crate::name::TopicName,
        batch: Vec<NewMessage>,
    ) -> crate::store::StoreFuture<crate::store::Appended> {
        self.inner.append(topic, batch)
    }

    fn read(
        &self,
        topic: &crate::name::TopicName,
        from: u64,
        until: u64,
        limit: usize,
    ) -> crate::store::StoreFuture<crate::store::History> {
        self.inner.read(topic, from, until, limit)
    }

    fn head(&self, topic: &crate::name::TopicName) -> crate::store::StoreFuture<crate::store::TopicHead> {
        self.inner.head(topic)
    }

    fn delete(&self, topic: &crate::name::TopicName) -> crate::store::StoreFuture<crate::store::Epoch> {
        self.inner.delete(topic)
    }

    fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> crate::store::StoreFuture<Vec<crate::store::ListedTopic>> {
        self.inner.list(prefix, after, limit)
    }

    fn queue_append(&self, queue: &QueueName, records: Vec<QueueRecord>) -> crate::store::StoreFuture<()> {
        let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
        note(&self.log, format!("append {queue} {ids:?}"));
        if self.held.as_ref() != Some(queue) {
            return Box::pin(std::future::ready(Ok(())));
        }
        let (mut release, log, queue) = (self.release.clone(), self.log.clone(), queue.clone());
        Box::pin(async move {
            let outcome = match release.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone().unwrap_or(Err(StoreError::Closed)),
                Err(_) => Err(StoreError::Closed),
            };
            note(&log, format!("appended {queue} {ids:?} ok={}", outcome.is_ok()));
            outcome
        })
    }

    fn queue_remove(&self, queue: &QueueName, ids: Vec<u64>) {
        note(&self.log, format!("remove {queue} {ids:?}"));
    }

    fn queue_load(&self) -> Vec<QueueSnapshot> {
        self.load.clone()
    }

    fn sweep(&self) {}

    fn is_ready(&self) -> bool {
        true
    }
}

/// Runs spawned tasks until `done` holds (the store double's futures need a few polls).
async fn until(what: &str, mut done: impl FnMut() -> bool) -> Result<(), QueueError> {
    for _ in 0..1000 {
        if done() {
            return Ok(());
        }
        tokio::task::yield_now().await;
    }
    Err(QueueError::Store(StoreError::Unavailable(format!("never: {what}"))))
}

fn record(id: u64, payload: &'static str) -> QueueRecord {
    QueueRecord {
        id,
        kind: Kind::Text,
        payload: Bytes::from_static(payload.as_bytes()),
        ts: 5,
        ready_at: 5,
        expires_at: None,
    }
}

#[tokio::test]
async fn a_dead_letter_at_load_survives_whatever_order_the_queues_load_in() -> Result<(), QueueError> {
    let jobs = QueueName::parse("jobs").expect("name");
    let dlq = jobs.dlq().expect("dlq");
    // The parent comes first: its job, out of attempts, is dead-lettered at load, while
    // the dead-letter queue already holds a dead letter with id 1 of its own.
    let load = vec![
        QueueSnapshot {
            queue: jobs.clone(),
            next_id: 2,
            records: vec![record(1, "cut off")],
            attempts: [(1, 2)].into(),
        },
        QueueSnapshot { queue: dlq.clone(), next_id: 2, records: vec![record(1, "older")], attempts: BTreeMap::new() },
    ];
    let (store, _release, _log) = Scripted::new(load, None);
    let config = QueueConfig { max_attempts: 2, ..QueueConfig::default() };
    let q = Queues::new(store, Arc::new(ManualClock::new(10)), config, 1024);
    assert_eq!(q.stats(&jobs), QueueStats { ready: 0, in_flight: 0, delayed: 0, dead: 2 });
    let mut dead: Vec<(u64, Bytes)> = q.fetch(&dlq, 10, 100).into_iter().map(|d| (d.message_id, d.payload)).collect();
    dead.sort();
    assert_eq!(dead, vec![(1, Bytes::from_static(b"older")), (2, Bytes::from_static(b"cut off"))]);
    Ok(())
}

#[tokio::test]
async fn dead_lettering_removes_from_the_parent_only_once_the_dlq_append_is_done() -> Result<(), QueueError> {
    let (store, release, log) = Scripted::new(Vec::new(), Some("q.dlq"));
    let clock = Arc::new(ManualClock::new(0));
    let config = QueueConfig { max_attempts: 1, ..QueueConfig::default() };
    let q = Queues::new(store, clock.clone(), config, 1024);
    let name = QueueName::parse("q").expect("name");
    q.enqueue(&name, text("job"), 0).await?;
    q.fetch(&name, 1, 100);
    clock.advance(100);
    assert_eq!(q.stats(&name).dead, 1, "dead-lettered at the lease end");
    tokio::task::yield_now().await;
    let logged = lock(&log).clone();
    assert_eq!(logged, vec!["append q [1]", "append q.dlq [1]"], "no removal from q before the dead letter is stored");
    release.send_replace(Some(Ok(())));
    until("the removal from q", || lock(&log).iter().any(|l| l.starts_with("remove q "))).await?;
    assert_eq!(lock(&log)[2..], ["appended q.dlq [1] ok=true", "remove q [1]"]);
    Ok(())
}

#[tokio::test]
async fn a_flush_waits_until_the_dead_letters_original_is_removed() -> Result<(), Box<dyn std::error::Error>> {
    // A clean stop flushes, then the process exits and its tasks are dropped. Had the
    // flush not waited for the removal (issued by a task once the dead letter is stored),
    // the job would still be stored in `q` and be dead-lettered a second time at the next
    // start. Found by the disk store's model-based restart test.
    let (store, release, log) = Scripted::new(Vec::new(), Some("q.dlq"));
    let clock = Arc::new(ManualClock::new(0));
    let queues = QueueConfig { max_attempts: 1, ..QueueConfig::default() };
    let broker = crate::Broker::with_clock(store, crate::BrokerConfig { queues, ..Default::default() }, clock.clone());
    let name = QueueName::parse("q").expect("name");
    broker.queues().enqueue(&name, text("job"), 0).await?;
    broker.queues().fetch(&name, 1, 100);
    clock.advance(100);
    assert_eq!(broker.queues().stats(&name).dead, 1, "dead-lettered at the lease end");
    let mut flush = Box::pin(broker.flush());
    assert!(futures_poll(&mut flush).is_none(), "the flush waits while the dead letter's append is pending");
    release.send_replace(Some(Ok(())));
    flush.await?;
    assert_eq!(lock(&log).last().map(String::as_str), Some("remove q [1]"), "removal issued before the flush ended");
    Ok(())
}

#[tokio::test]
async fn a_failed_dlq_append_leaves_the_job_stored_in_its_queue() -> Result<(), QueueError> {
    let (store, release, log) = Scripted::new(Vec::new(), Some("q.dlq"));
    let clock = Arc::new(ManualClock::new(0));
    let config = QueueConfig { max_attempts: 1, ..QueueConfig::default() };
    let q = Queues::new(store, clock.clone(), config, 1024);
    let name = QueueName::parse("q").expect("name");
    q.enqueue(&name, text("job"), 0).await?;
    q.fetch(&name, 1, 100);
    clock.advance(100);
    assert_eq!(q.stats(&name).dead, 1);
    release.send_replace(Some(Err(StoreError::Unavailable("disk full".into()))));
    until("the failed append", || lock(&log).iter().any(|l| l.starts_with("appended"))).await?;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // Still stored in `q`, out of attempts: a restart dead-letters it again.
    assert!(!lock(&log).iter().any(|l| l.starts_with("remove q ")), "{:?}", lock(&log));
    Ok(())
}

#[tokio::test]
async fn a_dropped_enqueue_neither_leaks_its_reservation_nor_hides_its_job() -> Result<(), QueueError> {
    let (store, release, log) = Scripted::new(Vec::new(), Some("q"));
    let config = QueueConfig { max_attempts: 2, max_queue_messages: 3, max_waiters_per_queue: 1 };
    let q = Queues::new(store, Arc::new(ManualClock::new(0)), config, 16);
    let name = QueueName::parse("q").expect("name");
    {
        // The caller goes away (deadline, reset) while the durable write is pending.
        let mut enqueue = Box::pin(q.enqueue(&name, text("orphan"), 0));
        assert!(futures_poll(&mut enqueue).is_none());
        assert_eq!(lock(&log).clone(), vec!["append q [1]"]);
    }
    release.send_replace(Some(Ok(())));
    until("the write to land", || lock(&log).len() == 2).await?;
    tokio::task::yield_now().await;
    let got = q.fetch(&name, 10, 100);
    assert_eq!(got.iter().map(|d| &d.payload[..]).collect::<Vec<_>>(), vec![&b"orphan"[..]], "stored, so visible");
    q.ack(&name, &got[0].id)?;
    for _ in 0..3 {
        q.enqueue(&name, text("x"), 0).await?; // the reservation was given back
    }
    assert!(matches!(q.enqueue(&name, text("x"), 0).await, Err(QueueError::Full { .. })));
    Ok(())
}
