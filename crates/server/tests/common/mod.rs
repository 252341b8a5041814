//! Shared helpers of the black-box tests: a real server on 127.0.0.1:0, raw WebSocket
//! and SSE clients, a seeded random generator, and condition polling with a deadline.

#![allow(dead_code)] // each test binary uses a different subset

pub mod cluster;
pub mod mix;
pub mod node;

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_server::{Config, Server, StoreKind};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T = ()> = std::result::Result<T, Error>;
pub type RawSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A test server; shut down when dropped.
pub struct TestServer {
    pub server: Option<Server>,
    pub url: String,
    pub ws: String,
    pub http: reqwest::Client,
    /// Its PostgreSQL schema, with `HERALD_TEST_STORE=postgres` (dropped after it).
    pub schema: Option<PgSchema>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.shutdown();
        }
    }
}

/// Starts a memory-store server on a free port, after `tune` adjusts the config. With
/// `HERALD_TEST_STORE=postgres`, the server keeps topics and queues in PostgreSQL
/// instead (`HERALD_TEST_POSTGRES_URL`, default the local server's `test` database), in
/// a schema of its own, dropped when the server is: the whole black-box suite runs
/// against that store so (`.ci/run` does both).
pub async fn start(tune: impl FnOnce(&mut Config)) -> Result<TestServer> {
    let mut config = Config { listen: "127.0.0.1:0".parse()?, store: StoreKind::Memory, ..Config::default() };
    let schema = test_store(&mut config);
    tune(&mut config);
    let server = herald_server::start(config).await?;
    let url = server.url();
    let ws = url.replacen("http://", "ws://", 1);
    Ok(TestServer { server: Some(server), url, ws, http: http(), schema })
}

/// The store `HERALD_TEST_STORE` asks for: PostgreSQL in a new schema (returned), or
/// memory.
fn test_store(config: &mut Config) -> Option<PgSchema> {
    if std::env::var("HERALD_TEST_STORE").as_deref() != Ok("postgres") {
        return None;
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let schema = format!("herald_suite_{}_{n}_{nanos}", std::process::id());
    config.store = StoreKind::Postgres;
    config.postgres.url = postgres_url();
    config.postgres.schema = schema.clone();
    config.postgres.pool_size = 8;
    Some(PgSchema(schema))
}

/// The PostgreSQL the suite's servers use.
pub fn postgres_url() -> String {
    std::env::var("HERALD_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A test server's schema, dropped (with its tables) when the server is.
pub struct PgSchema(pub String);

impl Drop for PgSchema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.0);
        let dropped = std::process::Command::new("psql")
            .args(["-q", "-X", "-d", &postgres_url(), "-c", &sql])
            // Without the NOTICE listing every table the drop cascades to.
            .env("PGOPTIONS", "-c client_min_messages=warning")
            .stdout(std::process::Stdio::null())
            .status();
        if !dropped.is_ok_and(|s| s.success()) {
            eprintln!("could not drop the test schema {}", self.0);
        }
    }
}

/// A plain reqwest client (reqwest is built without a crypto provider of its own).
pub fn http() -> reqwest::Client {
    herald_client::install_crypto_provider();
    reqwest::Client::new()
}

impl TestServer {
    pub fn client(&self) -> herald_client::Client {
        herald_client::Client::new(&self.url)
    }

    pub async fn json_ws(&self) -> Result<herald_client::WsConnection> {
        Ok(herald_client::WsConnection::connect(&self.url).await?)
    }

    /// A JSON protocol connection whose server frames come packed (`?pack=lines`).
    pub async fn json_ws_packed(&self) -> Result<herald_client::WsConnection> {
        let tls = herald_client::TlsConfig::system();
        Ok(herald_client::WsConnection::connect_packed(&self.url, &tls, None).await?)
    }

    /// A plain WebSocket on `{path}` (with its query), for frame-level checks.
    pub async fn socket(&self, path: &str) -> Result<RawSocket> {
        let (socket, _) = tokio_tungstenite::connect_async(format!("{}{path}", self.ws)).await?;
        Ok(socket)
    }

    /// A raw socket on `/v1/topics/{topic}/ws?{query}`.
    pub async fn raw_ws(&self, topic: &str, query: &str) -> Result<RawSocket> {
        let url = format!("{}/v1/topics/{topic}/ws?{query}", self.ws);
        let (socket, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(socket)
    }

    /// A raw socket whose kernel receive buffer is pinned small, so a test that stops
    /// reading fills the server's buffers quickly (loopback autotuning may otherwise
    /// absorb tens of megabytes).
    pub async fn raw_ws_small_buffer(&self, topic: &str, query: &str) -> Result<RawSocket> {
        let addr = self.server.as_ref().ok_or("server")?.addr();
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(64 * 1024)?;
        let stream = socket.connect(addr).await?;
        let url = format!("{}/v1/topics/{topic}/ws?{query}", self.ws);
        let (socket, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await?;
        Ok(socket)
    }

    /// GET a JSON document.
    pub async fn get_json(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        let r = self.http.get(format!("{}{path}", self.url)).send().await?;
        let status = r.status().as_u16();
        let body = r.bytes().await?;
        Ok((status, serde_json::from_slice(&body)?))
    }

    /// POST a body with a content type; returns status and the JSON answer.
    pub async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(u16, serde_json::Value)> {
        let mut req = self.http.post(format!("{}{path}", self.url)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let body = r.bytes().await?;
        Ok((status, serde_json::from_slice(&body)?))
    }

    /// Live subscribers of a topic on this node.
    pub async fn subscribers(&self, topic: &str) -> Result<u64> {
        let (_, info) = self.get_json(&format!("/v1/topics/{topic}")).await?;
        info["subscribers"].as_u64().ok_or_else(|| "no subscribers field".into())
    }

    /// One metric's value from /metrics.
    pub async fn metric(&self, name: &str) -> Result<u64> {
        let text = self.http.get(format!("{}/metrics", self.url)).send().await?.text().await?;
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .ok_or_else(|| format!("metric {name} missing"))?;
        Ok(line[name.len() + 1..].trim().parse()?)
    }
}

/// Polls `check` until it holds, failing after `limit`. For conditions that have no
/// event to await (a count seen through the HTTP API).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for: {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bounds a test step so a bug fails the test instead of hanging it.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(limit, fut).await.map_err(|_| format!("timed out: {what}").into())
}

/// The next data frame of a raw socket (text or binary), skipping control frames.
pub async fn raw_next(socket: &mut RawSocket) -> Result<WsMessage> {
    loop {
        match socket.next().await {
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            Some(Ok(m)) => return Ok(m),
            Some(Err(e)) => return Err(e.into()),
            None => return Err("socket ended".into()),
        }
    }
}

/// Reads a raw socket until its close frame and returns the close code.
pub async fn close_code(socket: &mut RawSocket) -> Result<u16> {
    loop {
        match socket.next().await {
            Some(Ok(WsMessage::Close(frame))) => return Ok(frame.map_or(1005, |f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("no close frame: {e}").into()),
            None => return Err("socket ended without a close frame".into()),
        }
    }
}

pub async fn send_text(socket: &mut RawSocket, text: &str) -> Result {
    socket.send(WsMessage::text(text)).await?;
    Ok(())
}

/// A small seeded generator (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
    /// A size up to 64 KiB, most of them small.
    pub fn size(&mut self) -> usize {
        let cap = 65_536u64 >> self.below(8);
        self.below(cap) as usize
    }
    /// Random bytes of a random size up to 64 KiB.
    pub fn some_bytes(&mut self) -> Vec<u8> {
        let n = self.size();
        self.bytes(n)
    }
    /// Random text of 1 byte to 64 KiB that never starts with `{`.
    pub fn some_text(&mut self) -> String {
        let n = self.size().max(1);
        self.text(n)
    }
    /// Printable ASCII that never starts with `{`.
    pub fn text(&mut self, len: usize) -> String {
        (0..len).map(|i| if i == 0 { 't' } else { (b' ' + self.below(95) as u8) as char }).collect()
    }
}

/// A `herald serve` child process, killed when dropped so that a failing test leaves
/// no server behind.
pub struct HeraldProcess(pub std::process::Child);

impl std::ops::Deref for HeraldProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for HeraldProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for HeraldProcess {
    fn drop(&mut self) {
        // Already gone after a kill or an exit: nothing to do.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real `herald serve` binary with `args` (plus a free port); returns the
/// child and its base URL, parsed from its "listening" log line.
pub fn spawn_herald(args: &[&str]) -> Result<(HeraldProcess, String)> {
    let (child, line) = spawn_herald_until(args, "addr=")?;
    let addr = line.split("addr=").nth(1).and_then(|rest| rest.split_whitespace().next()).ok_or("no address")?;
    Ok((child, format!("http://{addr}")))
}

/// Starts the real `herald serve` binary with `args` (plus a free port) and reads its
/// log until the first line containing `marker`, which it returns.
pub fn spawn_herald_until(args: &[&str], marker: &str) -> Result<(HeraldProcess, String)> {
    spawn_herald_env(args, &[], marker)
}

/// [`spawn_herald_until`] with environment variables `env` set for the child.
pub fn spawn_herald_env(args: &[&str], env: &[(&str, &str)], marker: &str) -> Result<(HeraldProcess, String)> {
    use std::io::{BufRead, BufReader};
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("HERALD_LOG", "info")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut child = HeraldProcess(child);
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let line = loop {
        let line = lines.next().ok_or_else(|| format!("herald exited before logging {marker:?}"))??;
        if line.contains(marker) {
            break line;
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, line))
}

/// Enqueues `body` (text) into `queue` with `query`; its message id.
pub async fn enqueue_text(server: &TestServer, queue: &str, body: &str, query: &str) -> Result<u64> {
    let path = format!("/v1/queues/{queue}/messages?{query}");
    let (status, reply) = server.post(&path, Some("text/plain"), body.as_bytes().to_vec()).await?;
    assert_eq!(status, 201, "{reply}");
    Ok(reply["message_id"].as_u64().ok_or("message_id")?)
}

/// Fetches from `queue` with `query`; the jobs.
pub async fn fetch_jobs(server: &TestServer, queue: &str, query: &str) -> Result<Vec<serde_json::Value>> {
    let (status, reply) = server.post(&format!("/v1/queues/{queue}/fetch?{query}"), None, Vec::new()).await?;
    assert_eq!(status, 200, "{reply}");
    Ok(reply["messages"].as_array().cloned().unwrap_or_default())
}

/// POSTs nothing to `path`; the status (ack, requeue, extend answer no body).
pub async fn post_status(server: &TestServer, path: &str) -> Result<u16> {
    Ok(server.http.post(format!("{}{path}", server.url)).send().await?.status().as_u16())
}
