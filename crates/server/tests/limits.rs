//! Abuse limits against the real server (docs/security.md, "Abuse limits"): publishers
//! flooding past their rate over WebSocket are slowed while a well-behaved publisher and
//! its subscriber keep their latency; REST and gRPC publishes and enqueues over the rate
//! are refused with when to retry, and nothing of them is stored; a user's rate spans
//! its connections; new connections per address are limited; a connection that spends
//! its error budget is closed; 1000 half-open connections are dropped after the header
//! timeout and do not stop new clients. The tests clear `trusted_networks`, so the
//! limits apply to 127.0.0.1.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start, within, Result, TestServer};
use futures_util::SinkExt;
use herald_client::grpc::pb;
use herald_client::{GrpcClient, StartFrom};
use herald_server::Config;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Limits on for 127.0.0.1 with `tune` applied; new connections per address unlimited
/// unless `tune` says otherwise (the tests open many).
async fn limited(tune: impl FnOnce(&mut herald_auth::limits::LimitsConfig)) -> Result<TestServer> {
    start(|c: &mut Config| {
        c.limits.trusted_networks.clear();
        c.limits.connections_per_second_per_ip = 0;
        tune(&mut c.limits);
    })
    .await
}

async fn retained(server: &TestServer, topic: &str) -> Result<u64> {
    Ok(server.client().info(topic).await?.retained)
}

async fn limited_metric(server: &TestServer, limit: &str) -> Result<u64> {
    server.metric(&format!("herald_limited_total{{limit=\"{limit}\"}}")).await
}

/// Sends frames as fast as the socket takes them until `stop`; the server pausing its
/// reads is what slows it.
fn flood(mut socket: common::RawSocket, frame: WsMessage, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            // A stalled send is the point; check `stop` now and then.
            match tokio::time::timeout(Duration::from_millis(50), socket.send(frame.clone())).await {
                Ok(Ok(())) => sent += 1,
                Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
        sent
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_publishers_are_slowed_while_others_keep_their_latency() -> Result {
    const RATE: u64 = 500;
    let server = limited(|l| l.messages_per_second = RATE as u32).await?;
    // Two flooders, one per WebSocket protocol, each on its own connection.
    let stop = Arc::new(AtomicBool::new(false));
    let json = tokio_tungstenite::connect_async(format!("{}/v1/ws", server.ws)).await?.0;
    let frame = json!({"op": "publish", "topic": "flood.json", "data": "x".repeat(100)}).to_string();
    let json_flood = flood(json, WsMessage::text(frame), stop.clone());
    let raw = server.raw_ws("flood.raw", "mode=pub").await?;
    let raw_flood = flood(raw, WsMessage::binary(vec![7u8; 100]), stop.clone());
    let started = Instant::now();

    // A well-behaved publisher and its subscriber, each on its own connection.
    let mut subscriber = server.json_ws().await?;
    subscriber.subscribe("calm", StartFrom::Latest, None).await?;
    let mut publisher = server.json_ws().await?;
    let mut latencies = Vec::new();
    for i in 0..50u64 {
        let sent = Instant::now();
        let reply = publisher.publish("calm", json!(i)).await?;
        assert_eq!(reply["type"], "published", "{reply}");
        let message = within(Duration::from_secs(5), "the calm message", subscriber.recv()).await??;
        assert_eq!(message["data"], json!(i), "in order, nothing lost: {message}");
        latencies.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let (json_sent, raw_sent) = (json_flood.await?, raw_flood.await?);

    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let worst = latencies[latencies.len() - 1];
    // Generous bounds for a 2-core machine running other tests: what matters is that the
    // floods do not push the calm publisher's latency to their backlog's length.
    assert!(median < Duration::from_millis(50), "median latency {median:?} (worst {worst:?})");
    assert!(worst < Duration::from_millis(500), "worst latency {worst:?}");

    // Each flooder got its burst plus the rate for the time it ran, no more.
    let allowed = RATE + (RATE as f64 * (elapsed + 0.5)) as u64;
    for (topic, sent) in [("flood.json", json_sent), ("flood.raw", raw_sent)] {
        let stored = retained(&server, topic).await?;
        assert!(stored > RATE / 2, "{topic}: the flooder was served too ({stored} stored)");
        assert!(stored <= allowed, "{topic}: {stored} stored in {elapsed:.2} s at {RATE}/s (allowed {allowed})");
        assert!(sent >= stored, "{topic}: sent {sent}, stored {stored}");
    }
    assert!(limited_metric(&server, "paused").await? > 0);
    Ok(())
}

#[tokio::test]
async fn requests_over_the_rate_are_refused_with_when_to_retry() -> Result {
    const RATE: usize = 20;
    let server = limited(|l| l.messages_per_second = RATE as u32).await?;
    // REST on one keep-alive connection: the burst passes, then 429 with Retry-After.
    let http = common::http();
    let (mut created, mut refused) = (0, 0);
    for i in 0..2 * RATE {
        let r = http.post(format!("{}/v1/topics/rest.t/messages", server.url)).body(format!("m{i}")).send().await?;
        match r.status().as_u16() {
            201 => created += 1,
            429 => {
                let retry: u64 = r.headers().get("retry-after").ok_or("no Retry-After")?.to_str()?.parse()?;
                assert!((1..=2).contains(&retry), "Retry-After {retry}");
                let body: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                refused += 1;
            }
            other => return Err(format!("unexpected status {other}").into()),
        }
    }
    assert!((RATE..RATE + 3).contains(&created), "{created} created");
    assert_eq!(created + refused, 2 * RATE);
    assert_eq!(retained(&server, "rest.t").await?, created as u64, "nothing refused was stored");

    // Enqueues share the connection's bucket, which is empty now.
    let r = http.post(format!("{}/v1/queues/jobs/messages", server.url)).body("job").send().await?;
    assert_eq!(r.status().as_u16(), 429);
    let (_, stats) = server.get_json("/v1/queues/jobs").await?;
    assert_eq!(stats["ready"], 0, "{stats}");

    // gRPC: RESOURCE_EXHAUSTED with gRPC's retry pushback.
    let grpc = GrpcClient::connect(&server.url).await?;
    let mut statuses = Vec::new();
    for i in 0..2 * RATE {
        let request = pb::PublishRequest { topic: "grpc.t".into(), data: format!("m{i}").into(), ..Default::default() };
        statuses.push(grpc.topics().publish(request).await.err());
    }
    let refused: Vec<_> = statuses.iter().flatten().collect();
    assert!(refused.len() >= RATE - 2, "{} refused", refused.len());
    for status in &refused {
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().starts_with("rate_limited:"), "{}", status.message());
        let pushback: u64 = status.metadata().get("grpc-retry-pushback-ms").ok_or("no pushback")?.to_str()?.parse()?;
        assert!((1..=1000).contains(&pushback), "pushback {pushback} ms");
    }
    assert_eq!(retained(&server, "grpc.t").await?, (2 * RATE - refused.len()) as u64);
    assert!(limited_metric(&server, "rate").await? >= (refused.len() + 1) as u64);
    Ok(())
}

#[tokio::test]
async fn a_users_rate_spans_its_connections() -> Result {
    // No per-connection limit; anonymous callers are limited by address.
    let server = limited(|l| {
        l.messages_per_second = 0;
        l.user_messages_per_second = 10;
    })
    .await?;
    let mut created = 0;
    let started = Instant::now();
    for i in 0..30 {
        // A new client (a new connection) each time.
        let r = common::http()
            .post(format!("{}/v1/topics/user.t/messages", server.url))
            .body(format!("{i}"))
            .send()
            .await?;
        created += usize::from(r.status().as_u16() == 201);
    }
    // The burst, plus what the bucket refilled while the 30 ran.
    let allowed = 10 + (10.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!((10..=allowed).contains(&created), "{created} created across 30 connections (allowed {allowed})");
    assert!(created < 30, "the user's rate held across connections");
    Ok(())
}

#[tokio::test]
async fn new_connections_per_address_are_limited() -> Result {
    let server = limited(|l| l.connections_per_second_per_ip = 5).await?;
    let addr = server.server.as_ref().ok_or("server")?.addr();
    let mut answered = 0;
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await?;
        let mut reply = Vec::new();
        // A refused connection is closed at once, without an answer.
        let _ = within(Duration::from_secs(5), "an answer or a close", tcp.read_to_end(&mut reply)).await?;
        answered += usize::from(reply.starts_with(b"HTTP/1.1 200"));
    }
    assert!((5..8).contains(&answered), "{answered} of 20 answered at 5 per second");
    // Reading the metric takes a connection too: retried until the bucket has one.
    common::eventually(Duration::from_secs(5), "the refusals counted", || async {
        Ok(limited_metric(&server, "connection_rate").await.is_ok_and(|n| n >= 12))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_connection_that_spends_its_error_budget_is_closed() -> Result {
    let server = limited(|l| l.errors_per_minute = 5).await?;
    // JSON WebSocket: error frames until the budget is spent, then 1008.
    let mut socket = tokio_tungstenite::connect_async(format!("{}/v1/ws", server.ws)).await?.0;
    for _ in 0..10 {
        if socket.send(WsMessage::text("not json")).await.is_err() {
            break;
        }
    }
    assert_eq!(common::close_code(&mut socket).await?, 1008);

    // REST: past the budget, the answer says Connection: close and the server closes.
    let addr = server.server.as_ref().ok_or("server")?.addr();
    let mut tcp = TcpStream::connect(addr).await?;
    let bad = b"POST /v1/topics/bad..name/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx";
    let mut closed_after = None;
    for i in 1..=10 {
        if tcp.write_all(bad).await.is_err() {
            closed_after = Some(i);
            break;
        }
        let mut buf = vec![0u8; 4096];
        let n = within(Duration::from_secs(5), "an answer", tcp.read(&mut buf)).await??;
        let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        if n == 0 || text.contains("connection: close") {
            closed_after = Some(i);
            break;
        }
        assert!(text.starts_with("http/1.1 400"), "{text}");
    }
    assert_eq!(closed_after, Some(6), "closed once 5 errors were spent");
    assert!(limited_metric(&server, "error_budget").await? >= 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_are_dropped_and_do_not_stop_new_clients() -> Result {
    let timeout = Duration::from_secs(3);
    // Default limits (loopback trusted), short header timeout.
    let server = start(|c| c.limits.header_timeout = timeout).await?;
    let addr = server.server.as_ref().ok_or("server")?.addr();
    // 900 connections that send nothing, 100 that send half a request and stall.
    let opened = Instant::now();
    let mut half_open = Vec::new();
    for i in 0..1000 {
        let mut tcp = TcpStream::connect(addr).await?;
        if i % 10 == 0 {
            tcp.write_all(b"GET /v1/topics HTTP/1.1\r\nhost: x\r\n").await?;
        }
        half_open.push(tcp);
    }
    // A new client is served at once, long before the half-open ones time out.
    let mut subscriber = server.json_ws().await?;
    subscriber.subscribe("fresh", StartFrom::Latest, None).await?;
    let published = server.client().publish("fresh", "text/plain", "hello").await?;
    let message = within(Duration::from_secs(2), "the message", subscriber.recv()).await??;
    assert_eq!(message["offset"], published.offset);
    assert!(opened.elapsed() < timeout, "the new client was served only after {:?}", opened.elapsed());

    // Every half-open connection is closed by the server after the timeout.
    let reads = half_open.into_iter().map(|mut tcp| async move {
        let mut buf = [0u8; 256];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // A 408 or similar before the close is fine.
                Ok(_) => continue,
            }
        }
    });
    within(
        timeout + Duration::from_secs(5),
        "every half-open connection closed",
        futures_util::future::join_all(reads),
    )
    .await?;
    assert!(opened.elapsed() >= timeout - Duration::from_millis(100), "closed before the timeout");
    assert!(limited_metric(&server, "header_timeout").await? >= 1000);
    Ok(())
}
