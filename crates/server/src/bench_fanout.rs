//! `herald bench fanout`: end-to-end fan-out over WebSocket. S subscribers hold raw
//! WebSocket subscriptions (`mode=sub`, each message a bare frame: no parsing on the
//! client, so the load generator stays cheap); one raw publisher (`mode=pub`) sends N
//! messages as fast as the socket takes them. The run ends when every subscriber has
//! received all N; deliveries/s = S x N / the time from the first publish to the last
//! delivery. `tools/peer-bench nats-ws-fanout` measures nats-server the same way.
//!
//! With `--sub-url` (repeated), subscribers are spread over those nodes round-robin
//! while the publisher uses `--url`: a cluster's ingest node and its fan-out nodes
//! (tools/cluster-bench.sh). Subscribers start from the earliest offset of a fresh
//! topic, so a subscription a cluster node is still setting up misses nothing.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Flags of `herald bench fanout`.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Server URL (the publisher's; the subscribers' too without `--sub-url`).
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Nodes the subscribers connect to, round-robin (repeat the flag); default `--url`.
    #[arg(long = "sub-url")]
    pub sub_urls: Vec<String>,
    /// Subscribers, each with its own WebSocket.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Messages published.
    #[arg(long, default_value_t = 2000)]
    pub messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// TLS trust and credentials (as for `herald pub`).
    #[command(flatten)]
    pub conn: crate::cli::ConnArgs,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

fn ws_url(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = base
        .strip_prefix("https://")
        .map(|b| format!("wss://{b}"))
        .unwrap_or_else(|| base.replacen("http://", "ws://", 1));
    format!("{base}{path}")
}

/// Runs the benchmark.
pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.subscribers >= 1 && args.messages >= 1, "--subscribers and --messages must be at least 1");
    let topic = format!("bench.fanout.{}", std::process::id());
    let config = WebSocketConfig::default().read_buffer_size(64 << 10);
    let nodes = if args.sub_urls.is_empty() { std::slice::from_ref(&args.url) } else { &args.sub_urls[..] };
    let sub_urls: Vec<String> =
        nodes.iter().map(|n| ws_url(n, &format!("/v1/topics/{topic}/ws?mode=sub&from=earliest"))).collect();
    let (tls, auth) = (args.conn.tls()?, args.conn.authorization()?);
    let mut sockets = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let sub_url = &sub_urls[i % sub_urls.len()];
        let (socket, _) = herald_client::connect_socket(sub_url, config, &tls, auth.as_deref())
            .await
            .with_context(|| format!("subscribing at {sub_url}"))?;
        sockets.push(socket);
    }
    let expected = args.messages;
    let subscribers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let mut got = 0u64;
                while got < expected {
                    match socket.next().await {
                        Some(Ok(WsMessage::Text(_) | WsMessage::Binary(_))) => got += 1,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(anyhow::anyhow!("subscriber failed after {got}: {e}")),
                        None => return Err(anyhow::anyhow!("subscriber closed after {got}")),
                    }
                }
                Ok(Instant::now())
            })
        })
        .collect();

    let pub_url = ws_url(&args.url, &format!("/v1/topics/{topic}/ws?mode=pub"));
    let (mut publisher, _) = herald_client::connect_socket(&pub_url, WebSocketConfig::default(), &tls, auth.as_deref())
        .await
        .context("publisher")?;
    let payload = "x".repeat(args.size);
    let started = Instant::now();
    for _ in 0..args.messages {
        // feed: frames are written in batches, flushed below.
        publisher.feed(WsMessage::text(payload.clone())).await.context("publishing")?;
    }
    publisher.flush().await.context("publishing")?;
    let published = started.elapsed();

    let mut last = started;
    let deadline = Duration::from_secs(args.timeout);
    for s in subscribers {
        let done = tokio::time::timeout(deadline.saturating_sub(started.elapsed()), s)
            .await
            .context("timed out waiting for subscribers")???;
        last = last.max(done);
    }
    let elapsed = last.duration_since(started);
    let _ = publisher.close(None).await;
    let deliveries = args.subscribers as u64 * args.messages;
    let per_second = deliveries as f64 / elapsed.as_secs_f64();
    let publish_rate = args.messages as f64 / published.as_secs_f64();
    if args.json {
        let report = serde_json::json!({
            "scenario": "herald-fanout",
            "subscribers": args.subscribers,
            "messages": args.messages,
            "size": args.size,
            "deliveries": deliveries,
            "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "deliveries_per_second": per_second.round() as u64,
            "publish_per_second": publish_rate.round() as u64,
        });
        println!("{report}");
    } else {
        println!(
            "herald-fanout subscribers={} messages={} size={}: {deliveries} deliveries in {:.2} s = {per_second:.0}/s (published at {publish_rate:.0}/s)",
            args.subscribers,
            args.messages,
            args.size,
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}
