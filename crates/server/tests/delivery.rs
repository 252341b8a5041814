//! What subscribers receive: the kind table across every front door, encode-once
//! fan-out, SSE with Last-Event-ID, keepalive, TTL, topic listing.

mod common;

use std::time::Duration;

use common::{eventually, raw_next, start, within, RawSocket, Result, TestServer};
use futures_util::SinkExt;
use herald_client::{Delivery, Payload, StartFrom, WsConnection};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A minimal SSE reader over a streaming response.
struct Sse {
    response: reqwest::Response,
    buf: String,
}

/// One SSE event: its id and its data lines joined with `\n`.
#[derive(Debug, PartialEq)]
struct Event {
    id: Option<u64>,
    data: String,
}

impl Sse {
    async fn open(server: &TestServer, topic: &str, query: &str, last_event_id: Option<&str>) -> Result<Self> {
        let mut req = server.http.get(format!("{}/v1/topics/{topic}/sse?{query}", server.url));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let response = req.send().await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Ok(Self { response, buf: String::new() })
    }

    /// The next event with data (comments and keepalives skipped).
    async fn next(&mut self) -> Result<Event> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = Event { id: None, data: String::new() };
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(id) = line.strip_prefix("id: ") {
                        event.id = Some(id.parse()?);
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push(d);
                    }
                }
                if !data.is_empty() {
                    event.data = data.join("\n");
                    return Ok(event);
                }
                continue;
            }
            let chunk = self.response.chunk().await?.ok_or("SSE stream ended")?;
            self.buf.push_str(std::str::from_utf8(&chunk)?);
        }
    }
}

async fn next_delivery(ws: &mut WsConnection) -> Result<Delivery> {
    loop {
        let text = ws.recv_text().await?;
        if text.starts_with(r#"{"type":"message""#) {
            return Ok(Delivery::parse(&text)?);
        }
    }
}

#[tokio::test]
async fn every_kind_reaches_every_front_door_in_its_form() -> Result {
    let server = start(|_| {}).await?;
    let mut json_ws = server.json_ws().await?;
    json_ws.subscribe("k", StartFrom::Latest, None).await?;
    let mut raw = server.raw_ws("k", "mode=sub").await?;
    let mut sse = Sse::open(&server, "k", "", None).await?;

    let exact_json = r#"{"n": 1.10, "big": 123456789012345678901234567890}"#;
    // (how it is published, what JSON views show as data, the raw frame)
    let mut publisher = server.raw_ws("k", "mode=pub").await?;
    let mut pub_ws = server.json_ws().await?;
    let mut expected: Vec<(String, WsMessage)> = Vec::new();
    for (ct, body, view, frame) in [
        (Some("text/plain"), "héllo".as_bytes(), r#""data":"héllo""#, WsMessage::text("héllo")),
        (Some("TEXT/Plain; charset=UTF-8"), b"".as_slice(), r#""data":"""#, WsMessage::text("")),
        (
            Some("application/json"),
            exact_json.as_bytes(),
            &format!(r#""data":{exact_json}"#)[..],
            WsMessage::text(exact_json),
        ),
        (Some("application/vnd.api+json; charset=utf-8"), b"[1,2]", r#""data":[1,2]"#, WsMessage::text("[1,2]")),
        (None, &[0u8, 255][..], r#""data_b64":"AP8=""#, WsMessage::binary(vec![0u8, 255])),
        (Some("image/png"), b"", r#""data_b64":"""#, WsMessage::binary(Vec::new())),
    ] {
        let (status, _) = server.post("/v1/topics/k/messages", ct, body.to_vec()).await?;
        assert_eq!(status, 201);
        expected.push((view.to_owned(), frame));
    }
    for (frame, view, raw_frame) in [
        (r#"{"op":"publish","id":1,"topic":"k","data":null}"#, r#""data":null"#, WsMessage::text("null")),
        (r#"{"op":"publish","id":2,"topic":"k","data":"s"}"#, r#""data":"s""#, WsMessage::text(r#""s""#)),
        (
            r#"{"op":"publish","id":3,"topic":"k","data_b64":"aGk="}"#,
            r#""data_b64":"aGk=""#,
            WsMessage::binary(b"hi".to_vec()),
        ),
    ] {
        pub_ws.send_text(frame).await?;
        assert_eq!(pub_ws.recv().await?["type"], "published");
        expected.push((view.to_owned(), raw_frame));
    }
    publisher.send(WsMessage::text("raw text")).await?;
    publisher.send(WsMessage::binary(vec![7u8])).await?;
    expected.push((r#""data":"raw text""#.to_owned(), WsMessage::text("raw text")));
    expected.push((r#""data_b64":"Bw==""#.to_owned(), WsMessage::binary(vec![7u8])));

    for (i, (view, frame)) in expected.iter().enumerate() {
        let offset = i as u64 + 1;
        let json_frame = json_ws.recv_text().await?;
        assert!(
            json_frame.starts_with(&format!(r#"{{"type":"message","topic":"k","offset":{offset},"ts":"#)),
            "{json_frame}"
        );
        assert!(json_frame.ends_with(&format!("{view}}}")), "json ws {json_frame} should end with {view}");
        assert_eq!(&raw_next(&mut raw).await?, frame, "raw frame of offset {offset}");
        let event = sse.next().await?;
        assert_eq!(event.id, Some(offset));
        assert!(event.data.starts_with(&format!(r#"{{"topic":"k","offset":{offset},"ts":"#)), "{event:?}");
        assert!(event.data.ends_with(&format!("{view}}}")), "sse {event:?}");
    }
    // Every message arrived live, so all are stored: fetch shows the same JSON views.
    let fetched = server.http.get(format!("{}/v1/topics/k/messages", server.url)).send().await?.text().await?;
    let page: Value = serde_json::from_str(&fetched)?;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(expected.len()));
    for (i, (view, _)) in expected.iter().enumerate() {
        assert!(fetched.contains(&format!(r#"{{"offset":{},"#, i + 1)), "fetch has offset {}", i + 1);
        assert!(fetched.contains(&format!("{view}}}")), "fetch has {view}");
    }
    assert!(fetched.contains(exact_json), "fetch keeps every digit: {fetched}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_out_encodes_each_message_once_per_wire_form() -> Result {
    const MESSAGES: u64 = 20;
    let server = start(|_| {}).await?;
    let mut json_subs = Vec::new();
    for _ in 0..40 {
        let mut ws = server.json_ws().await?;
        ws.subscribe("enc", StartFrom::Latest, None).await?;
        json_subs.push(ws);
    }
    let mut raw_subs: Vec<RawSocket> = Vec::new();
    for _ in 0..40 {
        raw_subs.push(server.raw_ws("enc", "mode=sub").await?);
    }
    let mut sse_subs = Vec::new();
    for _ in 0..20 {
        sse_subs.push(Sse::open(&server, "enc", "", None).await?);
    }
    assert_eq!(server.subscribers("enc").await?, 100);
    let client = server.client();
    for i in 0..MESSAGES {
        match i % 3 {
            0 => client.publish_text("enc", format!("t{i}")).await?,
            1 => client.publish("enc", "application/json", format!("{{\"i\":{i}}}")).await?,
            _ => client.publish("enc", "application/octet-stream", vec![i as u8; 100]).await?,
        };
    }
    let limit = Duration::from_secs(20);
    for ws in &mut json_subs {
        for offset in 1..=MESSAGES {
            assert_eq!(within(limit, "json", next_delivery(ws)).await??.offset, offset);
        }
    }
    for raw in &mut raw_subs {
        for _ in 0..MESSAGES {
            within(limit, "raw", raw_next(raw)).await??;
        }
    }
    for sse in &mut sse_subs {
        for offset in 1..=MESSAGES {
            assert_eq!(within(limit, "sse", sse.next()).await??.id, Some(offset));
        }
    }
    for form in ["ws_json", "ws_raw", "sse"] {
        let encodes = server.metric(&format!("herald_encodes_total{{form=\"{form}\"}}")).await?;
        assert_eq!(encodes, MESSAGES, "{form}: one encoding per message, not per subscriber");
    }
    assert_eq!(server.metric("herald_deliveries_total").await?, 100 * MESSAGES);
    Ok(())
}

#[tokio::test]
async fn sse_resumes_after_last_event_id() -> Result {
    let server = start(|_| {}).await?;
    let client = server.client();
    for i in 1..=5 {
        client.publish_text("e", format!("m{i}")).await?;
    }
    let mut sse = Sse::open(&server, "e", "", Some("3")).await?;
    assert_eq!(sse.next().await?.id, Some(4));
    assert_eq!(sse.next().await?.id, Some(5));
    client.publish_text("e", "m6").await?;
    assert_eq!(sse.next().await?.id, Some(6), "then live");
    // Last-Event-ID wins over from; one beyond the next offset means live only.
    let mut live = Sse::open(&server, "e", "from=earliest", Some("6")).await?;
    let mut earliest = Sse::open(&server, "e", "from=earliest", None).await?;
    assert_eq!(earliest.next().await?.id, Some(1));
    client.publish_text("e", "m7").await?;
    assert_eq!(live.next().await?.id, Some(7));
    Ok(())
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_pong_timeout_and_a_live_one_is_kept() -> Result {
    let server = start(|c| {
        c.http.ping_interval = Duration::from_millis(100);
        c.http.pong_timeout = Duration::from_millis(200);
    })
    .await?;
    // Never polled: it cannot answer Pings.
    let _silent = server.raw_ws("ka", "mode=sub").await?;
    let mut live = server.json_ws().await?;
    live.subscribe("ka", StartFrom::Latest, None).await?;
    assert_eq!(server.subscribers("ka").await?, 2);
    // The live client answers Pings while it reads; keep it reading in the background.
    let reader = tokio::spawn(async move { next_delivery(&mut live).await.map(|d| (d, live)) });
    eventually(Duration::from_secs(5), "silent peer dropped", || async { Ok(server.subscribers("ka").await? == 1) })
        .await?;
    server.client().publish_text("ka", "still here").await?;
    let (delivery, _live) = within(Duration::from_secs(5), "live message", reader).await???;
    assert_eq!(delivery.payload, Payload::Json(r#""still here""#.into()));
    Ok(())
}

#[tokio::test]
async fn ttl_hides_from_history_but_not_from_live_delivery() -> Result {
    let server = start(|_| {}).await?;
    let mut ws = server.json_ws().await?;
    ws.subscribe("ttl", StartFrom::Latest, None).await?;
    let (status, _) = server.post("/v1/topics/ttl/messages?ttl_ms=0", Some("text/plain"), b"gone".to_vec()).await?;
    assert_eq!(status, 201);
    server.client().publish_text("ttl", "kept").await?;
    assert_eq!(next_delivery(&mut ws).await?.payload, Payload::Json(r#""gone""#.into()), "live delivery unaffected");
    let (_, page) = server.get_json("/v1/topics/ttl/messages").await?;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["messages"][0]["data"], "kept");
    let mut replay = server.json_ws().await?;
    replay.subscribe("ttl", StartFrom::Earliest, None).await?;
    assert_eq!(next_delivery(&mut replay).await?.offset, 2, "replay skips the expired message");
    Ok(())
}

#[tokio::test]
async fn topics_are_listed_by_name_and_paginated() -> Result {
    let server = start(|_| {}).await?;
    let client = server.client();
    for t in ["a.3", "a.1", "b.1", "a.2"] {
        client.publish_text(t, "x").await?;
    }
    // A topic with a live subscriber but no history is listed too.
    let mut ws = server.json_ws().await?;
    ws.subscribe("a.4", StartFrom::Latest, None).await?;
    let names = |v: &Value| -> Vec<String> {
        v["topics"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t["topic"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let (_, first) = server.get_json("/v1/topics?prefix=a.&limit=2").await?;
    assert_eq!(names(&first), ["a.1", "a.2"]);
    let (_, rest) = server.get_json("/v1/topics?prefix=a.&limit=2&after=a.2").await?;
    assert_eq!(names(&rest), ["a.3", "a.4"]);
    assert_eq!(rest["topics"][1], json!({"topic": "a.4", "last": 0, "subscribers": 1, "publishers": 0}));
    let (_, all) = server.get_json("/v1/topics").await?;
    assert_eq!(names(&all), ["a.1", "a.2", "a.3", "a.4", "b.1"]);
    let (_, fresh) = server.get_json("/v1/topics/never").await?;
    assert_eq!(
        (fresh["first"].clone(), fresh["last"].clone(), fresh["retained"].clone()),
        (json!(0), json!(0), json!(0))
    );
    assert!(fresh["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    Ok(())
}
