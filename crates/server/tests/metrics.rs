//! `/metrics` after a scripted workload on a real server: every metric docs/operations.md
//! names is exported with values the workload explains, and the number of series stays
//! bounded with 10 000 topics and 100 queues.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::{eventually, send_text, start, Result, TestServer};
use herald_client::{GrpcClient, StartFrom};
use serde_json::json;

/// One scrape: `name{labels}` (as printed) -> value, and the metric families declared.
struct Scrape {
    series: HashMap<String, f64>,
    families: BTreeSet<String>,
}

impl Scrape {
    async fn of(server: &TestServer) -> Result<Self> {
        let text = server.http.get(format!("{}/metrics", server.url)).send().await?.text().await?;
        let mut series = HashMap::new();
        let mut families = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.insert(rest.split(' ').next().unwrap_or_default().to_owned());
            } else if !line.is_empty() && !line.starts_with('#') {
                let (key, value) = line.rsplit_once(' ').ok_or_else(|| format!("bad line {line:?}"))?;
                series.insert(key.to_owned(), value.parse()?);
            }
        }
        Ok(Self { series, families })
    }

    fn get(&self, key: &str) -> f64 {
        self.series.get(key).copied().unwrap_or(f64::NAN)
    }
}

/// The metric names docs/operations.md's table lists.
fn documented_metrics() -> Result<BTreeSet<String>> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/operations.md"))?;
    let mut names = BTreeSet::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.split('|').nth(1).unwrap_or_default();
        for quoted in cell.split('`').skip(1).step_by(2) {
            let name: String = quoted.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name.starts_with("herald_") || name.starts_with("process_") {
                names.insert(name);
            }
        }
    }
    Ok(names)
}

#[tokio::test]
async fn a_workload_shows_in_every_documented_metric() -> Result {
    let dir = std::env::temp_dir().join(format!("herald-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.clone();
    let server = start(move |c| {
        c.store = herald_server::StoreKind::Disk;
        c.data_dir = data_dir;
        c.http.metrics_topics = vec!["work".into()];
    })
    .await?;

    // A subscriber, then one publish through each door that publishes.
    let mut sub = server.json_ws().await?;
    sub.subscribe("work", StartFrom::Latest, None).await?;
    let (status, _) = server.post("/v1/topics/work/messages", Some("application/json"), b"\"http\"".to_vec()).await?;
    assert_eq!(status, 201);
    let mut ws = server.json_ws().await?;
    ws.publish("work", json!("ws")).await?;
    let mut raw = server.raw_ws("work", "mode=pub").await?;
    send_text(&mut raw, "raw").await?;
    let grpc = GrpcClient::connect(&server.url).await?;
    grpc.publish("work", herald_client::grpc::pb::Kind::Text, "grpc").await?;
    for _ in 0..4 {
        sub.recv().await?;
    }
    // A queue round trip and one message left ready.
    for job in ["a", "b"] {
        let (status, _) = server
            .post("/v1/queues/jobs/messages", Some("application/json"), format!("\"{job}\"").into_bytes())
            .await?;
        assert_eq!(status, 201);
    }
    // The first job fails once: requeued, then delivered again.
    let (_, fetched) = server.post("/v1/queues/jobs/fetch", None, Vec::new()).await?;
    let id = fetched["messages"][0]["id"].as_str().ok_or("no job fetched")?.to_owned();
    let requeued = server.http.post(format!("{}/v1/queues/jobs/requeue/{id}", server.url)).send().await?;
    assert_eq!(requeued.status().as_u16(), 204);
    let (_, fetched) = server.post("/v1/queues/jobs/fetch?max=2", None, Vec::new()).await?;
    let jobs = fetched["messages"].as_array().ok_or("no jobs fetched")?;
    let again = jobs.iter().find(|j| j["attempt"] == 2).ok_or("the requeued job again")?;
    let other = jobs.iter().find(|j| j["attempt"] == 1).ok_or("the other job")?;
    let other = other["id"].as_str().ok_or("id")?;
    let requeued = server.http.post(format!("{}/v1/queues/jobs/requeue/{other}", server.url)).send().await?;
    assert_eq!(requeued.status().as_u16(), 204);
    let id = again["id"].as_str().ok_or("no job fetched")?.to_owned();
    let acked = server.http.post(format!("{}/v1/queues/jobs/ack/{id}", server.url)).send().await?;
    assert_eq!(acked.status().as_u16(), 204);

    // Publish histograms are observed after the call's answer, the fan-out histogram
    // after the write: wait for the last of them rather than race them.
    eventually(Duration::from_secs(10), "every publish and the fan-out observed", || async {
        let m = Scrape::of(&server).await?;
        Result::Ok(
            ["ws", "raw", "http", "grpc"]
                .iter()
                .all(|door| m.get(&format!("herald_publish_seconds_count{{door=\"{door}\"}}")) == 1.0)
                && m.get("herald_fanout_seconds_count") >= 1.0,
        )
    })
    .await?;
    let m = Scrape::of(&server).await?;

    let documented = documented_metrics()?;
    assert!(documented.len() >= 30, "docs/operations.md lists only {documented:?}");
    for name in documented {
        assert!(m.families.contains(&name), "{name} is documented but not exported");
    }
    assert_eq!(m.get("herald_messages_published_total"), 4.0);
    assert_eq!(m.get("herald_deliveries_total"), 4.0);
    assert_eq!(m.get("herald_connections_by_door{door=\"ws\"}"), 2.0);
    assert_eq!(m.get("herald_connections_by_door{door=\"raw\"}"), 1.0);
    assert_eq!(m.get("herald_connections_by_door{door=\"sse\"}"), 0.0);
    assert_eq!(m.get("herald_connections"), 3.0);
    assert!(m.get("herald_publish_seconds_sum{door=\"http\"}") > 0.0);
    // Every observation falls in the last bucket, and the buckets are cumulative.
    assert_eq!(m.get("herald_publish_seconds_bucket{door=\"ws\",le=\"+Inf\"}"), 1.0);
    assert!(m.get("herald_fanout_seconds_bucket{le=\"5\"}") >= 1.0);
    assert!(m.get("herald_fanout_seconds_sum") < 5.0);
    // The disk store committed the four publishes and the queue's writes.
    assert!(m.get("herald_store_commit_seconds_count") >= 4.0);
    assert!(m.get("herald_store_commit_writes_sum") >= m.get("herald_store_commit_writes_count"));
    assert_eq!(m.get("herald_queue_fetch_wait_seconds_count"), 2.0);
    assert_eq!(m.get("herald_queue_redelivered_total"), 1.0);
    assert_eq!(m.get("herald_outbound_queued_bytes"), 0.0, "everything was written");
    assert_eq!(m.get("herald_queues"), 1.0);
    assert_eq!(m.get("herald_topic_last_offset{topic=\"work\"}"), 4.0);
    assert_eq!(m.get("herald_topic_subscribers{topic=\"work\"}"), 1.0);
    assert_eq!(m.get("herald_queue_messages{queue=\"jobs\",state=\"ready\"}"), 1.0);
    assert_eq!(m.get("herald_queue_messages{queue=\"jobs\",state=\"in_flight\"}"), 0.0);
    assert_eq!(m.get(&format!("herald_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))), 1.0);
    assert!(m.get("process_resident_memory_bytes") > 1e6);
    assert!(m.get("process_open_fds") >= 3.0);

    drop(sub);
    drop(ws);
    drop(raw);
    eventually(Duration::from_secs(10), "the connections gauges back to 0", || async {
        let m = Scrape::of(&server).await?;
        Result::Ok(m.get("herald_connections") == 0.0 && m.get("herald_connections_by_door{door=\"ws\"}") == 0.0)
    })
    .await?;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn ten_thousand_topics_and_a_hundred_queues_keep_the_series_bounded() -> Result {
    let server = start(|_| {}).await?;
    let grpc = GrpcClient::connect(&server.url).await?;
    for i in 0..10_000 {
        grpc.publish(&format!("t-{i}"), herald_client::grpc::pb::Kind::Text, "x").await?;
    }
    for i in 0..100 {
        let body = format!("\"{i}\"").into_bytes();
        // Queue q-i holds 1 to 3 messages.
        for _ in 0..=i % 3 {
            let (status, _) =
                server.post(&format!("/v1/queues/q-{i}/messages"), Some("application/json"), body.clone()).await?;
            assert_eq!(status, 201);
        }
    }
    let m = Scrape::of(&server).await?;
    assert_eq!(m.get("herald_messages_published_total"), 10_000.0);
    assert_eq!(m.get("herald_queues"), 100.0);
    assert!(m.series.keys().all(|k| !k.contains("t-")), "a series per topic");
    let per_queue = m.series.keys().filter(|k| k.starts_with("herald_queue_messages{")).count();
    assert_eq!(per_queue, 20 * 4, "20 largest queues x 4 states");
    // Every exported queue holds 3 messages (the largest), none of the others more.
    assert!(m
        .series
        .iter()
        .filter(|(k, _)| k.starts_with("herald_queue_messages{") && k.ends_with("state=\"ready\"}"))
        .all(|(_, v)| *v == 3.0));
    assert!(m.series.len() < 400, "{} series", m.series.len());
    Ok(())
}

#[tokio::test]
async fn allow_listed_topics_get_series_of_their_own_and_no_more_than_a_hundred() -> Result {
    let server = start(|c| c.http.metrics_topics = vec!["orders".into(), "chat.>".into(), ">".into()]).await?;
    let mut sub = server.json_ws().await?;
    sub.subscribe("chat.a", StartFrom::Latest, None).await?;
    let grpc = GrpcClient::connect(&server.url).await?;
    for topic in ["orders", "orders", "chat.a", "chat.b", "other"] {
        grpc.publish(topic, herald_client::grpc::pb::Kind::Text, "x").await?;
    }
    for i in 0..150 {
        grpc.publish(&format!("bulk.{i}"), herald_client::grpc::pb::Kind::Text, "x").await?;
    }
    let m = Scrape::of(&server).await?;
    assert_eq!(m.get("herald_topic_last_offset{topic=\"orders\"}"), 2.0);
    assert_eq!(m.get("herald_topic_retained_messages{topic=\"orders\"}"), 2.0);
    assert_eq!(m.get("herald_topic_last_offset{topic=\"chat.b\"}"), 1.0);
    assert_eq!(m.get("herald_topic_subscribers{topic=\"chat.a\"}"), 1.0);
    assert_eq!(m.get("herald_topic_subscribers{topic=\"chat.b\"}"), 0.0);
    // `>` fills the rest, up to 100 topics in all.
    let per_topic = m.series.keys().filter(|k| k.starts_with("herald_topic_last_offset{")).count();
    assert_eq!(per_topic, 100);
    Ok(())
}
