//! The gRPC front door over real sockets, with a real tonic client: every RPC of
//! `herald.v1.Topics` and `herald.v1.Queues`, their errors as status codes, reflection,
//! shutdown, encode-once fan-out, and messages crossing between gRPC, WebSocket and SSE.

mod common;

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::{eventually, raw_next, start, within, Result, TestServer};
use futures_util::{SinkExt, StreamExt};
use herald_client::grpc::pb;
use herald_client::{ClientError, Delivery, GrpcClient, Payload, StartFrom};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(20);

async fn grpc(server: &TestServer) -> Result<GrpcClient> {
    Ok(GrpcClient::connect(&server.url).await?)
}

/// Asserts a call failed with `code` and a message starting with Herald's `word`.
#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: std::result::Result<T, tonic::Status>, code: Code, word: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} {word}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(
                s.message().starts_with(&format!("{word}: ")),
                "message {:?} should start with {word}",
                s.message()
            );
        }
    }
}

fn publish(topic: &str, kind: pb::Kind, content_type: &str, data: &[u8]) -> pb::PublishRequest {
    pb::PublishRequest {
        topic: topic.into(),
        data: Bytes::copy_from_slice(data),
        kind: kind as i32,
        content_type: content_type.into(),
        ttl_ms: None,
    }
}

fn batch_message(kind: pb::Kind, data: &[u8]) -> pb::BatchMessage {
    pb::BatchMessage { data: Bytes::copy_from_slice(data), kind: kind as i32, ..Default::default() }
}

#[tokio::test]
async fn topics_publish_fetch_info_list_delete() -> Result {
    let server = start(|_| {}).await?;
    let client = grpc(&server).await?;
    let mut topics = client.topics();
    let sent = [
        (publish("g.news", pb::Kind::Text, "", b"hello"), pb::Kind::Text),
        (
            publish("g.news", pb::Kind::Unspecified, "application/json; charset=utf-8", br#"{"price": 12.50}"#),
            pb::Kind::Json,
        ),
        (publish("g.news", pb::Kind::Unspecified, "", &[0, 1, 2, 255]), pb::Kind::Binary),
        (publish("g.news", pb::Kind::Unspecified, "Text/Plain", b"typed by content type"), pb::Kind::Text),
    ];
    for (i, (request, _)) in sent.iter().enumerate() {
        let r = topics.publish(request.clone()).await?.into_inner();
        assert_eq!((r.topic.as_str(), r.offset), ("g.news", i as u64 + 1));
        assert!(r.ts > 0);
    }

    let page = topics.fetch(pb::FetchRequest { topic: "g.news".into(), from: 0, limit: 0 }).await?.into_inner();
    assert!(!page.epoch.is_empty());
    assert_eq!(page.next, 5);
    assert_eq!(page.messages.len(), 4);
    for (m, (request, kind)) in page.messages.iter().zip(&sent) {
        assert_eq!(m.data, request.data, "payload kept byte for byte");
        assert_eq!(m.kind, *kind as i32);
        assert_eq!(m.topic, "g.news");
    }
    let content_types: Vec<&str> = page.messages.iter().map(|m| m.content_type.as_str()).collect();
    assert_eq!(
        content_types,
        ["text/plain; charset=utf-8", "application/json", "application/octet-stream", "text/plain; charset=utf-8"]
    );
    // The JSON views see the same messages: JSON exactly as sent, binary as base64.
    let (_, http) = server.get_json("/v1/topics/g.news/messages?from=2&limit=2").await?;
    assert_eq!(http["messages"][0]["data"], json!({"price": 12.50}));
    assert_eq!(http["messages"][1]["data_b64"], "AAEC/w==");

    let page = topics.fetch(pb::FetchRequest { topic: "g.news".into(), from: 3, limit: 1 }).await?.into_inner();
    assert_eq!(page.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), [3]);
    assert_eq!(page.next, 4);
    let page = topics.fetch(pb::FetchRequest { topic: "g.never".into(), from: 7, limit: 5 }).await?.into_inner();
    assert_eq!((page.messages.len(), page.next), (0, 1), "never published: next is 1");

    let info = topics.info(pb::TopicInfoRequest { topic: "g.news".into() }).await?.into_inner();
    assert_eq!((info.first, info.last, info.retained, info.subscribers), (1, 4, 4, 0));
    assert_eq!(info.epoch, page.epoch.clone().max(info.epoch.clone()));

    topics.publish(publish("g.other", pb::Kind::Text, "", b"x")).await?;
    let list = topics.list(pb::ListTopicsRequest { prefix: "g.".into(), after: String::new(), limit: 0 }).await?;
    let names: Vec<(String, u64)> = list.into_inner().topics.into_iter().map(|t| (t.topic, t.last)).collect();
    assert_eq!(names, [("g.news".to_owned(), 4), ("g.other".to_owned(), 1)]);
    let list = topics.list(pb::ListTopicsRequest { prefix: "g.".into(), after: "g.news".into(), limit: 1 }).await?;
    assert_eq!(list.into_inner().topics.len(), 1);

    topics.delete(pb::DeleteTopicRequest { topic: "g.news".into() }).await?;
    let after = topics.info(pb::TopicInfoRequest { topic: "g.news".into() }).await?.into_inner();
    assert_eq!((after.first, after.last, after.retained), (0, 0, 0));
    assert_ne!(after.epoch, info.epoch, "delete starts a new epoch");
    let r = topics.publish(publish("g.news", pb::Kind::Text, "", b"again")).await?.into_inner();
    assert_eq!(r.offset, 1, "offsets start again");
    Ok(())
}

#[tokio::test]
async fn publish_batch_is_atomic_with_consecutive_offsets() -> Result {
    let server = start(|_| {}).await?;
    let client = grpc(&server).await?;
    client.publish("g.batch", pb::Kind::Text, "first").await?;
    let batch = vec![
        batch_message(pb::Kind::Json, b"[1, 2]"),
        batch_message(pb::Kind::Text, b"two"),
        batch_message(pb::Kind::Binary, &[9, 9]),
    ];
    let published = client.publish_batch("g.batch", batch).await?;
    assert_eq!(published.iter().map(|p| p.offset).collect::<Vec<_>>(), [2, 3, 4]);
    assert!(published.windows(2).all(|w| w[0].ts <= w[1].ts));

    // One bad message fails the whole batch and publishes nothing.
    let bad = vec![batch_message(pb::Kind::Text, b"fine"), batch_message(pb::Kind::Json, b"{nope")];
    match client.publish_batch("g.batch", bad).await {
        Err(ClientError::Grpc(s)) => assert_status::<()>(Err(*s), Code::InvalidArgument, "bad_request"),
        other => panic!("expected bad_request, got {other:?}"),
    }
    let mut topics = client.topics();
    assert_status(
        topics.publish_batch(pb::PublishBatchRequest { topic: "g.batch".into(), messages: vec![] }).await,
        Code::InvalidArgument,
        "bad_request",
    );
    let too_many = vec![batch_message(pb::Kind::Text, b"m"); 1001];
    assert_status(
        topics.publish_batch(pb::PublishBatchRequest { topic: "g.batch".into(), messages: too_many }).await,
        Code::InvalidArgument,
        "bad_request",
    );
    let info = topics.info(pb::TopicInfoRequest { topic: "g.batch".into() }).await?.into_inner();
    assert_eq!(info.last, 4, "nothing of the failed batches was published");
    Ok(())
}

#[tokio::test]
async fn subscribe_replays_then_goes_live_and_checks_the_epoch() -> Result {
    let server = start(|_| {}).await?;
    let client = grpc(&server).await?;
    for i in 1..=5 {
        client.publish("g.sub", pb::Kind::Text, format!("m{i}")).await?;
    }
    let mut earliest = client.subscribe("g.sub", StartFrom::Earliest, None).await?;
    assert_eq!((earliest.subscribed.next, earliest.subscribed.recovered), (6, true));
    let epoch = earliest.subscribed.epoch.clone();
    for i in 1..=5 {
        let m = within(LIMIT, "replay", earliest.next()).await??.ok_or("ended")?;
        assert_eq!((m.offset, &m.data[..]), (i, format!("m{i}").as_bytes()));
    }
    client.publish("g.sub", pb::Kind::Text, "m6").await?;
    assert_eq!(within(LIMIT, "live", earliest.next()).await??.ok_or("ended")?.offset, 6);

    let mut resumed = client.subscribe("g.sub", StartFrom::Offset(4), Some(epoch.clone())).await?;
    assert!(resumed.subscribed.recovered);
    for i in 4..=6 {
        assert_eq!(within(LIMIT, "resume", resumed.next()).await??.ok_or("ended")?.offset, i);
    }
    // Another history's epoch: nothing replayed, live only.
    let mut stale = client.subscribe("g.sub", StartFrom::Offset(2), Some("another-epoch".into())).await?;
    assert_eq!((stale.subscribed.recovered, stale.subscribed.next), (false, 7));
    let mut latest = client.subscribe("g.sub", StartFrom::Latest, None).await?;
    assert_eq!((latest.subscribed.next, latest.subscribed.recovered), (7, true));
    assert_eq!(server.subscribers("g.sub").await?, 4, "gRPC subscriptions count as subscribers");

    client.publish("g.sub", pb::Kind::Json, r#"{"n":7}"#).await?;
    for sub in [&mut earliest, &mut resumed, &mut stale, &mut latest] {
        let m = within(LIMIT, "live 7", sub.next()).await??.ok_or("ended")?;
        assert_eq!((m.offset, m.kind, &m.data[..]), (7, pb::Kind::Json as i32, &br#"{"n":7}"#[..]));
    }
    // Dropping a stream ends its subscription.
    drop((earliest, resumed, stale, latest));
    eventually(LIMIT, "subscriptions gone", || async { Ok(server.subscribers("g.sub").await? == 0) }).await?;
    Ok(())
}

#[tokio::test]
async fn queues_every_rpc() -> Result {
    let server = start(|c| c.broker.queues.max_attempts = 2).await?;
    let client = grpc(&server).await?;
    let mut queues = client.queues();
    let enqueue = |queue: &str, kind: pb::Kind, data: &[u8]| pb::EnqueueRequest {
        queue: queue.into(),
        data: Bytes::copy_from_slice(data),
        kind: kind as i32,
        ..Default::default()
    };
    let a = queues.enqueue(enqueue("g.jobs", pb::Kind::Json, br#"{"job":1}"#)).await?.into_inner();
    let b = queues.enqueue(enqueue("g.jobs", pb::Kind::Text, b"job 2")).await?.into_inner();
    assert_eq!((a.queue.as_str(), a.message_id + 1), ("g.jobs", b.message_id));
    let mut delayed = enqueue("g.jobs", pb::Kind::Binary, &[1]);
    delayed.delay_ms = 3_600_000;
    queues.enqueue(delayed).await?;
    let stats = queues.stats(pb::QueueStatsRequest { queue: "g.jobs".into() }).await?.into_inner();
    assert_eq!((stats.ready, stats.in_flight, stats.delayed, stats.dead), (2, 0, 1, 0));

    let fetch = |max, visibility_ms, wait_ms| pb::QueueFetchRequest {
        queue: "g.jobs".into(),
        max,
        visibility_ms,
        wait_ms,
        ack: Vec::new(),
    };
    let jobs = queues.fetch(fetch(10, 0, 0)).await?.into_inner().messages;
    assert_eq!(jobs.len(), 2, "the delayed one is not ready");
    assert_eq!((jobs[0].message_id, jobs[0].attempt, jobs[0].kind), (a.message_id, 1, pb::Kind::Json as i32));
    assert_eq!(&jobs[0].data[..], br#"{"job":1}"#);
    assert_eq!((jobs[1].kind, jobs[1].content_type.as_str()), (pb::Kind::Text as i32, "text/plain; charset=utf-8"));

    queues.ack(pb::AckRequest { queue: "g.jobs".into(), id: jobs[0].id.clone() }).await?;
    queues.extend(pb::ExtendRequest { queue: "g.jobs".into(), id: jobs[1].id.clone(), visibility_ms: 60_000 }).await?;
    queues.requeue(pb::RequeueRequest { queue: "g.jobs".into(), id: jobs[1].id.clone(), delay_ms: 0 }).await?;
    let again = queues.fetch(fetch(1, 60_000, 0)).await?.into_inner().messages;
    assert_eq!((again[0].message_id, again[0].attempt), (b.message_id, 2));
    assert_ne!(again[0].id, jobs[1].id, "a new delivery id per delivery");

    // The second attempt was the last: a requeue dead-letters it.
    queues.requeue(pb::RequeueRequest { queue: "g.jobs".into(), id: again[0].id.clone(), delay_ms: 0 }).await?;
    let stats = queues.stats(pb::QueueStatsRequest { queue: "g.jobs".into() }).await?.into_inner();
    assert_eq!((stats.ready, stats.in_flight, stats.delayed, stats.dead), (0, 0, 1, 1));
    let dead = queues
        .fetch(pb::QueueFetchRequest { queue: "g.jobs.dlq".into(), max: 1, visibility_ms: 1000, ..Default::default() })
        .await?
        .into_inner()
        .messages;
    assert_eq!((dead[0].attempt, &dead[0].data[..]), (1, &b"job 2"[..]));
    queues.ack(pb::AckRequest { queue: "g.jobs.dlq".into(), id: dead[0].id.clone() }).await?;

    // List: by name, with the counts, paged; not the dead-letter queue.
    queues.enqueue(enqueue("g.mail", pb::Kind::Text, b"m")).await?;
    let list = |after: &str, limit| pb::ListQueuesRequest { prefix: "g.".into(), after: after.into(), limit };
    let listed = queues.list(list("", 0)).await?.into_inner().queues;
    let names: Vec<&str> = listed.iter().map(|q| q.queue.as_str()).collect();
    assert_eq!(names, ["g.jobs", "g.mail"]);
    assert_eq!((listed[0].ready, listed[0].delayed, listed[0].dead), (0, 1, 0));
    let page = queues.list(list("g.jobs", 1)).await?.into_inner().queues;
    assert_eq!((page.len(), page[0].queue.as_str(), page[0].ready), (1, "g.mail", 1));
    let refused = queues.list(list("", 1001)).await.err().ok_or("limit 1001 accepted")?;
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // A long poll is answered as soon as a job is enqueued.
    let waiting = {
        let mut queues = client.queues();
        tokio::spawn(async move { queues.fetch(fetch(1, 0, 20_000)).await })
    };
    eventually(LIMIT, "long poll waiting", || async { Ok(server.metric("herald_queue_waiters").await? == 1) }).await?;
    queues.enqueue(enqueue("g.jobs", pb::Kind::Text, b"wake up")).await?;
    let woken = within(LIMIT, "long poll", waiting).await???.into_inner().messages;
    assert_eq!(&woken[0].data[..], b"wake up");
    Ok(())
}

/// `EnqueueBatch` and `AckBatch`: ids in order, kinds and delays kept, entries checked
/// before any is stored, per-entry outcomes when some fail.
#[tokio::test]
async fn queue_batches() -> Result {
    let server = start(|c| {
        c.broker.queues.max_queue_messages = 3;
        c.broker.max_message_bytes = 16;
    })
    .await?;
    let mut queues = grpc(&server).await?.queues();
    let entry = |kind: pb::Kind, data: &[u8], delay_ms| pb::EnqueueEntry {
        data: Bytes::copy_from_slice(data),
        kind: kind as i32,
        delay_ms,
        ..Default::default()
    };
    let batch = |queue: &str, messages| pb::EnqueueBatchRequest { queue: queue.into(), messages };
    let done = queues
        .enqueue_batch(batch(
            "gb",
            vec![
                entry(pb::Kind::Json, br#"{"n":1}"#, 0),
                entry(pb::Kind::Text, b"two", 0),
                entry(pb::Kind::Binary, &[3], 60_000),
            ],
        ))
        .await?
        .into_inner();
    assert_eq!((done.queue.as_str(), done.message_ids.len(), done.errors.len()), ("gb", 3, 0));
    assert!(done.message_ids.windows(2).all(|w| w[0] < w[1]), "{:?}", done.message_ids);
    let jobs = queues
        .fetch(pb::QueueFetchRequest { queue: "gb".into(), max: 10, ..Default::default() })
        .await?
        .into_inner()
        .messages;
    let got: Vec<(u64, i32, &[u8])> = jobs.iter().map(|j| (j.message_id, j.kind, &j.data[..])).collect();
    assert_eq!(
        got,
        [
            (done.message_ids[0], pb::Kind::Json as i32, &br#"{"n":1}"#[..]),
            (done.message_ids[1], pb::Kind::Text as i32, b"two")
        ]
    );
    let mut ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    ids.push("1-1-stale".into());
    let acked = queues.ack_batch(pb::AckBatchRequest { queue: "gb".into(), ids: ids.clone() }).await?.into_inner();
    assert_eq!((acked.acked, acked.errors.len()), (2, 1));
    assert_eq!((acked.errors[0].index, acked.errors[0].code.as_str()), (2, "not_found"));
    assert_status(
        queues.ack_batch(pb::AckBatchRequest { queue: "gb".into(), ids: ids[..1].to_vec() }).await,
        Code::NotFound,
        "not_found",
    );

    // Checked whole before anything is stored.
    let refused = [
        (batch("gb", Vec::new()), Code::InvalidArgument, "bad_request"),
        (batch("gb", vec![entry(pb::Kind::Text, b"x", 0); 1001]), Code::InvalidArgument, "bad_request"),
        (batch("gb.dlq", vec![entry(pb::Kind::Text, b"x", 0)]), Code::InvalidArgument, "invalid_name"),
        (batch("a..b", vec![entry(pb::Kind::Text, b"x", 0)]), Code::InvalidArgument, "invalid_name"),
        (
            batch("gb", vec![entry(pb::Kind::Text, b"x", 0), entry(pb::Kind::Text, &[b'x'; 17], 0)]),
            Code::ResourceExhausted,
            "too_large",
        ),
        (batch("gb", vec![entry(pb::Kind::Json, b"{nope", 0)]), Code::InvalidArgument, "bad_request"),
    ];
    for (request, code, word) in refused {
        assert_status(queues.enqueue_batch(request).await, code, word);
    }
    let stats = queues.stats(pb::QueueStatsRequest { queue: "gb".into() }).await?.into_inner();
    assert_eq!((stats.ready, stats.delayed), (0, 1), "nothing of a refused batch stored");
    // Room for two more (the delayed job counts): the third entry is refused alone.
    let part = queues.enqueue_batch(batch("gb", vec![entry(pb::Kind::Text, b"a", 0); 3])).await?.into_inner();
    assert_eq!(part.message_ids.iter().filter(|&&id| id > 0).count(), 2, "{part:?}");
    assert_eq!((part.message_ids[2], part.errors.len()), (0, 1), "{part:?}");
    assert_eq!((part.errors[0].index, part.errors[0].code.as_str()), (2, "rate_limited"));
    assert_status(
        queues.ack_batch(pb::AckBatchRequest { queue: "gb".into(), ids: vec!["not*valid".into()] }).await,
        Code::InvalidArgument,
        "bad_request",
    );

    // A fetch that acks: the two ready jobs, one call each after the first.
    let fetch = |ack: Vec<String>| pb::QueueFetchRequest { queue: "gb".into(), max: 1, ack, ..Default::default() };
    let first = queues.fetch(fetch(Vec::new())).await?.into_inner();
    assert_eq!((first.messages.len(), first.acked, first.ack_errors.len()), (1, 0, 0));
    let second = queues.fetch(fetch(vec![first.messages[0].id.clone(), "1-1-stale".into()])).await?.into_inner();
    assert_eq!((second.messages.len(), second.acked, second.ack_errors.len()), (1, 1, 1), "{second:?}");
    assert_eq!((second.ack_errors[0].index, second.ack_errors[0].code.as_str()), (1, "not_found"));
    assert_ne!(second.messages[0].message_id, first.messages[0].message_id);
    for bad in [vec!["not*valid".to_owned()], vec![second.messages[0].id.clone(); 1001]] {
        assert_status(queues.fetch(fetch(bad)).await, Code::InvalidArgument, "bad_request");
    }
    let stats = queues.stats(pb::QueueStatsRequest { queue: "gb".into() }).await?.into_inner();
    assert_eq!((stats.ready, stats.in_flight), (0, 1), "a refused fetch acks nothing");
    let last = queues.fetch(fetch(vec![second.messages[0].id.clone()])).await?.into_inner();
    assert_eq!((last.messages.len(), last.acked, last.ack_errors.len()), (0, 1, 0));
    let stats = queues.stats(pb::QueueStatsRequest { queue: "gb".into() }).await?.into_inner();
    assert_eq!((stats.ready, stats.in_flight, stats.delayed), (0, 0, 1));
    Ok(())
}

#[tokio::test]
async fn errors_are_status_codes_with_the_code_word() -> Result {
    let server = start(|c| {
        c.broker.max_message_bytes = 1024;
        c.grpc.max_request_bytes = 100_000;
    })
    .await?;
    let client = grpc(&server).await?;
    let (mut topics, mut queues) = (client.topics(), client.queues());

    // invalid_name, checked first.
    assert_status(
        topics.publish(publish("a..b", pb::Kind::Json, "", b"{nope")).await,
        Code::InvalidArgument,
        "invalid_name",
    );
    assert_status(
        topics.fetch(pb::FetchRequest { topic: "no spaces".into(), ..Default::default() }).await,
        Code::InvalidArgument,
        "invalid_name",
    );
    assert_status(
        topics.subscribe(pb::SubscribeRequest { topic: ".x".into(), ..Default::default() }).await,
        Code::InvalidArgument,
        "invalid_name",
    );
    assert_status(
        queues.enqueue(pb::EnqueueRequest { queue: "".into(), ..Default::default() }).await,
        Code::InvalidArgument,
        "invalid_name",
    );
    assert_status(
        queues.enqueue(pb::EnqueueRequest { queue: "jobs.dlq".into(), ..Default::default() }).await,
        Code::InvalidArgument,
        "invalid_name",
    );
    // bad_request: payloads that break their kind's rules, values out of range.
    assert_status(
        topics.publish(publish("t", pb::Kind::Json, "", b"{nope")).await,
        Code::InvalidArgument,
        "bad_request",
    );
    assert_status(
        topics.publish(publish("t", pb::Kind::Text, "", &[0xff])).await,
        Code::InvalidArgument,
        "bad_request",
    );
    let mut unknown_kind = publish("t", pb::Kind::Text, "", b"x");
    unknown_kind.kind = 42;
    assert_status(topics.publish(unknown_kind).await, Code::InvalidArgument, "bad_request");
    assert_status(
        topics.fetch(pb::FetchRequest { topic: "t".into(), from: 0, limit: 1001 }).await,
        Code::InvalidArgument,
        "bad_request",
    );
    let fetch = |max, visibility_ms, wait_ms| pb::QueueFetchRequest {
        queue: "q".into(),
        max,
        visibility_ms,
        wait_ms,
        ack: Vec::new(),
    };
    assert_status(queues.fetch(fetch(101, 0, 0)).await, Code::InvalidArgument, "bad_request");
    assert_status(queues.fetch(fetch(1, 43_200_001, 0)).await, Code::InvalidArgument, "bad_request");
    assert_status(queues.fetch(fetch(1, 0, 20_001)).await, Code::InvalidArgument, "bad_request");
    assert_status(
        queues.ack(pb::AckRequest { queue: "q".into(), id: "not/an/id".into() }).await,
        Code::InvalidArgument,
        "bad_request",
    );
    // too_large -> RESOURCE_EXHAUSTED, on every way in.
    let big = vec![b'x'; 1025];
    assert_status(topics.publish(publish("t", pb::Kind::Text, "", &big)).await, Code::ResourceExhausted, "too_large");
    assert_status(
        topics
            .publish_batch(pb::PublishBatchRequest {
                topic: "t".into(),
                messages: vec![batch_message(pb::Kind::Binary, &big)],
            })
            .await,
        Code::ResourceExhausted,
        "too_large",
    );
    assert_status(
        queues.enqueue(pb::EnqueueRequest { queue: "q".into(), data: big.into(), ..Default::default() }).await,
        Code::ResourceExhausted,
        "too_large",
    );
    // not_found: a delivery id that is not current.
    queues.enqueue(pb::EnqueueRequest { queue: "q".into(), data: "job".into(), ..Default::default() }).await?;
    let job = queues.fetch(fetch(1, 60_000, 0)).await?.into_inner().messages.remove(0);
    queues.ack(pb::AckRequest { queue: "q".into(), id: job.id.clone() }).await?;
    assert_status(
        queues.ack(pb::AckRequest { queue: "q".into(), id: job.id.clone() }).await,
        Code::NotFound,
        "not_found",
    );
    assert_status(
        queues.requeue(pb::RequeueRequest { queue: "q".into(), id: job.id.clone(), delay_ms: 0 }).await,
        Code::NotFound,
        "not_found",
    );
    assert_status(
        queues.extend(pb::ExtendRequest { queue: "q".into(), id: job.id.clone(), visibility_ms: 1000 }).await,
        Code::NotFound,
        "not_found",
    );
    assert_status(
        queues.ack(pb::AckRequest { queue: "never.used".into(), id: "1-1-abc".into() }).await,
        Code::NotFound,
        "not_found",
    );
    assert_status(
        queues.extend(pb::ExtendRequest { queue: "q".into(), id: job.id, visibility_ms: 0 }).await,
        Code::InvalidArgument,
        "bad_request",
    );
    // A request message over max_grpc_request_bytes is refused by the gRPC layer.
    let huge = vec![batch_message(pb::Kind::Binary, &[0; 1000]); 200];
    let refused = topics.publish_batch(pb::PublishBatchRequest { topic: "t".into(), messages: huge }).await;
    assert_eq!(refused.map(|_| ()).map_err(|s| s.code()), Err(Code::OutOfRange));
    // The connection is still fine after all of that.
    client.publish("t", pb::Kind::Text, "still here").await?;
    Ok(())
}

#[tokio::test]
async fn calls_are_refused_at_the_connection_limit() -> Result {
    let server = start(|c| c.http.max_connections = 1).await?;
    let client = grpc(&server).await?;
    let sub = client.subscribe("g.limit", StartFrom::Latest, None).await?;
    // The open Subscribe stream is the one connection allowed.
    assert_eq!(server.metric("herald_connections").await?, 1);
    match client.publish("g.limit", pb::Kind::Text, "x").await {
        Err(ClientError::Grpc(s)) => assert_status::<()>(Err(*s), Code::Unavailable, "unavailable"),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    drop(sub);
    eventually(LIMIT, "stream closed", || async { Ok(server.metric("herald_connections").await? == 0) }).await?;
    client.publish("g.limit", pb::Kind::Text, "x").await?;
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() -> Result {
    let server = start(|_| {}).await?;
    let client = grpc(&server).await?;
    let mut sub = client.subscribe("g.down", StartFrom::Latest, None).await?;
    let long_poll = {
        let mut queues = client.queues();
        tokio::spawn(async move {
            queues
                .fetch(pb::QueueFetchRequest { queue: "g.q".into(), max: 1, wait_ms: 20_000, ..Default::default() })
                .await
        })
    };
    eventually(LIMIT, "long poll waiting", || async { Ok(server.metric("herald_queue_waiters").await? == 1) }).await?;

    server.server.as_ref().ok_or("server")?.shutdown();
    match within(LIMIT, "stream end", sub.next()).await? {
        Err(ClientError::Grpc(s)) => {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            assert!(s.message().starts_with("unavailable: "), "{s:?}");
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    let answered = within(LIMIT, "long poll answered", long_poll).await??;
    assert!(answered?.into_inner().messages.is_empty(), "a pending long poll is answered with nothing");
    // New calls are refused (by Herald, or by the closed connection): UNAVAILABLE.
    match client.publish("g.down", pb::Kind::Text, "late").await {
        Err(ClientError::Grpc(s)) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    // The drain completes while the client still holds its HTTP/2 connection.
    let mut server = server;
    let stopped = server.server.take().ok_or("server")?;
    within(LIMIT, "server stopped", stopped.wait()).await??;
    drop(client);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_out_to_grpc_subscribers_encodes_each_message_once() -> Result {
    const SUBS: usize = 6;
    const N: u64 = 50;
    let server = start(|_| {}).await?;
    let client = grpc(&server).await?;
    let mut readers = Vec::new();
    for i in 0..SUBS {
        // Half share the publisher's connection, half have their own.
        let client = if i % 2 == 0 { client.clone() } else { grpc(&server).await? };
        let mut sub = client.subscribe("g.once", StartFrom::Latest, None).await?;
        readers.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            while offsets.len() < N as usize {
                offsets.push(sub.next().await?.ok_or("ended")?.offset);
            }
            Result::Ok(offsets)
        }));
    }
    for i in 0..N {
        client.publish("g.once", pb::Kind::Text, format!("m{i}")).await?;
    }
    for r in readers {
        assert_eq!(within(LIMIT, "subscriber", r).await???, (1..=N).collect::<Vec<_>>());
    }
    assert_eq!(server.metric("herald_encodes_total{form=\"grpc\"}").await?, N, "one encoding per message");
    Ok(())
}

/// Reads SSE events (`data:` lines joined) as JSON, skipping comments.
struct SseReader {
    response: reqwest::Response,
    buf: String,
}

impl SseReader {
    async fn open(server: &TestServer, topic: &str) -> Result<Self> {
        let mut response = server.http.get(format!("{}/v1/topics/{topic}/sse", server.url)).send().await?;
        assert_eq!(response.status(), 200);
        // The first chunk (": subscribed") arrives once the stream is live.
        let first = response.chunk().await?.ok_or("sse ended")?;
        Ok(Self { response, buf: String::from_utf8(first.to_vec())? })
    }

    async fn next(&mut self) -> Result<serde_json::Value> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                if !data.is_empty() {
                    return Ok(serde_json::from_str(&data.join("\n"))?);
                }
                continue;
            }
            let chunk = self.response.chunk().await?.ok_or("sse ended")?;
            self.buf.push_str(std::str::from_utf8(&chunk)?);
        }
    }
}

#[tokio::test]
async fn grpc_publishes_reach_websocket_and_sse_and_the_reverse() -> Result {
    let server = start(|_| {}).await?;
    let client = grpc(&server).await?;
    let mut json_ws = server.json_ws().await?;
    json_ws.subscribe("g.mix", StartFrom::Latest, None).await?;
    let mut raw = server.raw_ws("g.mix", "mode=sub").await?;
    let mut sse = SseReader::open(&server, "g.mix").await?;
    let mut sub = client.subscribe("g.mix", StartFrom::Latest, None).await?;
    assert_eq!(server.subscribers("g.mix").await?, 4);

    // gRPC -> WebSocket JSON, raw WebSocket, SSE (and the gRPC subscriber).
    client.publish("g.mix", pb::Kind::Json, r#"{"price": 12.50}"#).await?;
    client.publish("g.mix", pb::Kind::Text, "hello").await?;
    client.publish("g.mix", pb::Kind::Binary, vec![0u8, 1, 2]).await?;
    let expected = [
        Payload::Json(r#"{"price": 12.50}"#.into()),
        Payload::Json(r#""hello""#.into()),
        Payload::Binary(vec![0, 1, 2]),
    ];
    for (i, payload) in expected.iter().enumerate() {
        let d = Delivery::parse(&within(LIMIT, "json ws", json_ws.recv_text()).await??)?;
        assert_eq!((d.offset, &d.payload), (i as u64 + 1, payload));
    }
    assert_eq!(within(LIMIT, "raw", raw_next(&mut raw)).await??, WsMessage::text(r#"{"price": 12.50}"#));
    assert_eq!(within(LIMIT, "raw", raw_next(&mut raw)).await??, WsMessage::text("hello"));
    assert_eq!(within(LIMIT, "raw", raw_next(&mut raw)).await??, WsMessage::binary(vec![0u8, 1, 2]));
    let events = [
        within(LIMIT, "sse", sse.next()).await??,
        within(LIMIT, "sse", sse.next()).await??,
        within(LIMIT, "sse", sse.next()).await??,
    ];
    assert_eq!(events[0]["data"], json!({"price": 12.50}));
    assert_eq!((events[1]["offset"].as_u64(), &events[1]["data"]), (Some(2), &json!("hello")));
    assert_eq!(events[2]["data_b64"], base64::engine::general_purpose::STANDARD.encode([0u8, 1, 2]));
    for i in 1..=3 {
        assert_eq!(within(LIMIT, "grpc", sub.next()).await??.ok_or("ended")?.offset, i);
    }

    // HTTP, WebSocket JSON and raw WebSocket -> gRPC.
    let (status, _) = server.post("/v1/topics/g.mix/messages", Some("text/plain"), b"over http".to_vec()).await?;
    assert_eq!(status, 201);
    json_ws.publish("g.mix", json!({"n": 1.50})).await?;
    let mut raw_pub = server.raw_ws("g.mix", "mode=pub").await?;
    raw_pub.send(WsMessage::binary(vec![7u8, 8])).await?;
    let got: Vec<(u64, i32, Vec<u8>)> = {
        let mut got = Vec::new();
        for _ in 0..3 {
            let m = within(LIMIT, "grpc from others", sub.next()).await??.ok_or("ended")?;
            got.push((m.offset, m.kind, m.data.to_vec()));
        }
        got
    };
    assert_eq!(
        got,
        [
            (4, pb::Kind::Text as i32, b"over http".to_vec()),
            (5, pb::Kind::Json as i32, br#"{"n":1.5}"#.to_vec()),
            (6, pb::Kind::Binary as i32, vec![7, 8]),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn reflection_lists_and_describes_the_services() -> Result {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = start(|_| {}).await?;
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())?.connect().await?;
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |req| ServerReflectionRequest { host: String::new(), message_request: Some(req) };
    let requests = futures_util::stream::iter([
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol("herald.v1.Queues".into())),
    ]);
    let mut replies = reflection.server_reflection_info(requests).await?.into_inner();
    match replies.next().await.ok_or("no reply")??.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            assert!(names.contains(&"herald.v1.Topics".to_owned()), "{names:?}");
            assert!(names.contains(&"herald.v1.Queues".to_owned()), "{names:?}");
        }
        other => panic!("expected a service list, got {other:?}"),
    }
    match replies.next().await.ok_or("no reply")??.message_response {
        Some(MessageResponse::FileDescriptorResponse(files)) => assert!(!files.file_descriptor_proto.is_empty()),
        other => panic!("expected a file descriptor, got {other:?}"),
    }
    Ok(())
}

/// The events of a Subscribe stream up to the one holding message `last`: per event,
/// the offsets of its messages and whether it was a packed `messages` event.
async fn events_until(stream: &mut tonic::Streaming<pb::SubscribeEvent>, last: u64) -> Result<Vec<(Vec<u64>, bool)>> {
    use pb::subscribe_event::Event;
    let mut events = Vec::new();
    loop {
        let event = stream.message().await?.ok_or("stream ended")?.event;
        let (offsets, packed) = match event {
            Some(Event::Message(m)) => (vec![m.offset], false),
            Some(Event::Messages(ms)) => (ms.messages.iter().map(|m| m.offset).collect(), true),
            _ => continue,
        };
        let done = offsets.contains(&last);
        events.push((offsets, packed));
        if done {
            return Ok(events);
        }
    }
}

#[tokio::test]
async fn a_subscriber_that_asks_for_pack_gets_bursts_as_messages_events() -> Result {
    let server = start(|_| {}).await?;
    let client = grpc(&server).await?;
    // Big enough that a replay needs more than one packed event (about 64 KiB each).
    let payload = Bytes::from(vec![b'x'; 1000]);
    let batch: Vec<_> = (0..200)
        .map(|_| pb::BatchMessage { data: payload.clone(), kind: pb::Kind::Binary as i32, ..Default::default() })
        .collect();
    client.publish_batch("packed", batch).await?;

    for pack in [true, false] {
        let request = pb::SubscribeRequest {
            topic: "packed".into(),
            from: Some(pb::subscribe_request::From::Start(pb::Start::Earliest as i32)),
            pack,
            ..Default::default()
        };
        let mut stream = client.topics().subscribe(request).await?.into_inner();
        let events = within(LIMIT, "replay", events_until(&mut stream, 200)).await??;
        let offsets: Vec<u64> = events.iter().flat_map(|(o, _)| o.clone()).collect();
        assert_eq!(offsets, (1..=200).collect::<Vec<_>>(), "pack {pack}: each once, in order");
        if pack {
            assert!(events.len() < 20 && events.len() > 2, "packed in ~64 KiB events: {}", events.len());
            assert!(events.iter().any(|(_, packed)| *packed));
            assert!(events.iter().all(|(o, _)| o.len() * 1000 <= 70_000), "each within the bound");
        } else {
            assert!(events.iter().all(|(o, packed)| o.len() == 1 && !packed), "one message per event");
        }
    }
    // The client crate packs and hands messages out one at a time.
    let mut sub = client.subscribe("packed", StartFrom::Earliest, None).await?;
    for offset in 1..=200 {
        let m = within(LIMIT, "client", sub.next()).await??.ok_or("ended")?;
        assert_eq!((m.offset, m.data.len()), (offset, 1000));
    }
    Ok(())
}
