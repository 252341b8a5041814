//! `peer-bench`: the scenarios of `herald bench`, run against peer brokers so that
//! Herald and its peers can be measured on the same machine in the same run.
//!
//! `rabbitmq-queue` mirrors `herald bench queue`: concurrent workers each publish one
//! message (publisher confirms, awaited), fetch one with `basic.get`, and ack it,
//! until the shared count of round trips is reached; 500 untimed round trips first.
//!
//! `jetstream-publish` mirrors `herald bench publish`: concurrent publishers, each on
//! its own connection, publish one message and await the stream's acknowledgement
//! (PubAck) before the next, into a JetStream stream with file storage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::{Args, Parser, Subcommand};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Serialize;

/// Round trips run untimed before the measured ones, as `herald bench` does.
const WARM_UP: u64 = 500;

#[derive(Debug, Parser)]
#[command(version, about = "Benchmarks peer brokers with the scenarios of `herald bench`")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// RabbitMQ queue round trips: publish (confirmed), basic.get, ack, by concurrent workers.
    RabbitmqQueue(QueueArgs),
    /// NATS JetStream publishes (PubAck awaited) to a file-storage stream, by concurrent publishers.
    JetstreamPublish(PublishArgs),
    /// Core NATS fan-out to WebSocket subscribers: one publisher, many subscribers.
    NatsWsFanout(FanoutArgs),
}

#[derive(Debug, Args)]
struct FanoutArgs {
    /// nats-server's WebSocket listener (its `websocket` block, `no_tls: true`).
    #[arg(long, default_value = "ws://127.0.0.1:8225")]
    ws_url: String,
    /// nats-server's client port, for the publisher.
    #[arg(long, default_value = "nats://127.0.0.1:4225")]
    url: String,
    /// Subscribers, each with its own WebSocket.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages published.
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Concurrent publishers, each with its own connection.
    #[arg(long, default_value_t = 16)]
    publishers: usize,
    /// Publishes in total (after 500 untimed warm-up ones).
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
    /// Keep the stream afterwards (e.g. to time a restart holding it).
    #[arg(long)]
    keep: bool,
    /// Stream name; its subject is the name in lowercase. Default `PEERBENCH_<pid>`.
    #[arg(long)]
    stream: Option<String>,
}

#[derive(Debug, Args)]
struct QueueArgs {
    /// AMQP URL of the broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Concurrent workers, each with its own channel.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Round trips in total (after 500 untimed warm-up ones).
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Durable queue and persistent messages (delivery_mode 2); else transient ones.
    #[arg(long)]
    durable: bool,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

/// The `--json` output: one object, fields in the order of `herald bench --json`
/// (plus `durable`).
#[derive(Serialize)]
struct JsonReport {
    scenario: &'static str,
    workers: usize,
    size: usize,
    durable: bool,
    round_trips: usize,
    seconds: f64,
    per_second: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
}

/// Round-trip latencies, in microseconds, sorted.
struct Report {
    latencies: Vec<u64>,
    elapsed: Duration,
}

impl Report {
    /// Same nearest-rank rule as `herald bench`, so the figures compare exactly.
    fn percentile(&self, p: f64) -> u64 {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::RabbitmqQueue(args) => rabbitmq_queue(args).await,
        Command::JetstreamPublish(args) => jetstream_publish(args).await,
        Command::NatsWsFanout(args) => nats_ws_fanout(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line, without a backtrace; lapin's errors already
            // include their source in their text, so skip causes already said.
            let mut message = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !message.contains(&cause) {
                    message += if message.is_empty() { "" } else { ": " };
                    message += &cause;
                }
            }
            eprintln!("peer-bench: error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn rabbitmq_queue(args: QueueArgs) -> anyhow::Result<()> {
    ensure!(args.workers >= 1 && args.messages >= 1, "--workers and --messages must be at least 1");
    // One shared connection, one channel per worker. AMQP multiplexes channels on a
    // connection, and on a 2-core machine one connection per worker was clearly
    // slower, not faster: about 4,000-4,800 round trips/s against 5,200-7,000/s with
    // 8 workers, and about 4,000/s against 8,000/s with 64 (more sockets, more
    // RabbitMQ connection processes and client I/O loops competing for 2 cores).
    let conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {}", args.url))?;
    let admin = conn.create_channel().await.context("cannot open a channel")?;
    let queue = format!("peer-bench-{}", std::process::id());
    let declare = QueueDeclareOptions { durable: args.durable, auto_delete: true, ..QueueDeclareOptions::default() };
    admin
        .queue_declare(queue.as_str().into(), declare, FieldTable::default())
        .await
        .with_context(|| format!("cannot declare queue {queue}"))?;
    admin
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .with_context(|| format!("cannot purge queue {queue}"))?;

    let mut channels = Vec::with_capacity(args.workers);
    for _ in 0..args.workers {
        let channel = conn.create_channel().await.context("cannot open a worker channel")?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.context("cannot enable publisher confirms")?;
        channels.push(channel);
    }

    let result = async {
        round_trips(&channels, &queue, WARM_UP, args.size, args.durable).await.context("warm-up failed")?;
        round_trips(&channels, &queue, args.messages, args.size, args.durable).await
    }
    .await;

    // Clean up even when the run failed, but report the run's error first.
    let deleted = admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .with_context(|| format!("cannot delete queue {queue}"));
    let r = result?;
    deleted?;
    let _ = conn.close(200, "peer-bench done".into()).await;

    let n = r.latencies.len();
    let seconds = r.elapsed.as_secs_f64();
    let per_second = n as f64 / seconds;
    let (p50, p90, p99) = (r.percentile(0.5), r.percentile(0.9), r.percentile(0.99));
    let max = r.latencies.last().copied().unwrap_or_default();
    if args.json {
        let report = JsonReport {
            scenario: "rabbitmq-queue",
            workers: args.workers,
            size: args.size,
            durable: args.durable,
            round_trips: n,
            seconds: (seconds * 1000.0).round() / 1000.0,
            per_second: per_second.round() as u64,
            p50_us: p50,
            p90_us: p90,
            p99_us: p99,
            max_us: max,
        };
        let report = serde_json::to_string(&report)?;
        println!("{report}");
    } else {
        println!(
            "rabbitmq-queue workers={} size={} durable={}: {n} round trips in {seconds:.2} s = {per_second:.0}/s; \
             latency us p50={p50} p90={p90} p99={p99} max={max}",
            args.workers, args.size, args.durable,
        );
    }
    Ok(())
}

/// Runs `total` round trips spread over one worker per channel.
async fn round_trips(
    channels: &[Channel],
    queue: &str,
    total: u64,
    size: usize,
    durable: bool,
) -> anyhow::Result<Report> {
    let done = Arc::new(AtomicU64::new(0));
    let payload: Arc<[u8]> = vec![b'x'; size].into();
    let properties = if durable {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default().with_delivery_mode(1)
    };
    let started = Instant::now();
    let tasks: Vec<_> = channels
        .iter()
        .map(|channel| {
            let (channel, queue, done, payload, properties) =
                (channel.clone(), queue.to_owned(), done.clone(), payload.clone(), properties.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while done.fetch_add(1, Ordering::Relaxed) < total {
                    let t0 = Instant::now();
                    let confirmation = channel
                        .basic_publish(
                            "".into(),
                            queue.as_str().into(),
                            BasicPublishOptions::default(),
                            &payload,
                            properties.clone(),
                        )
                        .await
                        .context("basic.publish failed")?
                        .await
                        .context("publisher confirm failed")?;
                    ensure!(confirmation.is_ack(), "broker did not confirm a publish: {confirmation:?}");
                    let message = loop {
                        // Another worker may take "our" message; any one will do.
                        let got = channel
                            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                            .await
                            .context("basic.get failed")?;
                        if let Some(message) = got {
                            break message;
                        }
                    };
                    message.delivery.ack(BasicAckOptions::default()).await.context("basic.ack failed")?;
                    latencies.push(t0.elapsed().as_micros() as u64);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total as usize);
    for task in tasks {
        latencies.extend(task.await.context("worker panicked")??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Report { latencies, elapsed })
}

async fn jetstream_publish(args: PublishArgs) -> anyhow::Result<()> {
    use async_nats::jetstream::{self, stream};

    ensure!(args.publishers >= 1 && args.messages >= 1, "--publishers and --messages must be at least 1");
    let mut contexts = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers {
        let client = async_nats::connect(&args.url)
            .await
            .with_context(|| format!("cannot connect to NATS at {}", args.url))?;
        contexts.push(jetstream::new(client));
    }
    let name = args.stream.clone().unwrap_or_else(|| format!("PEERBENCH_{}", std::process::id()));
    let subject = name.to_lowercase();
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        ..stream::Config::default()
    };
    contexts[0].get_or_create_stream(config).await.with_context(|| format!("cannot create stream {name}"))?;

    let result = async {
        publishes(&contexts, &subject, WARM_UP, args.size).await.context("warm-up failed")?;
        publishes(&contexts, &subject, args.messages, args.size).await
    }
    .await;
    if !args.keep {
        contexts[0].delete_stream(&name).await.with_context(|| format!("cannot delete stream {name}"))?;
    }
    let r = result?;

    let n = r.latencies.len();
    let seconds = r.elapsed.as_secs_f64();
    let per_second = n as f64 / seconds;
    let (p50, p90, p99) = (r.percentile(0.5), r.percentile(0.9), r.percentile(0.99));
    let max = r.latencies.last().copied().unwrap_or_default();
    if args.json {
        let report = serde_json::json!({
            "scenario": "jetstream-publish",
            "publishers": args.publishers,
            "size": args.size,
            "messages": n,
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "per_second": per_second.round() as u64,
            "p50_us": p50,
            "p90_us": p90,
            "p99_us": p99,
            "max_us": max,
        });
        println!("{report}");
    } else {
        println!(
            "jetstream-publish publishers={} size={}: {n} publishes in {seconds:.2} s = {per_second:.0}/s; \
             latency us p50={p50} p90={p90} p99={p99} max={max}",
            args.publishers, args.size,
        );
    }
    Ok(())
}

/// Runs `total` acknowledged publishes spread over one publisher per context.
async fn publishes(
    contexts: &[async_nats::jetstream::Context],
    subject: &str,
    total: u64,
    size: usize,
) -> anyhow::Result<Report> {
    let done = Arc::new(AtomicU64::new(0));
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let tasks: Vec<_> = contexts
        .iter()
        .map(|js| {
            let (js, subject, done, payload) = (js.clone(), subject.to_owned(), done.clone(), payload.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while done.fetch_add(1, Ordering::Relaxed) < total {
                    let t0 = Instant::now();
                    js.publish(subject.clone(), payload.clone())
                        .await
                        .context("publish failed")?
                        .await
                        .context("no PubAck")?;
                    latencies.push(t0.elapsed().as_micros() as u64);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total as usize);
    for task in tasks {
        latencies.extend(task.await.context("publisher panicked")??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Report { latencies, elapsed })
}

/// Mirrors `herald bench fanout`: subscribers speak the NATS protocol over WebSocket and
/// count the bytes of the `MSG` lines and payloads they receive (a message may span
/// frames), so the client does as little work as Herald's raw subscribers do.
async fn nats_ws_fanout(args: FanoutArgs) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    ensure!(args.subscribers >= 1 && args.messages >= 1, "--subscribers and --messages must be at least 1");
    let subject = format!("bench.fanout.{}", std::process::id());
    // What one delivery costs on the wire: `MSG <subject> <sid> <size>\r\n<payload>\r\n`.
    let per_message = format!("MSG {subject} 1 {}\r\n", args.size).len() + args.size + 2;
    let expected = per_message as u64 * args.messages;
    let mut sockets = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        let (mut socket, _) = tokio_tungstenite::connect_async(args.ws_url.as_str())
            .await
            .with_context(|| format!("cannot connect to {}", args.ws_url))?;
        let hello = format!("CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {subject} 1\r\nPING\r\n");
        socket.send(WsMessage::binary(hello.into_bytes())).await?;
        // The PONG answers after the SUB is registered.
        loop {
            match socket.next().await {
                Some(Ok(WsMessage::Binary(b))) if b.windows(4).any(|w| w == b"PONG") => break,
                Some(Ok(WsMessage::Text(t))) if t.contains("PONG") => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("closed before PONG"),
            }
        }
        sockets.push(socket);
    }
    let subscribers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let mut got = 0u64;
                while got < expected {
                    match socket.next().await {
                        Some(Ok(WsMessage::Binary(b))) => got += b.len() as u64,
                        Some(Ok(WsMessage::Text(t))) => got += t.len() as u64,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => anyhow::bail!("subscriber failed: {e}"),
                        None => anyhow::bail!("subscriber closed"),
                    }
                }
                Ok(Instant::now())
            })
        })
        .collect();
    let client = async_nats::connect(&args.url).await.with_context(|| format!("cannot connect to {}", args.url))?;
    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let started = Instant::now();
    for _ in 0..args.messages {
        client.publish(subject.clone(), payload.clone()).await.context("publish failed")?;
    }
    client.flush().await.context("flush failed")?;
    let published = started.elapsed();
    let mut last = started;
    for s in subscribers {
        let done = tokio::time::timeout(Duration::from_secs(120), s).await.context("timed out")???;
        last = last.max(done);
    }
    let elapsed = last.duration_since(started);
    let deliveries = args.subscribers as u64 * args.messages;
    let per_second = deliveries as f64 / elapsed.as_secs_f64();
    let publish_rate = args.messages as f64 / published.as_secs_f64();
    if args.json {
        let report = serde_json::json!({
            "scenario": "nats-ws-fanout",
            "subscribers": args.subscribers,
            "messages": args.messages,
            "size": args.size,
            "deliveries": deliveries,
            "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "deliveries_per_second": per_second.round() as u64,
            "publish_per_second": publish_rate.round() as u64,
        });
        println!("{report}");
    } else {
        println!(
            "nats-ws-fanout subscribers={} messages={} size={}: {deliveries} deliveries in {:.2} s = {per_second:.0}/s (published at {publish_rate:.0}/s)",
            args.subscribers,
            args.messages,
            args.size,
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}
