//! Core fan-out: publish one 128-byte message to a topic with 1000 in-process
//! subscribers. Two sinks: a counter (the broker's own cost: ordering, the subscriber
//! loop) and real outbound queues drained in batches as a connection writer would.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald_core::{
    outbound, Broker, BrokerConfig, Item, Kind, MemoryStore, NewMessage, OutboundRx, Outgoing, RetentionConfig,
    StartFrom, Subscriber, TopicName,
};

const SUBSCRIBERS: usize = 1000;

struct Counter(AtomicU64);

impl Subscriber for Counter {
    fn deliver(&self, _msg: &Outgoing) -> bool {
        self.0.fetch_add(1, Ordering::Relaxed);
        true
    }
    fn overflow(&self) {}
}

fn broker() -> Broker {
    let store = MemoryStore::new(RetentionConfig { max_messages: 10_000, ..Default::default() });
    Broker::new(Arc::new(store), BrokerConfig::default())
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let topic = TopicName::parse("bench").expect("name");
    let payload = bytes::Bytes::from(vec![b'x'; 128]);
    let mut group = c.benchmark_group("fanout_1000_subscribers");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));

    let b = broker();
    let counter = Arc::new(Counter(AtomicU64::new(0)));
    for _ in 0..SUBSCRIBERS {
        rt.block_on(b.subscribe(&topic, StartFrom::Latest, None, counter.clone())).expect("subscribe");
    }
    group.bench_function("counting_sinks", |bench| {
        bench.iter(|| {
            let msg = NewMessage::new(Kind::Text, payload.clone());
            rt.block_on(b.publish(&topic, msg)).expect("publish");
        })
    });

    let b = broker();
    let mut receivers: Vec<OutboundRx<()>> = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let (tx, rx) = outbound::<()>(b.config().outbound);
        rt.block_on(b.subscribe(&topic, StartFrom::Latest, None, tx)).expect("subscribe");
        receivers.push(rx);
    }
    let mut buf: Vec<Item<()>> = Vec::with_capacity(256);
    let mut published = 0u64;
    group.bench_function("outbound_queues", |bench| {
        bench.iter(|| {
            let msg = NewMessage::new(Kind::Text, payload.clone());
            rt.block_on(b.publish(&topic, msg)).expect("publish");
            published += 1;
            // Drain like connection writers do: a batch at a time.
            if published.is_multiple_of(64) {
                rt.block_on(async {
                    for rx in &mut receivers {
                        let n = rx.recv_many(&mut buf, 256).await;
                        let bytes: usize = buf.drain(..n).map(|i| black_box(i).size()).sum();
                        rx.written(bytes);
                    }
                });
            }
        })
    });
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
