//! Every error code this issue's endpoints can produce, provoked over real sockets, and
//! the connection still working afterwards where the contract says it stays open.

mod common;

use std::time::Duration;

use common::{close_code, eventually, send_text, start, Result, TestServer};
use futures_util::SinkExt;
use herald_client::{StartFrom, WsConnection};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Sends `frame` and expects an error frame with `code` (and `id` when given).
async fn expect_error(ws: &mut WsConnection, frame: &str, code: &str, id: Option<u64>) -> Result {
    ws.send_text(frame).await?;
    let reply = ws.recv().await?;
    assert_eq!(reply["type"], "error", "{frame} -> {reply}");
    assert_eq!(reply["code"], code, "{frame} -> {reply}");
    assert_eq!(reply["id"].as_u64(), id, "{frame} -> {reply}");
    assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_still_works(ws).await
}

async fn assert_still_works(ws: &mut WsConnection) -> Result {
    let pong = ws.request(json!({"op": "ping"})).await?;
    assert_eq!(pong["type"], "pong");
    Ok(())
}

fn small_limits(server: &mut herald_server::Config) {
    server.broker.max_message_bytes = 1024;
    server.http.max_subscriptions_per_connection = 2;
}

#[tokio::test]
async fn json_protocol_errors_keep_the_connection() -> Result {
    let server = start(small_limits).await?;
    let mut ws = server.json_ws().await?;
    expect_error(&mut ws, "{not json", "bad_request", None).await?;
    expect_error(&mut ws, r#"{"op":"dance","id":1}"#, "bad_request", Some(1)).await?;
    expect_error(&mut ws, r#"{"id":2}"#, "bad_request", Some(2)).await?;
    expect_error(&mut ws, r#"{"op":"publish","id":3,"data":1}"#, "bad_request", Some(3)).await?;
    expect_error(&mut ws, r#"{"op":"subscribe","id":4,"topic":"t","from":"5"}"#, "bad_request", Some(4)).await?;
    expect_error(&mut ws, r#"{"op":"publish","id":5,"topic":"t","data":1,"ttl_ms":-1}"#, "bad_request", Some(5))
        .await?;
    expect_error(&mut ws, r#"{"op":"publish","id":6,"topic":"t","data_b64":"%%%"}"#, "bad_request", Some(6)).await?;
    expect_error(&mut ws, r#"{"op":"publish","id":7,"topic":"t","data":1,"data_b64":"AA=="}"#, "bad_request", Some(7))
        .await?;
    expect_error(&mut ws, r#"{"op":"ping","id":-1}"#, "bad_request", None).await?;
    expect_error(&mut ws, r#"{"op":"subscribe","id":8,"topic":"a..b"}"#, "invalid_name", Some(8)).await?;
    expect_error(&mut ws, r#"{"op":"publish","id":9,"topic":"no spaces","data":1}"#, "invalid_name", Some(9)).await?;
    // A payload over max_message_bytes: too_large, and the connection stays.
    let big = format!(r#"{{"op":"publish","id":10,"topic":"t","data":"{}"}}"#, "x".repeat(1500));
    expect_error(&mut ws, &big, "too_large", Some(10)).await?;
    // Subscription bookkeeping errors.
    assert_eq!(ws.subscribe("a", StartFrom::Latest, None).await?["type"], "subscribed");
    expect_error(&mut ws, r#"{"op":"subscribe","id":11,"topic":"a"}"#, "already_subscribed", Some(11)).await?;
    expect_error(&mut ws, r#"{"op":"unsubscribe","id":12,"topic":"nope"}"#, "not_subscribed", Some(12)).await?;
    assert_eq!(ws.subscribe("b", StartFrom::Latest, None).await?["type"], "subscribed");
    expect_error(&mut ws, r#"{"op":"subscribe","id":13,"topic":"c"}"#, "too_many_subscriptions", Some(13)).await?;
    assert_eq!(ws.request(json!({"op":"unsubscribe","topic":"a"})).await?["type"], "unsubscribed");
    assert_eq!(ws.subscribe("c", StartFrom::Latest, None).await?["type"], "subscribed", "room again");
    // A binary frame is not part of the JSON protocol.
    ws.send_raw(WsMessage::binary(vec![1, 2, 3])).await?;
    let reply = ws.recv().await?;
    assert_eq!((reply["type"].clone(), reply["code"].clone()), (json!("error"), json!("bad_request")));
    assert_still_works(&mut ws).await?;
    // Publishing without an id gets no reply unless it fails.
    ws.send_text(r#"{"op":"publish","topic":"c","data":{"n":1}}"#).await?;
    let msg = ws.recv().await?;
    assert_eq!((msg["type"].clone(), msg["offset"].clone()), (json!("message"), json!(1)));
    Ok(())
}

#[tokio::test]
async fn a_frame_over_the_frame_limit_closes_with_1009() -> Result {
    let server = start(small_limits).await?;
    let url = format!("{}/v1/ws", server.ws);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    // Frame limit is 2 x max_message_bytes = 2048. A reply queued just before still
    // goes out, then the close.
    send_text(&mut ws, r#"{"op":"ping","id":1}"#).await?;
    send_text(&mut ws, &format!(r#"{{"op":"publish","topic":"t","data":"{}"}}"#, "x".repeat(2100))).await?;
    match common::raw_next(&mut ws).await? {
        WsMessage::Text(t) => assert_eq!(t.as_str(), r#"{"type":"pong","id":1}"#),
        other => return Err(format!("expected the pong first, got {other:?}").into()),
    }
    assert_eq!(close_code(&mut ws).await?, 1009);
    Ok(())
}

#[tokio::test]
async fn raw_socket_errors() -> Result {
    let server = start(small_limits).await?;
    // Bad query or name: 400 before the upgrade.
    for (path, code) in
        [("t/ws?mode=listen", "bad_request"), ("t/ws?from=soon", "bad_request"), ("a..b/ws", "invalid_name")]
    {
        let url = format!("{}/v1/topics/{path}", server.ws);
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 400, "{path}");
                let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default())?;
                assert_eq!(body["error"]["code"], code, "{path}");
            }
            other => panic!("{path}: expected 400, got {other:?}"),
        }
    }
    // A data frame on mode=sub: 1003.
    let mut sub = server.raw_ws("t", "mode=sub").await?;
    send_text(&mut sub, "hello").await?;
    assert_eq!(close_code(&mut sub).await?, 1003);
    // A raw frame over max_message_bytes: 1009, nothing published.
    let mut raw = server.raw_ws("t", "mode=pub").await?;
    raw.send(WsMessage::binary(vec![0u8; 1025])).await?;
    assert_eq!(close_code(&mut raw).await?, 1009);
    assert_eq!(server.get_json("/v1/topics/t").await?.1["last"], 0);
    // Not a WebSocket upgrade at all.
    let (status, body) = server.get_json("/v1/topics/t/ws").await?;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!("bad_request")));
    Ok(())
}

async fn status_and_code(server: &TestServer, req: reqwest::RequestBuilder) -> Result<(u16, String)> {
    let _ = server;
    let r = req.send().await?;
    let status = r.status().as_u16();
    let body: Value = serde_json::from_slice(&r.bytes().await?)?;
    Ok((status, body["error"]["code"].as_str().unwrap_or_default().to_owned()))
}

#[tokio::test]
async fn http_errors() -> Result {
    let server = start(small_limits).await?;
    let h = &server.http;
    let url = |p: &str| format!("{}{p}", server.url);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (h.post(url("/v1/topics/a..b/messages")).body("x"), 400, "invalid_name"),
        (h.get(url("/v1/topics/%20x")), 400, "invalid_name"),
        (
            h.post(url("/v1/topics/t/messages")).header("content-type", "application/json").body("{oops"),
            400,
            "bad_request",
        ),
        (
            h.post(url("/v1/topics/t/messages")).header("content-type", "text/plain").body(vec![0xff, 0xfe]),
            400,
            "bad_request",
        ),
        (h.post(url("/v1/topics/t/messages?ttl_ms=soon")).body("x"), 400, "bad_request"),
        (h.post(url("/v1/topics/t/messages")).body(vec![0u8; 1025]), 413, "too_large"),
        (h.get(url("/v1/topics/t/messages?limit=0")), 400, "bad_request"),
        (h.get(url("/v1/topics/t/messages?limit=1001")), 400, "bad_request"),
        (h.get(url("/v1/topics/t/messages?from=-1")), 400, "bad_request"),
        (h.get(url("/v1/topics?limit=0")), 400, "bad_request"),
        (h.get(url("/v1/topics/t/sse")).header("last-event-id", "yesterday"), 400, "bad_request"),
        (h.get(url("/v1/topics/t/sse?from=never")), 400, "bad_request"),
        (h.get(url("/v1/nothing/here")), 404, "not_found"),
    ];
    for (req, status, code) in cases {
        let desc = format!("{req:?}");
        assert_eq!(status_and_code(&server, req).await?, (status, code.to_owned()), "{desc}");
    }
    // Nothing was stored by any of them.
    assert_eq!(server.get_json("/v1/topics/t").await?.1["last"], 0);
    Ok(())
}

#[tokio::test]
async fn past_max_connections_upgrades_and_requests_get_503() -> Result {
    let server = start(|c| c.http.max_connections = 2).await?;
    let a = server.json_ws().await?;
    let _b = server.raw_ws("t", "").await?;
    eventually(Duration::from_secs(5), "two connections counted", || async {
        Ok(server.metric("herald_connections").await? == 2)
    })
    .await?;
    match WsConnection::connect(&server.url).await {
        Err(herald_client::ClientError::WebSocket(e)) => match *e {
            tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 503),
            other => panic!("expected 503, got {other}"),
        },
        Err(other) => panic!("expected 503, got {other}"),
        Ok(_) => panic!("third connection accepted"),
    }
    let (status, code) = status_and_code(&server, server.http.get(format!("{}/v1/topics", server.url))).await?;
    assert_eq!((status, code.as_str()), (503, "unavailable"));
    // Health and metrics stay reachable for operators.
    assert_eq!(server.http.get(format!("{}/healthz", server.url)).send().await?.status(), 200);
    a.close().await?;
    eventually(Duration::from_secs(5), "a slot frees up", || async {
        Ok(server.http.get(format!("{}/v1/topics", server.url)).send().await?.status() == 200)
    })
    .await?;
    Ok(())
}

/// The status, Content-Type and code word of an HTTP answer that must be a JSON error.
async fn json_error(req: reqwest::RequestBuilder) -> Result<(u16, String, String)> {
    let r = req.send().await?;
    let status = r.status().as_u16();
    let content_type =
        r.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let body = r.bytes().await?;
    let json: Value = serde_json::from_slice(&body)
        .map_err(|e| format!("body is not JSON ({e}): {:?}", String::from_utf8_lossy(&body)))?;
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "an error has human words: {json}");
    Ok((status, content_type, json["error"]["code"].as_str().unwrap_or_default().to_owned()))
}

/// Every route family, and the router itself, answers errors with the JSON error body:
/// path segments that are not UTF-8 once percent-decoded (`%FF`) are `invalid_name`
/// where the segment is a name and `bad_request` where it is a delivery id; unknown
/// routes are `not_found`; a known path with another method is 405.
#[tokio::test]
async fn every_http_error_is_json() -> Result {
    use reqwest::Method;
    let server = start(|_| {}).await?;
    let cases: &[(Method, &str, u16, &str)] = &[
        // Topics: publish, fetch, info, delete, SSE, raw WebSocket (not an upgrade).
        (Method::POST, "/v1/topics/%FF/messages", 400, "invalid_name"),
        (Method::GET, "/v1/topics/%FF/messages", 400, "invalid_name"),
        (Method::GET, "/v1/topics/%FF", 400, "invalid_name"),
        (Method::DELETE, "/v1/topics/%FF", 400, "invalid_name"),
        (Method::GET, "/v1/topics/%FF/sse", 400, "invalid_name"),
        (Method::GET, "/v1/topics/%FF/ws", 400, "invalid_name"),
        (Method::GET, "/v1/topics/ok%FFname/ws?mode=sub", 400, "invalid_name"),
        // The JSON WebSocket endpoint, not upgraded.
        (Method::GET, "/v1/ws", 400, "bad_request"),
        // Queues: enqueue, fetch, stats, ack, requeue, extend; name and delivery id.
        (Method::POST, "/v1/queues/%FF/messages", 400, "invalid_name"),
        (Method::POST, "/v1/queues/%FF/fetch", 400, "invalid_name"),
        (Method::GET, "/v1/queues/%FF", 400, "invalid_name"),
        (Method::POST, "/v1/queues/%FF/ack/abc", 400, "invalid_name"),
        (Method::POST, "/v1/queues/%FF/requeue/abc", 400, "invalid_name"),
        (Method::POST, "/v1/queues/%FF/extend/abc?visibility_ms=10", 400, "invalid_name"),
        (Method::POST, "/v1/queues/a..b/ack/abc", 400, "invalid_name"),
        (Method::POST, "/v1/queues/q/ack/%FF", 400, "bad_request"),
        (Method::POST, "/v1/queues/q/requeue/%FF", 400, "bad_request"),
        (Method::POST, "/v1/queues/q/extend/%FF?visibility_ms=10", 400, "bad_request"),
        // Malformed query strings.
        (Method::GET, "/v1/topics/t/messages?limit=%FF", 400, "bad_request"),
        (Method::POST, "/v1/queues/q/fetch?max=many", 400, "bad_request"),
        // Unknown routes, under /v1 and elsewhere, with or without bad bytes.
        (Method::GET, "/v1/nothing/here", 404, "not_found"),
        (Method::GET, "/v1/topics/t/nope", 404, "not_found"),
        (Method::GET, "/v1/%FF", 404, "not_found"),
        (Method::GET, "/nope", 404, "not_found"),
        // A known path with another method.
        (Method::PUT, "/v1/topics/t", 405, "bad_request"),
        (Method::DELETE, "/v1/topics/t/messages", 405, "bad_request"),
        (Method::POST, "/v1/topics/t/sse", 405, "bad_request"),
        (Method::POST, "/v1/ws", 405, "bad_request"),
        (Method::GET, "/v1/queues/q/messages", 405, "bad_request"),
        (Method::GET, "/v1/queues/q/ack/abc", 405, "bad_request"),
    ];
    for (method, path, status, code) in cases {
        let req = server.http.request(method.clone(), format!("{}{path}", server.url));
        let got = json_error(req).await.map_err(|e| format!("{method} {path}: {e}"))?;
        assert_eq!(got, (*status, "application/json".to_owned(), (*code).to_owned()), "{method} {path}");
    }
    // A real upgrade to a raw socket whose name is not UTF-8: refused before the 101.
    let url = format!("{}/v1/topics/%FF/ws", server.ws);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
            let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok());
            assert_eq!(content_type, Some("application/json"));
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default())?;
            assert_eq!(body["error"]["code"], "invalid_name");
        }
        other => panic!("expected 400 invalid_name, got {other:?}"),
    }
    // A 405 still says which methods the path takes.
    let r = server.http.put(format!("{}/v1/topics/t", server.url)).send().await?;
    let allow = r.headers().get(reqwest::header::ALLOW).and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(allow.contains("GET") && allow.contains("DELETE"), "Allow: {allow:?}");
    Ok(())
}
