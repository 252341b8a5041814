//! Resuming after a disconnect: exactly the missed messages with a matching epoch and a
//! retained offset; `recovered: false` and no replay otherwise.

mod common;

use std::time::Duration;

use common::{start, within, Result};
use herald_client::{Delivery, Event, StartFrom};

async fn recv_offsets(ws: &mut herald_client::WsConnection, n: usize) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(Delivery::parse(&ws.recv_text().await?)?.offset);
    }
    Ok(out)
}

#[tokio::test]
async fn resubscribing_with_last_offset_and_epoch_gets_exactly_the_missed_messages() -> Result {
    let server = start(|_| {}).await?;
    let client = server.client();
    let mut ws = server.json_ws().await?;
    let reply = ws.subscribe("r", StartFrom::Latest, None).await?;
    let epoch = reply["epoch"].as_str().ok_or("epoch")?.to_owned();
    for i in 0..10 {
        client.publish_text("r", format!("{i}")).await?;
    }
    let seen = recv_offsets(&mut ws, 10).await?;
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    ws.close().await?;

    for i in 10..25 {
        client.publish_text("r", format!("{i}")).await?;
    }
    let mut ws = server.json_ws().await?;
    let reply = ws.subscribe("r", StartFrom::Offset(11), Some(&epoch)).await?;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["next"], 26);
    assert_eq!(reply["epoch"], epoch.as_str());
    client.publish_text("r", "live").await?;
    assert_eq!(recv_offsets(&mut ws, 16).await?, (11..=26).collect::<Vec<_>>(), "missed ones, then live");
    Ok(())
}

#[tokio::test]
async fn stale_epoch_trimmed_offset_or_future_offset_is_not_recovered() -> Result {
    let server = start(|c| c.retention.max_messages = 10).await?;
    let client = server.client();
    for i in 0..30 {
        client.publish_text("t", format!("{i}")).await?;
    }
    let mut ws = server.json_ws().await?;
    let epoch = ws.subscribe("t", StartFrom::Latest, None).await?["epoch"].as_str().ok_or("epoch")?.to_owned();

    let check = |from: u64, epoch: String| {
        let url = server.url.clone();
        async move {
            let mut ws = herald_client::WsConnection::connect(&url).await?;
            let reply = ws.subscribe("t", StartFrom::Offset(from), Some(&epoch)).await?;
            // Nothing is replayed: the next frame is a live message.
            herald_client::Client::new(&url).publish_text("t", "probe").await?;
            let next = Delivery::parse(&ws.recv_text().await?)?;
            Result::Ok((reply["recovered"].clone(), next.offset, reply["next"].as_u64()))
        }
    };
    let (recovered, first, next) = check(5, epoch.clone()).await?;
    assert_eq!((recovered, Some(first)), (false.into(), next), "trimmed offset");
    let (recovered, first, next) = check(25, "another-epoch".into()).await?;
    assert_eq!((recovered, Some(first)), (false.into(), next), "stale epoch");
    let (recovered, first, next) = check(99, epoch.clone()).await?;
    assert_eq!((recovered, Some(first)), (false.into(), next), "beyond next");
    // Oldest retained offset is still recovered.
    let mut ws = server.json_ws().await?;
    let head = server.get_json("/v1/topics/t").await?.1;
    let oldest = head["first"].as_u64().ok_or("first")?;
    let reply = ws.subscribe("t", StartFrom::Offset(oldest), Some(&epoch)).await?;
    assert_eq!(reply["recovered"], true);
    assert_eq!(recv_offsets(&mut ws, 10).await?, (oldest..oldest + 10).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn delete_changes_the_epoch_so_old_positions_are_not_recovered() -> Result {
    let server = start(|_| {}).await?;
    let client = server.client();
    for i in 0..5 {
        client.publish_text("d", format!("{i}")).await?;
    }
    let before = client.info("d").await?.epoch;
    client.delete("d").await?;
    let info = client.info("d").await?;
    assert_ne!(info.epoch, before);
    assert_eq!((info.first, info.last, info.retained), (0, 0, 0));
    assert_eq!(client.publish_text("d", "again").await?.offset, 1, "offsets start again");
    let mut ws = server.json_ws().await?;
    let reply = ws.subscribe("d", StartFrom::Offset(1), Some(&before)).await?;
    assert_eq!(reply["recovered"], false);
    Ok(())
}

/// A TCP forwarder whose connections can be cut, to simulate a network blip.
async fn cuttable_proxy(target: std::net::SocketAddr) -> Result<(String, tokio::sync::watch::Sender<u32>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut cut = cut_rx.clone();
            cut.mark_unchanged();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.changed() => {}
                }
            });
        }
    });
    Ok((url, cut_tx))
}

async fn next(sub: &mut herald_client::Subscription) -> Result<Event> {
    Ok(within(Duration::from_secs(10), "event", sub.next()).await?.ok_or("subscription ended")?)
}

#[tokio::test]
async fn the_client_crate_reconnects_and_resumes_without_loss() -> Result {
    let server = start(|_| {}).await?;
    let addr = server.server.as_ref().ok_or("server")?.addr();
    let (proxy_url, cut) = cuttable_proxy(addr).await?;
    let client = server.client();
    let mut sub = herald_client::Client::new(proxy_url).subscribe("auto", StartFrom::Earliest);
    assert!(matches!(next(&mut sub).await?, Event::Subscribed { recovered: true, .. }));
    client.publish_text("auto", "one").await?;
    assert!(matches!(next(&mut sub).await?, Event::Message(m) if m.offset == 1));

    // Cut the connection, publish while the subscriber is away.
    cut.send_modify(|n| *n += 1);
    assert!(matches!(next(&mut sub).await?, Event::Disconnected(_)));
    for text in ["two", "three"] {
        client.publish_text("auto", text).await?;
    }
    assert!(matches!(next(&mut sub).await?, Event::Subscribed { recovered: true, .. }));
    let mut offsets = Vec::new();
    while offsets.len() < 2 {
        if let Event::Message(m) = next(&mut sub).await? {
            offsets.push(m.offset);
        }
    }
    assert_eq!(offsets, [2, 3], "exactly the missed messages, no duplicate of 1");
    Ok(())
}

#[tokio::test]
async fn the_client_crate_resumes_a_saved_position_with_its_epoch() -> Result {
    // What a subscriber that saves its position across restarts does
    // (crates/client/examples/subscribe.rs).
    let server = start(|_| {}).await?;
    let client = server.client();
    for text in ["one", "two", "three"] {
        client.publish_text("saved", text).await?;
    }
    let epoch = client.info("saved").await?.epoch;

    let mut sub = client.resume("saved", 2, epoch.clone());
    assert!(matches!(next(&mut sub).await?, Event::Subscribed { recovered: true, next: 4, .. }));
    for offset in [2, 3] {
        assert!(matches!(next(&mut sub).await?, Event::Message(m) if m.offset == offset));
    }
    drop(sub);

    // The history restarted since: the position is gone, and the subscription says so.
    client.delete("saved").await?;
    client.publish_text("saved", "new one").await?;
    let mut sub = client.resume("saved", 4, epoch);
    assert!(matches!(next(&mut sub).await?, Event::Subscribed { recovered: false, next: 2, .. }));
    client.publish_text("saved", "live").await?;
    assert!(matches!(next(&mut sub).await?, Event::Message(m) if m.offset == 2));
    Ok(())
}
