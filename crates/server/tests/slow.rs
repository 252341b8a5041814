//! Slow consumers: a subscriber that stops reading never slows the publisher or other
//! subscribers, and is closed with 1013 once its buffer stays full.

mod common;

use std::time::{Duration, Instant};

use common::{close_code, eventually, start, within, Result};
use herald_client::{Delivery, StartFrom};

/// Small outbound buffers and a 3 s slow-consumer deadline: three seconds of stall would
/// show in the healthy subscribers' latencies if a stalled one could hold anyone up.
fn tight_buffers(c: &mut herald_server::Config) {
    c.broker.outbound.max_pending_bytes = 256 * 1024;
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

    // 1500 x 16 KiB (24 MB) is far past socket buffers plus 2 x 256 KiB: the stalled
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
