//! `idle`: opens many WebSocket subscribers on one broker, each subscribed to one
//! topic (the broker's confirmation awaited), reports once all are subscribed, then
//! holds them open and idle until stdin reaches EOF or SIGTERM/SIGINT arrives. Its only
//! purpose is to let a script read the broker's memory with N idle subscribers
//! (`tools/idle-bench.sh`); this process's own memory is not what is measured.
//!
//! Targets:
//! - `herald`: Herald's `/v1/ws`, `{"op":"subscribe",...}` answered by `"type":"subscribed"`;
//! - `nats`: the NATS protocol over nats-server's WebSocket listener: INFO, then
//!   CONNECT + SUB + PING, answered by PONG (sent after the SUB is registered);
//! - `mqtt`: MQTT 3.1.1 over WebSocket (subprotocol `mqtt`, binary frames): CONNECT
//!   (clean session, unique client id) answered by CONNACK, SUBSCRIBE QoS 0 by SUBACK
//!   (src/mqtt.rs).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::mqtt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Herald,
    Nats,
    Mqtt,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Herald => "herald",
            Target::Nats => "nats",
            Target::Mqtt => "mqtt",
        }
    }
}

#[derive(Debug, Args)]
pub struct IdleArgs {
    /// Protocol spoken over the WebSocket.
    #[arg(long, value_enum)]
    target: Target,
    /// WebSocket URL: ws://127.0.0.1:7191/v1/ws (herald), ws://127.0.0.1:8225 (nats),
    /// ws://127.0.0.1:9001 (mqtt; some brokers want a path such as /mqtt).
    #[arg(long)]
    url: String,
    /// Connections to open, each with one subscription.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Topic (subject) every connection subscribes to.
    #[arg(long, default_value = "idle")]
    topic: String,
    /// Local addresses to connect from, comma-separated (e.g. 127.0.0.1,127.0.0.2),
    /// connections spread round-robin; each gives about 28,000 ephemeral ports.
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Seconds one connection may take to connect and be subscribed; then it counts as failed.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

type Ws = WebSocketStream<TcpStream>;

/// What every connection needs, shared.
struct Plan {
    target: Target,
    url: String,
    server: SocketAddr,
    sources: Vec<IpAddr>,
    topic: String,
    timeout: Duration,
    /// Distinguishes this run's MQTT client ids from another run's.
    run: u32,
}

pub async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    ensure!(args.connections >= 1 && args.concurrency >= 1, "--connections and --concurrency must be at least 1");
    ensure!(!args.topic.is_empty() && !args.topic.contains(char::is_whitespace), "--topic must be one word");
    let request = args.url.as_str().into_client_request().with_context(|| format!("bad --url {}", args.url))?;
    let host = request.uri().host().context("--url has no host")?.trim_start_matches('[').trim_end_matches(']');
    let port = request.uri().port_u16().unwrap_or(80);
    let server = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let plan = Arc::new(Plan {
        target: args.target,
        url: args.url.clone(),
        server,
        sources: args.source_ips.clone(),
        topic: args.topic.clone(),
        timeout: Duration::from_secs(args.timeout),
        run: std::process::id(),
    });

    // Installed before anything is opened, so that SIGTERM/SIGINT never kill the
    // process mid-way (it always reports and exits by itself).
    let mut stop = Box::pin(stop_requested()?);
    let dropped = Arc::new(AtomicU64::new(0));
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0usize;
    let started = Instant::now();
    let mut opening = futures_util::stream::iter(0..args.connections)
        .map(|i| {
            let plan = plan.clone();
            async move {
                match tokio::time::timeout(plan.timeout, open(&plan, i)).await {
                    Ok(result) => result,
                    Err(_) => Err(anyhow::anyhow!("not subscribed within {} s", plan.timeout.as_secs())),
                }
            }
        })
        .buffer_unordered(args.concurrency);
    loop {
        let next = tokio::select! {
            next = opening.next() => next,
            why = &mut stop => bail!("{why} before all connections were subscribed (keep stdin open to hold them)"),
        };
        match next {
            Some(Ok(ws)) => {
                tokio::spawn(hold(ws, plan.target, dropped.clone()));
            }
            Some(Err(e)) => {
                failed += 1;
                let mut text = format!("{e:#}");
                text.truncate(200);
                *errors.entry(text).or_default() += 1;
            }
            None => break,
        }
    }
    let connect_ms = started.elapsed().as_millis() as u64;
    drop(opening);

    for (text, count) in &errors {
        eprintln!("peer-bench idle: {count} connection(s) failed: {text}");
    }
    let subscribed = args.connections - failed;
    if args.json {
        let report = serde_json::json!({
            "scenario": "idle",
            "target": plan.target.name(),
            "connections": args.connections,
            "subscribed": subscribed,
            "failed": failed,
            "connect_ms": connect_ms,
        });
        println!("{report}");
    } else {
        println!(
            "idle target={} connections={}: {subscribed} subscribed, {failed} failed, in {connect_ms} ms; holding them until stdin closes or SIGTERM",
            plan.target.name(),
            args.connections
        );
    }
    use std::io::Write;
    std::io::stdout().flush().context("cannot write to stdout")?;

    let why = stop.await;
    let dropped = dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        eprintln!("peer-bench idle: {dropped} connection(s) were closed by the server or failed while held");
    }
    eprintln!("peer-bench idle: {why}, closing {subscribed} connection(s)");
    Ok(())
}

/// Resolves when stdin reaches EOF or SIGTERM/SIGINT arrives, saying which. stdin is
/// read on a plain thread: a blocked read there does not delay the process's exit.
fn stop_requested() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    Ok(async move {
        tokio::select! {
            _ = rx => "stdin closed",
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// Connects (from the i-th source address, if any), upgrades to WebSocket and
/// subscribes; returns once the broker confirmed the subscription.
async fn open(plan: &Plan, i: usize) -> anyhow::Result<Ws> {
    let socket = if plan.server.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if !plan.sources.is_empty() {
        let source = plan.sources[i % plan.sources.len()];
        socket.bind(SocketAddr::new(source, 0)).with_context(|| format!("cannot bind to {source}"))?;
    }
    let stream = socket.connect(plan.server).await.with_context(|| format!("cannot connect to {}", plan.server))?;
    stream.set_nodelay(true)?;
    let request = match plan.target {
        Target::Mqtt => mqtt::request(&plan.url)?,
        _ => plan.url.as_str().into_client_request()?,
    };
    // Small buffers: this process holds up to ~20,000 sockets (tungstenite's default
    // read buffer is 128 KiB each).
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .context("WebSocket handshake failed")?;
    match plan.target {
        Target::Herald => subscribe_herald(&mut ws, &plan.topic).await?,
        Target::Nats => subscribe_nats(&mut ws, &plan.topic).await?,
        Target::Mqtt => subscribe_mqtt(&mut ws, &plan.topic, &format!("pb{}-{i}", plan.run)).await?,
    }
    Ok(ws)
}

/// The next data frame's bytes (text or binary); control frames are skipped (tungstenite
/// answers pings itself), a close or the end of the stream is an error.
async fn next_data(ws: &mut Ws) -> anyhow::Result<Vec<u8>> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_bytes().to_vec()),
            Some(Ok(Message::Binary(b))) => return Ok(b.to_vec()),
            Some(Ok(Message::Close(frame))) => bail!("server closed the WebSocket: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("WebSocket read failed"),
            None => bail!("server closed the connection"),
        }
    }
}

async fn subscribe_herald(ws: &mut Ws, topic: &str) -> anyhow::Result<()> {
    let request = serde_json::json!({"op": "subscribe", "id": 1, "topic": topic});
    ws.send(Message::text(request.to_string())).await.context("cannot send subscribe")?;
    loop {
        let frame = next_data(ws).await?;
        let reply: serde_json::Value =
            serde_json::from_slice(&frame).context("herald sent a frame that is not JSON")?;
        match reply["type"].as_str() {
            Some("subscribed") => return Ok(()),
            Some("error") => bail!("herald refused the subscription: {reply}"),
            _ => {}
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn subscribe_nats(ws: &mut Ws, subject: &str) -> anyhow::Result<()> {
    // A protocol line may in principle span frames; keep what came so far.
    let mut got = Vec::new();
    while !contains(&got, b"INFO") {
        got.extend(next_data(ws).await?);
    }
    let hello =
        format!("CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB {subject} 1\r\nPING\r\n");
    ws.send(Message::binary(hello.into_bytes())).await.context("cannot send CONNECT")?;
    got.clear();
    // The PONG answers after the SUB is registered.
    loop {
        got.extend(next_data(ws).await?);
        if contains(&got, b"-ERR") {
            bail!("nats-server refused: {}", String::from_utf8_lossy(&got).trim());
        }
        if contains(&got, b"PONG") {
            return Ok(());
        }
        if contains(&got, b"PING\r\n") {
            ws.send(Message::binary(&b"PONG\r\n"[..])).await?;
            got.clear();
        }
    }
}

async fn subscribe_mqtt(ws: &mut Ws, topic: &str, client_id: &str) -> anyhow::Result<()> {
    let mut reader = mqtt::Reader::default();
    mqtt::connect(ws, &mut reader, client_id).await?;
    mqtt::subscribe(ws, &mut reader, topic).await
}

/// Keeps reading one socket, so that WebSocket pings are answered (by tungstenite) and
/// NATS `PING`s too; counts the connection in `dropped` if it ends.
async fn hold(mut ws: Ws, target: Target, dropped: Arc<AtomicU64>) {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if target == Target::Nats && contains(&b, b"PING\r\n") => {
                if ws.send(Message::binary(&b"PONG\r\n"[..])).await.is_err() {
                    break;
                }
            }
            Some(Ok(Message::Text(t))) if target == Target::Nats && t.contains("PING\r\n") => {
                if ws.send(Message::binary(&b"PONG\r\n"[..])).await.is_err() {
                    break;
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    dropped.fetch_add(1, Ordering::Relaxed);
}
