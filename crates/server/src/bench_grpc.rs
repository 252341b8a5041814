//! `herald bench grpc-publish`: gRPC publish throughput against a running broker, with
//! unary `Topics.Publish` calls (`--batch 1`) or `Topics.PublishBatch` calls of
//! `--batch N` messages, by concurrent publishers, each on its own HTTP/2 connection.
//!
//! Reports messages per second, calls per second and per-call latency percentiles (text,
//! or one JSON object with `--json`). Hooked into [`crate::bench::BenchCommand`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use herald_client::grpc::pb;
use herald_client::GrpcClient;

/// Flags of `herald bench grpc-publish`.
#[derive(Debug, Args)]
pub struct GrpcPublishArgs {
    /// Server URL.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Concurrent publishers, each with its own connection, one call in flight each.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Messages in total (after 1000 untimed warm-up ones).
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Messages per call: 1 uses unary Publish, more uses PublishBatch (1 to 1000).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Topics to spread the publishers over (publisher i uses topic i mod N).
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

struct Run {
    /// Per-call latencies in microseconds, sorted.
    latencies: Vec<u64>,
    messages: u64,
    elapsed: Duration,
}

async fn publish_all(clients: &[GrpcClient], args: &GrpcPublishArgs, total: u64) -> anyhow::Result<Run> {
    let claimed = Arc::new(AtomicU64::new(0));
    let payload = Bytes::from("x".repeat(args.size));
    let batch = args.batch as u64;
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, client)| {
            let (client, claimed, payload) = (client.clone(), claimed.clone(), payload.clone());
            let topic = format!("bench.grpc.{}.{}", std::process::id(), i % args.topics.max(1));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut sent = 0u64;
                let mut topics = client.topics();
                loop {
                    // Claim up to `batch` messages of the total.
                    let from = claimed.fetch_add(batch, Ordering::Relaxed);
                    if from >= total {
                        break;
                    }
                    let n = batch.min(total - from);
                    let t0 = Instant::now();
                    if n == 1 && batch == 1 {
                        let request = pb::PublishRequest {
                            topic: topic.clone(),
                            data: payload.clone(),
                            kind: pb::Kind::Text as i32,
                            ..Default::default()
                        };
                        topics.publish(request).await?;
                    } else {
                        let message = pb::BatchMessage {
                            data: payload.clone(),
                            kind: pb::Kind::Text as i32,
                            ..Default::default()
                        };
                        let request =
                            pb::PublishBatchRequest { topic: topic.clone(), messages: vec![message; n as usize] };
                        let published = topics.publish_batch(request).await?.into_inner().published;
                        anyhow::ensure!(published.len() as u64 == n, "batch of {n} got {} offsets", published.len());
                    }
                    latencies.push(t0.elapsed().as_micros() as u64);
                    sent += n;
                }
                anyhow::Ok((latencies, sent))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut messages = 0;
    for task in tasks {
        let (l, n) = task.await??;
        latencies.extend(l);
        messages += n;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Run { latencies, messages, elapsed })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Runs `herald bench grpc-publish`.
pub async fn run(args: GrpcPublishArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.publishers >= 1 && args.messages >= 1, "--publishers and --messages must be at least 1");
    anyhow::ensure!((1..=1000).contains(&args.batch), "--batch must be from 1 to 1000");
    let mut clients = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers {
        clients.push(GrpcClient::connect(&args.url).await?);
    }
    publish_all(&clients, &args, 1000).await?;
    let r = publish_all(&clients, &args, args.messages).await?;
    let secs = r.elapsed.as_secs_f64();
    let (per_second, calls_per_second) = (r.messages as f64 / secs, r.latencies.len() as f64 / secs);
    let l = &r.latencies;
    let (p50, p90, p99) = (percentile(l, 0.5), percentile(l, 0.9), percentile(l, 0.99));
    let max = l.last().copied().unwrap_or_default();
    let mode = if args.batch == 1 { "unary" } else { "batch" };
    if args.json {
        println!(
            "{{\"scenario\":\"herald-grpc-publish\",\"mode\":\"{mode}\",\"publishers\":{},\"batch\":{},\"size\":{},\"messages\":{},\"calls\":{},\"seconds\":{secs:.3},\"per_second\":{per_second:.0},\"calls_per_second\":{calls_per_second:.0},\"p50_us\":{p50},\"p90_us\":{p90},\"p99_us\":{p99},\"max_us\":{max}}}",
            args.publishers,
            args.batch,
            args.size,
            r.messages,
            l.len()
        );
    } else {
        println!(
            "herald-grpc-publish {mode} publishers={} batch={} size={}: {} messages in {secs:.2} s = {per_second:.0} msg/s ({calls_per_second:.0} calls/s); call latency us p50={p50} p90={p90} p99={p99} max={max}",
            args.publishers, args.batch, args.size, r.messages
        );
    }
    Ok(())
}
