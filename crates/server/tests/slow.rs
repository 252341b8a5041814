//! Slow consumers: a subscriber that stops reading never slows the publisher or other
//! subscribers, and is closed with 1013 once its buffer stays full.

mod common;

use std::time::{Duration, Instant};

use common::{close_code, eventually, start, within, RawSocket, Result, TestServer};
use futures_util::SinkExt;
use herald_client::{Delivery, StartFrom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Small outbound buffers and a 3 s slow-consumer deadline: three seconds of stall would
/// show in the healthy subscribers' latencies if a stalled one could hold anyone up.
/// Small enough that 24 MB sent to a stalled subscriber is far past them; large enough
/// (2 MiB, closed at 4 MiB: 256 messages of 16 KiB, a quarter second of this pace) that a
/// healthy subscriber in a debug build on a busy 2-core machine never reaches them (at
/// 256 KiB a 32 ms hiccup was enough to close it).
fn tight_buffers(c: &mut herald_server::Config) {
    c.broker.outbound.max_pending_bytes = 2 << 20;
    c.broker.outbound.slow_consumer_timeout = Duration::from_secs(3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_subscriber_is_closed_and_slows_nobody() -> Result {
    let server = start(tight_buffers).await?;
    // The stalled subscriber: subscribed, then never reads its socket.
    let mut stalled = server.raw_ws_small_buffer("slow", "mode=sub").await?;
    // A healthy subscriber that reads and timestamps every message.
    let mut healthy = server.json_ws().await?;
    healthy.subscribe("slow", StartFrom::Latest, None).await?;
    assert_eq!(server.subscribers("slow").await?, 2);

    const N: usize = 1500;
    let payload = "x".repeat(16 * 1024);
    let reader = tokio::spawn(async move {
        let mut arrivals = Vec::with_capacity(N);
        while arrivals.len() < N {
            let d = Delivery::parse(&healthy.recv_text().await?)?;
            arrivals.push((d.offset, Instant::now()));
        }
        Result::Ok((arrivals, healthy))
    });
    let client = server.client();
    let mut sent = Vec::with_capacity(N);
    let mut slowest_publish = Duration::ZERO;
    // 16 MB/s: a rate the healthy subscriber sustains even in a debug build, so only
    // the stalled one falls behind.
    let mut pace = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..N {
        pace.tick().await;
        let t0 = Instant::now();
        let p = client.publish_text("slow", payload.clone()).await?;
        slowest_publish = slowest_publish.max(t0.elapsed());
        sent.push((p.offset, t0));
    }
    let (arrivals, _healthy) = within(Duration::from_secs(30), "healthy subscriber", reader).await???;
    let mut lags: Vec<Duration> = sent
        .iter()
        .zip(&arrivals)
        .map(|((o, t0), (a, t1))| {
            assert_eq!(o, a);
            t1.saturating_duration_since(*t0)
        })
        .collect();
    lags.sort_unstable();
    let p50 = lags[lags.len() / 2];
    let max = lags[lags.len() - 1];
    eprintln!("publish max {slowest_publish:?}; healthy subscriber lag p50 {p50:?} max {max:?}");
    assert!(slowest_publish < Duration::from_secs(1), "publisher never waits on the stalled subscriber");
    assert!(max < Duration::from_secs(1), "the healthy subscriber stays prompt");

    // 1500 x 16 KiB (24 MB) is far past socket buffers plus 2 x 2 MiB: the stalled
    // subscriber must be gone, with 1013 waiting at the end of what it was sent.
    eventually(Duration::from_secs(10), "stalled subscriber dropped", || async {
        Ok(server.subscribers("slow").await? == 1)
    })
    .await?;
    assert_eq!(within(Duration::from_secs(10), "close frame", close_code(&mut stalled)).await??, 1013);
    assert_eq!(server.metric("herald_slow_consumers_total").await?, 1);
    Ok(())
}

/// The same policy for a gRPC subscriber that stops reading its Subscribe stream: it is
/// dropped (its stream ends with RESOURCE_EXHAUSTED `slow consumer`) and neither the
/// publisher nor the healthy subscribers, gRPC and WebSocket, notice it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_grpc_subscriber_is_closed_and_slows_nobody() -> Result {
    use herald_client::grpc::pb;
    use herald_client::{ClientError, GrpcClient};

    let server = start(tight_buffers).await?;
    // The stalled subscriber: its own connection with small HTTP/2 windows (so the
    // server's flow control stops it soon), subscribed, then never read.
    let stalled_channel = tonic::transport::Endpoint::from_shared(server.url.clone())?
        .http2_adaptive_window(false)
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await?;
    let mut stalled = GrpcClient::from_channel(stalled_channel).subscribe("slow", StartFrom::Latest, None).await?;
    // Healthy subscribers that read and timestamp every message: gRPC and WebSocket.
    let mut healthy_grpc = GrpcClient::connect(&server.url).await?.subscribe("slow", StartFrom::Latest, None).await?;
    let mut healthy_ws = server.json_ws().await?;
    healthy_ws.subscribe("slow", StartFrom::Latest, None).await?;
    assert_eq!(server.subscribers("slow").await?, 3);

    const N: usize = 1500;
    let grpc_reader = tokio::spawn(async move {
        let mut arrivals = Vec::with_capacity(N);
        while arrivals.len() < N {
            let m = healthy_grpc.next().await?.ok_or("healthy gRPC stream ended")?;
            arrivals.push((m.offset, Instant::now()));
        }
        Result::Ok((arrivals, healthy_grpc))
    });
    let ws_reader = tokio::spawn(async move {
        let mut arrivals = Vec::with_capacity(N);
        while arrivals.len() < N {
            let d = Delivery::parse(&healthy_ws.recv_text().await?)?;
            arrivals.push((d.offset, Instant::now()));
        }
        Result::Ok((arrivals, healthy_ws))
    });
    let publisher = GrpcClient::connect(&server.url).await?;
    let payload = bytes::Bytes::from("x".repeat(16 * 1024));
    let mut sent = Vec::with_capacity(N);
    let mut slowest_publish = Duration::ZERO;
    let mut pace = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..N {
        pace.tick().await;
        let t0 = Instant::now();
        let p = publisher.publish("slow", pb::Kind::Text, payload.clone()).await?;
        slowest_publish = slowest_publish.max(t0.elapsed());
        sent.push((p.offset, t0));
    }
    let (grpc_arrivals, _g) = within(Duration::from_secs(30), "healthy gRPC subscriber", grpc_reader).await???;
    let (ws_arrivals, _w) = within(Duration::from_secs(30), "healthy WebSocket subscriber", ws_reader).await???;
    for (name, arrivals) in [("gRPC", grpc_arrivals), ("WebSocket", ws_arrivals)] {
        let mut lags: Vec<Duration> = sent
            .iter()
            .zip(&arrivals)
            .map(|((o, t0), (a, t1))| {
                assert_eq!(o, a);
                t1.saturating_duration_since(*t0)
            })
            .collect();
        lags.sort_unstable();
        let (p50, max) = (lags[lags.len() / 2], lags[lags.len() - 1]);
        eprintln!("healthy {name} subscriber lag p50 {p50:?} max {max:?}");
        assert!(max < Duration::from_secs(1), "the healthy {name} subscriber stays prompt");
    }
    eprintln!("publish max {slowest_publish:?}");
    assert!(slowest_publish < Duration::from_secs(1), "publisher never waits on the stalled subscriber");

    eventually(Duration::from_secs(10), "stalled gRPC subscriber dropped", || async {
        Ok(server.subscribers("slow").await? == 2)
    })
    .await?;
    assert_eq!(server.metric("herald_slow_consumers_total").await?, 1);
    // Reading again, the stalled client gets what was in flight, then the verdict.
    let mut received = 0;
    let end = within(Duration::from_secs(10), "stalled stream end", async {
        loop {
            match stalled.next().await {
                Ok(Some(_)) => received += 1,
                other => return other,
            }
        }
    })
    .await?;
    match end {
        Err(ClientError::Grpc(s)) => {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
            assert!(s.message().starts_with("slow consumer"), "{s:?}");
        }
        other => panic!("expected RESOURCE_EXHAUSTED slow consumer, got {other:?}"),
    }
    assert!(received < N, "the stalled subscriber was cut off ({received} of {N} messages)");
    Ok(())
}

/// Short keepalive timers and a 256 KiB bound for the tests of a writer blocked on a
/// Ping; a generous shutdown timeout, so that only a writer that honours shutdown lets
/// the server stop within the pong timeout.
fn quick_pings(c: &mut herald_server::Config) {
    c.http.ping_interval = Duration::from_millis(100);
    c.http.pong_timeout = PONG_TIMEOUT;
    c.broker.outbound.max_pending_bytes = BOUND;
    c.broker.outbound.slow_consumer_timeout = Duration::from_secs(60);
    c.shutdown_timeout = Duration::from_secs(60);
}

const PONG_TIMEOUT: Duration = Duration::from_secs(2);
const BOUND: usize = 256 * 1024;

/// A raw `mode=sub` socket on `topic` that never reads, whose server side can no longer
/// write, while the server's writer has nothing queued: its next keepalive Ping blocks.
///
/// First, 15 messages of 32 KiB (under twice the bound even if all were queued at
/// once) fill the client's small receive buffer in large segments, so its window
/// closes. Then the client sends Pings and never reads the Pongs, which the server's
/// reader writes (tungstenite answers Pings from the read side, outside the writer):
/// they stay in the server's send buffer until it is full. Pongs alone would reach the
/// client as tiny segments, overflow its receive buffer while its window is still open,
/// and then Linux drops the server's window updates as out of window: the client's
/// Pings would stall.
async fn blocked_on_ping(server: &TestServer, topic: &str) -> Result<RawSocket> {
    let mut socket = server.raw_ws_small_buffer(topic, "mode=sub").await?;
    let client = server.client();
    for _ in 0..15 {
        client.publish_text(topic, "x".repeat(32 * 1024)).await?;
    }
    // 16 MiB of Pongs: past any Linux send buffer (tcp_wmem caps autotuning at 4 MiB
    // by default).
    let payload = bytes::Bytes::from(vec![0u8; 125]);
    for i in 0..(16 << 20) / 127 {
        socket.feed(WsMessage::Ping(payload.clone())).await?;
        if i % 1024 == 0 {
            socket.flush().await?;
        }
    }
    socket.flush().await?;
    // The writer's Ping is not visible to a client that does not read, so there is no
    // event to await: a few ping intervals make sure one was attempted on the full socket.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(socket)
}

/// A writer blocked on its keepalive Ping still sees its queue closed as a slow consumer:
/// the connection is counted and dropped, instead of hanging on the Ping for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_blocked_on_a_ping_is_closed_as_a_slow_consumer() -> Result {
    let server = start(quick_pings).await?;
    let _stalled = blocked_on_ping(&server, "p").await?;
    assert_eq!(server.metric("herald_connections").await?, 1);
    // Past twice the bound: the queue closes at once as a slow consumer.
    let client = server.client();
    for _ in 0..3 {
        client.publish_text("p", "x".repeat(BOUND)).await?;
    }
    assert_eq!(server.subscribers("p").await?, 0, "the closed queue left the topic");
    // The close frame cannot be written either: it is given up after the pong timeout.
    eventually(PONG_TIMEOUT + Duration::from_secs(3), "slow consumer counted and dropped", || async {
        Ok(server.metric("herald_slow_consumers_total").await? == 1 && server.metric("herald_connections").await? == 0)
    })
    .await
}

/// Shutdown does not wait on a writer blocked on its keepalive Ping: it sends (or gives
/// up on) the 1001 close within the pong timeout, so the server stops well before its
/// shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_on_a_writer_blocked_on_a_ping() -> Result {
    let mut server = start(quick_pings).await?;
    let _stalled = blocked_on_ping(&server, "p").await?;
    let running = server.server.take().ok_or("server")?;
    running.shutdown();
    within(PONG_TIMEOUT + Duration::from_secs(3), "shutdown", running.wait()).await??;
    Ok(())
}

/// An SSE request on a raw TCP socket with a small receive buffer (so loopback
/// autotuning cannot absorb megabytes), read up to the `: subscribed` comment; the
/// caller then stops reading.
async fn stalled_sse(server: &TestServer, topic: &str) -> Result<tokio::net::TcpStream> {
    let addr = server.server.as_ref().ok_or("server")?.addr();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(64 * 1024)?;
    let mut stream = socket.connect(addr).await?;
    stream.write_all(format!("GET /v1/topics/{topic}/sse HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(12).any(|w| w == b": subscribed") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(format!("SSE stream ended early: {:?}", String::from_utf8_lossy(&seen)).into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(stream)
}

/// An SSE stream's writer releases a batch's bytes from the outbound queue only once the
/// batch is handed on: a message stuck behind a client that stopped reading still counts
/// toward the bound, so the connection is closed as soon as the queue passes twice the
/// bound, not a whole batch later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_stream_counts_its_unwritten_batch() -> Result {
    const MB: usize = 1 << 20;
    // Outbound bound B = 4 MiB; closed at once past 2B.
    const TWICE_BOUND: usize = 8 * MB;
    const OVERHEAD: usize = 96;
    let server = start(|c| {
        c.broker.max_message_bytes = TWICE_BOUND;
        c.broker.outbound.max_pending_bytes = TWICE_BOUND / 2;
        c.broker.outbound.slow_consumer_timeout = Duration::from_secs(60);
    })
    .await?;
    let stalled = stalled_sse(&server, "s").await?;
    let client = server.client();
    // Plug the stream: a 7 MiB message (under 2B) fills the socket buffers and leaves
    // the HTTP server writing the rest of it. Its first bytes reaching the client show it
    // was handed on, so its bytes were released.
    client.publish_text("s", "x".repeat(7 * MB)).await?;
    within(Duration::from_secs(10), "the plug reaches the client", stalled.peek(&mut [0u8; 1])).await??;
    // A small message waits where the HTTP server takes the next chunk from (it takes
    // none while busy with the plug); the next one, X, is taken by the writer and cannot
    // be handed on. Pending now: X, 2 KiB.
    client.publish_text("s", "slot").await?;
    client.publish_text("s", "x".repeat(2048)).await?;
    assert_eq!(server.subscribers("s").await?, 1);
    // Y, just under 2B on its own: with X still counted, past 2B, so closed at once. A
    // writer that released X before writing it would count Y alone and keep going.
    client.publish_text("s", "x".repeat(TWICE_BOUND - 1024 - OVERHEAD)).await?;
    assert_eq!(server.subscribers("s").await?, 0, "closed as a slow consumer past twice the bound");
    eventually(Duration::from_secs(5), "slow consumer counted", || async {
        Ok(server.metric("herald_slow_consumers_total").await? == 1)
    })
    .await
}
