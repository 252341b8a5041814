//! Admin actions on queues over HTTP and gRPC: purge (ready and delayed jobs go, leased
//! ones stay with their workers) and redrive (dead letters back to their queue), the
//! latter under load with nothing lost or duplicated, and durable across a restart.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{enqueue_text as enqueue, fetch_jobs as fetch, post_status as call, start, within, Result, TestServer};
use herald_client::grpc::pb;
use herald_client::GrpcClient;
use serde_json::Value;

async fn stats(server: &TestServer, queue: &str) -> Result<(u64, u64, u64, u64)> {
    let s = server.get_json(&format!("/v1/queues/{queue}")).await?.1;
    let n = |k: &str| s[k].as_u64().unwrap_or(u64::MAX);
    Ok((n("ready"), n("in_flight"), n("delayed"), n("dead")))
}

#[tokio::test]
async fn purge_removes_ready_and_delayed_jobs_and_leaves_leased_ones() -> Result {
    let server = start(|_| {}).await?;
    for i in 0..4 {
        enqueue(&server, "p", &format!("job {i}"), "").await?;
    }
    enqueue(&server, "p", "later", "delay_ms=3600000").await?;
    let leased = fetch(&server, "p", "max=1").await?;
    assert_eq!(stats(&server, "p").await?, (3, 1, 1, 0));

    let (status, reply) = server.post("/v1/queues/p/purge", None, Vec::new()).await?;
    assert_eq!((status, &reply["queue"], &reply["purged"]), (200, &Value::from("p"), &Value::from(4)));
    assert_eq!(stats(&server, "p").await?, (0, 1, 0, 0));
    assert!(fetch(&server, "p", "max=10").await?.is_empty());
    // The leased job is its worker's still: the ack counts.
    let id = leased[0]["id"].as_str().ok_or("id")?;
    assert_eq!(call(&server, &format!("/v1/queues/p/ack/{id}")).await?, 204);
    assert_eq!(stats(&server, "p").await?, (0, 0, 0, 0));
    // Purging again, or a queue never used: nothing to remove.
    let (_, reply) = server.post("/v1/queues/p/purge", None, Vec::new()).await?;
    assert_eq!(reply["purged"], 0);
    let (_, reply) = server.post("/v1/queues/never/purge", None, Vec::new()).await?;
    assert_eq!(reply["purged"], 0);
    // A dead-letter queue can be purged; it cannot be redriven.
    let (status, _) = server.post("/v1/queues/p.dlq/purge", None, Vec::new()).await?;
    assert_eq!(status, 200);
    let (status, reply) = server.post("/v1/queues/p.dlq/redrive", None, Vec::new()).await?;
    assert_eq!((status, &reply["error"]["code"]), (400, &Value::from("bad_request")), "{reply}");
    let (status, reply) = server.post("/v1/queues/p/redrive?max=0", None, Vec::new()).await?;
    assert_eq!(status, 400, "{reply}");
    Ok(())
}

/// Jobs `0..N` are enqueued by a producer while workers run: a worker gives each job
/// divisible by 3 back on its first delivery (one attempt allowed: it is dead-lettered)
/// and acks everything else, and a job it sees again (after a redrive). Meanwhile
/// redrives run over and over. In the end every job was acked exactly once, nothing is
/// left in the queue or its dead-letter queue, and after a restart of the disk store
/// nothing comes back.
#[tokio::test]
async fn redrive_under_load_loses_and_duplicates_nothing() -> Result {
    const N: usize = 1500;
    let dir = std::env::temp_dir().join(format!("herald-redrive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tune = {
        let dir = dir.clone();
        move |c: &mut herald_server::Config| {
            c.store = herald_server::StoreKind::Disk;
            c.data_dir = dir.clone();
            c.broker.queues.max_attempts = 1;
        }
    };
    let server = Arc::new(start(tune.clone()).await?);

    let producer = {
        let server = server.clone();
        tokio::spawn(async move {
            for i in 0..N {
                enqueue(&server, "load", &i.to_string(), "").await?;
            }
            Result::Ok(())
        })
    };
    // job -> times acked; jobs given back once.
    let acked = Arc::new(Mutex::new(HashMap::<usize, u32>::new()));
    let failed = Arc::new(Mutex::new(HashSet::<usize>::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (server, acked, failed) = (server.clone(), acked.clone(), failed.clone());
            tokio::spawn(async move {
                while acked.lock().map_err(|_| "poisoned")?.len() < N {
                    for m in fetch(&server, "load", "max=10&wait_ms=100").await? {
                        let job: usize = m["data"].as_str().ok_or("data")?.parse()?;
                        let id = m["id"].as_str().ok_or("id")?;
                        let give_back = job.is_multiple_of(3) && failed.lock().map_err(|_| "poisoned")?.insert(job);
                        if give_back {
                            assert_eq!(call(&server, &format!("/v1/queues/load/requeue/{id}")).await?, 204);
                        } else {
                            assert_eq!(call(&server, &format!("/v1/queues/load/ack/{id}")).await?, 204);
                            *acked.lock().map_err(|_| "poisoned")?.entry(job).or_default() += 1;
                        }
                    }
                }
                Result::Ok(())
            })
        })
        .collect();
    let redriver = {
        let (server, acked) = (server.clone(), acked.clone());
        tokio::spawn(async move {
            let mut moved = 0;
            let mut calls = 0;
            while acked.lock().map_err(|_| "poisoned")?.len() < N {
                let (status, reply) = server.post("/v1/queues/load/redrive?max=50", None, Vec::new()).await?;
                assert_eq!(status, 200, "{reply}");
                moved += reply["moved"].as_u64().ok_or("moved")?;
                calls += 1;
                tokio::time::sleep(Duration::from_millis(5)).await; // paces the admin, not a sync
            }
            Result::Ok((moved, calls))
        })
    };
    within(Duration::from_secs(120), "producer", producer).await???;
    for w in workers {
        within(Duration::from_secs(120), "worker", w).await???;
    }
    let (moved, calls) = within(Duration::from_secs(120), "redriver", redriver).await???;

    let acked = acked.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(acked.len(), N, "every job acked");
    let twice: Vec<_> = acked.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "acked more than once: {twice:?}");
    let given_back = failed.lock().map_err(|_| "poisoned")?.len();
    assert_eq!(given_back, N.div_ceil(3));
    assert_eq!(moved as usize, given_back, "each dead letter redriven once ({calls} redrive calls)");
    assert_eq!(stats(&server, "load").await?, (0, 0, 0, 0));

    // The moves are durable: after a restart neither queue holds anything.
    let mut server = Arc::try_unwrap(server).map_err(|_| "server still shared")?;
    let running = server.server.take().ok_or("server")?;
    running.shutdown();
    running.wait().await?; // the store closed: its directory lock released
    let server = start(tune).await?;
    assert_eq!(stats(&server, "load").await?, (0, 0, 0, 0));
    assert!(fetch(&server, "load.dlq", "max=10").await?.is_empty());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn purge_and_redrive_over_grpc() -> Result {
    let server = start(|c| c.broker.queues.max_attempts = 1).await?;
    let client = GrpcClient::connect(&server.url).await?;
    let mut queues = client.queues();
    for i in 0..3 {
        enqueue(&server, "g", &format!("job {i}"), "").await?;
    }
    // Two jobs fail once and are dead-lettered; one stays ready.
    for m in fetch(&server, "g", "max=2").await? {
        let id = m["id"].as_str().ok_or("id")?;
        assert_eq!(call(&server, &format!("/v1/queues/g/requeue/{id}")).await?, 204);
    }
    assert_eq!(stats(&server, "g").await?, (1, 0, 0, 2));

    let one = queues.redrive(pb::RedriveRequest { queue: "g".into(), max: 1 }).await?.into_inner();
    assert_eq!((one.queue.as_str(), one.moved), ("g", 1));
    let rest = queues.redrive(pb::RedriveRequest { queue: "g".into(), max: 0 }).await?.into_inner();
    assert_eq!(rest.moved, 1);
    assert_eq!(stats(&server, "g").await?, (3, 0, 0, 0));
    // Oldest dead letter first, as a new job on its first attempt.
    let jobs = fetch(&server, "g", "max=10").await?;
    let data: Vec<_> = jobs.iter().map(|m| (m["data"].as_str().unwrap_or(""), m["attempt"].as_u64())).collect();
    assert_eq!(data, [("job 2", Some(1)), ("job 0", Some(1)), ("job 1", Some(1))]);

    enqueue(&server, "g", "ready", "").await?;
    let purged = queues.purge(pb::PurgeRequest { queue: "g".into() }).await?.into_inner();
    assert_eq!(purged.purged, 1, "the three leased jobs stay");
    assert_eq!(stats(&server, "g").await?, (0, 3, 0, 0));

    let refused = queues.redrive(pb::RedriveRequest { queue: "g.dlq".into(), max: 0 }).await;
    assert_eq!(refused.map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::InvalidArgument));
    let refused = queues.redrive(pb::RedriveRequest { queue: "g".into(), max: 100_001 }).await;
    assert_eq!(refused.map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::InvalidArgument));
    Ok(())
}

/// The admin list's entries, by door.
async fn listed(server: &TestServer, query: &str) -> Result<Value> {
    let (status, list) = server.get_json(&format!("/v1/admin/connections?{query}")).await?;
    assert_eq!(status, 200, "{list}");
    Ok(list)
}

fn by_door<'a>(list: &'a Value, door: &str) -> Result<&'a Value> {
    let all = list["connections"].as_array().ok_or("connections")?;
    Ok(all.iter().find(|c| c["door"] == door).ok_or_else(|| format!("no {door} connection in {list}"))?)
}

#[tokio::test]
async fn connections_are_listed_and_closed_over_http_and_grpc() -> Result {
    use common::{close_code, raw_next, send_text};
    use futures_util::StreamExt;

    let server = start(|_| {}).await?;
    // One connection through each door, each subscribed.
    let mut ws = server.socket("/v1/ws").await?;
    for topic in ["b", "a"] {
        send_text(&mut ws, &format!(r#"{{"op":"subscribe","topic":"{topic}"}}"#)).await?;
        raw_next(&mut ws).await?; // the `subscribed` reply
    }
    let mut raw = server.raw_ws("r", "mode=sub").await?;
    let mut sse = server.http.get(format!("{}/v1/topics/s/sse", server.url)).send().await?;
    assert_eq!(sse.status(), 200);
    let client = GrpcClient::connect(&server.url).await?;
    let mut grpc = client.subscribe("g", herald_client::StartFrom::Latest, None).await?;

    let list = listed(&server, "").await?;
    assert_eq!((list["open"].as_u64(), list["next"].is_null()), (Some(4), true), "{list}");
    for (door, topics) in [("ws", vec!["a", "b"]), ("raw", vec!["r"]), ("sse", vec!["s"]), ("grpc", vec!["g"])] {
        let c = by_door(&list, door)?;
        assert_eq!(c["subscriptions"], serde_json::json!(topics), "{c}");
        assert!(c["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{c}");
        assert_eq!((c["user"].is_null(), c["queued_bytes"].as_u64()), (true, Some(0)), "{c}");
        assert!(c["since"].as_u64().is_some_and(|t| t > 1_700_000_000_000), "{c}");
    }
    // Pages of 3 then 1, by id.
    let first = listed(&server, "limit=3").await?;
    let next = first["next"].as_u64().ok_or("a next page")?;
    let second = listed(&server, &format!("after={next}&limit=3")).await?;
    let ids =
        |l: &Value| l["connections"].as_array().map(|a| a.iter().filter_map(|c| c["id"].as_u64()).collect::<Vec<_>>());
    let (one, two) = (ids(&first).ok_or("ids")?, ids(&second).ok_or("ids")?);
    assert_eq!((one.len(), two.len(), second["next"].is_null()), (3, 1, true));
    assert!(one.windows(2).all(|w| w[0] < w[1]) && one[2] < two[0] && one[2] == next);
    let (status, _) = server.get_json("/v1/admin/connections?limit=0").await?;
    assert_eq!(status, 400);

    // Closed over HTTP: the JSON WebSocket gets 1008, the SSE stream ends.
    let ws_id = by_door(&list, "ws")?["id"].as_u64().ok_or("id")?;
    let status = server.http.delete(format!("{}/v1/admin/connections/{ws_id}", server.url)).send().await?.status();
    assert_eq!(status, 204);
    assert_eq!(within(Duration::from_secs(10), "the close", close_code(&mut ws)).await??, 1008);
    let sse_id = by_door(&list, "sse")?["id"].as_u64().ok_or("id")?;
    let status = server.http.delete(format!("{}/v1/admin/connections/{sse_id}", server.url)).send().await?.status();
    assert_eq!(status, 204);
    within(Duration::from_secs(10), "the SSE stream's end", async {
        while sse.chunk().await?.is_some() {}
        Result::Ok(())
    })
    .await??;
    let again = server.http.delete(format!("{}/v1/admin/connections/{ws_id}", server.url)).send().await?;
    assert_eq!(again.status(), 404);
    let bad = server.http.delete(format!("{}/v1/admin/connections/x1", server.url)).send().await?;
    assert_eq!(bad.status(), 400);

    // Over gRPC: listed, the gRPC stream and the raw socket closed.
    let mut admin = client.admin();
    let grpc_id = by_door(&list, "grpc")?["id"].as_u64().ok_or("id")?;
    let raw_id = by_door(&list, "raw")?["id"].as_u64().ok_or("id")?;
    common::eventually(Duration::from_secs(10), "two connections left", || async {
        let listed = admin.clone().list_connections(pb::ListConnectionsRequest { after: 0, limit: 0 }).await?;
        Result::Ok(listed.into_inner().open == 2)
    })
    .await?;
    let listed = admin.list_connections(pb::ListConnectionsRequest { after: 0, limit: 0 }).await?.into_inner();
    let doors: Vec<_> = listed.connections.iter().map(|c| (c.id, c.door.as_str(), c.subscriptions.clone())).collect();
    assert_eq!(doors, [(raw_id, "raw", vec!["r".to_owned()]), (grpc_id, "grpc", vec!["g".to_owned()])]);
    admin.close_connection(pb::CloseConnectionRequest { id: grpc_id }).await?;
    let ended = within(Duration::from_secs(10), "the gRPC stream's end", grpc.next()).await?;
    let Err(herald_client::ClientError::Grpc(status)) = ended else {
        return Err(format!("not ended by a status: {ended:?}").into());
    };
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("closed by an administrator"), "{status:?}");
    admin.close_connection(pb::CloseConnectionRequest { id: raw_id }).await?;
    assert_eq!(within(Duration::from_secs(10), "the raw close", close_code(&mut raw)).await??, 1008);
    let missing = admin.close_connection(pb::CloseConnectionRequest { id: raw_id }).await;
    assert_eq!(missing.map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::NotFound));
    let _ = raw.next().await;
    Ok(())
}
