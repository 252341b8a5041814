//! Measures the embedded-store candidates for Herald's disk store with identical
//! scenarios: durable append throughput and latency under W concurrent writers,
//! start-up time after 1 000 000 messages, and range reads from the middle.
//!
//! Candidates: `herald-store-disk` (its `Store` API, fsync always, group commit),
//! redb (a transaction per append, and a hand-made group commit), fjall (a persist per
//! append, and a hand-made group commit). Every run uses a fresh directory that is
//! removed afterwards; each figure is the median of `--runs` runs.

mod candidates;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

use candidates::{Appender, Engine, Variant};

/// Payload size of every message, in bytes.
pub const PAYLOAD: usize = 128;

#[derive(Parser, Debug)]
#[command(about = "Benchmarks herald-store-disk, redb and fjall with the same scenarios")]
struct Args {
    /// Runs of each measurement; the medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print JSON (all runs and the medians) instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON to this file (the table still goes to stdout).
    #[arg(long)]
    json_file: Option<PathBuf>,
    /// Concurrent writers for the append scenario (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    writers: Vec<usize>,
    /// Append variants to run (comma-separated): raw-fsync, herald, herald-tasks, redb, redb-batched, fjall, fjall-batched.
    #[arg(long, value_delimiter = ',', default_value = "raw-fsync,herald,herald-tasks,redb,redb-batched,fjall,fjall-batched")]
    variants: Vec<String>,
    /// Engines for the start-up and read scenarios (comma-separated): herald, redb, fjall.
    #[arg(long, value_delimiter = ',', default_value = "herald,redb,fjall")]
    engines: Vec<String>,
    /// Scenarios (comma-separated): append, startup (start-up includes the read scenario).
    #[arg(long, value_delimiter = ',', default_value = "append,startup")]
    scenarios: Vec<String>,
    /// Messages per append run with one writer.
    #[arg(long, default_value_t = 10_000)]
    messages_single: u64,
    /// Messages per append run with more than one writer.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// An append run stops early after this many seconds (the figures use what was done).
    #[arg(long, default_value_t = 25)]
    cap_secs: u64,
    /// Messages written before the start-up measurement.
    #[arg(long, default_value_t = 1_000_000)]
    startup_messages: u64,
    /// Range reads of 1000 messages per read run.
    #[arg(long, default_value_t = 2_000)]
    reads: u64,
    /// Parent of the per-run directories.
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
}

/// A directory removed when dropped.
struct RunDir(PathBuf);

impl RunDir {
    fn new(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(format!("store-candidates-{}-{name}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Deterministic, incompressible-looking payload for message `i` (xorshift).
pub fn payload(i: u64) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(PAYLOAD);
    while out.len() < PAYLOAD {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(PAYLOAD);
    out[..8].copy_from_slice(&i.to_be_bytes());
    out
}

#[derive(Debug, Clone, Serialize)]
struct AppendRun {
    messages: u64,
    secs: f64,
    msgs_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Debug, Clone, Serialize)]
struct AppendResult {
    variant: String,
    writers: usize,
    runs: Vec<AppendRun>,
    median_messages: u64,
    median_msgs_per_sec: f64,
    median_p50_us: f64,
    median_p99_us: f64,
}

#[derive(Debug, Clone, Serialize)]
struct StartupRun {
    load_secs: f64,
    disk_bytes: u64,
    disk_allocated_bytes: u64,
    open_ms: f64,
    read_msgs_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
struct StartupResult {
    engine: String,
    messages: u64,
    runs: Vec<StartupRun>,
    median_open_ms: f64,
    median_disk_bytes: u64,
    median_disk_allocated_bytes: u64,
    median_read_msgs_per_sec: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    payload_bytes: usize,
    runs: usize,
    append: Vec<AppendResult>,
    startup: Vec<StartupResult>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted_ns.len() as f64 - 1.0) * p).round() as usize;
    sorted_ns[idx.min(sorted_ns.len() - 1)] as f64 / 1000.0
}

/// Runs `writers` OS threads appending through `app` until `total` messages or the cap.
fn drive_threads(app: Arc<dyn Appender>, writers: usize, total: u64, cap: Duration) -> Result<(u64, f64, Vec<u64>)> {
    let counter = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(writers + 1));
    let mut handles = Vec::with_capacity(writers);
    for _ in 0..writers {
        let app = app.clone();
        let counter = counter.clone();
        let barrier = barrier.clone();
        let handle = std::thread::Builder::new().stack_size(256 << 10).spawn(move || -> Result<Vec<u64>> {
            let mut lat = Vec::new();
            barrier.wait();
            let start = Instant::now();
            loop {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if i >= total || start.elapsed() > cap {
                    break;
                }
                let p = payload(i);
                let t = Instant::now();
                app.append(&p)?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            Ok(lat)
        });
        handles.push(handle.context("spawning a writer thread")?);
    }
    barrier.wait();
    let start = Instant::now();
    let mut all = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(lat)) => all.extend(lat),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(anyhow::anyhow!("a writer thread panicked"))),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok((all.len() as u64, secs, all))
}

/// Runs `writers` tokio tasks appending to herald's store (how the broker calls it).
fn drive_herald_tasks(dir: &Path, writers: usize, total: u64, cap: Duration) -> Result<(u64, f64, Vec<u64>)> {
    use herald_core::Store;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let store = Arc::new(candidates::herald_open(dir)?);
    let topic = candidates::herald_topic()?;
    let counter = Arc::new(AtomicU64::new(0));
    let result = rt.block_on(async {
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(writers);
        for _ in 0..writers {
            let store = store.clone();
            let topic = topic.clone();
            let counter = counter.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    if i >= total || start.elapsed() > cap {
                        break;
                    }
                    let msg = candidates::herald_message(&payload(i));
                    let t = Instant::now();
                    store.append(&topic, vec![msg]).await?;
                    lat.push(t.elapsed().as_nanos() as u64);
                }
                Ok::<_, herald_core::StoreError>(lat)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.context("a writer task panicked")??);
        }
        Ok::<_, anyhow::Error>((all.len() as u64, start.elapsed().as_secs_f64(), all))
    });
    drop(store);
    result
}

fn append_run(args: &Args, variant: Variant, writers: usize, run: usize) -> Result<AppendRun> {
    let dir = RunDir::new(&args.dir, &format!("{}-w{writers}-r{run}", variant.name()))?;
    let total = if writers == 1 { args.messages_single } else { args.messages };
    let cap = Duration::from_secs(args.cap_secs);
    let (messages, secs, mut lat) = if variant == Variant::HeraldTasks {
        drive_herald_tasks(&dir.0, writers, total, cap)?
    } else {
        let app = candidates::open_appender(variant, &dir.0)?;
        let out = drive_threads(app.clone(), writers, total, cap)?;
        drop(app); // closes the store before its directory goes
        out
    };
    lat.sort_unstable();
    Ok(AppendRun {
        messages,
        secs,
        msgs_per_sec: messages as f64 / secs,
        p50_us: percentile_us(&lat, 0.50),
        p99_us: percentile_us(&lat, 0.99),
    })
}

/// Apparent and allocated size of everything under `dir`.
fn disk_usage(dir: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (a, b) = disk_usage(&entry.path())?;
            apparent += a;
            allocated += b;
        } else {
            apparent += meta.len();
            allocated += meta.blocks() * 512;
        }
    }
    Ok((apparent, allocated))
}

fn startup_run(args: &Args, engine: Engine, run: usize) -> Result<StartupRun> {
    let dir = RunDir::new(&args.dir, &format!("startup-{}-r{run}", engine.name()))?;
    let n = args.startup_messages;
    let started = Instant::now();
    candidates::load(engine, &dir.0, n)?;
    let load_secs = started.elapsed().as_secs_f64();
    let (disk_bytes, disk_allocated_bytes) = disk_usage(&dir.0)?;

    let started = Instant::now();
    let reader = candidates::reopen(engine, &dir.0, n)?;
    let open_ms = started.elapsed().as_secs_f64() * 1000.0;

    // Range reads of 1000 messages from the middle.
    let from = n / 2 + 1;
    let to = from + 999;
    let started = Instant::now();
    for _ in 0..args.reads {
        let got = reader.read_range(from, to)?;
        if got != 1000 {
            bail!("{}: read {got} messages of 1000 from offset {from}", engine.name());
        }
    }
    let read_secs = started.elapsed().as_secs_f64();
    drop(reader);
    Ok(StartupRun {
        load_secs,
        disk_bytes,
        disk_allocated_bytes,
        open_ms,
        read_msgs_per_sec: (args.reads * 1000) as f64 / read_secs,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut report = Report { payload_bytes: PAYLOAD, runs: args.runs, append: Vec::new(), startup: Vec::new() };

    // Run-major order (every candidate's run 0, then every run 1, ...): the disk's speed
    // drifts with other load, and interleaving spreads that drift over all candidates.
    if args.scenarios.iter().any(|s| s == "append") {
        let variants = args.variants.iter().map(|v| Variant::parse(v)).collect::<Result<Vec<_>>>()?;
        let mut all: Vec<(Variant, usize, Vec<AppendRun>)> = Vec::new();
        for &variant in &variants {
            for &writers in &args.writers {
                all.push((variant, writers, Vec::new()));
            }
        }
        for run in 0..args.runs {
            for (variant, writers, runs) in &mut all {
                let (variant, writers) = (*variant, *writers);
                let r = append_run(&args, variant, writers, run)
                    .with_context(|| format!("append {} W={writers} run {run}", variant.name()))?;
                eprintln!(
                    "append {:<14} W={writers:<4} run {run}: {:>8} msgs in {:>6.2}s = {:>9.0} msg/s  p50 {:>8.0} us  p99 {:>8.0} us",
                    variant.name(),
                    r.messages,
                    r.secs,
                    r.msgs_per_sec,
                    r.p50_us,
                    r.p99_us
                );
                runs.push(r);
            }
        }
        for (variant, writers, runs) in all {
            report.append.push(AppendResult {
                variant: variant.name().to_string(),
                writers,
                median_messages: median(runs.iter().map(|r| r.messages as f64).collect()) as u64,
                median_msgs_per_sec: median(runs.iter().map(|r| r.msgs_per_sec).collect()),
                median_p50_us: median(runs.iter().map(|r| r.p50_us).collect()),
                median_p99_us: median(runs.iter().map(|r| r.p99_us).collect()),
                runs,
            });
        }
    }

    if args.scenarios.iter().any(|s| s == "startup") {
        let engines = args.engines.iter().map(|e| Engine::parse(e)).collect::<Result<Vec<_>>>()?;
        let mut all: Vec<(Engine, Vec<StartupRun>)> = engines.iter().map(|&e| (e, Vec::new())).collect();
        for run in 0..args.runs {
            for (engine, runs) in &mut all {
                let engine = *engine;
                let r = startup_run(&args, engine, run).with_context(|| format!("startup {} run {run}", engine.name()))?;
                eprintln!(
                    "startup {:<6} run {run}: load {:>6.2}s  disk {:>6.1} MiB (allocated {:>6.1} MiB)  open {:>8.1} ms  read {:>10.0} msg/s",
                    engine.name(),
                    r.load_secs,
                    r.disk_bytes as f64 / (1 << 20) as f64,
                    r.disk_allocated_bytes as f64 / (1 << 20) as f64,
                    r.open_ms,
                    r.read_msgs_per_sec
                );
                runs.push(r);
            }
        }
        for (engine, runs) in all {
            report.startup.push(StartupResult {
                engine: engine.name().to_string(),
                messages: args.startup_messages,
                median_open_ms: median(runs.iter().map(|r| r.open_ms).collect()),
                median_disk_bytes: median(runs.iter().map(|r| r.disk_bytes as f64).collect()) as u64,
                median_disk_allocated_bytes: median(runs.iter().map(|r| r.disk_allocated_bytes as f64).collect())
                    as u64,
                median_read_msgs_per_sec: median(runs.iter().map(|r| r.read_msgs_per_sec).collect()),
                runs,
            });
        }
    }

    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json_file {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &Report) {
    if !report.append.is_empty() {
        println!(
            "Durable append, {} B messages, medians of {} runs",
            report.payload_bytes, report.runs
        );
        println!(
            "{:<14} {:>5} {:>9} {:>10} {:>17} {:>10} {:>10}",
            "variant", "W", "messages", "msg/s", "msg/s min-max", "p50 us", "p99 us"
        );
        for r in &report.append {
            let min = r.runs.iter().map(|x| x.msgs_per_sec).fold(f64::INFINITY, f64::min);
            let max = r.runs.iter().map(|x| x.msgs_per_sec).fold(0.0, f64::max);
            println!(
                "{:<14} {:>5} {:>9} {:>10.0} {:>17} {:>10.0} {:>10.0}",
                r.variant,
                r.writers,
                r.median_messages,
                r.median_msgs_per_sec,
                format!("{min:.0}-{max:.0}"),
                r.median_p50_us,
                r.median_p99_us
            );
        }
    }
    if !report.startup.is_empty() {
        if !report.append.is_empty() {
            println!();
        }
        println!("Start-up and reads, medians of {} runs", report.runs);
        println!(
            "{:<8} {:>10} {:>10} {:>14} {:>10} {:>14}",
            "engine", "messages", "disk MiB", "allocated MiB", "open ms", "read msg/s"
        );
        for r in &report.startup {
            println!(
                "{:<8} {:>10} {:>10.1} {:>14.1} {:>10.1} {:>14.0}",
                r.engine,
                r.messages,
                r.median_disk_bytes as f64 / (1 << 20) as f64,
                r.median_disk_allocated_bytes as f64 / (1 << 20) as f64,
                r.median_open_ms,
                r.median_read_msgs_per_sec
            );
        }
    }
}
