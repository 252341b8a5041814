//! `herald bench`: load generators against a running broker, reporting throughput and
//! latency percentiles (text, or one JSON object with `--json`).
//!
//! `queue` is a round-trip benchmark: each worker enqueues one message, fetches one,
//! and acks it, over HTTP, until the total count is reached. `tools/peer-bench` runs
//! the same scenario against RabbitMQ so the two can be compared in one run.
//!
//! `publish` measures acknowledged publishes: each publisher holds one WebSocket and
//! publishes one message, waiting for its `published` reply (sent only once the store
//! holds it as durably as configured) before the next; with `--pipeline N` it keeps N
//! publishes in flight. `tools/peer-bench
//! jetstream-publish` does the same against NATS JetStream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use herald_client::{Client, FetchOptions, WsConnection};
use serde_json::Value;

/// `herald bench` scenarios.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Queue round trips: enqueue, fetch, ack, by concurrent workers.
    Queue(QueueArgs),
    /// Acknowledged publishes to one topic by concurrent WebSocket publishers.
    Publish(PublishArgs),
    /// gRPC publish throughput, unary or batched (see `bench_grpc`).
    GrpcPublish(crate::bench_grpc::GrpcPublishArgs),
    /// End-to-end fan-out: one publisher, many raw WebSocket subscribers (see `bench_fanout`).
    Fanout(crate::bench_fanout::FanoutArgs),
}

/// Flags of `herald bench publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Server URL.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Concurrent publishers, each with its own WebSocket.
    #[arg(long, default_value_t = 16)]
    pub publishers: usize,
    /// Publishes in total (after 500 untimed warm-up ones).
    #[arg(long, default_value_t = 20_000)]
    pub messages: u64,
    /// Payload size in bytes (a JSON string of this many bytes, quotes included).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Topic to publish to; default `bench.publish.<pid>`, deleted afterwards.
    #[arg(long)]
    pub topic: Option<String>,
    /// Keep the topic's history afterwards (e.g. to time a restart holding it).
    #[arg(long)]
    pub keep: bool,
    /// Publishes each publisher keeps in flight (1: wait for each ack before the next).
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `herald bench queue`.
#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Server URL.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Round trips in total (after 500 untimed warm-up ones).
    #[arg(long, default_value_t = 20_000)]
    pub messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a benchmark.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Queue(args) => queue(args).await,
        BenchCommand::Publish(args) => publish(args).await,
        BenchCommand::GrpcPublish(args) => crate::bench_grpc::run(args).await,
        BenchCommand::Fanout(args) => crate::bench_fanout::run(args).await,
    }
}

/// Round-trip latencies, in microseconds, sorted.
struct Report {
    latencies: Vec<u64>,
    elapsed: Duration,
}

impl Report {
    /// Prints one line of text, or one JSON object, naming the scenario and its `params`.
    fn print(&self, scenario: &str, params: &[(&str, usize)], json: bool) {
        let n = self.latencies.len();
        let seconds = self.elapsed.as_secs_f64();
        let per_second = n as f64 / seconds;
        let (p50, p90, p99) = (self.percentile(0.5), self.percentile(0.9), self.percentile(0.99));
        let max = self.latencies.last().copied().unwrap_or_default();
        if json {
            let mut report = serde_json::json!({ "scenario": scenario });
            for (name, value) in params {
                report[*name] = (*value).into();
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

    fn percentile(&self, p: f64) -> u64 {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

async fn round_trips(client: &Client, queue: &str, workers: usize, total: u64, size: usize) -> anyhow::Result<Report> {
    let done = Arc::new(AtomicU64::new(0));
    let payload = "x".repeat(size);
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (client, queue, done, payload) = (client.clone(), queue.to_owned(), done.clone(), payload.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let fetch = FetchOptions { max: 1, wait: Duration::from_secs(1), ..FetchOptions::default() };
                while done.fetch_add(1, Ordering::Relaxed) < total {
                    let t0 = Instant::now();
                    client.enqueue(&queue, "text/plain", payload.clone(), Duration::ZERO).await?;
                    let job = loop {
                        // Another worker may take "our" message; any one will do.
                        if let Some(job) = client.fetch_jobs(&queue, fetch).await?.pop() {
                            break job;
                        }
                    };
                    client.ack(&queue, &job).await?;
                    latencies.push(t0.elapsed().as_micros() as u64);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total as usize);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Report { latencies, elapsed })
}

async fn queue(args: QueueArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1 && args.messages >= 1, "--workers and --messages must be at least 1");
    let client = Client::new(&args.url);
    let queue = format!("bench.queue.{}", std::process::id());
    round_trips(&client, &queue, args.workers, 500, args.size).await?;
    let r = round_trips(&client, &queue, args.workers, args.messages, args.size).await?;
    r.print("herald-queue", &[("workers", args.workers), ("size", args.size)], args.json);
    Ok(())
}

async fn publishes(
    connections: &mut Vec<WsConnection>,
    topic: &str,
    total: u64,
    size: usize,
    pipeline: usize,
) -> anyhow::Result<Report> {
    let done = Arc::new(AtomicU64::new(0));
    let payload = Value::String("x".repeat(size.saturating_sub(2)));
    let started = Instant::now();
    let tasks: Vec<_> = connections
        .drain(..)
        .map(|mut ws| {
            let (topic, done, payload) = (topic.to_owned(), done.clone(), payload.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                // Sent and not yet answered, in order (replies come in the order sent).
                let mut in_flight = std::collections::VecDeque::with_capacity(pipeline);
                let mut next_id = 1u64 << 40; // apart from WsConnection's own request ids
                loop {
                    while in_flight.len() < pipeline && done.fetch_add(1, Ordering::Relaxed) < total {
                        next_id += 1;
                        let frame =
                            serde_json::json!({"op": "publish", "id": next_id, "topic": topic, "data": payload});
                        in_flight.push_back(Instant::now());
                        ws.send_text(frame.to_string()).await?;
                    }
                    let Some(t0) = in_flight.pop_front() else { break };
                    let reply = ws.recv().await?;
                    anyhow::ensure!(reply["offset"].is_u64(), "publish refused: {reply}");
                    latencies.push(t0.elapsed().as_micros() as u64);
                }
                anyhow::Ok((ws, latencies))
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total as usize);
    for task in tasks {
        let (ws, mine) = task.await??;
        connections.push(ws);
        latencies.extend(mine);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Report { latencies, elapsed })
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.publishers >= 1 && args.messages >= 1, "--publishers and --messages must be at least 1");
    let mut connections = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers {
        connections.push(WsConnection::connect(&args.url).await?);
    }
    let topic = args.topic.clone().unwrap_or_else(|| format!("bench.publish.{}", std::process::id()));
    anyhow::ensure!(args.pipeline >= 1, "--pipeline must be at least 1");
    publishes(&mut connections, &topic, 500, args.size, args.pipeline).await?;
    let r = publishes(&mut connections, &topic, args.messages, args.size, args.pipeline).await?;
    for ws in connections {
        let _ = ws.close().await;
    }
    if !args.keep {
        // The benchmark's history is of no further use.
        let _ = Client::new(&args.url).delete(&topic).await;
    }
    let params = [("publishers", args.publishers), ("size", args.size), ("pipeline", args.pipeline)];
    r.print("herald-publish", &params, args.json);
    Ok(())
}
