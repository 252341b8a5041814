//! `herald bench`: load generators against a running broker, reporting throughput and
//! latency percentiles (text, or one JSON object with `--json`).
//!
//! `queue` is a round-trip benchmark: each worker enqueues one message, fetches one,
//! and acks it, over HTTP, until the total count is reached; with `--batch N` it
//! enqueues N in one batch request, then fetches and acks until N are done (up to 100,
//! or `--fetch`, per fetch; each fetch's jobs acked in one batch request). With
//! `--producers P`, P producers enqueue the batches while the workers only fetch and
//! ack. `tools/peer-bench` runs the per-job scenario against RabbitMQ, and
//! `tools/pg-peer` the split one against graphile-worker.
//!
//! On a terminal, a line on stderr shows the count so far and the rate of the last
//! second while a run lasts (nothing when stderr is a file or a pipe, so scripts and
//! tests read only the report).
//!
//! `publish` measures acknowledged publishes: each publisher holds one WebSocket and
//! publishes one message, waiting for its `published` reply (sent only once the store
//! holds it as durably as configured) before the next; with `--pipeline N` it sends N
//! publishes, then reads their N replies. `tools/peer-bench
//! jetstream-publish` does the same against NATS JetStream.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use herald_client::{Client, EntryError, FetchOptions, Job, NewJob, WsConnection};
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
    /// TLS trust and credentials (as for `herald pub`).
    #[command(flatten)]
    pub conn: crate::cli::ConnArgs,
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
    /// Jobs per step (1 to 1000): enqueued in one batch request, then fetched and acked
    /// (`--fetch` at a time, each fetch's jobs acked in one request). 1: one enqueue,
    /// one fetch, one ack per job.
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// Jobs per fetch (1 to 100; default: the batch, at most 100). `--batch 100 --fetch
    /// 1` is a batching producer with workers that take one job at a time.
    #[arg(long)]
    pub fetch: Option<u64>,
    /// Separate producers (0: none, each worker enqueues its own jobs): this many tasks
    /// enqueue the jobs in batches of `--batch` while the workers only fetch and ack;
    /// timed from the first enqueue to the last ack, latency per fetch-and-ack.
    #[arg(long, default_value_t = 0)]
    pub producers: usize,
    /// With `--producers`: each worker acks the jobs it got with its next fetch (one
    /// request per fetch, `{"ack":[...]}` in the fetch's body) instead of in a request
    /// of their own; the last ones, once every job was fetched, in an ack request.
    #[arg(long, requires = "producers")]
    pub ack_with_fetch: bool,
    /// The queue (default `bench.queue.<pid>`, one of its own; name one to share it
    /// with load generators on other cluster nodes).
    #[arg(long)]
    pub queue: Option<String>,
    /// TLS trust and credentials (as for `herald pub`).
    #[command(flatten)]
    pub conn: crate::cli::ConnArgs,
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

/// What a benchmark measured: per-operation latencies and the units of work done
/// (messages; more than the operations when one call carries a batch).
pub(crate) struct Report {
    /// Per-operation latencies in microseconds, sorted.
    latencies: Vec<u64>,
    units: u64,
    elapsed: Duration,
}

impl Report {
    /// Prints one line of text, or one JSON object, naming the scenario and its `params`.
    pub(crate) fn print(&self, scenario: &str, params: &[(&str, Value)], json: bool) {
        let ops = self.latencies.len() as u64;
        let seconds = self.elapsed.as_secs_f64();
        let per_second = self.units as f64 / seconds;
        let ops_per_second = ops as f64 / seconds;
        let (p50, p90, p99) = (self.percentile(0.5), self.percentile(0.9), self.percentile(0.99));
        let max = self.latencies.last().copied().unwrap_or_default();
        if json {
            let mut report = serde_json::json!({ "scenario": scenario });
            for (name, value) in params {
                report[*name] = value.clone();
            }
            report["count"] = self.units.into();
            if ops != self.units {
                report["calls"] = ops.into();
                report["calls_per_second"] = (ops_per_second.round() as u64).into();
            }
            for (name, value) in [("p50_us", p50), ("p90_us", p90), ("p99_us", p99), ("max_us", max)] {
                report[name] = value.into();
            }
            report["seconds"] = ((seconds * 1000.0).round() / 1000.0).into();
            report["per_second"] = (per_second.round() as u64).into();
            println!("{report}");
        } else {
            let params: Vec<String> = params
                .iter()
                .map(|(name, value)| match value.as_str() {
                    Some(text) => format!("{name}={text}"),
                    None => format!("{name}={value}"),
                })
                .collect();
            let calls = if ops == self.units { String::new() } else { format!(" ({ops_per_second:.0} calls/s)") };
            println!(
                "{scenario} {}: {} in {seconds:.2} s = {per_second:.0}/s{calls}; latency us p50={p50} p90={p90} p99={p99} max={max}",
                params.join(" "),
                self.units
            );
        }
    }

    fn percentile(&self, p: f64) -> u64 {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

/// A progress line on stderr, redrawn every second while a run lasts, only if stderr is
/// a terminal. Dropped, it stops and clears its line.
pub(crate) struct Progress {
    done: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `done` of `total` `unit`s.
    pub(crate) fn start(unit: &'static str, total: u64) -> Self {
        let done = Arc::new(AtomicU64::new(0));
        let task = std::io::stderr().is_terminal().then(|| {
            let done = done.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::now() + Duration::from_secs(1),
                    Duration::from_secs(1),
                );
                let mut before = 0;
                loop {
                    tick.tick().await;
                    let now = done.load(Ordering::Relaxed);
                    let elapsed = started.elapsed().as_secs();
                    // \r and "erase to the end of the line": the line is redrawn in place.
                    eprint!(
                        "\r\x1b[Kherald bench: {now}/{total} {unit} in {elapsed} s, {}/s",
                        now.saturating_sub(before)
                    );
                    let _ = std::io::stderr().flush();
                    before = now;
                }
            })
        });
        Self { done, task }
    }

    /// The count the run adds its finished units to.
    pub(crate) fn counter(&self) -> Arc<AtomicU64> {
        self.done.clone()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            eprint!("\r\x1b[K");
            let _ = std::io::stderr().flush();
        }
    }
}

/// One step of a worker: `units` units of work, pushing one latency (µs) per operation.
pub(crate) type Step<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// Runs `total` units of work over one task per worker: each claims up to `per_step`
/// units at a time from a shared count and runs `step` on them, until the count is
/// reached. Gives the workers back with the report.
pub(crate) async fn measure<W: Send + 'static>(
    workers: Vec<W>,
    total: u64,
    per_step: u64,
    step: for<'a> fn(&'a mut W, u64, &'a mut Vec<u64>) -> Step<'a>,
) -> anyhow::Result<(Vec<W>, Report)> {
    let claimed = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("messages", total);
    let started = Instant::now();
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut worker| {
            let (claimed, done) = (claimed.clone(), progress.counter());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let from = claimed.fetch_add(per_step, Ordering::Relaxed);
                    if from >= total {
                        break;
                    }
                    let units = per_step.min(total - from);
                    step(&mut worker, units, &mut latencies).await?;
                    done.fetch_add(units, Ordering::Relaxed);
                }
                anyhow::Ok((worker, latencies))
            })
        })
        .collect();
    let mut workers = Vec::with_capacity(tasks.len());
    let mut latencies = Vec::with_capacity(total as usize);
    for task in tasks {
        let (worker, mine) = task.await??;
        workers.push(worker);
        latencies.extend(mine);
    }
    let elapsed = started.elapsed();
    drop(progress);
    latencies.sort_unstable();
    Ok((workers, Report { latencies, units: total, elapsed }))
}

/// A queue worker: enqueue, fetch, ack, one round trip per step.
struct QueueWorker {
    client: Client,
    queue: String,
    /// The payload, text for single enqueues.
    payload: String,
    /// The same size as a JSON string, for batches (whose entries are JSON or binary).
    json: String,
    /// Jobs per fetch.
    fetch: u64,
    /// Ack a fetch's jobs with the next fetch (split mode).
    ack_with_fetch: bool,
}

impl QueueWorker {
    /// Enqueues `n` JSON jobs in one batch request; every one must be stored.
    async fn enqueue_batch(&self, n: usize) -> anyhow::Result<()> {
        all_done(self.client.enqueue_batch(&self.queue, &vec![NewJob::json(self.json.clone()); n]).await?, "enqueue")
    }

    /// Acks `jobs`: none, one ack request, or one batch ack; every one must be acked.
    async fn ack_all(&self, jobs: &[Job]) -> anyhow::Result<()> {
        match jobs {
            [] => {}
            [job] => self.client.ack(&self.queue, job).await?,
            _ => all_done(self.client.ack_batch(&self.queue, jobs).await?, "ack")?,
        }
        Ok(())
    }
}

/// Every entry of a batch done, or the first refusal as the error.
fn all_done<T>(outcomes: Vec<Result<T, EntryError>>, what: &str) -> anyhow::Result<()> {
    match outcomes.into_iter().find_map(Result::err) {
        Some(e) => Err(anyhow::anyhow!("{what} refused: {} {}", e.code, e.message)),
        None => Ok(()),
    }
}

fn round_trip<'a>(w: &'a mut QueueWorker, units: u64, latencies: &'a mut Vec<u64>) -> Step<'a> {
    Box::pin(async move {
        let t0 = Instant::now();
        if units == 1 {
            w.client.enqueue(&w.queue, "text/plain", w.payload.clone(), Duration::ZERO).await?;
        } else {
            w.enqueue_batch(units as usize).await?;
        }
        let mut done = 0;
        while done < units {
            // Another worker may take "our" messages; any will do.
            let max = (units - done).min(w.fetch) as u32;
            let fetch = FetchOptions { max, wait: Duration::from_secs(1), ..FetchOptions::default() };
            let jobs = w.client.fetch_jobs(&w.queue, fetch).await?;
            w.ack_all(&jobs).await?;
            done += jobs.len() as u64;
        }
        latencies.push(t0.elapsed().as_micros() as u64);
        Ok(())
    })
}

/// Producers and workers apart: `producers` tasks enqueue `total` jobs in batches of
/// `batch` while every worker fetches (`w.fetch` at a time, long-polling) and acks what
/// it got (in an ack request, or with its next fetch), until `total` are acked. Timed
/// from the start to the last ack; one latency per request that acked jobs, from the
/// start of the fetch that got them (or that acked them with the fetch) to its ack.
async fn split(workers: &[Arc<QueueWorker>], producers: usize, batch: u64, total: u64) -> anyhow::Result<Report> {
    let (enqueued, acked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let fetched = Arc::new(AtomicU64::new(0));
    let progress = Progress::start("messages", total);
    let started = Instant::now();
    let producer_tasks: Vec<_> = (0..producers)
        .map(|p| {
            let (w, enqueued) = (workers[p % workers.len()].clone(), enqueued.clone());
            tokio::spawn(async move {
                loop {
                    let from = enqueued.fetch_add(batch, Ordering::Relaxed);
                    if from >= total {
                        return anyhow::Ok(());
                    }
                    w.enqueue_batch(batch.min(total - from) as usize).await?;
                }
            })
        })
        .collect();
    let worker_tasks: Vec<_> = workers
        .iter()
        .map(|w| {
            let (w, acked, fetched, done) = (w.clone(), acked.clone(), fetched.clone(), progress.counter());
            tokio::spawn(async move {
                let (mut latencies, mut finished) = (Vec::new(), None);
                // Jobs fetched but not yet acked: they go with the next fetch.
                let mut held: Vec<Job> = Vec::new();
                let mut count = |n: u64, t0: Instant| {
                    latencies.push(t0.elapsed().as_micros() as u64);
                    done.fetch_add(n, Ordering::Relaxed);
                    if acked.fetch_add(n, Ordering::Relaxed) + n >= total {
                        finished = Some(started.elapsed());
                    }
                };
                while acked.load(Ordering::Relaxed) < total {
                    let fetch = FetchOptions {
                        max: w.fetch as u32,
                        wait: Duration::from_millis(100),
                        ..FetchOptions::default()
                    };
                    let t0 = Instant::now();
                    if !held.is_empty() && fetched.load(Ordering::Relaxed) >= total {
                        // Nothing left to fetch: no long poll to carry these acks.
                        w.ack_all(&held).await?;
                        count(std::mem::take(&mut held).len() as u64, t0);
                        continue;
                    }
                    let jobs = if held.is_empty() {
                        w.client.fetch_jobs(&w.queue, fetch).await?
                    } else {
                        let (acks, jobs) = w.client.ack_and_fetch(&w.queue, &held, fetch).await?;
                        all_done(acks, "ack")?;
                        count(std::mem::take(&mut held).len() as u64, t0);
                        jobs
                    };
                    if jobs.is_empty() {
                        continue;
                    }
                    fetched.fetch_add(jobs.len() as u64, Ordering::Relaxed);
                    if w.ack_with_fetch {
                        held = jobs;
                    } else {
                        w.ack_all(&jobs).await?;
                        count(jobs.len() as u64, t0);
                    }
                }
                anyhow::Ok((latencies, finished))
            })
        })
        .collect();
    for task in producer_tasks {
        task.await??;
    }
    let (mut latencies, mut elapsed) = (Vec::new(), Duration::ZERO);
    for task in worker_tasks {
        let (mine, finished) = task.await??;
        latencies.extend(mine);
        elapsed = elapsed.max(finished.unwrap_or_default());
    }
    drop(progress);
    latencies.sort_unstable();
    Ok(Report { latencies, units: total, elapsed })
}

async fn queue(args: QueueArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers >= 1 && args.messages >= 1, "--workers and --messages must be at least 1");
    anyhow::ensure!((1..=1000).contains(&args.batch), "--batch must be 1 to 1000");
    let fetch = args.fetch.unwrap_or(args.batch.min(100));
    anyhow::ensure!((1..=100).contains(&fetch), "--fetch must be 1 to 100");
    let client = args.conn.http(&args.url)?;
    let queue = args.queue.unwrap_or_else(|| format!("bench.queue.{}", std::process::id()));
    let payload = "x".repeat(args.size);
    let json = format!("\"{}\"", "x".repeat(args.size.saturating_sub(2)));
    let workers = (0..args.workers)
        .map(|_| QueueWorker {
            client: client.clone(),
            queue: queue.clone(),
            payload: payload.clone(),
            json: json.clone(),
            fetch,
            ack_with_fetch: args.ack_with_fetch,
        })
        .collect();
    let r = if args.producers == 0 {
        let (workers, _) = measure(workers, 500, args.batch, round_trip).await?;
        measure(workers, args.messages, args.batch, round_trip).await?.1
    } else {
        let workers: Vec<Arc<QueueWorker>> = workers.into_iter().map(Arc::new).collect();
        split(&workers, args.producers, args.batch, 500).await?;
        split(&workers, args.producers, args.batch, args.messages).await?
    };
    let params = [
        ("workers", args.workers.into()),
        ("size", args.size.into()),
        ("batch", args.batch.into()),
        ("fetch", fetch.into()),
        ("producers", args.producers.into()),
        ("ack_with_fetch", args.ack_with_fetch.into()),
    ];
    r.print("herald-queue", &params, args.json);
    Ok(())
}

/// A WebSocket publisher: a step sends its units' publishes, then reads their replies
/// (which come in the order sent), timing each from its send to its reply.
struct Publisher {
    ws: WsConnection,
    topic: String,
    payload: Value,
    next_id: u64,
}

fn publish_step<'a>(p: &'a mut Publisher, units: u64, latencies: &'a mut Vec<u64>) -> Step<'a> {
    Box::pin(async move {
        let mut sent = Vec::with_capacity(units as usize);
        for _ in 0..units {
            p.next_id += 1;
            let frame = serde_json::json!({"op": "publish", "id": p.next_id, "topic": p.topic, "data": p.payload});
            sent.push(Instant::now());
            p.ws.send_text(frame.to_string()).await?;
        }
        for t0 in sent {
            let reply = p.ws.recv().await?;
            anyhow::ensure!(reply["offset"].is_u64(), "publish refused: {reply}");
            latencies.push(t0.elapsed().as_micros() as u64);
        }
        Ok(())
    })
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.publishers >= 1 && args.messages >= 1, "--publishers and --messages must be at least 1");
    anyhow::ensure!(args.pipeline >= 1, "--pipeline must be at least 1");
    let topic = args.topic.clone().unwrap_or_else(|| format!("bench.publish.{}", std::process::id()));
    let payload = Value::String("x".repeat(args.size.saturating_sub(2)));
    let (tls, auth) = (args.conn.tls()?, args.conn.authorization()?);
    let mut publishers = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers {
        let ws = WsConnection::connect_as(&args.url, &tls, auth.as_deref()).await?;
        // Ids apart from the ones WsConnection gives its own requests.
        publishers.push(Publisher { ws, topic: topic.clone(), payload: payload.clone(), next_id: 1 << 40 });
    }
    let pipeline = args.pipeline as u64;
    let (publishers, _) = measure(publishers, 500, pipeline, publish_step).await?;
    let (publishers, r) = measure(publishers, args.messages, pipeline, publish_step).await?;
    for p in publishers {
        let _ = p.ws.close().await;
    }
    if !args.keep {
        // The benchmark's history is of no further use.
        if let Ok(client) = args.conn.http(&args.url) {
            let _ = client.delete(&topic).await;
        }
    }
    let params =
        [("publishers", args.publishers.into()), ("size", args.size.into()), ("pipeline", args.pipeline.into())];
    r.print("herald-publish", &params, args.json);
    Ok(())
}
