//! Fan-out correctness over real sockets: many publishers on every front door, many
//! subscribers on the JSON and raw WebSockets and gRPC; dense offsets; replay joining live.

mod common;

use std::time::Duration;

use base64::Engine;
use common::mix::{check_one_order, collect_grpc, collect_json, collect_raw, publish_concurrently};
use common::{raw_next, start, within, Result, TestServer};
use futures_util::{SinkExt, StreamExt};
use herald_client::grpc::pb;
use herald_client::{Delivery, GrpcClient, Payload, StartFrom};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const TOPIC: &str = "mix.all";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_publishers_many_subscribers_every_message_once_in_order() -> Result {
    const P: usize = 5;
    const M: usize = 1000;
    const TOTAL: usize = P * M;
    let server = start(|_| {}).await?;

    let mut json_subs = Vec::new();
    for i in 0..8 {
        // Half of them with packed frames (`?pack=lines`).
        let mut ws = if i % 2 == 0 { server.json_ws().await? } else { server.json_ws_packed().await? };
        let reply = ws.subscribe(TOPIC, StartFrom::Latest, None).await?;
        assert_eq!(reply["type"], "subscribed");
        json_subs.push(collect_json(ws, TOTAL));
    }
    let mut raw_subs = Vec::new();
    for _ in 0..8 {
        raw_subs.push(collect_raw(server.raw_ws(TOPIC, "mode=sub").await?, TOTAL));
    }
    let mut grpc_subs = Vec::new();
    let shared = GrpcClient::connect(&server.url).await?;
    for i in 0..4 {
        // Two share one connection (two HTTP/2 streams), two have their own.
        let client = if i < 2 { shared.clone() } else { GrpcClient::connect(&server.url).await? };
        grpc_subs.push(collect_grpc(client.subscribe(TOPIC, StartFrom::Latest, None).await?, TOTAL));
    }
    assert_eq!(server.subscribers(TOPIC).await?, 20);

    let limit = Duration::from_secs(120);
    // Held to the end: a server dropped here would close the sockets still being read.
    let server = std::sync::Arc::new(server);
    let sent = publish_concurrently(&server, TOPIC, P, M, limit).await?;
    // Offsets reported to publishers are distinct and within 1..=TOTAL.
    let mut offsets: Vec<u64> = sent.iter().flatten().filter_map(|(_, o)| *o).collect();
    offsets.sort_unstable();
    offsets.dedup();
    assert_eq!(offsets.len(), TOTAL - M, "publishers 0, 1, 3 and 4 got distinct offsets");
    assert!(offsets.iter().all(|o| (1..=TOTAL as u64).contains(o)));
    check_one_order(&sent, json_subs, raw_subs, grpc_subs, limit).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_get_offsets_exactly_one_to_n() -> Result {
    let server = std::sync::Arc::new(start(|_| {}).await?);
    let tasks: Vec<_> = (0..8)
        .map(|p| {
            let server = server.clone();
            tokio::spawn(async move {
                let mut offsets = Vec::new();
                if p % 2 == 0 {
                    let mut ws = server.json_ws().await?;
                    for i in 0..250 {
                        let reply = ws.publish("dense", json!({"p": p, "i": i})).await?;
                        offsets.push(reply["offset"].as_u64().ok_or("no offset")?);
                    }
                } else {
                    let client = server.client();
                    for i in 0..250 {
                        offsets.push(client.publish_text("dense", format!("{p}-{i}")).await?.offset);
                    }
                }
                Result::Ok(offsets)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        let offsets = within(Duration::from_secs(60), "publisher", t).await???;
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "one connection's publishes keep their order");
        all.extend(offsets);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=2000).collect::<Vec<u64>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_then_live_has_no_gap_and_no_duplicate_while_publishing() -> Result {
    const BEFORE: u64 = 500;
    const TOTAL: u64 = 3000;
    let server = std::sync::Arc::new(start(|_| {}).await?);
    let client = server.client();
    for i in 0..BEFORE {
        client.publish_text("flow", format!("m{i}")).await?;
    }
    let (progress_tx, progress) = tokio::sync::watch::channel(BEFORE);
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in BEFORE..TOTAL {
                let p = client.publish_text("flow", format!("m{i}")).await?;
                let _ = progress_tx.send(p.offset);
            }
            Result::Ok(())
        })
    };
    // Subscribers join at different moments while the publisher runs.
    let plans = [
        (600, StartFrom::Earliest),
        (900, StartFrom::Offset(250)),
        (1500, StartFrom::Latest),
        (2000, StartFrom::Offset(1900)),
    ];
    let mut subs = Vec::new();
    for (i, (at, from)) in plans.into_iter().enumerate() {
        let mut progress = progress.clone();
        progress.wait_for(|&o| o >= at).await?;
        // Every other one with packed frames: a replay's batches share WebSocket frames.
        let mut ws = if i % 2 == 0 { server.json_ws_packed().await? } else { server.json_ws().await? };
        let reply = ws.subscribe("flow", from, None).await?;
        assert_eq!(reply["recovered"], true, "{reply}");
        let first = match from {
            StartFrom::Earliest => 1,
            StartFrom::Offset(n) => n,
            StartFrom::Latest => reply["next"].as_u64().ok_or("no next")?,
        };
        subs.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            loop {
                let d = Delivery::parse(&ws.recv_text().await?)?;
                assert_eq!(d.payload, Payload::Json(format!("\"m{}\"", d.offset - 1)));
                offsets.push(d.offset);
                if d.offset == TOTAL {
                    return Result::Ok((first, offsets));
                }
            }
        }));
    }
    within(Duration::from_secs(60), "publisher", publisher).await???;
    for sub in subs {
        let (first, offsets) = within(Duration::from_secs(60), "subscriber", sub).await???;
        assert_eq!(offsets, (first..=TOTAL).collect::<Vec<_>>(), "contiguous from {first}");
    }
    Ok(())
}

#[tokio::test]
async fn a_raw_publisher_streaming_frames_is_published_in_order_and_whole_on_the_disk_store() -> Result {
    // Frames that arrive together are published as one batch: none may be lost, reordered
    // or published twice, also when pings and the close frame arrive among them.
    let dir = std::env::temp_dir().join(format!("herald-rawpub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.clone();
    let server = start(move |c| {
        c.store = herald_server::StoreKind::Disk;
        c.data_dir = data_dir;
    })
    .await?;
    let mut publisher = server.raw_ws("stream", "mode=pub").await?;
    let n = 2000;
    for i in 0..n {
        let frame =
            if i % 3 == 0 { WsMessage::binary(format!("b{i}").into_bytes()) } else { WsMessage::text(format!("t{i}")) };
        publisher.feed(frame).await?;
        if i % 500 == 0 {
            publisher.feed(WsMessage::Ping(Default::default())).await?;
        }
    }
    publisher.close(None).await?; // flushes, then the close frame right behind the data
                                  // The server answers the close once its reader has published everything before it.
    within(Duration::from_secs(10), "the server's close", async {
        while let Some(frame) = publisher.next().await {
            frame?;
        }
        Result::Ok(())
    })
    .await??;
    let mut got = Vec::new();
    let mut from = 0;
    loop {
        let (_, page) = server.get_json(&format!("/v1/topics/stream/messages?from={from}&limit=1000")).await?;
        let msgs = page["messages"].as_array().cloned().unwrap_or_default();
        if msgs.is_empty() {
            break;
        }
        for m in &msgs {
            let data = match (&m["data"], &m["data_b64"]) {
                (serde_json::Value::String(t), _) => t.clone(),
                (_, serde_json::Value::String(b)) => {
                    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b)?)?
                }
                _ => return Err("no payload".into()),
            };
            got.push((m["offset"].as_u64().ok_or("offset")?, data));
        }
        from = page["next"].as_u64().ok_or("next")?;
    }
    let expected: Vec<(u64, String)> =
        (0..n).map(|i| (i as u64 + 1, if i % 3 == 0 { format!("b{i}") } else { format!("t{i}") })).collect();
    assert_eq!(got, expected);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn pipelined_json_frames_are_answered_in_order_with_consecutive_offsets() -> Result {
    // Frames that arrive together are handled together (runs of publishes to one topic
    // share one store write), yet each is answered on its own, in the order sent.
    let server = start(|_| {}).await?;
    let mut ws = server.json_ws().await?;
    let mut frames = Vec::new();
    for i in 1..=100 {
        frames.push(json!({"op": "publish", "id": i, "topic": "a", "data": i}).to_string());
    }
    frames.push(r#"{"op":"publish","id":101,"topic":"a","data":}"#.to_owned()); // not JSON
    for i in 102..=151 {
        frames.push(json!({"op": "publish", "id": i, "topic": "b", "data": i}).to_string());
    }
    frames.push(json!({"op": "ping", "id": 152}).to_string());
    for i in 153..=252 {
        frames.push(json!({"op": "publish", "topic": "a", "data": i}).to_string());
        // no id: no reply
    }
    frames.push(json!({"op": "ping", "id": 253}).to_string());
    for frame in frames {
        ws.send_text(frame).await?;
    }
    let mut replies = Vec::new();
    while replies.len() < 153 {
        replies.push(within(Duration::from_secs(10), "reply", ws.recv()).await??);
    }
    for (i, r) in replies[..100].iter().enumerate() {
        assert_eq!(
            (r["type"].as_str(), r["id"].as_u64(), r["offset"].as_u64()),
            (Some("published"), Some(i as u64 + 1), Some(i as u64 + 1)),
            "{r}"
        );
    }
    assert_eq!((replies[100]["type"].as_str(), replies[100]["code"].as_str()), (Some("error"), Some("bad_request")));
    for (i, r) in replies[101..151].iter().enumerate() {
        assert_eq!(
            (r["id"].as_u64(), r["topic"].as_str(), r["offset"].as_u64()),
            (Some(102 + i as u64), Some("b"), Some(i as u64 + 1)),
            "{r}"
        );
    }
    assert_eq!((replies[151]["type"].as_str(), replies[151]["id"].as_u64()), (Some("pong"), Some(152)));
    assert_eq!((replies[152]["type"].as_str(), replies[152]["id"].as_u64()), (Some("pong"), Some(253)));
    let (_, page) = server.get_json("/v1/topics/a/messages?from=0&limit=1000").await?;
    let data: Vec<u64> =
        page["messages"].as_array().ok_or("messages")?.iter().filter_map(|m| m["data"].as_u64()).collect();
    assert_eq!(data, (1..=100).chain(153..=252).collect::<Vec<u64>>());
    Ok(())
}

/// One connection subscribes to a topic and publishes to it, all frames sent at once:
/// each publish's `message` frame comes before its `published` reply, and the frames are
/// the same as if the client had sent them one by one (ARCHITECTURE.md, step 6).
async fn own_publishes_come_back_before_their_replies(server: &TestServer, round: usize) -> Result {
    let topic = format!("own.{round}");
    // Some rounds have history to replay (live messages are held back meanwhile), some
    // another publisher on the topic (a message may wait for an earlier offset).
    let history = [0, 1, 300][round % 3];
    if history > 0 {
        let batch = (0..history).map(|i| pb::BatchMessage {
            data: format!("old {i}").into_bytes().into(),
            kind: pb::Kind::Text as i32,
            ..Default::default()
        });
        GrpcClient::connect(&server.url).await?.publish_batch(&topic, batch.collect()).await?;
    }
    let other = (round % 2 == 1).then(|| {
        let (client, topic) = (server.client(), topic.clone());
        tokio::spawn(async move {
            loop {
                if client.publish_text(&topic, "other").await.is_err() {
                    return;
                }
            }
        })
    });
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/v1/ws", server.ws)).await?;
    let frames = [
        json!({"op": "subscribe", "id": 1, "topic": topic, "from": "earliest"}),
        json!({"op": "publish", "id": 2, "topic": topic, "data": "a"}),
        json!({"op": "publish", "topic": topic, "data": "b"}),
        json!({"op": "publish", "id": 4, "topic": topic, "data": "c"}),
        json!({"op": "ping", "id": 5}),
    ];
    for frame in frames {
        ws.feed(WsMessage::text(frame.to_string())).await?;
    }
    ws.flush().await?;
    // What arrived, with the other publisher's messages left out; offsets checked dense.
    let mut seen = Vec::new();
    let mut offsets = std::collections::HashMap::new();
    let mut next = 1;
    loop {
        let frame = within(Duration::from_secs(10), "a frame", raw_next(&mut ws)).await??;
        let v: serde_json::Value = serde_json::from_str(frame.to_text()?)?;
        match (v["type"].as_str(), v["data"].as_str()) {
            (Some("message"), data) => {
                assert_eq!(v["offset"].as_u64(), Some(next), "round {round}: {v}");
                next += 1;
                match data {
                    Some(own @ ("a" | "b" | "c")) => {
                        offsets.insert(own.to_owned(), next - 1);
                        seen.push(format!("message {own}"));
                    }
                    Some(d) if d.starts_with("old ") => seen.push("old".to_owned()),
                    _ => {}
                }
            }
            (Some("published"), _) => {
                let own = if v["id"] == 2 { "a" } else { "c" };
                assert_eq!(v["offset"].as_u64(), offsets.get(own).copied(), "round {round}: {v} answers {own}");
                seen.push(format!("published {}", v["id"]));
            }
            (Some(kind), _) => seen.push(format!("{kind} {}", v["id"])),
            (None, _) => return Err(format!("round {round}: not a reply: {v}").into()),
        }
        if v["type"] == "pong" {
            break;
        }
    }
    if let Some(other) = other {
        other.abort();
    }
    let mut expected = vec!["subscribed 1".to_owned()];
    expected.extend(std::iter::repeat_n("old".to_owned(), history));
    expected.extend(["message a", "published 2", "message b", "message c", "published 4", "pong 5"].map(String::from));
    assert_eq!(seen, expected, "round {round}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_connection_a_message_comes_before_its_published_reply_on_the_memory_store() -> Result {
    let server = start(|_| {}).await?;
    for round in 0..60 {
        own_publishes_come_back_before_their_replies(&server, round).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_connection_a_message_comes_before_its_published_reply_on_the_disk_store() -> Result {
    let dir = std::env::temp_dir().join(format!("herald-own-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.clone();
    let server = start(move |c| {
        c.store = herald_server::StoreKind::Disk;
        c.data_dir = data_dir;
    })
    .await?;
    for round in 0..60 {
        own_publishes_come_back_before_their_replies(&server, round).await?;
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A packed connection's WebSocket frames, each split into its server frames.
async fn packed_frames(socket: &mut common::RawSocket, until_offset: u64) -> Result<Vec<Vec<serde_json::Value>>> {
    let mut frames = Vec::new();
    loop {
        let WsMessage::Text(text) = raw_next(socket).await? else { return Err("not a text frame".into()) };
        let lines =
            text.split('\n').map(serde_json::from_str).collect::<std::result::Result<Vec<serde_json::Value>, _>>()?;
        let done = lines.iter().any(|l| l["offset"].as_u64() == Some(until_offset));
        frames.push(lines);
        if done {
            return Ok(frames);
        }
    }
}

#[tokio::test]
async fn packed_frames_carry_many_server_frames_in_order_with_json_line_breaks_as_spaces() -> Result {
    let server = start(|_| {}).await?;
    let client = server.client();
    for i in 0..300 {
        client.publish_text("packed", format!("m{i}")).await?;
    }
    // A JSON payload with line breaks (JSON whitespace) and one inside a string (escaped).
    let pretty = "{\n  \"a\": [1,\n 2],\n  \"s\": \"x\\ny\"\n}";
    let (status, reply) = server.post("/v1/topics/packed/messages", Some("application/json"), pretty.into()).await?;
    assert_eq!(status, 201, "{reply}");

    let mut packed = server.socket("/v1/ws?pack=lines").await?;
    common::send_text(&mut packed, r#"{"op":"subscribe","id":1,"topic":"packed","from":"earliest"}"#).await?;
    let frames = within(Duration::from_secs(20), "packed replay", packed_frames(&mut packed, 301)).await??;
    let lines: Vec<&serde_json::Value> = frames.iter().flatten().collect();
    assert_eq!(lines[0]["type"], "subscribed", "the reply first: {}", lines[0]);
    let offsets: Vec<u64> = lines[1..].iter().filter_map(|l| l["offset"].as_u64()).collect();
    assert_eq!(offsets, (1..=301).collect::<Vec<_>>(), "every message once, in order, nothing else");
    assert!(frames.len() < 30, "a replay's messages share frames: {} frames for 302 server frames", frames.len());
    assert_eq!(lines[300]["data"], "m299");
    let expected: serde_json::Value = serde_json::from_str(pretty)?;
    assert_eq!(lines[301]["data"], expected, "the same JSON value");

    // The packed frame holds the payload with its line breaks as spaces; an unpacked
    // connection gets the exact text.
    let mut packed_ws = server.json_ws_packed().await?;
    let mut plain_ws = server.json_ws().await?;
    for ws in [&mut packed_ws, &mut plain_ws] {
        let reply = ws.subscribe("packed", StartFrom::Offset(301), None).await?;
        assert_eq!(reply["recovered"], true, "{reply}");
    }
    let spaced = pretty.replace('\n', " ");
    assert_eq!(Delivery::parse(&packed_ws.recv_text().await?)?.payload, Payload::Json(spaced));
    assert_eq!(Delivery::parse(&plain_ws.recv_text().await?)?.payload, Payload::Json(pretty.to_owned()));

    // Live: the message, then its publish's reply (maybe in one frame), each whole.
    common::send_text(&mut packed, r#"{"op":"publish","id":2,"topic":"packed","data":"live"}"#).await?;
    let mut lines: Vec<serde_json::Value> = Vec::new();
    while lines.len() < 2 {
        lines.extend(
            within(Duration::from_secs(10), "live", packed_frames(&mut packed, 302)).await??.into_iter().flatten(),
        );
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!((lines[0]["type"].as_str(), lines[0]["data"].as_str()), (Some("message"), Some("live")));
    assert_eq!((lines[1]["type"].as_str(), lines[1]["offset"].as_u64()), (Some("published"), Some(302)));

    // Only `lines` is a packing: anything else is refused before the upgrade.
    let (status, body) = server.get_json("/v1/ws?pack=yes").await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    Ok(())
}
