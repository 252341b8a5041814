//! `herald bench grpc-publish`: gRPC publish throughput against a running broker, with
//! unary `Topics.Publish` calls (`--batch 1`) or `Topics.PublishBatch` calls of
//! `--batch N` messages, by concurrent publishers, each on its own HTTP/2 connection.
//!
//! Reports messages per second, calls per second and per-call latency percentiles (text,
//! or one JSON object with `--json`). Hooked into [`crate::bench::BenchCommand`].

use std::time::Instant;

use bytes::Bytes;
use clap::Args;
use herald_client::grpc::pb;
use herald_client::GrpcClient;

use crate::bench::{measure, Step};

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
    /// Topic to publish to (with `--topics` N: `TOPIC.0` to `TOPIC.<N-1>`); default
    /// `bench.grpc.<pid>.<i>`. Lets a subscriber started beforehand follow the run.
    #[arg(long)]
    pub topic: Option<String>,
    /// TLS trust and credentials (as for `herald pub`).
    #[command(flatten)]
    pub conn: crate::cli::ConnArgs,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

/// A gRPC publisher: one call per step, unary for a step of one unit when `--batch` is
/// 1, else `PublishBatch` of the step's units.
struct Publisher {
    client: GrpcClient,
    topics: pb::topics_client::TopicsClient<herald_client::grpc::Channel>,
    topic: String,
    payload: Bytes,
    unary: bool,
}

fn publish_step<'a>(p: &'a mut Publisher, units: u64, latencies: &'a mut Vec<u64>) -> Step<'a> {
    Box::pin(async move {
        let t0 = Instant::now();
        if p.unary {
            let request = pb::PublishRequest {
                topic: p.topic.clone(),
                data: p.payload.clone(),
                kind: pb::Kind::Text as i32,
                ..Default::default()
            };
            p.topics.publish(p.client.request(request)).await?;
        } else {
            let message =
                pb::BatchMessage { data: p.payload.clone(), kind: pb::Kind::Text as i32, ..Default::default() };
            let request = pb::PublishBatchRequest { topic: p.topic.clone(), messages: vec![message; units as usize] };
            let published = p.topics.publish_batch(p.client.request(request)).await?.into_inner().published;
            anyhow::ensure!(published.len() as u64 == units, "batch of {units} got {} offsets", published.len());
        }
        latencies.push(t0.elapsed().as_micros() as u64);
        Ok(())
    })
}

/// Runs `herald bench grpc-publish`.
pub async fn run(args: GrpcPublishArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.publishers >= 1 && args.messages >= 1, "--publishers and --messages must be at least 1");
    anyhow::ensure!((1..=1000).contains(&args.batch), "--batch must be from 1 to 1000");
    let payload = Bytes::from("x".repeat(args.size));
    let mut publishers = Vec::with_capacity(args.publishers);
    for i in 0..args.publishers {
        let client = args.conn.grpc(&args.url).await?;
        let n = i % args.topics.max(1);
        let topic = match &args.topic {
            Some(topic) if args.topics <= 1 => topic.clone(),
            Some(prefix) => format!("{prefix}.{n}"),
            None => format!("bench.grpc.{}.{n}", std::process::id()),
        };
        let topics = client.topics();
        publishers.push(Publisher { client, topics, topic, payload: payload.clone(), unary: args.batch == 1 });
    }
    let batch = args.batch as u64;
    let (publishers, _) = measure(publishers, 1000, batch, publish_step).await?;
    let (_, r) = measure(publishers, args.messages, batch, publish_step).await?;
    let mode = if args.batch == 1 { "unary" } else { "batch" };
    let params = [
        ("mode", mode.into()),
        ("publishers", args.publishers.into()),
        ("batch", args.batch.into()),
        ("size", args.size.into()),
    ];
    r.print("herald-grpc-publish", &params, args.json);
    Ok(())
}
