//! `herald bench`: load generators against a running broker, reporting throughput and
//! latency percentiles (text, or one JSON object with `--json`).
//!
//! `queue` is a round-trip benchmark: each worker enqueues one message, fetches one,
//! and acks it, over HTTP, until the total count is reached. `tools/peer-bench` runs
//! the same scenario against RabbitMQ so the two can be compared in one run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use herald_client::{Client, FetchOptions};

/// `herald bench` scenarios.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Queue round trips: enqueue, fetch, ack, by concurrent workers.
    Queue(QueueArgs),
    /// gRPC publish throughput, unary or batched (see `bench_grpc`).
    GrpcPublish(crate::bench_grpc::GrpcPublishArgs),
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
        BenchCommand::GrpcPublish(args) => crate::bench_grpc::run(args).await,
    }
}

/// Round-trip latencies, in microseconds, sorted.
struct Report {
    latencies: Vec<u64>,
    elapsed: Duration,
}

impl Report {
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
    let n = r.latencies.len() as f64;
    let per_second = n / r.elapsed.as_secs_f64();
    let (p50, p90, p99) = (r.percentile(0.5), r.percentile(0.9), r.percentile(0.99));
    let max = r.latencies.last().copied().unwrap_or_default();
    if args.json {
        println!(
            "{{\"scenario\":\"herald-queue\",\"workers\":{},\"size\":{},\"round_trips\":{},\"seconds\":{:.3},\"per_second\":{:.0},\"p50_us\":{p50},\"p90_us\":{p90},\"p99_us\":{p99},\"max_us\":{max}}}",
            args.workers,
            args.size,
            r.latencies.len(),
            r.elapsed.as_secs_f64(),
            per_second
        );
    } else {
        println!(
            "herald-queue workers={} size={}: {} round trips in {:.2} s = {:.0}/s; latency us p50={p50} p90={p90} p99={p99} max={max}",
            args.workers,
            args.size,
            r.latencies.len(),
            r.elapsed.as_secs_f64(),
            per_second
        );
    }
    Ok(())
}
