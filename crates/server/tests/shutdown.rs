//! The real binary: SIGTERM closes WebSockets with 1001, ends SSE streams, ends gRPC
//! Subscribe streams with UNAVAILABLE, and the process exits 0; a signal during start-up
//! is not lost.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{close_code, spawn_herald, spawn_herald_until, within, Result};

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_exits_0() -> Result {
    let (mut child, url) = spawn_herald(&["--store", "memory"])?;
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut json = herald_client::WsConnection::connect(&url).await?;
    json.subscribe("s", herald_client::StartFrom::Latest, None).await?;
    let (mut raw, _) = tokio_tungstenite::connect_async(format!("{ws_url}/v1/topics/s/ws")).await?;
    let mut sse = common::http().get(format!("{url}/v1/topics/s/sse")).send().await?;
    assert_eq!(sse.status(), 200);
    assert!(sse.chunk().await?.is_some(), "SSE stream open");
    let mut grpc =
        herald_client::GrpcClient::connect(&url).await?.subscribe("s", herald_client::StartFrom::Latest, None).await?;

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(status.success());

    let limit = Duration::from_secs(10);
    match within(limit, "json close", json.recv()).await? {
        Err(herald_client::ClientError::Closed(Some((code, _)))) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert_eq!(within(limit, "raw close", close_code(&mut raw)).await??, 1001);
    // The SSE stream ends (cleanly or by the connection closing).
    while let Ok(Some(_)) = within(limit, "sse end", sse.chunk()).await? {}
    match within(limit, "grpc end", grpc.next()).await? {
        Err(herald_client::ClientError::Grpc(s)) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    let exit = within(limit, "exit", tokio::task::spawn_blocking(move || child.wait())).await???;
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    Ok(())
}

#[tokio::test]
async fn a_signal_during_start_up_stops_the_server_cleanly() -> Result {
    // `starting` is logged once the handlers are in place, before the port is bound and
    // the store opened: a signal sent on reading it arrives while the server is still
    // starting (or just after). Handlers installed after the bind, as before, let such a
    // signal kill the process (no exit code). Repeated, to land at different points of
    // the start-up; a signal before the `starting` line can kill any program, so the
    // test waits for it.
    for (round, sig) in ["-TERM", "-INT", "-TERM", "-INT", "-TERM", "-INT"].into_iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("herald-startsig-{}-{round}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data_dir = dir.to_string_lossy().into_owned();
        let (mut child, _) = spawn_herald_until(&["--store", "disk", "--data-dir", &data_dir], "starting")?;
        let status = Command::new("kill").args([sig, &child.id().to_string()]).status()?;
        assert!(status.success());
        let limit = Duration::from_secs(10);
        let exit = within(limit, "exit", tokio::task::spawn_blocking(move || child.wait())).await???;
        assert_eq!(exit.code(), Some(0), "round {round} ({sig}): {exit:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// `/readyz`'s status code.
async fn readyz(url: &str) -> Result<u16> {
    Ok(common::http().get(format!("{url}/readyz")).send().await?.status().as_u16())
}

#[tokio::test]
async fn sigterm_with_a_drain_delay_turns_readyz_503_while_websockets_still_deliver() -> Result {
    let (mut child, url) = spawn_herald(&["--store", "memory", "--drain-delay", "5s"])?;
    let mut ws = herald_client::WsConnection::connect(&url).await?;
    ws.subscribe("d", herald_client::StartFrom::Latest, None).await?;
    assert_eq!(readyz(&url).await?, 200);

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(status.success());
    let limit = Duration::from_secs(10);
    common::eventually(limit, "readyz 503", || async { Ok(readyz(&url).await? == 503) }).await?;

    // Lame duck: new requests are served and the open WebSocket still delivers.
    let client = herald_client::Client::new(&url);
    let published = client.publish_text("d", "during the drain").await?;
    let delivery = herald_client::Delivery::parse(&within(limit, "delivery", ws.recv_text()).await??)?;
    assert_eq!((delivery.offset, delivery.payload.to_line()), (published.offset, "during the drain".to_owned()));

    // Then the shutdown order as without a delay: 1001, exit 0.
    match within(limit, "close", ws.recv()).await? {
        Err(herald_client::ClientError::Closed(Some((code, _)))) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let exit = within(limit, "exit", tokio::task::spawn_blocking(move || child.wait())).await???;
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    Ok(())
}

#[tokio::test]
async fn a_second_shutdown_cuts_the_drain_delay_short() -> Result {
    let server = common::start(|c| c.drain_delay = Duration::from_secs(600)).await?;
    let mut ws = server.json_ws().await?;
    ws.subscribe("d", herald_client::StartFrom::Latest, None).await?;
    let running = server.server.as_ref().ok_or("server")?;
    running.shutdown();
    assert_eq!(readyz(&server.url).await?, 503, "draining at once");
    assert_eq!(ws.request(serde_json::json!({"op": "ping"})).await?["type"], "pong", "still served");
    running.shutdown();
    match within(Duration::from_secs(10), "close", ws.recv()).await? {
        Err(herald_client::ClientError::Closed(Some((code, _)))) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn json_logs_carry_the_effective_configuration_at_start() -> Result {
    use std::io::{BufRead, BufReader};
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", "memory", "--max-message-bytes", "4096"])
        .env("HERALD_LOG", "info")
        .env("HERALD_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut child = common::HeraldProcess(child);
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let line: serde_json::Value = serde_json::from_str(&line?)?;
            let done = line["fields"]["message"] == "herald listening";
            seen.push(line);
            if done {
                return Ok(seen);
            }
        }
        Err::<_, common::Error>("stderr ended before `herald listening`".into())
    });
    let lines = within(Duration::from_secs(20), "start-up logs", lines).await???;
    let config = lines
        .iter()
        .find(|l| l["fields"]["message"] == "effective configuration")
        .and_then(|l| l["fields"]["config"].as_str())
        .ok_or("no effective configuration line")?;
    assert!(config.contains("store=\"memory\"") && config.contains("limits.max_message_bytes=4096"), "{config}");
    let listening = lines.last().ok_or("no line")?;
    assert!(listening["fields"]["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{listening}");
    assert_eq!(listening["level"], "INFO");

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--print-config"])
        .env("HERALD_LOG_FORMAT", "yaml")
        .output()?;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("HERALD_LOG_FORMAT must be `text` or `json`"));
    Ok(())
}
