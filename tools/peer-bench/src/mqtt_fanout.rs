//! `mqtt-ws-fanout` mirrors `herald bench fanout` and `nats-ws-fanout` for an MQTT broker
//! (rumqttd in `tools/bench-fanout.sh`): T topics (`bench/fanout/<pid>/<t>`, or
//! `bench/fanout/<pid>` when T = 1) with S subscribers each. The T x S subscribers, each on
//! its own WebSocket (MQTT 3.1.1, subprotocol `mqtt`, clean session, unique client id),
//! subscribe at QoS 0, subscriber i to topic i % T, and are all confirmed (SUBACK) before
//! anything is published; then P publishers, each on its own WebSocket too, publish at
//! once: publisher p owns the topics t with t % P == p and publishes M rounds of one QoS 0
//! message to each of them, as fast as its socket takes them (frames fed, flushed every
//! `PUBLISH_BATCH`). Each subscriber cuts what it receives into MQTT packets (several may
//! share a frame, one may span frames) and counts the PUBLISH packets. The run ends when
//! every subscriber has M; deliveries/s = T x S x M / the time from the first publish to
//! the last delivery.
//!
//! QoS 0 lets a broker drop messages. A message dropped never arrives, so the run fails
//! (with the counts that did arrive) when no delivery came for `--stall` seconds after the
//! last publish, or after `--timeout` seconds in all, rather than hang.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::mqtt;

/// PUBLISH frames fed to a publisher's socket between two flushes.
const PUBLISH_BATCH: u64 = 256;

#[derive(Debug, Args)]
pub struct MqttFanoutArgs {
    /// The broker's MQTT-over-WebSocket listener (rumqttd: a `[ws.N]` listener, any path).
    #[arg(long, default_value = "ws://127.0.0.1:8083/mqtt")]
    url: String,
    #[command(flatten)]
    shape: crate::FanoutShape,
    /// Give up this many seconds after the first publish.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Give up when nothing arrived for this many seconds after the last publish
    /// (messages the broker dropped never come).
    #[arg(long, default_value_t = 10)]
    stall: u64,
}

type Ws = WebSocketStream<TcpStream>;

async fn open(url: &str, config: WebSocketConfig, client_id: &str) -> anyhow::Result<(Ws, mqtt::Reader)> {
    let request = mqtt::request(url)?;
    let host = request.uri().host().context("--url has no host")?.trim_start_matches('[').trim_end_matches(']');
    let port = request.uri().port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host, port)).await.with_context(|| format!("cannot connect to {host}:{port}"))?;
    stream.set_nodelay(true)?;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .with_context(|| format!("WebSocket handshake with {url} failed"))?;
    let mut reader = mqtt::Reader::default();
    mqtt::connect(&mut ws, &mut reader, client_id).await?;
    Ok((ws, reader))
}

/// Counts the PUBLISH packets one subscriber receives into `got` until it has `messages`;
/// returns when the last one came.
async fn count(
    mut ws: Ws,
    mut reader: mqtt::Reader,
    body_len: usize,
    messages: u64,
    got: Arc<AtomicU64>,
) -> anyhow::Result<Instant> {
    let mut n = 0u64;
    loop {
        while let Some(packet) = reader.next()? {
            if packet.kind() == mqtt::PUBLISH {
                ensure!(
                    packet.body.len() == body_len,
                    "a PUBLISH of {} bytes after the fixed header, not {body_len}",
                    packet.body.len()
                );
                n += 1;
            }
        }
        got.store(n, Ordering::Relaxed);
        if n >= messages {
            ensure!(n == messages, "received {n} messages, more than the {messages} published");
            return Ok(Instant::now());
        }
        let frame = mqtt::next_frame(&mut ws).await?;
        reader.extend(&frame);
    }
}

/// Publishes `messages` rounds of `packets` (one QoS 0 PUBLISH per topic the publisher
/// owns, each round in the same order), feeding frames and flushing every
/// `PUBLISH_BATCH`; gives the socket back with the time of its last flush.
async fn publish(mut ws: Ws, packets: Vec<bytes::Bytes>, messages: u64) -> anyhow::Result<(Ws, Instant)> {
    let mut fed = 0u64;
    for _ in 0..messages {
        for packet in &packets {
            ws.feed(Message::Binary(packet.clone())).await.context("WebSocket write failed")?;
            fed += 1;
            if fed.is_multiple_of(PUBLISH_BATCH) {
                ws.flush().await.context("WebSocket flush failed")?;
            }
        }
    }
    ws.flush().await.context("WebSocket flush failed")?;
    Ok((ws, Instant::now()))
}

/// What arrived so far, for an error message.
fn tally(counts: &[Arc<AtomicU64>], messages: u64) -> String {
    let got: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let total: u64 = got.iter().sum();
    let complete = got.iter().filter(|&&n| n >= messages).count();
    format!(
        "{total} of {} deliveries arrived; {complete} of {} subscribers got all {messages}, the others between {} and {} \
         (QoS 0: messages a broker drops never arrive)",
        messages * got.len() as u64,
        got.len(),
        got.iter().min().unwrap_or(&0),
        got.iter().max().unwrap_or(&0),
    )
}

pub async fn mqtt_ws_fanout(args: MqttFanoutArgs) -> anyhow::Result<()> {
    let shape = &args.shape;
    shape.check()?;
    let run = std::process::id();
    let topics = shape.topic_names("bench/fanout", '/');

    // Subscribers one after the other, each subscribed before the next, as the other
    // fan-out benchmarks do; 64 KiB read buffers as `herald bench fanout`'s.
    let config = WebSocketConfig::default().read_buffer_size(64 << 10);
    let mut counts = Vec::with_capacity(shape.connections());
    let mut subscribers = FuturesUnordered::new();
    for i in 0..shape.connections() {
        let topic = &topics[i % shape.topics];
        let (mut ws, mut reader) =
            open(&args.url, config, &format!("pb{run}-{i}")).await.with_context(|| format!("subscriber {i}"))?;
        mqtt::subscribe(&mut ws, &mut reader, topic).await.with_context(|| format!("subscriber {i}"))?;
        let got = Arc::new(AtomicU64::new(0));
        counts.push(got.clone());
        let body_len = mqtt::publish_body_len(topic, shape.size);
        let task = tokio::spawn(count(ws, reader, body_len, shape.messages, got));
        subscribers.push(async move { (i, task.await) });
    }

    let payload = vec![b'x'; shape.size];
    let mut publishers = Vec::with_capacity(shape.publishers);
    for p in 0..shape.publishers {
        let (ws, _) = open(&args.url, WebSocketConfig::default(), &format!("pb{run}-pub{p}"))
            .await
            .with_context(|| format!("publisher {p}"))?;
        let packets: Vec<_> =
            shape.topics_of(p).map(|t| bytes::Bytes::from(mqtt::publish_packet(&topics[t], &payload))).collect();
        publishers.push((ws, packets));
    }
    let timeout = Duration::from_secs(args.timeout);
    let started = Instant::now();
    let tasks: Vec<_> =
        publishers.into_iter().map(|(ws, packets)| tokio::spawn(publish(ws, packets, shape.messages))).collect();
    let publishing = async {
        let mut done = Vec::with_capacity(tasks.len());
        for (p, task) in tasks.into_iter().enumerate() {
            done.push(
                task.await
                    .with_context(|| format!("publisher {p} panicked"))?
                    .with_context(|| format!("publisher {p}"))?,
            );
        }
        anyhow::Ok(done)
    };
    let publishers = match tokio::time::timeout(timeout, publishing).await {
        Ok(result) => result.context("publishing failed")?,
        Err(_) => bail!("publishing took over {} s; {}", args.timeout, tally(&counts, shape.messages)),
    };
    let published = publishers.iter().map(|(_, at)| at.duration_since(started)).max().unwrap_or_default();

    // Wait for every subscriber, watching progress: fail with the counts on a subscriber's
    // error, on --timeout, or when nothing more arrived for --stall seconds.
    let mut last = started;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let (mut arrived, mut progress_at) = (0u64, Instant::now());
    while !subscribers.is_empty() {
        tokio::select! {
            Some((i, done)) = subscribers.next() => {
                let done = done.with_context(|| format!("subscriber {i} panicked"))?;
                match done {
                    Ok(at) => last = last.max(at),
                    Err(e) => bail!("subscriber {i} failed: {e:#}; {}", tally(&counts, shape.messages)),
                }
            }
            _ = tick.tick() => {
                let now: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
                if now != arrived {
                    (arrived, progress_at) = (now, Instant::now());
                }
                if started.elapsed() > timeout {
                    bail!("timed out after {} s: {}", args.timeout, tally(&counts, shape.messages));
                }
                if progress_at.elapsed() > Duration::from_secs(args.stall) {
                    bail!("nothing arrived for {} s after the last publish: {}", args.stall, tally(&counts, shape.messages));
                }
            }
        }
    }
    let elapsed = last.duration_since(started);
    for (mut publisher, _) in publishers {
        let _ = publisher.send(Message::binary(mqtt::disconnect_packet())).await;
        let _ = publisher.close(None).await;
    }

    crate::print_fanout("mqtt-ws-fanout", shape, elapsed, published);
    Ok(())
}
