//! `herald bench fanout`: end-to-end fan-out over WebSocket, T topics x S subscribers
//! per topic, P publishers. Subscribers speak one of three protocols (`--protocol`):
//! `raw` (default) holds raw subscriptions (`mode=sub`, each message a bare frame: no
//! parsing on the client, so the load generator stays cheap); `json` subscribes over
//! the JSON protocol (`/v1/ws`, one frame per message) and `packed` over the JSON
//! protocol with packed frames (`/v1/ws?pack=lines`, several messages per frame); a
//! JSON subscriber counts the `message` frames (the lines of a packed frame) without
//! parsing them further. Each publisher owns the topics `t` with `t % P == its index`,
//! has one raw publishing socket (`mode=pub`) per topic it owns, and sends N rounds of
//! one message to each of them as fast as the sockets take them. The run ends when
//! every subscriber has received all N messages of its topic; deliveries/s = T x S x N
//! / the time from the first publish to the last delivery. `tools/peer-bench
//! nats-ws-fanout` and `mqtt-ws-fanout` measure nats-server and rumqttd the same way.
//!
//! With `--sub-url` (repeated), subscribers are spread over those nodes round-robin
//! while the publishers use `--url`: a cluster's ingest node and its fan-out nodes
//! (tools/cluster-bench.sh). Subscribers start from the earliest offset of a fresh
//! topic, so a subscription a cluster node is still setting up misses nothing.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use herald_client::{ClientError, TlsConfig};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How subscribers of `herald bench fanout` receive messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// Raw WebSocket subscriptions: a bare frame per message.
    Raw,
    /// The JSON protocol: a `message` frame per message.
    Json,
    /// The JSON protocol with packed frames (`?pack=lines`).
    Packed,
}

/// Flags of `herald bench fanout`.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Server URL (the publishers'; the subscribers' too without `--sub-url`).
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Nodes the subscribers connect to, round-robin (repeat the flag); default `--url`.
    #[arg(long = "sub-url")]
    pub sub_urls: Vec<String>,
    /// Topics.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Subscribers per topic, each with its own WebSocket.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Publishers (1 to `--topics`), each with its own sockets.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Messages published per topic.
    #[arg(long, default_value_t = 2000)]
    pub messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// How subscribers receive messages.
    #[arg(long, value_enum, default_value_t = Protocol::Raw)]
    pub protocol: Protocol,
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

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens one subscriber of `topic` on node `base` and waits until it is subscribed.
async fn subscriber(
    base: &str,
    topic: &str,
    protocol: Protocol,
    (tls, auth): (&TlsConfig, Option<&str>),
) -> anyhow::Result<Socket> {
    let config = WebSocketConfig::default().read_buffer_size(64 << 10);
    let path = match protocol {
        Protocol::Raw => format!("/v1/topics/{topic}/ws?mode=sub&from=earliest"),
        Protocol::Json => "/v1/ws".to_owned(),
        Protocol::Packed => "/v1/ws?pack=lines".to_owned(),
    };
    let url = ws_url(base, &path);
    let (mut socket, _) = herald_client::connect_socket(&url, config, tls, auth)
        .await
        .with_context(|| format!("subscribing at {url}"))?;
    if protocol != Protocol::Raw {
        let subscribe = serde_json::json!({"op": "subscribe", "id": 1, "topic": topic, "from": "earliest"});
        socket.send(WsMessage::text(subscribe.to_string())).await?;
        match socket.next().await {
            Some(Ok(WsMessage::Text(t))) if t.starts_with(r#"{"type":"subscribed""#) => {}
            other => anyhow::bail!("subscribing to {topic}: {other:?}"),
        }
    }
    Ok(socket)
}

/// Messages in one frame a subscriber received: a packed frame holds one per line.
fn messages_in(protocol: Protocol, frame: &WsMessage) -> u64 {
    match (protocol, frame) {
        (Protocol::Raw, WsMessage::Text(_) | WsMessage::Binary(_)) => 1,
        (Protocol::Json, WsMessage::Text(_)) => 1,
        (Protocol::Packed, WsMessage::Text(t)) => t.as_bytes().iter().filter(|&&b| b == b'\n').count() as u64 + 1,
        _ => 0,
    }
}

/// Runs the benchmark.
pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.topics >= 1 && args.subscribers >= 1 && args.messages >= 1,
        "--topics, --subscribers and --messages must be at least 1"
    );
    anyhow::ensure!((1..=args.topics).contains(&args.publishers), "--publishers must be from 1 to --topics");
    let run = std::process::id();
    let topics: Vec<String> = match args.topics {
        1 => vec![format!("bench.fanout.{run}")],
        n => (0..n).map(|t| format!("bench.fanout.{run}.{t}")).collect(),
    };
    let nodes = if args.sub_urls.is_empty() { std::slice::from_ref(&args.url) } else { &args.sub_urls[..] };
    let (tls, auth) = (args.conn.tls()?, args.conn.authorization()?);
    let mut sockets = Vec::with_capacity(args.topics * args.subscribers);
    for i in 0..args.topics * args.subscribers {
        let topic = &topics[i % topics.len()];
        sockets.push(subscriber(&nodes[i % nodes.len()], topic, args.protocol, (&tls, auth.as_deref())).await?);
    }
    let (expected, protocol) = (args.messages, args.protocol);
    let progress = crate::bench::Progress::start("deliveries", sockets.len() as u64 * expected);
    let subscribers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            let delivered = progress.counter();
            tokio::spawn(async move {
                let mut got = 0u64;
                while got < expected {
                    match socket.next().await {
                        Some(Ok(frame)) => {
                            let n = messages_in(protocol, &frame);
                            got += n;
                            delivered.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        }
                        Some(Err(e)) => return Err(anyhow::anyhow!("subscriber failed after {got}: {e}")),
                        None => return Err(anyhow::anyhow!("subscriber closed after {got}")),
                    }
                }
                Ok(Instant::now())
            })
        })
        .collect();

    let mut publishers = Vec::with_capacity(args.publishers);
    for p in 0..args.publishers {
        let mut owned = Vec::new();
        for topic in topics.iter().skip(p).step_by(args.publishers) {
            let url = ws_url(&args.url, &format!("/v1/topics/{topic}/ws?mode=pub"));
            let (socket, _) = herald_client::connect_socket(&url, WebSocketConfig::default(), &tls, auth.as_deref())
                .await
                .context("publisher")?;
            owned.push(socket);
        }
        publishers.push(owned);
    }
    let payload = "x".repeat(args.size);
    let started = Instant::now();
    let publishing: Vec<_> = publishers
        .into_iter()
        .map(|mut sockets| {
            let payload = payload.clone();
            tokio::spawn(async move {
                for _ in 0..expected {
                    for socket in &mut sockets {
                        // feed: frames are written in batches, flushed below.
                        socket.feed(WsMessage::text(payload.clone())).await?;
                    }
                }
                for socket in &mut sockets {
                    socket.flush().await?;
                }
                Ok::<_, ClientError>(sockets)
            })
        })
        .collect();
    let mut publishers = Vec::with_capacity(publishing.len());
    for p in publishing {
        publishers.push(p.await?.context("publishing")?);
    }
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
    drop(progress);
    for socket in publishers.iter_mut().flatten() {
        let _ = socket.close(None).await;
    }
    let deliveries = (args.topics * args.subscribers) as u64 * args.messages;
    let per_second = deliveries as f64 / elapsed.as_secs_f64();
    let publish_rate = (args.topics as u64 * args.messages) as f64 / published.as_secs_f64();
    let protocol = format!("{:?}", args.protocol).to_lowercase();
    if args.json {
        let report = serde_json::json!({
            "scenario": "herald-fanout",
            "protocol": protocol,
            "topics": args.topics,
            "subscribers": args.subscribers,
            "publishers": args.publishers,
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
            "herald-fanout protocol={protocol} topics={} subscribers={} publishers={} messages={} size={}: {deliveries} deliveries in {:.2} s = {per_second:.0}/s (published at {publish_rate:.0}/s)",
            args.topics,
            args.subscribers,
            args.publishers,
            args.messages,
            args.size,
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}
