//! Work queues over HTTP: many workers, at-least-once with a failing worker, long poll,
//! dead letters, stale delivery ids, delays, limits and errors, the list of queues. Every case runs on one
//! node, and on two cluster nodes sharing their queues through Redis (an ingest node and
//! an `all` node, on the standalone Redis and on the 3-primary Redis Cluster), with
//! producers, workers and calls spread over both.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{ensure_redis_cluster, tuned_node_on, Prefix, REDIS, REDIS_CLUSTER};
use common::{eventually, start, within, Result, TestServer};
use herald_core::Role;
use serde_json::{json, Value};

/// Where a case runs.
#[derive(Clone, Copy)]
enum Setup {
    /// One server with the memory store.
    Single,
    /// Two cluster nodes on the Redis (or Redis Cluster) at this URL.
    Cluster(&'static str),
}

/// A case's two nodes (one server twice on a single node), producers and workers
/// alternate between them.
struct Nodes {
    a: Arc<TestServer>,
    b: Arc<TestServer>,
    _prefix: Option<Prefix>,
}

impl Nodes {
    async fn start(setup: Setup, tune: impl Fn(&mut herald_server::Config)) -> Result<Self> {
        match setup {
            Setup::Single => {
                let a = Arc::new(start(&tune).await?);
                Ok(Self { b: a.clone(), a, _prefix: None })
            }
            Setup::Cluster(url) => {
                if url == REDIS_CLUSTER {
                    ensure_redis_cluster()?;
                }
                let prefix = Prefix::new("queues");
                let a = Arc::new(tuned_node_on(url, &prefix, Role::Ingest, &tune).await?);
                let b = Arc::new(tuned_node_on(url, &prefix, Role::All, &tune).await?);
                Ok(Self { a, b, _prefix: Some(prefix) })
            }
        }
    }

    fn at(&self, i: usize) -> &Arc<TestServer> {
        if i.is_multiple_of(2) {
            &self.a
        } else {
            &self.b
        }
    }
}

async fn enqueue(server: &TestServer, queue: &str, body: String) -> Result<u64> {
    common::enqueue_text(server, queue, &body, "").await
}

async fn fetch(server: &TestServer, queue: &str, query: &str) -> Result<Vec<Value>> {
    common::fetch_jobs(server, queue, query).await
}

async fn call(server: &TestServer, path: &str) -> Result<u16> {
    common::post_status(server, path).await
}

async fn stats(server: &TestServer, queue: &str) -> Result<Value> {
    Ok(server.get_json(&format!("/v1/queues/{queue}")).await?.1)
}

const N: usize = 10_000;

async fn fill(nodes: &Nodes, queue: &str) -> Result {
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (server, queue) = (nodes.at(p).clone(), queue.to_owned());
            tokio::spawn(async move {
                for i in (p..N).step_by(4) {
                    enqueue(&server, &queue, format!("job-{i}")).await?;
                }
                Result::Ok(())
            })
        })
        .collect();
    for p in producers {
        within(Duration::from_secs(120), "producer", p).await???;
    }
    Ok(())
}

/// Runs `workers` acking workers until `N` distinct jobs are done; returns every
/// processed (job, attempt).
async fn work(nodes: &Nodes, queue: &str, workers: usize) -> Result<Vec<(String, u64)>> {
    let done = Arc::new(std::sync::Mutex::new(HashMap::<String, u64>::new()));
    let processed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (server, queue, done, processed) =
                (nodes.at(w).clone(), queue.to_owned(), done.clone(), processed.clone());
            tokio::spawn(async move {
                loop {
                    if done.lock().map_err(|_| "poisoned")?.len() >= N {
                        return Result::Ok(());
                    }
                    for m in fetch(&server, &queue, "max=10&wait_ms=200").await? {
                        let job = m["data"].as_str().ok_or("data")?.to_owned();
                        let attempt = m["attempt"].as_u64().ok_or("attempt")?;
                        processed.lock().map_err(|_| "poisoned")?.push((job.clone(), attempt));
                        done.lock().map_err(|_| "poisoned")?.insert(job, attempt);
                        let id = m["id"].as_str().ok_or("id")?;
                        assert_eq!(call(&server, &format!("/v1/queues/{queue}/ack/{id}")).await?, 204);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        within(Duration::from_secs(120), "worker", t).await???;
    }
    let processed = processed.lock().map_err(|_| "poisoned")?.clone();
    Ok(processed)
}

async fn eight_workers_process_every_message_exactly_once(setup: Setup) -> Result {
    let nodes = Nodes::start(setup, |_| {}).await?;
    fill(&nodes, "jobs").await?;
    assert_eq!(stats(&nodes.b, "jobs").await?["ready"], N);
    let processed = work(&nodes, "jobs", 8).await?;
    assert_eq!(processed.len(), N, "no message processed twice");
    let mut jobs: Vec<&str> = processed.iter().map(|(j, _)| j.as_str()).collect();
    jobs.sort_unstable();
    jobs.dedup();
    assert_eq!(jobs.len(), N);
    assert!(processed.iter().all(|(_, attempt)| *attempt == 1));
    assert_eq!(stats(&nodes.a, "jobs").await?, json!({"queue":"jobs","ready":0,"in_flight":0,"delayed":0,"dead":0}));
    Ok(())
}

async fn a_worker_that_never_acks_loses_nothing(setup: Setup) -> Result {
    let nodes = Nodes::start(setup, |_| {}).await?;
    fill(&nodes, "flaky").await?;
    // The bad worker takes 200 messages with a short lease and walks away.
    let mut abandoned = Vec::new();
    for i in 0..20 {
        for m in fetch(nodes.at(i), "flaky", "max=10&visibility_ms=300").await? {
            abandoned.push(m["data"].as_str().ok_or("data")?.to_owned());
        }
    }
    assert_eq!(abandoned.len(), 200);
    let processed = work(&nodes, "flaky", 8).await?;
    let attempts: HashMap<&str, u64> = processed.iter().map(|(j, a)| (j.as_str(), *a)).collect();
    assert_eq!(attempts.len(), N, "every message processed");
    for job in &abandoned {
        assert!(attempts[job.as_str()] > 1, "{job} was redelivered with attempt > 1");
    }
    let first_time = processed.iter().filter(|(_, a)| *a == 1).count();
    assert_eq!(first_time, N - 200, "the others went out once");
    Ok(())
}

async fn long_poll_returns_on_enqueue_and_empty_at_wait_ms(setup: Setup) -> Result {
    let nodes = Nodes::start(setup, |_| {}).await?;
    let server = &nodes.b;
    // Empty at wait_ms.
    let t0 = Instant::now();
    assert!(fetch(server, "lp", "wait_ms=300").await?.is_empty());
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(3), "{waited:?}");
    // Woken by an enqueue.
    let mut lags = Vec::new();
    for i in 0..20 {
        let poll = {
            let server = server.clone();
            tokio::spawn(async move {
                let got = fetch(&server, "lp", "wait_ms=10000").await?;
                Result::Ok((got, Instant::now()))
            })
        };
        eventually(Duration::from_secs(5), "long poll waiting", || async {
            Ok(server.metric("herald_queue_waiters").await? == 1)
        })
        .await?;
        let sent = Instant::now();
        enqueue(&nodes.a, "lp", format!("m{i}")).await?;
        let (got, at) = within(Duration::from_secs(10), "long poll", poll).await???;
        assert_eq!(got.len(), 1);
        lags.push(at.saturating_duration_since(sent));
    }
    lags.sort_unstable();
    eprintln!("long poll wake-up after enqueue: median {:?}, max {:?}", lags[lags.len() / 2], lags[lags.len() - 1]);
    assert!(lags[lags.len() - 1] < Duration::from_secs(1));
    Ok(())
}

async fn dead_letters_stale_ids_and_delays_over_http(setup: Setup) -> Result {
    let nodes = Nodes::start(setup, |c| c.broker.queues.max_attempts = 2).await?;
    let (server, other) = (&nodes.a, &nodes.b);
    let id = enqueue(server, "work", "poison".into()).await?;
    let first = fetch(other, "work", "").await?;
    assert_eq!((first[0]["message_id"].as_u64(), first[0]["attempt"].as_u64()), (Some(id), Some(1)));
    let first_id = first[0]["id"].as_str().ok_or("id")?.to_owned();
    assert!(first_id.len() <= 64 && first_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_eq!(call(server, &format!("/v1/queues/work/requeue/{first_id}")).await?, 204);
    assert_eq!(call(other, &format!("/v1/queues/work/ack/{first_id}")).await?, 404, "stale after requeue");
    let second = fetch(other, "work", "").await?;
    assert_eq!(second[0]["attempt"], 2);
    let second_id = second[0]["id"].as_str().ok_or("id")?.to_owned();
    assert_eq!(call(server, &format!("/v1/queues/work/extend/{second_id}?visibility_ms=60000")).await?, 204);
    assert_eq!(call(other, &format!("/v1/queues/work/requeue/{second_id}")).await?, 204);
    assert_eq!(stats(server, "work").await?, json!({"queue":"work","ready":0,"in_flight":0,"delayed":0,"dead":1}));
    let dead = fetch(other, "work.dlq", "").await?;
    assert_eq!((dead[0]["data"].as_str(), dead[0]["attempt"].as_u64()), (Some("poison"), Some(1)));
    let dead_id = dead[0]["id"].as_str().ok_or("id")?;
    assert_eq!(call(server, &format!("/v1/queues/work.dlq/ack/{dead_id}")).await?, 204);
    assert_eq!(stats(server, "work").await?["dead"], 0);

    // A delayed message is not fetchable before its delay.
    let (status, _) =
        server.post("/v1/queues/later/messages?delay_ms=60000", Some("text/plain"), b"x".to_vec()).await?;
    assert_eq!(status, 201);
    assert_eq!(stats(server, "later").await?["delayed"], 1);
    assert!(fetch(server, "later", "").await?.is_empty());
    // A message whose TTL passed is dropped.
    let (status, _) = server.post("/v1/queues/brief/messages?ttl_ms=0", Some("text/plain"), b"x".to_vec()).await?;
    assert_eq!(status, 201);
    assert!(fetch(server, "brief", "").await?.is_empty());
    assert_eq!(
        stats(server, "never-used").await?,
        json!({"queue":"never-used","ready":0,"in_flight":0,"delayed":0,"dead":0})
    );
    Ok(())
}

/// `POST /v1/queues/{queue}/batch` and `POST /v1/queues/{queue}/ack`: a batch's jobs
/// in order with their kinds and delays, acks done one by one with the stale one named.
async fn batches_enqueue_in_order_and_ack_with_outcomes(setup: Setup) -> Result {
    let nodes = Nodes::start(setup, |_| {}).await?;
    let (server, other) = (&nodes.a, &nodes.b);
    let batch = json!({"messages": [
        {"data": {"n": 1}},
        {"data_b64": "AAE="},
        {"text": "plain"},
        {"data": "later", "delay_ms": 60000},
        {"data": "brief", "ttl_ms": 0},
    ]});
    let (status, v) =
        server.post("/v1/queues/bat/batch", Some("application/json"), batch.to_string().into_bytes()).await?;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["queue"], "bat");
    let ids: Vec<u64> = v["message_ids"].as_array().ok_or("message_ids")?.iter().filter_map(Value::as_u64).collect();
    assert_eq!(ids.len(), 5, "{v}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in the batch's order: {ids:?}");
    assert!(v.get("errors").is_none(), "{v}");
    assert_eq!(stats(other, "bat").await?, json!({"queue":"bat","ready":3,"in_flight":0,"delayed":1,"dead":0}));

    let jobs = fetch(other, "bat", "max=10").await?;
    assert_eq!(jobs.len(), 3, "the delayed job waits, the expired one is gone: {jobs:?}");
    assert_eq!((jobs[0]["message_id"].as_u64(), &jobs[0]["data"]), (Some(ids[0]), &json!({"n": 1})));
    assert_eq!((jobs[1]["message_id"].as_u64(), &jobs[1]["data_b64"]), (Some(ids[1]), &json!("AAE=")));
    assert_eq!((jobs[2]["message_id"].as_u64(), &jobs[2]["data"]), (Some(ids[2]), &json!("plain")), "a text job");
    let delivery = |i: usize| jobs[i]["id"].as_str().unwrap_or_default().to_owned();
    let acks = json!({"ids": [delivery(0), delivery(1), "1-1-stale", delivery(2)]});
    let (status, v) =
        server.post("/v1/queues/bat/ack", Some("application/json"), acks.to_string().into_bytes()).await?;
    assert_eq!(status, 207, "{v}");
    assert_eq!(v["acked"], 3);
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!((&v["errors"][0]["index"], &v["errors"][0]["code"]), (&json!(2), &json!("not_found")));
    assert_eq!(stats(server, "bat").await?["in_flight"], 0);
    // Every ack stale: the first one's error, as a single ack would answer.
    let again = json!({"ids": [delivery(0)]}).to_string().into_bytes();
    let (status, v) = other.post("/v1/queues/bat/ack", Some("application/json"), again).await?;
    assert_eq!((status, &v["error"]["code"]), (404, &json!("not_found")));
    Ok(())
}

/// `POST /v1/queues/{queue}/fetch` with `{"ack":[...]}`: the jobs named are acked in
/// the same request that fetches the next ones, a stale one named in `ack_errors`; a
/// malformed body refuses the request before anything is acked or fetched.
async fn a_fetch_acks_the_jobs_its_body_names(setup: Setup) -> Result {
    let nodes = Nodes::start(setup, |_| {}).await?;
    let (server, other) = (&nodes.a, &nodes.b);
    for n in 1..=3 {
        enqueue(server, "chain", format!("job {n}")).await?;
    }
    let fetch_acking = |node: &Arc<TestServer>, acks: Value| {
        let node = node.clone();
        async move {
            let body = json!({ "ack": acks }).to_string().into_bytes();
            node.post("/v1/queues/chain/fetch?max=1", Some("application/json"), body).await
        }
    };
    let first = fetch(server, "chain", "max=1").await?;
    let id = |job: &Value| job["id"].as_str().unwrap_or_default().to_owned();
    let (status, v) = fetch_acking(other, json!([id(&first[0])])).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!((&v["acked"], &v["messages"][0]["data"]), (&json!(1), &json!("job 2")), "{v}");
    assert!(v.get("ack_errors").is_none(), "{v}");
    let second = v["messages"][0].clone();
    // The first job's delivery is no longer current: named, the others acked all the same.
    let (status, v) = fetch_acking(server, json!([id(&first[0]), id(&second)])).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!((&v["acked"], &v["messages"][0]["data"]), (&json!(1), &json!("job 3")), "{v}");
    assert_eq!(v["ack_errors"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!((&v["ack_errors"][0]["index"], &v["ack_errors"][0]["code"]), (&json!(0), &json!("not_found")));
    let third = v["messages"][0].clone();
    assert_eq!(stats(other, "chain").await?["in_flight"], 1);

    // Refused whole: nothing acked, nothing fetched.
    enqueue(server, "chain", "job 4".into()).await?;
    let too_many = json!({ "ack": vec![id(&third); 1001] }).to_string();
    for (body, why) in [
        (json!({ "ack": [id(&third), "not valid"] }).to_string(), "a malformed id"),
        (json!({ "ids": [id(&third)] }).to_string(), "an unknown field"),
        ("ack".to_owned(), "not JSON"),
        (too_many, "over 1000 ids"),
    ] {
        let (status, v) =
            other.post("/v1/queues/chain/fetch?max=1", Some("application/json"), body.into_bytes()).await?;
        assert_eq!((status, &v["error"]["code"]), (400, &json!("bad_request")), "{why}: {v}");
    }
    assert_eq!(stats(server, "chain").await?, json!({"queue":"chain","ready":1,"in_flight":1,"delayed":0,"dead":0}));

    // The last job acked with a fetch that finds the queue empty.
    let (status, v) = fetch_acking(other, json!([id(&third)])).await?;
    assert_eq!((status, &v["acked"], &v["messages"][0]["data"]), (200, &json!(1), &json!("job 4")), "{v}");
    let (status, v) = fetch_acking(server, json!([id(&v["messages"][0])])).await?;
    assert_eq!((status, &v["acked"], &v["messages"]), (200, &json!(1), &json!([])), "{v}");
    assert_eq!(stats(other, "chain").await?, json!({"queue":"chain","ready":0,"in_flight":0,"delayed":0,"dead":0}));
    // Without a body, the answer is as before: no `acked`.
    let (status, v) = server.post("/v1/queues/chain/fetch", None, Vec::new()).await?;
    assert_eq!((status, v), (200, json!({"messages": []})));
    Ok(())
}

async fn a_dlq_long_poll_returns_when_the_last_lease_ends_on_an_idle_queue(setup: Setup) -> Result {
    let nodes = Nodes::start(setup, |c| c.broker.queues.max_attempts = 1).await?;
    enqueue(&nodes.a, "idle", "poison".into()).await?;
    // The only allowed delivery; its worker dies. Nothing touches `idle` after this.
    assert_eq!(fetch(&nodes.a, "idle", "visibility_ms=200").await?.len(), 1);
    let t0 = Instant::now();
    let dead = fetch(&nodes.b, "idle.dlq", "wait_ms=10000").await?;
    let waited = t0.elapsed();
    assert_eq!(dead.first().map(|m| m["data"].clone()), Some("poison".into()), "after {waited:?}");
    assert!(waited < Duration::from_secs(3), "returned at the lease end, not at wait_ms: {waited:?}");
    Ok(())
}

async fn queue_errors(setup: Setup) -> Result {
    let nodes = Nodes::start(setup, |c| {
        c.broker.queues.max_queue_messages = 1;
        c.broker.max_message_bytes = 16;
    })
    .await?;
    let server = &nodes.a;
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or_default().to_owned();
    let post = |path: &'static str, body: &'static [u8]| server.post(path, Some("text/plain"), body.to_vec());
    let (s, v) = post("/v1/queues/jobs.dlq/messages", b"x").await?;
    assert_eq!((s, code(&v)), (400, "invalid_name".into()), "no enqueue into a dead-letter queue");
    let (s, v) = post("/v1/queues/a..b/messages", b"x").await?;
    assert_eq!((s, code(&v)), (400, "invalid_name".into()));
    let (s, v) = post("/v1/queues/jobs/messages", b"this is over sixteen bytes").await?;
    assert_eq!((s, code(&v)), (413, "too_large".into()));
    let (s, _) = post("/v1/queues/jobs/messages", b"x").await?;
    assert_eq!(s, 201);
    let (s, v) = nodes.b.post("/v1/queues/jobs/messages", Some("text/plain"), b"y".to_vec()).await?;
    assert_eq!((s, code(&v)), (429, "rate_limited".into()), "queue full, on the other node too");
    for q in ["max=0", "max=101", "visibility_ms=0", "visibility_ms=43200001", "wait_ms=20001", "max=x"] {
        let (s, v) = server.post(&format!("/v1/queues/jobs/fetch?{q}"), None, Vec::new()).await?;
        assert_eq!((s, code(&v)), (400, "bad_request".into()), "{q}");
    }
    let (s, v) = server.post("/v1/queues/jobs/ack/not*valid", None, Vec::new()).await?;
    assert_eq!((s, code(&v)), (400, "bad_request".into()));
    let (s, v) = nodes.b.post("/v1/queues/jobs/ack/1-1-abc", None, Vec::new()).await?;
    assert_eq!((s, code(&v)), (404, "not_found".into()));
    let (s, v) = server.post("/v1/queues/jobs/extend/1-1-abc", None, Vec::new()).await?;
    assert_eq!((s, code(&v)), (400, "bad_request".into()), "visibility_ms required");

    // Batches: every entry is checked before any is stored.
    let many = json!({"messages": vec![json!({"data": 1}); 1001]}).to_string();
    for (body, want, why) in [
        (r#"{"messages":[]}"#.to_owned(), "bad_request", "empty"),
        (many, "bad_request", "over 1000"),
        (r#"{"messages":[{"data":1,"data_b64":"AA=="}]}"#.into(), "bad_request", "both payloads"),
        (r#"{"messages":[{"data":1},{}]}"#.into(), "bad_request", "no payload"),
        (r#"{"messages":[{"text":"a","data":1}]}"#.into(), "bad_request", "text and data"),
        (r#"{"messages":[{"text":1}]}"#.into(), "bad_request", "text not a string"),
        (r#"{"messages":[{"data":1,"priority":2}]}"#.into(), "bad_request", "unknown field"),
        (r#"{"messages":[{"data_b64":"***"}]}"#.into(), "bad_request", "bad base64"),
        (r#"{"messages":[{"data":1}"#.into(), "bad_request", "malformed"),
        (r#"{"messages":[{"data":1},{"data":"this is over sixteen bytes"}]}"#.into(), "too_large", "one too large"),
    ] {
        let (s, v) = server.post("/v1/queues/part/batch", Some("application/json"), body.into_bytes()).await?;
        assert_eq!(code(&v), want, "{why}: {s} {v}");
    }
    let (s, v) = server
        .post("/v1/queues/jobs.dlq/batch", Some("application/json"), br#"{"messages":[{"data":1}]}"#.to_vec())
        .await?;
    assert_eq!((s, code(&v)), (400, "invalid_name".into()));
    assert_eq!(stats(server, "part").await?["ready"], 0, "nothing of a refused batch stored");
    // The queue holds one: the first entry is stored, the other two are refused.
    let body = br#"{"messages":[{"data":1},{"data":2},{"data":3}]}"#.to_vec();
    let (s, v) = nodes.b.post("/v1/queues/part/batch", Some("application/json"), body).await?;
    assert_eq!(s, 207, "{v}");
    assert!(v["message_ids"][0].is_u64() && v["message_ids"][1].is_null() && v["message_ids"][2].is_null(), "{v}");
    let errors: Vec<(u64, String)> = v["errors"]
        .as_array()
        .ok_or("errors")?
        .iter()
        .map(|e| (e["index"].as_u64().unwrap_or(99), code(&json!({"error": e}))))
        .collect();
    assert_eq!(errors, [(1, "rate_limited".into()), (2, "rate_limited".into())]);
    for body in [r#"{"ids":[]}"#, r#"{"ids":["not*valid"]}"#, r#"{"id":"1-1-abc"}"#] {
        let (s, v) = server.post("/v1/queues/jobs/ack", Some("application/json"), body.as_bytes().to_vec()).await?;
        assert_eq!((s, code(&v)), (400, "bad_request".into()), "{body}");
    }
    Ok(())
}

/// `GET /v1/queues`: by name, with the counts of `GET /v1/queues/{queue}`, paged with
/// `after` and `limit`, filtered by `prefix`, from either node.
async fn list_queues_pages_in_name_order(setup: Setup) -> Result {
    let nodes = Nodes::start(setup, |c| c.broker.queues.max_attempts = 1).await?;
    for (i, q) in ["list.b", "list.b", "list.a", "other"].into_iter().enumerate() {
        common::enqueue_text(nodes.at(i), q, "x", "").await?;
    }
    common::enqueue_text(&nodes.b, "list.c", "later", "delay_ms=60000").await?;
    // One job of list.a dead-lettered (one attempt), one of list.b in flight.
    let job = fetch(&nodes.a, "list.a", "").await?;
    let id = job[0]["id"].as_str().ok_or("id")?;
    assert_eq!(call(&nodes.b, &format!("/v1/queues/list.a/requeue/{id}")).await?, 204);
    assert_eq!(fetch(&nodes.b, "list.b", "").await?.len(), 1);
    let names = |v: &Value| -> Vec<String> {
        v["queues"]
            .as_array()
            .map(|a| a.iter().filter_map(|q| q["queue"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let (s, first) = nodes.a.get_json("/v1/queues?prefix=list.&limit=2").await?;
    assert_eq!(s, 200, "{first}");
    assert_eq!(
        first["queues"],
        json!([
            {"queue": "list.a", "ready": 0, "in_flight": 0, "delayed": 0, "dead": 1},
            {"queue": "list.b", "ready": 1, "in_flight": 1, "delayed": 0, "dead": 0},
        ])
    );
    let (_, rest) = nodes.b.get_json("/v1/queues?prefix=list.&limit=2&after=list.b").await?;
    assert_eq!(rest["queues"], json!([{"queue": "list.c", "ready": 0, "in_flight": 0, "delayed": 1, "dead": 0}]));
    let (_, end) = nodes.a.get_json("/v1/queues?prefix=list.&after=list.c").await?;
    assert_eq!(end, json!({"queues": []}));
    let (_, all) = nodes.b.get_json("/v1/queues").await?;
    assert_eq!(names(&all), ["list.a", "list.b", "list.c", "other"], "no dead-letter queue listed");
    for bad in ["limit=0", "limit=1001", "limit=x"] {
        let (s, v) = nodes.a.get_json(&format!("/v1/queues?{bad}")).await?;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_request")), "{bad}");
    }
    Ok(())
}

async fn shutdown_answers_a_pending_long_poll(setup: Setup) -> Result {
    let Nodes { a, b, _prefix } = Nodes::start(setup, |_| {}).await?;
    drop(a);
    let mut server = Arc::try_unwrap(b).map_err(|_| "the node is still shared")?;
    let poll = {
        let (http, url) = (server.http.clone(), server.url.clone());
        tokio::spawn(async move {
            let r = http.post(format!("{url}/v1/queues/idle/fetch?wait_ms=20000")).send().await?;
            Result::Ok((r.status().as_u16(), r.text().await?))
        })
    };
    eventually(Duration::from_secs(5), "long poll waiting", || async {
        Ok(server.metric("herald_queue_waiters").await? == 1)
    })
    .await?;
    let running = server.server.take().ok_or("server")?;
    running.shutdown();
    let (status, body) = within(Duration::from_secs(5), "long poll answered", poll).await???;
    assert_eq!((status, body.as_str()), (200, r#"{"messages":[]}"#));
    within(Duration::from_secs(10), "server stopped", running.wait()).await??;
    Ok(())
}

/// One test per case and setup.
macro_rules! cases {
    ($setup:expr) => {
        cases!(@each $setup;
            eight_workers_process_every_message_exactly_once,
            a_worker_that_never_acks_loses_nothing,
            long_poll_returns_on_enqueue_and_empty_at_wait_ms,
            dead_letters_stale_ids_and_delays_over_http,
            a_dlq_long_poll_returns_when_the_last_lease_ends_on_an_idle_queue,
            queue_errors,
            batches_enqueue_in_order_and_ack_with_outcomes,
            a_fetch_acks_the_jobs_its_body_names,
            list_queues_pages_in_name_order,
            shutdown_answers_a_pending_long_poll
        );
    };
    (@each $setup:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() -> Result {
                super::$case($setup).await
            }
        )*
    };
}

mod single {
    use super::*;
    cases!(Setup::Single);
}

mod cluster {
    use super::*;
    cases!(Setup::Cluster(REDIS));
}

mod redis_cluster {
    use super::*;
    cases!(Setup::Cluster(REDIS_CLUSTER));
}
