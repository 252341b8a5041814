use super::*;
use crate::config::RetentionConfig;
use crate::memory::MemoryStore;
use crate::message::Kind;

#[derive(Default)]
struct Collect(Mutex<Vec<u64>>);

impl Subscriber for Collect {
    fn deliver(&self, msg: &Arc<Message>) -> bool {
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
    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<ListedTopic>, StoreError> {
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
