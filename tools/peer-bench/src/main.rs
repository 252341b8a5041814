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
//!
//! `idle` holds many idle WebSocket subscribers on Herald, nats-server or an MQTT
//! broker, for `tools/idle-bench.sh` to read the broker's memory (see idle.rs).
//!
//! `nats-ws-fanout` and `mqtt-ws-fanout` (mqtt_fanout.rs) mirror `herald bench fanout`
//! for nats-server and an MQTT broker (rumqttd) over WebSocket, generalised to T topics
//! with S WebSocket subscribers each, fed by P publishers (one of each by default).

mod idle;
mod mqtt;
mod mqtt_fanout;

use std::future::Future;
use std::pin::Pin;
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
use serde_json::Value;

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
    /// Core NATS fan-out to WebSocket subscribers: T subjects x S subscribers each, P publishers.
    NatsWsFanout(FanoutArgs),
    /// MQTT fan-out (QoS 0), all over WebSocket: T topics x S subscribers each, P publishers.
    MqttWsFanout(mqtt_fanout::MqttFanoutArgs),
    /// Idle WebSocket subscribers (Herald, NATS or MQTT), held open until stdin closes or SIGTERM.
    Idle(idle::IdleArgs),
}

#[derive(Debug, Args)]
struct FanoutArgs {
    /// nats-server's WebSocket listener (its `websocket` block, `no_tls: true`).
    #[arg(long, default_value = "ws://127.0.0.1:8225")]
    ws_url: String,
    /// nats-server's client port, for the publishers.
    #[arg(long, default_value = "nats://127.0.0.1:4225")]
    url: String,
    #[command(flatten)]
    shape: FanoutShape,
}

/// What every fan-out run takes: T topics with S subscribers each, P publishers, M
/// messages per topic of a given size, and how to print the result. With one topic and
/// one publisher (the defaults) it is the single-topic run `herald bench fanout` does.
#[derive(Debug, Args)]
pub(crate) struct FanoutShape {
    /// Topics (NATS subjects), each with its own `--subscribers`.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Subscribers per topic, each with its own WebSocket.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Publishers (1 to `--topics`), each with its own connection; publisher p publishes
    /// to the topics t with t % P == p.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Messages published to each topic.
    #[arg(long, default_value_t = 2000)]
    pub messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

impl FanoutShape {
    /// Checks the counts: all at least 1, and no more publishers than topics.
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.topics >= 1 && self.subscribers >= 1 && self.messages >= 1,
            "--topics, --subscribers and --messages must be at least 1"
        );
        ensure!(
            (1..=self.topics).contains(&self.publishers),
            "--publishers must be between 1 and --topics ({})",
            self.topics
        );
        Ok(())
    }

    /// The run's topic names, `<prefix><sep><pid><sep><t>` for t in 0..T; with one topic
    /// `<prefix><sep><pid>`, the name single-topic runs always had.
    pub fn topic_names(&self, prefix: &str, separator: char) -> Vec<String> {
        let run = format!("{prefix}{separator}{}", std::process::id());
        if self.topics == 1 {
            return vec![run];
        }
        (0..self.topics).map(|t| format!("{run}{separator}{t}")).collect()
    }

    /// The topics publisher `p` publishes to, in order: those t with t % P == p.
    pub fn topics_of(&self, publisher: usize) -> impl Iterator<Item = usize> {
        (publisher..self.topics).step_by(self.publishers)
    }

    /// Subscriber connections in all: T x S; subscriber i is on topic i % T.
    pub fn connections(&self) -> usize {
        self.topics * self.subscribers
    }

    /// Deliveries in a run: T x S x M.
    pub fn deliveries(&self) -> u64 {
        self.connections() as u64 * self.messages
    }
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

/// Per-operation latencies in microseconds, sorted, and the run's wall time.
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

    /// One line of text, or one JSON object with the keys of `herald bench --json`.
    fn print(&self, scenario: &str, params: &[(&str, Value)], json: bool) {
        let n = self.latencies.len();
        let seconds = self.elapsed.as_secs_f64();
        let per_second = n as f64 / seconds;
        let (p50, p90, p99) = (self.percentile(0.5), self.percentile(0.9), self.percentile(0.99));
        let max = self.latencies.last().copied().unwrap_or_default();
        if json {
            let mut report = serde_json::json!({ "scenario": scenario });
            for (name, value) in params {
                report[*name] = value.clone();
            }
            for (name, value) in
                [("count", n as u64), ("p50_us", p50), ("p90_us", p90), ("p99_us", p99), ("max_us", max)]
            {
                report[name] = value.into();
            }
            report["seconds"] = ((seconds * 1000.0).round() / 1000.0).into();
            report["per_second"] = (per_second.round() as u64).into();
            println!("{report}");
        } else {
            let params: Vec<String> = params.iter().map(|(name, value)| format!("{name}={value}")).collect();
            println!(
                "{scenario} {}: {n} in {seconds:.2} s = {per_second:.0}/s; latency us p50={p50} p90={p90} p99={p99} max={max}",
                params.join(" ")
            );
        }
    }
}

/// One timed operation of a worker, pushing its latency (µs).
type Step<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// Runs `total` operations over one task per worker, each taking the next from a shared
/// count until it is reached (the driver of `herald bench`). Gives the workers back.
async fn measure<W: Send + 'static>(
    workers: Vec<W>,
    total: u64,
    step: for<'a> fn(&'a mut W, &'a mut Vec<u64>) -> Step<'a>,
) -> anyhow::Result<(Vec<W>, Report)> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut worker| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while done.fetch_add(1, Ordering::Relaxed) < total {
                    step(&mut worker, &mut latencies).await?;
                }
                anyhow::Ok((worker, latencies))
            })
        })
        .collect();
    let mut workers = Vec::with_capacity(tasks.len());
    let mut latencies = Vec::with_capacity(total as usize);
    for task in tasks {
        let (worker, mine) = task.await.context("worker panicked")??;
        workers.push(worker);
        latencies.extend(mine);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok((workers, Report { latencies, elapsed }))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::RabbitmqQueue(args) => rabbitmq_queue(args).await,
        Command::JetstreamPublish(args) => jetstream_publish(args).await,
        Command::NatsWsFanout(args) => nats_ws_fanout(args).await,
        Command::MqttWsFanout(args) => mqtt_fanout::mqtt_ws_fanout(args).await,
        Command::Idle(args) => idle::idle(args).await,
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

    let properties = BasicProperties::default().with_delivery_mode(if args.durable { 2 } else { 1 });
    let payload: Arc<[u8]> = vec![b'x'; args.size].into();
    let mut workers = Vec::with_capacity(args.workers);
    for _ in 0..args.workers {
        let channel = conn.create_channel().await.context("cannot open a worker channel")?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.context("cannot enable publisher confirms")?;
        workers.push(RabbitWorker {
            channel,
            queue: queue.clone(),
            payload: payload.clone(),
            properties: properties.clone(),
        });
    }

    let result = async {
        let (workers, _) = measure(workers, WARM_UP, round_trip).await.context("warm-up failed")?;
        measure(workers, args.messages, round_trip).await
    }
    .await;

    // Clean up even when the run failed, but report the run's error first.
    let deleted = admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .with_context(|| format!("cannot delete queue {queue}"));
    let (_, r) = result?;
    deleted?;
    let _ = conn.close(200, "peer-bench done".into()).await;
    let params = [("workers", args.workers.into()), ("size", args.size.into()), ("durable", args.durable.into())];
    r.print("rabbitmq-queue", &params, args.json);
    Ok(())
}

/// A worker on its own channel: publish (confirmed), basic.get, ack per step.
struct RabbitWorker {
    channel: Channel,
    queue: String,
    payload: Arc<[u8]>,
    properties: BasicProperties,
}

fn round_trip<'a>(w: &'a mut RabbitWorker, latencies: &'a mut Vec<u64>) -> Step<'a> {
    Box::pin(async move {
        let t0 = Instant::now();
        let confirmation = w
            .channel
            .basic_publish(
                "".into(),
                w.queue.as_str().into(),
                BasicPublishOptions::default(),
                &w.payload,
                w.properties.clone(),
            )
            .await
            .context("basic.publish failed")?
            .await
            .context("publisher confirm failed")?;
        ensure!(confirmation.is_ack(), "broker did not confirm a publish: {confirmation:?}");
        let message = loop {
            // Another worker may take "our" message; any one will do.
            let got = w
                .channel
                .basic_get(w.queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .context("basic.get failed")?;
            if let Some(message) = got {
                break message;
            }
        };
        message.delivery.ack(BasicAckOptions::default()).await.context("basic.ack failed")?;
        latencies.push(t0.elapsed().as_micros() as u64);
        Ok(())
    })
}

async fn jetstream_publish(args: PublishArgs) -> anyhow::Result<()> {
    use async_nats::jetstream::{self, stream};

    ensure!(args.publishers >= 1 && args.messages >= 1, "--publishers and --messages must be at least 1");
    let name = args.stream.clone().unwrap_or_else(|| format!("PEERBENCH_{}", std::process::id()));
    let subject = name.to_lowercase();
    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let mut publishers = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers {
        let client =
            async_nats::connect(&args.url).await.with_context(|| format!("cannot connect to NATS at {}", args.url))?;
        publishers.push(JsPublisher { js: jetstream::new(client), subject: subject.clone(), payload: payload.clone() });
    }
    let admin = publishers[0].js.clone();
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        ..stream::Config::default()
    };
    admin.get_or_create_stream(config).await.with_context(|| format!("cannot create stream {name}"))?;

    let result = async {
        let (publishers, _) = measure(publishers, WARM_UP, js_publish).await.context("warm-up failed")?;
        measure(publishers, args.messages, js_publish).await
    }
    .await;
    if !args.keep {
        admin.delete_stream(&name).await.with_context(|| format!("cannot delete stream {name}"))?;
    }
    let (_, r) = result?;
    r.print("jetstream-publish", &[("publishers", args.publishers.into()), ("size", args.size.into())], args.json);
    Ok(())
}

/// A publisher on its own connection: one publish, PubAck awaited, per step.
struct JsPublisher {
    js: async_nats::jetstream::Context,
    subject: String,
    payload: bytes::Bytes,
}

fn js_publish<'a>(p: &'a mut JsPublisher, latencies: &'a mut Vec<u64>) -> Step<'a> {
    Box::pin(async move {
        let t0 = Instant::now();
        p.js.publish(p.subject.clone(), p.payload.clone())
            .await
            .context("publish failed")?
            .await
            .context("no PubAck")?;
        latencies.push(t0.elapsed().as_micros() as u64);
        Ok(())
    })
}

/// Mirrors `herald bench fanout`: subscribers speak the NATS protocol over WebSocket and
/// count the bytes of the `MSG` lines and payloads they receive (a message may span
/// frames), so the client does as little work as Herald's raw subscribers do. T x S
/// subscribers, subscriber i on subject i % T; P publishers on the client port, each
/// with its own connection, publishing M rounds of one message to each of its subjects.
async fn nats_ws_fanout(args: FanoutArgs) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let shape = &args.shape;
    shape.check()?;
    let subjects = shape.topic_names("bench.fanout", '.');
    let mut sockets = Vec::with_capacity(shape.connections());
    for i in 0..shape.connections() {
        let subject = &subjects[i % shape.topics];
        // What one delivery costs on the wire: `MSG <subject> <sid> <size>\r\n<payload>\r\n`.
        let per_message = format!("MSG {subject} 1 {}\r\n", shape.size).len() + shape.size + 2;
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
        sockets.push((socket, per_message as u64 * shape.messages));
    }
    let subscribers: Vec<_> = sockets
        .into_iter()
        .map(|(mut socket, expected)| {
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
    let mut clients = Vec::with_capacity(shape.publishers);
    for _ in 0..shape.publishers {
        clients.push(async_nats::connect(&args.url).await.with_context(|| format!("cannot connect to {}", args.url))?);
    }
    let payload = bytes::Bytes::from(vec![b'x'; shape.size]);
    let started = Instant::now();
    let publishers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(p, client)| {
            let mine: Vec<async_nats::Subject> = shape.topics_of(p).map(|t| subjects[t].as_str().into()).collect();
            let (payload, messages) = (payload.clone(), shape.messages);
            tokio::spawn(async move {
                for _ in 0..messages {
                    for subject in &mine {
                        client.publish(subject.clone(), payload.clone()).await.context("publish failed")?;
                    }
                }
                client.flush().await.context("flush failed")?;
                anyhow::Ok((client, Instant::now()))
            })
        })
        .collect();
    // The clients stay open until the last delivery: a flush only hands the messages to
    // the socket, and closing it before nats-server has read them all can lose them.
    let mut clients = Vec::with_capacity(shape.publishers);
    let mut published = Duration::ZERO;
    for (p, task) in publishers.into_iter().enumerate() {
        let (client, done) = task.await.with_context(|| format!("publisher {p} panicked"))??;
        clients.push(client);
        published = published.max(done.duration_since(started));
    }
    let mut last = started;
    for s in subscribers {
        let done = tokio::time::timeout(Duration::from_secs(120), s).await.context("timed out")???;
        last = last.max(done);
    }
    let elapsed = last.duration_since(started);
    drop(clients);
    print_fanout("nats-ws-fanout", shape, elapsed, published);
    Ok(())
}

/// Prints a fan-out run's result, as a line or (with `--json`) one JSON object with the
/// keys `tools/bench-fanout.sh` reads, and `topics` and `publishers`. `elapsed` runs from
/// the first publish to the last delivery, `published` to the last publisher's flush:
/// deliveries/s = T x S x M / `elapsed`, publishes/s = T x M / `published`.
pub(crate) fn print_fanout(scenario: &str, shape: &FanoutShape, elapsed: Duration, published: Duration) {
    let FanoutShape { topics, subscribers, publishers, messages, size, json } = *shape;
    let deliveries = shape.deliveries();
    let per_second = deliveries as f64 / elapsed.as_secs_f64();
    let publish_rate = (topics as u64 * messages) as f64 / published.as_secs_f64();
    if json {
        let report = serde_json::json!({
            "scenario": scenario,
            "topics": topics,
            "subscribers": subscribers,
            "publishers": publishers,
            "messages": messages,
            "size": size,
            "deliveries": deliveries,
            "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "deliveries_per_second": per_second.round() as u64,
            "publish_per_second": publish_rate.round() as u64,
        });
        println!("{report}");
    } else {
        println!(
            "{scenario} topics={topics} subscribers={subscribers} publishers={publishers} messages={messages} size={size}: {deliveries} deliveries in {:.2} s = {per_second:.0}/s (published at {publish_rate:.0}/s)",
            elapsed.as_secs_f64()
        );
    }
}
