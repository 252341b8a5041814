use super::*;
use crate::config::RetentionConfig;
use crate::memory::MemoryStore;
use crate::message::Kind;

#[derive(Default)]
struct Collect(Mutex<Vec<u64>>);

impl Subscriber for Collect {
    fn deliver(&self, msg: &Outgoing) -> bool {
        lock(&self.0).push(msg.offset);
        true
    }
    fn overflow(&self) {}
}

impl Collect {
    fn offsets(&self) -> Vec<u64> {
        lock(&self.0).clone()
    }
}

fn broker(max_messages: u64) -> Broker {
    let store = MemoryStore::new(RetentionConfig { max_messages, ..Default::default() });
    Broker::new(Arc::new(store), BrokerConfig::default())
}

fn text(s: &str) -> NewMessage {
    NewMessage::new(Kind::Text, s.to_owned())
}

fn topic() -> TopicName {
    TopicName::parse("news").expect("valid")
}

async fn publish_n(b: &Broker, n: usize) -> Result<(), BrokerError> {
    for i in 0..n {
        b.publish(&topic(), text(&i.to_string())).await?;
    }
    Ok(())
}

#[tokio::test]
async fn live_subscribers_get_every_message_in_order() -> Result<(), BrokerError> {
    let b = broker(100);
    let subs: Vec<Arc<Collect>> = (0..3).map(|_| Arc::new(Collect::default())).collect();
    for s in &subs {
        let sub = b.subscribe(&topic(), StartFrom::Latest, None, s.clone()).await?;
        assert!(sub.replay.is_none());
        assert_eq!((sub.next, sub.recovered), (1, true));
    }
    publish_n(&b, 5).await?;
    for s in &subs {
        assert_eq!(s.offsets(), [1, 2, 3, 4, 5]);
    }
    assert_eq!(b.info(&topic()).await?.subscribers, 3);
    Ok(())
}

#[tokio::test]
async fn replay_then_live_has_no_gap_and_no_duplicate() -> Result<(), BrokerError> {
    let b = broker(100);
    publish_n(&b, 5).await?;
    let s = Arc::new(Collect::default());
    let sub = b.subscribe(&topic(), StartFrom::Offset(3), None, s.clone()).await?;
    assert_eq!((sub.next, sub.recovered), (6, true));
    let mut replay = sub.replay.expect("history to replay");
    // Published during the replay: held back, then delivered after it.
    publish_n(&b, 2).await?;
    assert!(s.offsets().is_empty());
    let mut replayed = Vec::new();
    while let Some(chunk) = replay.next_chunk(2).await? {
        replayed.extend(chunk.iter().map(|m| m.offset));
    }
    assert_eq!(replayed, [3, 4, 5]);
    replay.finish();
    publish_n(&b, 1).await?;
    assert_eq!(s.offsets(), [6, 7, 8]);
    Ok(())
}

#[tokio::test]
async fn unrecoverable_positions_replay_nothing() -> Result<(), BrokerError> {
    let b = broker(3);
    publish_n(&b, 5).await?; // 1 and 2 trimmed
    let s: Arc<dyn Subscriber> = Arc::new(Collect::default());
    let trimmed = b.subscribe(&topic(), StartFrom::Offset(2), None, s.clone()).await?;
    assert!(!trimmed.recovered && trimmed.replay.is_none());
    let beyond = b.subscribe(&topic(), StartFrom::Offset(7), None, s.clone()).await?;
    assert!(!beyond.recovered);
    let stale = b.subscribe(&topic(), StartFrom::Offset(4), Some("other"), s.clone()).await?;
    assert!(!stale.recovered);
    let ok = b.subscribe(&topic(), StartFrom::Offset(3), Some(&trimmed.epoch), s.clone()).await?;
    assert!(ok.recovered && ok.replay.is_some());
    let at_next = b.subscribe(&topic(), StartFrom::Offset(6), None, s).await?;
    assert!(at_next.recovered && at_next.replay.is_none());
    Ok(())
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_delete_restarts_offsets() -> Result<(), BrokerError> {
    let b = broker(100);
    let s = Arc::new(Collect::default());
    let sub = b.subscribe(&topic(), StartFrom::Latest, None, s.clone()).await?;
    publish_n(&b, 2).await?;
    b.delete(&topic()).await?;
    publish_n(&b, 1).await?;
    assert_eq!(s.offsets(), [1, 2, 1], "live subscription survives delete");
    assert!(b.unsubscribe(&topic(), sub.id));
    assert!(!b.unsubscribe(&topic(), sub.id));
    publish_n(&b, 1).await?;
    assert_eq!(s.offsets().len(), 3);
    assert_eq!(b.info(&topic()).await?.subscribers, 0);
    Ok(())
}

#[tokio::test]
async fn too_large_is_refused_before_the_store() -> Result<(), BrokerError> {
    let b = broker(100);
    let big = NewMessage::new(Kind::Binary, vec![0u8; b.config().max_message_bytes + 1]);
    assert!(matches!(b.publish(&topic(), big).await, Err(BrokerError::TooLarge { .. })));
    assert_eq!(b.info(&topic()).await?.head.next, 1);
    Ok(())
}

#[tokio::test]
async fn fetch_pages_and_next() -> Result<(), BrokerError> {
    let b = broker(100);
    let empty = b.fetch(&topic(), 0, 10).await?;
    assert_eq!((empty.messages.len(), empty.next), (0, 1));
    publish_n(&b, 5).await?;
    let page = b.fetch(&topic(), 2, 2).await?;
    assert_eq!(page.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(page.next, 4);
    assert_eq!(b.fetch(&topic(), 9, 10).await?.next, 6);
    Ok(())
}

/// A store whose reads are followed at once by a delete of the topic: the delete lands
/// between a history read and anything the broker does after it.
struct DeleteAfterRead(MemoryStore);

impl Store for DeleteAfterRead {
    fn append(&self, topic: &TopicName, batch: Vec<NewMessage>) -> crate::store::StoreFuture<Appended> {
        self.0.append(topic, batch)
    }
    fn read(&self, topic: &TopicName, from: u64, until: u64, limit: usize) -> crate::store::StoreFuture<History> {
        let read = self.0.read(topic, from, until, limit);
        let deleted = self.0.delete(topic);
        Box::pin(async move {
            let history = read.await;
            deleted.await?;
            history
        })
    }
    fn head(&self, topic: &TopicName) -> crate::store::StoreFuture<TopicHead> {
        self.0.head(topic)
    }
    fn delete(&self, topic: &TopicName) -> crate::store::StoreFuture<Epoch> {
        self.0.delete(topic)
    }
    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> crate::store::StoreFuture<Vec<ListedTopic>> {
        self.0.list(prefix, after, limit)
    }
    fn queue_append(
        &self,
        queue: &crate::name::QueueName,
        records: Vec<crate::store::QueueRecord>,
    ) -> crate::store::StoreFuture<()> {
        self.0.queue_append(queue, records)
    }
    fn queue_remove(&self, queue: &crate::name::QueueName, ids: Vec<u64>) {
        self.0.queue_remove(queue, ids)
    }
    fn sweep(&self) {}
    fn is_ready(&self) -> bool {
        true
    }
}

/// Issue 9, item 13: a fetch labels its messages with the epoch they were read in, even
/// when the topic is deleted right after the read.
#[tokio::test]
async fn a_fetch_names_the_epoch_its_messages_belong_to() -> Result<(), BrokerError> {
    let b =
        Broker::new(Arc::new(DeleteAfterRead(MemoryStore::new(RetentionConfig::default()))), BrokerConfig::default());
    publish_n(&b, 3).await?;
    let before = b.info(&topic()).await?.head.epoch;
    let fetched = b.fetch(&topic(), 0, 10).await?;
    assert_eq!(fetched.messages.len(), 3);
    assert_eq!(fetched.epoch, before, "old messages keep their old epoch");
    assert_ne!(b.info(&topic()).await?.head.epoch, before, "the delete happened");
    Ok(())
}

/// Requests held until the test releases them, in any order.
#[derive(Default)]
struct Gate {
    waiting: Mutex<Vec<Option<tokio::sync::oneshot::Sender<()>>>>,
    arrived: tokio::sync::watch::Sender<usize>,
}

impl Gate {
    fn enter(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.waiting).push(Some(tx));
        self.arrived.send_modify(|n| *n += 1);
        rx
    }

    /// Resolves once `n` requests have arrived in all.
    async fn arrived(&self, n: usize) -> Result<(), tokio::sync::watch::error::RecvError> {
        self.arrived.subscribe().wait_for(|&k| k >= n).await.map(|_| ())
    }

    /// Lets request `i` (counted from 0 in arrival order) complete.
    fn release(&self, i: usize) {
        if let Some(tx) = lock(&self.waiting).get_mut(i).and_then(Option::take) {
            let _ = tx.send(());
        }
    }
}

/// A memory store answering like a networked one: `head` reads the state when called
/// but resolves only once released, and `append` stores the batch when called (it is
/// visible in the head) but resolves only once released.
struct Gated {
    inner: MemoryStore,
    heads: Gate,
    appends: Gate,
}

fn released<T: Send + 'static>(
    open: tokio::sync::oneshot::Receiver<()>,
    then: crate::store::StoreFuture<T>,
) -> crate::store::StoreFuture<T> {
    Box::pin(async move {
        open.await.map_err(|_| StoreError::Closed)?;
        then.await
    })
}

impl Store for Arc<Gated> {
    fn append(&self, topic: &TopicName, batch: Vec<NewMessage>) -> crate::store::StoreFuture<Appended> {
        let appended = self.inner.append(topic, batch);
        released(self.appends.enter(), appended)
    }
    fn read(&self, topic: &TopicName, from: u64, until: u64, limit: usize) -> crate::store::StoreFuture<History> {
        self.inner.read(topic, from, until, limit)
    }
    fn head(&self, topic: &TopicName) -> crate::store::StoreFuture<TopicHead> {
        let head = self.inner.head(topic);
        released(self.heads.enter(), head)
    }
    fn delete(&self, topic: &TopicName) -> crate::store::StoreFuture<Epoch> {
        self.inner.delete(topic)
    }
    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> crate::store::StoreFuture<Vec<ListedTopic>> {
        self.inner.list(prefix, after, limit)
    }
    fn queue_append(
        &self,
        queue: &crate::name::QueueName,
        records: Vec<crate::store::QueueRecord>,
    ) -> crate::store::StoreFuture<()> {
        self.inner.queue_append(queue, records)
    }
    fn queue_remove(&self, queue: &crate::name::QueueName, ids: Vec<u64>) {
        self.inner.queue_remove(queue, ids)
    }
    fn sweep(&self) {}
    fn is_ready(&self) -> bool {
        true
    }
}

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn gated() -> (Broker, Arc<Gated>) {
    let inner = MemoryStore::new(RetentionConfig::default());
    let store = Arc::new(Gated { inner, heads: Gate::default(), appends: Gate::default() });
    (Broker::new(Arc::new(store.clone()), BrokerConfig::default()), store)
}

/// Starts a publish whose append stays pending until `appends.release(i)`.
async fn start_publish(
    b: &Broker,
    store: &Gated,
    i: usize,
) -> Result<tokio::task::JoinHandle<Result<Published, BrokerError>>, Box<dyn std::error::Error>> {
    let (b, t) = (b.clone(), topic());
    let publish = tokio::spawn(async move { b.publish(&t, text("m")).await });
    store.appends.arrived(i + 1).await?;
    Ok(publish)
}

/// Publishes and fans out the append that is request `i`.
async fn publish_released(b: &Broker, store: &Gated, i: usize) -> TestResult {
    let publish = start_publish(b, store, i).await?;
    store.appends.release(i);
    publish.await??;
    Ok(())
}

/// Starts a subscribe whose head stays pending until `heads.release(i)`.
async fn start_subscribe(
    b: &Broker,
    store: &Gated,
    i: usize,
    from: StartFrom,
    sink: &Arc<Collect>,
) -> Result<tokio::task::JoinHandle<Result<Subscribed, BrokerError>>, Box<dyn std::error::Error>> {
    let (b, t, sink) = (b.clone(), topic(), sink.clone());
    let sub = tokio::spawn(async move { b.subscribe(&t, from, None, sink).await });
    store.heads.arrived(i + 1).await?;
    Ok(sub)
}

/// The offsets a subscription received: its replay, then what came live.
async fn received(sub: Subscribed, sink: &Collect) -> Result<Vec<u64>, BrokerError> {
    let mut offsets = Vec::new();
    if let Some(mut replay) = sub.replay {
        while let Some(chunk) = replay.next_chunk(2).await? {
            offsets.extend(chunk.iter().map(|m| m.offset));
        }
        replay.finish();
    }
    offsets.extend(sink.offsets());
    Ok(offsets)
}

#[tokio::test]
async fn a_pending_head_loses_and_repeats_nothing_published_meanwhile() -> TestResult {
    let (b, store) = gated();
    publish_released(&b, &store, 0).await?;
    publish_released(&b, &store, 1).await?;
    let s = Arc::new(Collect::default());
    let sub = start_subscribe(&b, &store, 0, StartFrom::Earliest, &s).await?;
    for i in 2..5 {
        publish_released(&b, &store, i).await?;
    }
    assert!(s.offsets().is_empty(), "nothing goes out before the head is known");
    assert_eq!(b.subscriber_count(&topic()), 0, "registered while pending, counted once answered");
    store.heads.release(0);
    let sub = sub.await??;
    assert_eq!((sub.next, sub.recovered), (6, true));
    publish_released(&b, &store, 5).await?;
    assert_eq!(received(sub, &s).await?, [1, 2, 3, 4, 5, 6]);
    Ok(())
}

#[tokio::test]
async fn two_pending_heads_on_a_fresh_topic_each_get_everything_once() -> TestResult {
    let (b, store) = gated();
    let (first, second) = (Arc::new(Collect::default()), Arc::new(Collect::default()));
    let first_sub = start_subscribe(&b, &store, 0, StartFrom::Earliest, &first).await?;
    publish_released(&b, &store, 0).await?;
    let second_sub = start_subscribe(&b, &store, 1, StartFrom::Earliest, &second).await?;
    publish_released(&b, &store, 1).await?;
    // The later head (which counts message 1) arrives first and sets where fan-out starts.
    store.heads.release(1);
    let second_sub = second_sub.await??;
    assert_eq!(second_sub.next, 3);
    publish_released(&b, &store, 2).await?;
    store.heads.release(0);
    let first_sub = first_sub.await??;
    assert_eq!(first_sub.next, 4, "the topic's watermark, not the older head's");
    publish_released(&b, &store, 3).await?;
    assert_eq!(received(first_sub, &first).await?, [1, 2, 3, 4]);
    assert_eq!(received(second_sub, &second).await?, [1, 2, 3, 4]);
    assert_eq!(b.subscriber_count(&topic()), 2);
    Ok(())
}

#[tokio::test]
async fn an_append_resolving_while_the_head_is_pending_is_replayed_or_live_once() -> TestResult {
    let (b, store) = gated();
    // Stored before the head is read, fanned out after it: counted by the head.
    let before = start_publish(&b, &store, 0).await?;
    let s = Arc::new(Collect::default());
    let sub = start_subscribe(&b, &store, 0, StartFrom::Earliest, &s).await?;
    // Stored after the head is read: not counted by it.
    let after = start_publish(&b, &store, 1).await?;
    store.appends.release(1);
    store.appends.release(0);
    before.await??;
    after.await??;
    store.heads.release(0);
    let sub = sub.await??;
    publish_released(&b, &store, 2).await?;
    assert_eq!(received(sub, &s).await?, [1, 2, 3]);

    // The same for a subscriber from now on: what resolved before it was attached is
    // not delivered, what resolved after it is, once.
    let latest = Arc::new(Collect::default());
    let sub = start_subscribe(&b, &store, 1, StartFrom::Latest, &latest).await?;
    let meanwhile = start_publish(&b, &store, 3).await?;
    store.appends.release(3);
    meanwhile.await??;
    store.heads.release(1);
    let sub = sub.await??;
    assert_eq!((sub.next, sub.replay.is_none()), (5, true));
    publish_released(&b, &store, 4).await?;
    assert_eq!(latest.offsets(), [5]);
    Ok(())
}

#[tokio::test]
async fn a_subscribe_given_up_while_its_head_is_pending_leaves_nothing() -> TestResult {
    let (b, store) = gated();
    let s = Arc::new(Collect::default());
    let sub = start_subscribe(&b, &store, 0, StartFrom::Earliest, &s).await?;
    sub.abort();
    assert!(sub.await.is_err_and(|e| e.is_cancelled()));
    assert_eq!(b.subscriber_count(&topic()), 0);
    assert!(!lock(b.shard(&topic())).contains_key(&topic()), "the waiting topic is gone");
    assert_eq!(b.metrics().subscriptions.load(Ordering::Relaxed), 0);
    Ok(())
}
