//! A mixed publishing workload and message digests shared by the fan-out tests: every
//! front door publishes, every door's subscriber identifies a message by kind class and
//! payload bytes.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use base64::Engine;
use futures_util::SinkExt;
use herald_client::grpc::pb;
use herald_client::{Delivery, GrpcClient, Payload};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::{Result, Rng, TestServer};

/// A message as any subscriber can identify it: kind class plus payload bytes.
pub fn digest(class: u8, bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    class.hash(&mut h);
    bytes.hash(&mut h);
    h.finish()
}

pub fn from_delivery(d: &Delivery) -> u64 {
    match &d.payload {
        Payload::Json(text) if text.starts_with('"') => match serde_json::from_str::<String>(text) {
            Ok(s) => digest(b'T', s.as_bytes()),
            Err(_) => digest(b'?', text.as_bytes()),
        },
        Payload::Json(text) => digest(b'J', text.as_bytes()),
        Payload::Binary(bytes) => digest(b'B', bytes),
    }
}

pub fn from_raw(frame: &WsMessage) -> u64 {
    match frame {
        WsMessage::Text(t) if t.starts_with('{') => digest(b'J', t.as_bytes()),
        WsMessage::Text(t) => digest(b'T', t.as_bytes()),
        WsMessage::Binary(b) => digest(b'B', b),
        _ => 0,
    }
}

pub fn from_grpc(m: &pb::TopicMessage) -> u64 {
    match pb::Kind::try_from(m.kind) {
        Ok(pb::Kind::Json) => digest(b'J', &m.data),
        Ok(pb::Kind::Text) => digest(b'T', &m.data),
        Ok(pb::Kind::Binary) => digest(b'B', &m.data),
        _ => 0,
    }
}

pub fn json_payload(rng: &mut Rng, publisher: usize, seq: usize) -> String {
    let pad = rng.some_text();
    json!({"p": publisher, "i": seq, "pad": pad, "big": 12345678901234567890u64}).to_string()
}

/// Publishes `n` messages through front door `publisher` (0: JSON WebSocket, 1 and 3:
/// HTTP, 2: raw WebSocket, 4: gRPC, unary and batches); returns each message's digest
/// and offset (if reported).
pub async fn publish(server: &TestServer, topic: &str, publisher: usize, n: usize) -> Result<Vec<(u64, Option<u64>)>> {
    let mut rng = Rng::new(publisher as u64 + 1);
    let mut sent = Vec::with_capacity(n);
    match publisher {
        0 => {
            let mut ws = server.json_ws().await?;
            for i in 0..n {
                let (frame, d) = if i % 2 == 0 {
                    let data = json_payload(&mut rng, publisher, i);
                    let d = digest(b'J', data.as_bytes());
                    (format!(r#"{{"op":"publish","id":{i},"topic":"{topic}","data":{data}}}"#), d)
                } else {
                    let bytes = rng.some_bytes();
                    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
                    (
                        format!(r#"{{"op":"publish","id":{i},"topic":"{topic}","data_b64":"{b64}"}}"#),
                        digest(b'B', &bytes),
                    )
                };
                ws.send_text(frame).await?;
                let reply = ws.recv().await?;
                assert_eq!(reply["type"], "published", "{reply}");
                sent.push((d, reply["offset"].as_u64()));
            }
        }
        2 => {
            let mut raw = server.raw_ws(topic, "mode=pub").await?;
            for i in 0..n {
                let (frame, d) = if i % 2 == 0 {
                    let text = rng.some_text();
                    let d = digest(b'T', text.as_bytes());
                    (WsMessage::text(text), d)
                } else {
                    let bytes = rng.some_bytes();
                    let d = digest(b'B', &bytes);
                    (WsMessage::binary(bytes), d)
                };
                raw.send(frame).await?;
                sent.push((d, None));
            }
            raw.close(None).await?;
        }
        4 => {
            let client = GrpcClient::connect(&server.url).await?;
            let mut next = 0;
            while next < n {
                // Alternate single publishes and batches of up to 10, kinds mixed.
                let size = if next % 20 == 0 { 1 } else { (n - next).min(10) };
                let mut batch = Vec::with_capacity(size);
                for i in next..next + size {
                    let (kind, data, d) = match i % 3 {
                        0 => {
                            let t = rng.some_text();
                            (pb::Kind::Text, t.clone().into_bytes(), digest(b'T', t.as_bytes()))
                        }
                        1 => {
                            let j = json_payload(&mut rng, publisher, i);
                            (pb::Kind::Json, j.clone().into_bytes(), digest(b'J', j.as_bytes()))
                        }
                        _ => {
                            let b = rng.some_bytes();
                            let d = digest(b'B', &b);
                            (pb::Kind::Binary, b, d)
                        }
                    };
                    batch.push((pb::BatchMessage { data: data.into(), kind: kind as i32, ..Default::default() }, d));
                }
                if let [(single, d)] = &batch[..] {
                    let kind = pb::Kind::try_from(single.kind)?;
                    let p = client.publish(topic, kind, single.data.clone()).await?;
                    sent.push((*d, Some(p.offset)));
                } else {
                    let digests: Vec<u64> = batch.iter().map(|(_, d)| *d).collect();
                    let published = client.publish_batch(topic, batch.into_iter().map(|(m, _)| m).collect()).await?;
                    assert_eq!(published.len(), digests.len());
                    sent.extend(digests.into_iter().zip(published).map(|(d, p)| (d, Some(p.offset))));
                }
                next += size;
            }
        }
        _ => {
            let path = format!("/v1/topics/{topic}/messages");
            for i in 0..n {
                let (ct, body, d) = match i % 3 {
                    0 => {
                        let t = rng.some_text();
                        ("text/plain; charset=utf-8", t.clone().into_bytes(), digest(b'T', t.as_bytes()))
                    }
                    1 => {
                        let j = json_payload(&mut rng, publisher, i);
                        ("application/json", j.clone().into_bytes(), digest(b'J', j.as_bytes()))
                    }
                    _ => {
                        let b = rng.some_bytes();
                        let d = digest(b'B', &b);
                        ("application/octet-stream", b, d)
                    }
                };
                let (status, reply) = server.post(&path, Some(ct), body).await?;
                assert_eq!(status, 201, "{reply}");
                sent.push((d, reply["offset"].as_u64()));
            }
        }
    }
    Ok(sent)
}

/// What one subscriber received: (offset, digest), or digests alone (raw sockets).
pub type Task<T> = tokio::task::JoinHandle<Result<Vec<T>>>;

/// Collects `total` deliveries of a JSON WebSocket subscription (other frames skipped).
pub fn collect_json(mut ws: herald_client::WsConnection, total: usize) -> Task<(u64, u64)> {
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(total);
        while got.len() < total {
            let text = ws.recv_text().await?;
            if text.starts_with(r#"{"type":"message""#) {
                let d = Delivery::parse(&text)?;
                got.push((d.offset, from_delivery(&d)));
            }
        }
        Ok(got)
    })
}

/// Collects `total` frames of a raw WebSocket subscription.
pub fn collect_raw(mut raw: super::RawSocket, total: usize) -> Task<u64> {
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(total);
        while got.len() < total {
            match super::raw_next(&mut raw).await? {
                WsMessage::Close(frame) => return Err(format!("closed after {} frames: {frame:?}", got.len()).into()),
                frame => got.push(from_raw(&frame)),
            }
        }
        Ok(got)
    })
}

/// Collects `total` messages of a gRPC Subscribe stream.
pub fn collect_grpc(mut sub: herald_client::grpc::GrpcSubscription, total: usize) -> Task<(u64, u64)> {
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(total);
        while got.len() < total {
            let m = sub.next().await?.ok_or("gRPC stream ended")?;
            got.push((m.offset, from_grpc(&m)));
        }
        Ok(got)
    })
}

/// Runs `publishers` concurrent [`publish`]ers of `each` messages on `server`; returns
/// what each sent.
pub async fn publish_concurrently(
    server: &std::sync::Arc<TestServer>,
    topic: &'static str,
    publishers: usize,
    each: usize,
    limit: std::time::Duration,
) -> Result<Vec<Vec<(u64, Option<u64>)>>> {
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let server = server.clone();
            tokio::spawn(async move { publish(&server, topic, p, each).await })
        })
        .collect();
    let mut sent = Vec::new();
    for task in tasks {
        sent.push(super::within(limit, "publisher", task).await???);
    }
    Ok(sent)
}

/// Checks that every subscriber received offsets 1..=total once, in order, the messages
/// `sent` each once, all in one order that keeps each publisher's; returns that order.
pub async fn check_one_order(
    sent: &[Vec<(u64, Option<u64>)>],
    json: Vec<Task<(u64, u64)>>,
    raw: Vec<Task<u64>>,
    grpc: Vec<Task<(u64, u64)>>,
    limit: std::time::Duration,
) -> Result<Vec<u64>> {
    let total = sent.iter().map(Vec::len).sum::<usize>() as u64;
    let dense: Vec<u64> = (1..=total).collect();
    let mut expected: Vec<u64> = sent.iter().flatten().map(|(d, _)| *d).collect();
    expected.sort_unstable();
    let mut reference: Option<Vec<u64>> = None;
    for sub in json.into_iter().chain(grpc) {
        let got = super::within(limit, "subscriber", sub).await???;
        assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), dense, "offsets 1..N in order, once each");
        let sequence: Vec<u64> = got.iter().map(|(_, d)| *d).collect();
        let mut sorted = sequence.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, expected, "the messages published, each once");
        match &reference {
            None => reference = Some(sequence),
            Some(r) => assert_eq!(r, &sequence, "every subscriber sees one order"),
        }
    }
    let reference = reference.ok_or("no JSON or gRPC subscriber")?;
    for sub in raw {
        assert_eq!(super::within(limit, "raw subscriber", sub).await???, reference, "raw: the same order");
    }
    // Each publisher's messages keep the order it sent them in: they appear in the
    // delivered sequence as a subsequence (greedy matching copes with equal payloads).
    for p in sent {
        let mut rest = reference.iter();
        assert!(p.iter().all(|(d, _)| rest.any(|x| x == d)), "publisher order kept");
    }
    Ok(reference)
}
