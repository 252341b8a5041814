//! A rough throughput measurement, not run by default: N tasks each appending
//! 1-message batches (100 bytes) for 5 s against one store, for N = 1, 16 and 256,
//! spread over 16 topics and then on a single one. Prints messages per second and the
//! average rows per group commit.
//!
//! `cargo test -p herald-store-postgres --test throughput -- --ignored --nocapture`

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, text, Result, Schema};
use herald_core::{RetentionConfig, Store, SystemClock, TopicName};
use herald_store_postgres::{PgConfig, PgStore};

const RUN_FOR: Duration = Duration::from_secs(5);

async fn measure(tasks: usize, topics: usize) -> Result<(f64, f64)> {
    let schema = Schema::new();
    let config = PgConfig { pool_size: 16, ..config(&schema.0, RetentionConfig::default()) };
    let store = Arc::new(PgStore::connect(config, Arc::new(SystemClock)).await?);
    let registry = prometheus::Registry::new();
    store.register_metrics(&registry);
    let names: Vec<TopicName> =
        (0..topics).map(|i| TopicName::parse(&format!("bench.t{i}"))).collect::<std::result::Result<_, _>>()?;
    let payload = "x".repeat(100);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + RUN_FOR;
    let mut running = Vec::new();
    for i in 0..tasks {
        let (store, done, t, payload) = (store.clone(), done.clone(), names[i % topics].clone(), payload.clone());
        running.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                store.append(&t, vec![text(&payload)]).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, herald_core::StoreError>(())
        }));
    }
    let started = Instant::now();
    for task in running {
        task.await??;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let rows = registry
        .gather()
        .into_iter()
        .find(|f| f.name() == "herald_store_commit_rows")
        .and_then(|f| f.get_metric().first().map(|m| m.get_histogram().clone()))
        .map_or(0.0, |h| h.get_sample_sum() / h.get_sample_count().max(1) as f64);
    Ok((rate, rows))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand"]
async fn appends_per_second() -> Result {
    for topics in [16, 1] {
        for tasks in [1, 16, 256] {
            let (rate, rows) = measure(tasks, topics).await?;
            println!("{tasks:>4} tasks, {topics:>2} topics: {rate:>9.0} messages/s, {rows:>6.1} rows per commit");
        }
    }
    Ok(())
}
