//! The real binary: SIGTERM closes WebSockets with 1001, ends SSE streams, ends gRPC
//! Subscribe streams with UNAVAILABLE, and the process exits 0.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{close_code, spawn_herald, within, Result};

#[tokio::test]
async fn sigterm_closes_websockets_with_1001_and_exits_0() -> Result {
    let (mut child, url) = spawn_herald(&["--store", "memory"])?;
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut json = herald_client::WsConnection::connect(&url).await?;
    json.subscribe("s", herald_client::StartFrom::Latest, None).await?;
    let (mut raw, _) = tokio_tungstenite::connect_async(format!("{ws_url}/v1/topics/s/ws")).await?;
    let mut sse = reqwest::get(format!("{url}/v1/topics/s/sse")).await?;
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
