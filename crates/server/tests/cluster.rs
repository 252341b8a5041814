//! Scale-out over Redis (docs/cluster.md): nodes that share the Redis on 127.0.0.1:6379
//! (`.ci/run` starts one) under a key prefix of their own, each node a real server on
//! its own port. One ingest node takes every publish; subscribers on two fan-out nodes,
//! on every door, receive every message once, in one order, with the same offsets.

mod common;

use std::time::Duration;

use common::cluster::{ensure_redis_cluster, node, node_on, Prefix, REDIS, REDIS_CLUSTER};
use common::mix::{check_one_order, collect_grpc, collect_json, collect_raw, publish_concurrently};
use common::{eventually, within, Result, TestServer};
use herald_client::{GrpcClient, StartFrom};
use herald_core::Role;

/// One SSE subscriber's events as (offset, digest of the data line).
async fn sse_events(server: &TestServer, topic: &str, n: usize) -> Result<tokio::task::JoinHandle<Result<Vec<u64>>>> {
    let mut response = server.http.get(format!("{}/v1/topics/{topic}/sse?from=earliest", server.url)).send().await?;
    assert_eq!(response.status(), 200);
    Ok(tokio::spawn(async move {
        let mut buf = String::new();
        let mut offsets = Vec::with_capacity(n);
        while offsets.len() < n {
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id: ")) {
                    offsets.push(id.parse()?);
                }
            }
            if offsets.len() >= n {
                break;
            }
            let chunk = response.chunk().await?.ok_or("SSE stream ended")?;
            buf.push_str(std::str::from_utf8(&chunk)?);
        }
        Ok(offsets)
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_ingest_and_two_fanout_nodes_deliver_every_message_once_in_one_order() -> Result {
    ingest_and_fanout(REDIS, "cluster.mix").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_on_a_redis_cluster_of_three_primaries() -> Result {
    ensure_redis_cluster()?;
    ingest_and_fanout(REDIS_CLUSTER, "cluster.mix").await?;
    // Topics spread over the primaries' slots: several topics, each with its own hash
    // tag, published and read back through the nodes.
    let prefix = Prefix::new("spread");
    let ingest = node_on(REDIS_CLUSTER, &prefix, Role::Ingest).await?;
    let fanout = node_on(REDIS_CLUSTER, &prefix, Role::Fanout).await?;
    let topics: Vec<String> = (0..12).map(|i| format!("spread.t{i}")).collect();
    let mut subs = Vec::new();
    for t in &topics {
        let mut ws = fanout.json_ws().await?;
        ws.subscribe(t, StartFrom::Earliest, None).await?;
        subs.push(collect_json(ws, 3));
    }
    for t in &topics {
        for i in 0..3 {
            let (status, body) = ingest
                .post(&format!("/v1/topics/{t}/messages"), Some("text/plain"), format!("{t}/{i}").into_bytes())
                .await?;
            assert_eq!(status, 201, "{body}");
        }
    }
    for sub in subs {
        let got = within(Duration::from_secs(30), "subscriber", sub).await???;
        assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![1, 2, 3]);
    }
    let mut holders = 0;
    for url in REDIS_CLUSTER.split(',') {
        let mut con = redis::Client::open(url)?.get_connection()?;
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}{{t:spread.*", prefix.0)).query(&mut con)?;
        holders += usize::from(!keys.is_empty());
    }
    assert_eq!(holders, 3, "the topics' keys live on every primary");
    Ok(())
}

/// One ingest node and two fan-out nodes on `redis`: subscribers on every door of both
/// fan-out nodes get every message of five mixed publishers once, in one order.
async fn ingest_and_fanout(redis: &str, topic: &'static str) -> Result {
    const P: usize = 5;
    const M: usize = 300;
    const TOTAL: usize = P * M;
    let prefix = Prefix::new("mix");
    let ingest = std::sync::Arc::new(node_on(redis, &prefix, Role::Ingest).await?);
    let fanout = [node_on(redis, &prefix, Role::Fanout).await?, node_on(redis, &prefix, Role::Fanout).await?];

    let mut json_subs = Vec::new();
    let mut raw_subs = Vec::new();
    let mut grpc_subs = Vec::new();
    let mut sse_subs = Vec::new();
    for server in &fanout {
        for _ in 0..2 {
            let mut ws = server.json_ws().await?;
            let reply = ws.subscribe(topic, StartFrom::Earliest, None).await?;
            assert_eq!(reply["type"], "subscribed", "{reply}");
            json_subs.push(collect_json(ws, TOTAL));
            raw_subs.push(collect_raw(server.raw_ws(topic, "mode=sub&from=earliest").await?, TOTAL));
        }
        let client = GrpcClient::connect(&server.url).await?;
        grpc_subs.push(collect_grpc(client.subscribe(topic, StartFrom::Earliest, None).await?, TOTAL));
        sse_subs.push(sse_events(server, topic, TOTAL).await?);
    }
    for server in &fanout {
        let counted = async || Ok(server.subscribers(topic).await? == 6);
        eventually(Duration::from_secs(10), "six subscribers on each fan-out node", counted).await?;
    }

    let limit = Duration::from_secs(120);
    let sent = publish_concurrently(&ingest, topic, P, M, limit).await?;
    check_one_order(&sent, json_subs, raw_subs, grpc_subs, limit).await?;
    for sub in sse_subs {
        assert_eq!(
            within(limit, "SSE subscriber", sub).await???,
            (1..=TOTAL as u64).collect::<Vec<_>>(),
            "SSE offsets"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_refuses_what_it_does_not_serve_naming_its_role() -> Result {
    let prefix = Prefix::new("roles");
    let ingest = node(&prefix, Role::Ingest).await?;
    let fanout = node(&prefix, Role::Fanout).await?;

    let (status, body) = fanout.post("/v1/topics/r.t/messages", Some("text/plain"), b"x".to_vec()).await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("role is fanout") && message.contains("ingest"), "{message}");
    let grpc = GrpcClient::connect(&fanout.url).await?;
    let refused = grpc.publish("r.t", herald_client::grpc::pb::Kind::Text, b"x".to_vec()).await;
    assert!(format!("{refused:?}").contains("role is fanout"), "{refused:?}");

    let mut raw = fanout.raw_ws("r.t", "mode=pub").await?;
    common::send_text(&mut raw, "x").await?;
    assert_eq!(common::close_code(&mut raw).await?, 1003, "a raw publish on a fan-out node");

    let mut ws = ingest.json_ws().await?;
    let reply = ws.subscribe("r.t", StartFrom::Latest, None).await?;
    assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some("unavailable")), "{reply}");
    assert!(reply["message"].as_str().is_some_and(|m| m.contains("role is ingest")), "{reply}");
    let sse = ingest.http.get(format!("{}/v1/topics/r.t/sse", ingest.url)).send().await?;
    assert_eq!(sse.status(), 503);

    // Publishing on the ingest node works, and the fan-out node serves the history.
    let (status, body) = ingest.post("/v1/topics/r.t/messages", Some("text/plain"), b"hello".to_vec()).await?;
    assert_eq!(status, 201, "{body}");
    let (status, page) = fanout.get_json("/v1/topics/r.t/messages?from=1").await?;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"][0]["data"], "hello");
    let (_, list) = fanout.get_json("/v1/topics?prefix=r.").await?;
    assert_eq!(list["topics"][0]["topic"], "r.t", "{list}");

    // Queue calls are the ingest side's: served there (tests/queues.rs runs them all on
    // two nodes), refused on the fan-out node with its role named.
    let (status, body) = ingest.post("/v1/queues/jobs/messages", Some("text/plain"), b"x".to_vec()).await?;
    assert_eq!(status, 201, "{body}");
    let (status, body) = fanout.post("/v1/queues/jobs/fetch", None, Vec::new()).await?;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("role is fanout") && message.contains("queue calls"), "{message}");

    for server in [&ingest, &fanout] {
        let ready = server.http.get(format!("{}/readyz", server.url)).send().await?;
        assert_eq!(ready.status(), 200);
    }
    Ok(())
}
