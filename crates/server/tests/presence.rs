//! Presence over the real server: join and leave events on the JSON WebSocket, SSE and
//! gRPC for members of every door, in order, across reconnects; the member list and
//! counts over the JSON protocol, HTTP and gRPC, exact after 1000 subscribers come and
//! go; and the per-topic event bound under churn.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{raw_next, send_text, start, within, RawSocket, Result, TestServer};
use futures_util::StreamExt;
use herald_client::grpc::pb;
use herald_client::GrpcClient;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(20);

/// The next JSON frame of a `/v1/ws` socket.
async fn frame(ws: &mut RawSocket) -> Result<Value> {
    match within(WAIT, "a frame", raw_next(ws)).await?? {
        WsMessage::Text(t) => Ok(serde_json::from_str(&t)?),
        other => Err(format!("not a text frame: {other:?}").into()),
    }
}

/// Sends `request` and returns the reply with its id (frames before it are returned
/// too, in order).
async fn call(ws: &mut RawSocket, request: Value) -> Result<(Value, Vec<Value>)> {
    let id = request["id"].clone();
    send_text(ws, &request.to_string()).await?;
    let mut before = Vec::new();
    loop {
        let f = frame(ws).await?;
        if f["id"] == id {
            return Ok((f, before));
        }
        before.push(f);
    }
}

/// A `/v1/ws` connection subscribed to `topic` with `extra` fields on its subscribe.
async fn subscriber(server: &TestServer, topic: &str, extra: Value) -> Result<RawSocket> {
    let mut ws = server.socket("/v1/ws").await?;
    let mut req = json!({"op":"subscribe","id":1,"topic":topic});
    if let (Some(req), Some(extra)) = (req.as_object_mut(), extra.as_object()) {
        req.extend(extra.clone());
    }
    let (reply, _) = call(&mut ws, req).await?;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    Ok(ws)
}

/// This connection's id, as the admin API lists it: the newest connection on `topic`.
async fn newest_conn(server: &TestServer, topic: &str) -> Result<u64> {
    let (_, list) = server.get_json(&format!("/v1/topics/{topic}/presence?limit=1000")).await?;
    let ids = list["members"].as_array().ok_or("members")?.iter().filter_map(|m| m["conn"].as_u64());
    ids.max().ok_or_else(|| "no member".into())
}

/// `(type, conn, door, role)` of a presence event.
fn event(f: &Value) -> (String, u64, String, String) {
    let m = &f["member"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (s(&f["type"]), m["conn"].as_u64().unwrap_or(0), s(&m["door"]), s(&m["role"]))
}

#[tokio::test]
async fn members_of_every_door_join_and_leave_in_order() -> Result {
    let server = start(|_| {}).await?;
    let t = "room";
    let mut watcher = subscriber(&server, t, json!({"presence": true, "info": {"name": "w"}})).await?;
    let w = newest_conn(&server, t).await?;

    // A JSON subscriber with info, which then publishes: two memberships.
    let mut a = subscriber(&server, t, json!({"info": {"name": "ann", "tags": [1, 2]}})).await?;
    let a_id = newest_conn(&server, t).await?;
    let joined = frame(&mut watcher).await?;
    assert_eq!(event(&joined), ("join".into(), a_id, "ws".into(), "subscriber".into()));
    assert_eq!(joined["topic"], t);
    assert_eq!(joined["member"]["info"], json!({"name": "ann", "tags": [1, 2]}));
    assert_eq!(joined["member"]["user"], Value::Null);
    let (published, _) = call(&mut a, json!({"op":"publish","id":2,"topic":t,"data":1})).await?;
    assert_eq!(published["type"], "published");
    // The watcher gets the message too; presence events are not ordered with messages.
    let next_event = async |ws: &mut RawSocket| -> Result<Value> {
        loop {
            let f = frame(ws).await?;
            if f["type"] != "message" {
                return Ok(f);
            }
        }
    };
    assert_eq!(event(&next_event(&mut watcher).await?), ("join".into(), a_id, "ws".into(), "publisher".into()));

    // A raw socket in mode both: subscriber and publisher.
    let raw = server.raw_ws(t, "mode=both").await?;
    let raw_id = newest_conn(&server, t).await?;
    let e1 = event(&next_event(&mut watcher).await?);
    let e2 = event(&next_event(&mut watcher).await?);
    assert_eq!(e1, ("join".into(), raw_id, "raw".into(), "subscriber".into()));
    assert_eq!(e2, ("join".into(), raw_id, "raw".into(), "publisher".into()));

    // An SSE stream and a gRPC subscription.
    let sse = server.http.get(format!("{}/v1/topics/{t}/sse", server.url)).send().await?;
    let sse_id = newest_conn(&server, t).await?;
    assert_eq!(event(&next_event(&mut watcher).await?), ("join".into(), sse_id, "sse".into(), "subscriber".into()));
    let grpc = GrpcClient::connect(&server.url).await?;
    let request = pb::SubscribeRequest { topic: t.into(), info: r#"{"via":"grpc"}"#.into(), ..Default::default() };
    let mut stream = grpc.topics().subscribe(grpc.request(request)).await?.into_inner();
    within(WAIT, "subscribed", stream.next()).await?.ok_or("stream")??;
    let grpc_id = newest_conn(&server, t).await?;
    let joined = next_event(&mut watcher).await?;
    assert_eq!(event(&joined), ("join".into(), grpc_id, "grpc".into(), "subscriber".into()));
    assert_eq!(joined["member"]["info"], json!({"via": "grpc"}));

    // The list and counts, over the JSON protocol, HTTP and gRPC, and in topic info.
    let (list, _) = call(&mut watcher, json!({"op":"presence","id":7,"topic":t})).await?;
    assert_eq!(
        (list["subscribers"].as_u64(), list["publishers"].as_u64(), &list["more"]),
        (Some(5), Some(2), &json!(false))
    );
    let members: Vec<(u64, String)> = list["members"]
        .as_array()
        .ok_or("members")?
        .iter()
        .map(|m| (m["conn"].as_u64().unwrap_or(0), m["role"].as_str().unwrap_or_default().to_owned()))
        .collect();
    let sub = || "subscriber".to_owned();
    let publ = || "publisher".to_owned();
    assert_eq!(
        members,
        [
            (w, sub()),
            (a_id, sub()),
            (a_id, publ()),
            (raw_id, sub()),
            (raw_id, publ()),
            (sse_id, sub()),
            (grpc_id, sub())
        ]
    );
    let (status, http) = server.get_json(&format!("/v1/topics/{t}/presence")).await?;
    assert_eq!(status, 200);
    assert_eq!(http["members"], list["members"]);
    assert_eq!(http["next"], Value::Null);
    let (_, page) = server.get_json(&format!("/v1/topics/{t}/presence?limit=2")).await?;
    let page: Vec<u64> =
        page["members"].as_array().ok_or("members")?.iter().filter_map(|m| m["conn"].as_u64()).collect();
    assert_eq!(page, [w, a_id, a_id], "a connection's roles are listed together");
    let (_, info) = server.get_json(&format!("/v1/topics/{t}")).await?;
    assert_eq!((info["subscribers"].as_u64(), info["publishers"].as_u64()), (Some(5), Some(2)));
    let (_, topics) = server.get_json("/v1/topics").await?;
    assert_eq!(topics["topics"][0]["publishers"], 2);
    let presence =
        grpc.topics().presence(grpc.request(pb::PresenceRequest { topic: t.into(), ..Default::default() })).await?;
    let presence = presence.into_inner();
    assert_eq!((presence.subscribers, presence.publishers, presence.members.len()), (5, 2, 7));
    assert_eq!(presence.members[1].info, r#"{"name":"ann","tags":[1,2]}"#);

    // Leaves, in the order they happen.
    drop(stream);
    assert_eq!(event(&next_event(&mut watcher).await?), ("leave".into(), grpc_id, "grpc".into(), "subscriber".into()));
    drop(sse);
    assert_eq!(event(&next_event(&mut watcher).await?), ("leave".into(), sse_id, "sse".into(), "subscriber".into()));
    drop(raw);
    let e1 = event(&next_event(&mut watcher).await?);
    let e2 = event(&next_event(&mut watcher).await?);
    assert_eq!(e1, ("leave".into(), raw_id, "raw".into(), "subscriber".into()));
    assert_eq!(e2, ("leave".into(), raw_id, "raw".into(), "publisher".into()));
    // Unsubscribing leaves as a subscriber; the connection stays a publisher until it ends.
    let (reply, _) = call(&mut a, json!({"op":"unsubscribe","id":3,"topic":t})).await?;
    assert_eq!(reply["type"], "unsubscribed");
    assert_eq!(event(&next_event(&mut watcher).await?), ("leave".into(), a_id, "ws".into(), "subscriber".into()));
    drop(a);
    assert_eq!(event(&next_event(&mut watcher).await?), ("leave".into(), a_id, "ws".into(), "publisher".into()));
    let (list, _) = call(&mut watcher, json!({"op":"presence","id":8,"topic":t})).await?;
    assert_eq!((list["subscribers"].as_u64(), list["publishers"].as_u64()), (Some(1), Some(0)));
    Ok(())
}

#[tokio::test]
async fn a_reconnect_is_a_leave_then_a_join_and_sse_and_grpc_watch_too() -> Result {
    let server = start(|_| {}).await?;
    let t = "lobby";
    let mut sse = server.http.get(format!("{}/v1/topics/{t}/sse?presence=true", server.url)).send().await?;
    let grpc = GrpcClient::connect(&server.url).await?;
    let request = pb::SubscribeRequest { topic: t.into(), presence: true, ..Default::default() };
    let mut stream = grpc.topics().subscribe(grpc.request(request)).await?.into_inner();
    within(WAIT, "subscribed", stream.next()).await?.ok_or("stream")??;
    // The gRPC subscription's own join goes to the SSE watcher first.
    let mut sse_text = String::new();
    let mut sse_until = async |sse: &mut reqwest::Response, n: usize| -> Result<Vec<Value>> {
        loop {
            let events: Vec<Value> = sse_text
                .split("\n\n")
                .filter_map(|e| {
                    let name = e.lines().find_map(|l| l.strip_prefix("event: "))?;
                    let data: Value = serde_json::from_str(e.lines().find_map(|l| l.strip_prefix("data: "))?).ok()?;
                    Some(json!({"event": name, "data": data}))
                })
                .collect();
            if events.len() >= n {
                return Ok(events);
            }
            let chunk = within(WAIT, "an SSE chunk", sse.chunk()).await??.ok_or("sse ended")?;
            sse_text.push_str(std::str::from_utf8(&chunk)?);
        }
    };
    let mut grpc_next = async || -> Result<pb::PresenceEvent> {
        loop {
            let event = within(WAIT, "a gRPC event", stream.next()).await?.ok_or("stream ended")??;
            if let Some(pb::subscribe_event::Event::Presence(p)) = event.event {
                return Ok(p);
            }
        }
    };

    let first = subscriber(&server, t, json!({})).await?;
    let c1 = newest_conn(&server, t).await?;
    drop(first);
    let _second = subscriber(&server, t, json!({"info": "again"})).await?;
    let c2 = newest_conn(&server, t).await?;
    assert!(c2 > c1, "a new connection, a new id");

    let events = sse_until(&mut sse, 4).await?;
    let seen: Vec<(String, u64)> = events
        .iter()
        .map(|e| {
            (e["event"].as_str().unwrap_or_default().to_owned(), e["data"]["member"]["conn"].as_u64().unwrap_or(0))
        })
        .collect();
    let grpc_id = c1 - 1;
    assert_eq!(seen, [("join".into(), grpc_id), ("join".into(), c1), ("leave".into(), c1), ("join".into(), c2)]);
    assert_eq!(events[3]["data"]["member"]["info"], "again");
    assert!(events.iter().all(|e| e["data"].get("type").is_none()), "SSE names the event instead");

    let kinds = [pb::presence_event::Kind::Join, pb::presence_event::Kind::Leave, pb::presence_event::Kind::Join];
    for (kind, conn) in kinds.into_iter().zip([c1, c1, c2]) {
        let e = grpc_next().await?;
        assert_eq!(
            (e.kind, e.member.map(|m| (m.conn, m.door, m.role))),
            (kind as i32, Some((conn, "ws".into(), "subscriber".into())))
        );
    }
    Ok(())
}

#[tokio::test]
async fn counts_and_list_are_exact_after_1000_subscribers_come_and_go() -> Result {
    let server = start(|c| c.broker.presence_events_per_second = 100_000).await?;
    let t = "crowd";
    let mut watcher = subscriber(&server, t, json!({"presence": true})).await?;
    let mut sockets = Vec::new();
    for _ in 0..1000 {
        sockets.push(subscriber(&server, t, json!({})).await?);
    }
    // Every other one leaves, then 100 more come.
    let mut kept: Vec<RawSocket> = Vec::new();
    for (i, s) in sockets.into_iter().enumerate() {
        if i % 2 == 0 {
            kept.push(s);
        }
    }
    for _ in 0..100 {
        kept.push(subscriber(&server, t, json!({})).await?);
    }
    // The watcher saw 1100 joins and 500 leaves; replaying them gives the same set as
    // the server's list.
    let mut members = BTreeSet::new();
    for _ in 0..1600 {
        let f = frame(&mut watcher).await?;
        let (kind, conn, _, _) = event(&f);
        match kind.as_str() {
            "join" => assert!(members.insert(conn), "joined twice: {f}"),
            "leave" => assert!(members.remove(&conn), "left without joining: {f}"),
            _ => return Err(format!("unexpected {f}").into()),
        }
    }
    let mut listed = BTreeSet::new();
    let mut after = 0;
    loop {
        let (_, page) = server.get_json(&format!("/v1/topics/{t}/presence?after={after}&limit=250")).await?;
        assert_eq!(page["subscribers"], 601);
        for m in page["members"].as_array().ok_or("members")? {
            listed.insert(m["conn"].as_u64().ok_or("conn")?);
        }
        match page["next"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    let watcher_id = *listed.iter().next().ok_or("empty")?;
    listed.remove(&watcher_id);
    assert_eq!(listed, members);
    assert_eq!(server.subscribers(t).await?, 601);
    drop(kept);
    common::eventually(WAIT, "every subscriber gone", || async {
        let (_, page) = server.get_json(&format!("/v1/topics/{t}/presence")).await?;
        Ok(page["subscribers"] == 1)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn past_the_rate_events_are_dropped_and_counted() -> Result {
    const RATE: u32 = 20;
    const CHURN: usize = 150;
    let server = start(|c| c.broker.presence_events_per_second = RATE).await?;
    let t = "churn";
    let mut watcher = subscriber(&server, t, json!({"presence": true})).await?;
    for _ in 0..CHURN {
        let mut s = subscriber(&server, t, json!({})).await?;
        let (reply, _) = call(&mut s, json!({"op":"unsubscribe","id":9,"topic":t})).await?;
        assert_eq!(reply["type"], "unsubscribed");
    }
    // Every join and leave is either sent or counted in a presence_lost event.
    let (mut sent, mut dropped, mut lost_events) = (0u64, 0u64, 0);
    let mut first_window = None;
    while sent + dropped < 2 * CHURN as u64 {
        let f = frame(&mut watcher).await?;
        match f["type"].as_str() {
            Some("join" | "leave") => sent += 1,
            Some("presence_lost") => {
                first_window.get_or_insert(sent);
                lost_events += 1;
                dropped += f["dropped"].as_u64().ok_or("dropped")?;
                assert_eq!((f["subscribers"].as_u64(), f["publishers"].as_u64()), (Some(1), Some(0)), "{f}");
            }
            _ => return Err(format!("unexpected {f}").into()),
        }
    }
    assert_eq!(sent + dropped, 2 * CHURN as u64);
    assert!(dropped > 0 && lost_events >= 1, "the churn went past the rate");
    assert_eq!(first_window, Some(u64::from(RATE)), "the first window sent exactly the rate, then dropped");
    Ok(())
}

#[tokio::test]
async fn bad_presence_input_is_refused() -> Result {
    let server = start(|_| {}).await?;
    let mut ws = server.socket("/v1/ws").await?;
    let big = "x".repeat(2000);
    let (reply, _) = call(&mut ws, json!({"op":"subscribe","id":1,"topic":"t","info":big})).await?;
    assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some("bad_request")));
    let (reply, _) = call(&mut ws, json!({"op":"subscribe","id":2,"topic":"t","presence":"yes"})).await?;
    assert_eq!(reply["code"], "bad_request");
    let (reply, _) = call(&mut ws, json!({"op":"presence","id":3,"topic":"a..b"})).await?;
    assert_eq!(reply["code"], "invalid_name");
    let (reply, _) = call(&mut ws, json!({"op":"presence","id":4,"topic":"nobody"})).await?;
    assert_eq!((reply["subscribers"].as_u64(), reply["members"].as_array().map(Vec::len)), (Some(0), Some(0)));
    let sse = server.http.get(format!("{}/v1/topics/t/sse?presence=maybe", server.url)).send().await?;
    assert_eq!(sse.status(), 400);
    let sse = server.http.get(format!("{}/v1/topics/t/sse?info=%7Bnot%20json", server.url)).send().await?;
    assert_eq!(sse.status(), 400);
    let (status, body) = server.get_json("/v1/topics/t/presence?limit=0").await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")));
    let grpc = GrpcClient::connect(&server.url).await?;
    let request = pb::SubscribeRequest { topic: "t".into(), info: "{".into(), ..Default::default() };
    let refused = grpc.topics().subscribe(grpc.request(request)).await.err().ok_or("accepted bad info")?;
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    Ok(())
}
