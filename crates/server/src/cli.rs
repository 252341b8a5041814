//! The client subcommands built on the client crate: `herald pub` and `herald sub`
//! (over HTTP and WebSocket by default, or over gRPC with `--grpc`), `herald enqueue`,
//! and the lists `herald topics` and `herald queues`. `herald work` is in `work.rs`.
//!
//! Every command that prints results takes `-o/--output text|json`: text for people,
//! JSON (one document, or one object a line for streams of results) for scripts. It is
//! not `--json`, which `herald pub` and `herald enqueue` already use for the kind of the
//! message they send.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use herald_client::grpc::pb;
use herald_client::{Client, Event, GrpcClient, ListOptions, NewJob, Published, StartFrom, TlsConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// How a client command prints its results (`-o/--output`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people: plain values, or a table.
    #[default]
    Text,
    /// For scripts: JSON with stable field names.
    Json,
}

/// Flags of `herald pub`.
#[derive(Debug, Args)]
pub struct PubArgs {
    /// Topic to publish to.
    pub topic: String,
    /// The message; without it, each line of stdin is one message.
    pub message: Option<String>,
    /// Send as JSON (each message must parse).
    #[arg(long, conflicts_with = "binary")]
    pub json: bool,
    /// Send as one binary message: MESSAGE's bytes, or stdin whole.
    #[arg(long)]
    pub binary: bool,
    /// Publish over gRPC instead of HTTP (same URL).
    #[arg(long)]
    pub grpc: bool,
    /// Print each message's offset (text), or a JSON line `{"topic","offset","ts"}` per
    /// message (json).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The server and how to reach it.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Flags of `herald enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Queue to enqueue into.
    pub queue: String,
    /// The job; without it, each line of stdin is one job.
    pub message: Option<String>,
    /// Send as JSON (each job must parse).
    #[arg(long, conflicts_with = "binary")]
    pub json: bool,
    /// Send as one binary job: MESSAGE's bytes, or stdin whole.
    #[arg(long)]
    pub binary: bool,
    /// Keep each job out of reach for this long.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub delay_ms: u64,
    /// Print each job's message id (text), or a JSON line `{"queue","message_id"}` per
    /// job (json).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The server and how to reach it.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Flags of `herald topics` and `herald queues`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only names starting with this.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// A table (text), or one JSON array of objects (json).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The server and how to reach it.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Which server a client command talks to, and how (`herald pub`, `sub`, `enqueue`,
/// `topics`, `queues`, `work`).
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Server URL (`https://` for TLS).
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// TLS trust and credentials.
    #[command(flatten)]
    pub conn: ConnArgs,
}

impl ServerArgs {
    /// An HTTP (and WebSocket) client for the server.
    pub fn http(&self) -> anyhow::Result<Client> {
        self.conn.http(&self.url)
    }

    /// A gRPC client for the server.
    pub async fn grpc(&self) -> anyhow::Result<GrpcClient> {
        self.conn.grpc(&self.url).await
    }
}

/// How a client command connects: TLS trust and credentials (`herald pub`, `sub`,
/// `topics`, `queues`, `enqueue`, `work` and `bench`).
#[derive(Debug, Clone, Default, Args)]
pub struct ConnArgs {
    /// Trust only the CA certificates in this PEM file for `https://` (a private CA);
    /// without it, the system's certificate store.
    #[arg(long, env = "HERALD_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// Basic auth as USER:PASSWORD (for a server with [auth]).
    #[arg(long, env = "HERALD_USER", conflicts_with = "token")]
    pub user: Option<String>,
    /// A bearer token (JWT) (for a server with [auth]).
    #[arg(long, env = "HERALD_TOKEN")]
    pub token: Option<String>,
    /// A client certificate (PEM, leaf first) to log in with, for a server with
    /// `tls.client_ca`; needs --key.
    #[arg(long, env = "HERALD_CERT", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, env = "HERALD_KEY", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
}

impl ConnArgs {
    /// The trust `--ca` names, or the system's, with the client certificate of `--cert`.
    pub fn tls(&self) -> anyhow::Result<TlsConfig> {
        let tls = match &self.ca {
            Some(path) => TlsConfig::with_ca_file(path)?,
            None => TlsConfig::system(),
        };
        Ok(match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => tls.with_client_cert(cert, key)?,
            _ => tls,
        })
    }

    /// The `Authorization` value `--user` or `--token` give.
    pub fn authorization(&self) -> anyhow::Result<Option<String>> {
        Ok(match (&self.user, &self.token) {
            (Some(user), _) => {
                let (name, password) =
                    user.split_once(':').ok_or_else(|| anyhow::anyhow!("--user takes USER:PASSWORD"))?;
                Some(herald_client::basic_auth(name, password))
            }
            (None, Some(token)) => Some(herald_client::bearer_auth(token)),
            (None, None) => None,
        })
    }

    /// An HTTP (and WebSocket) client for `url`.
    pub fn http(&self, url: &str) -> anyhow::Result<Client> {
        let client = Client::with_tls(url, self.tls()?);
        Ok(match self.authorization()? {
            Some(auth) => client.authorized(auth)?,
            None => client,
        })
    }

    /// A gRPC client for `url`.
    pub async fn grpc(&self, url: &str) -> anyhow::Result<GrpcClient> {
        let client =
            GrpcClient::connect_with(url, &self.tls()?).await.with_context(|| format!("connecting to {url}"))?;
        Ok(match self.authorization()? {
            Some(auth) => client.authorized(&auth)?,
            None => client,
        })
    }
}

/// Flags of `herald sub`.
#[derive(Debug, Args)]
pub struct SubArgs {
    /// Topic to subscribe to.
    pub topic: String,
    /// Where to start: earliest, latest or an offset.
    #[arg(long, default_value = "latest")]
    pub from: StartFrom,
    /// Prefix each line with the message's offset and a tab.
    #[arg(long)]
    pub offsets: bool,
    /// Subscribe over gRPC instead of WebSocket (same URL).
    #[arg(long)]
    pub grpc: bool,
    /// Exit after printing this many messages (for scripts; without it, run until
    /// interrupted).
    #[arg(long, short = 'n', value_name = "N")]
    pub count: Option<u64>,
    /// The server and how to reach it.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Messages `herald sub` may still print: `--count`, or unbounded.
struct Remaining(Option<u64>);

impl Remaining {
    /// Counts one message printed; true when that was the last one wanted.
    fn printed(&mut self) -> bool {
        match &mut self.0 {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        }
    }

    fn done(&self) -> bool {
        self.0 == Some(0)
    }
}

/// Prints what a publish got: its offset, or a JSON line.
fn print_published(p: &Published, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Text => println!("{}", p.offset),
        Output::Json => println!("{}", serde_json::to_string(p)?),
    }
    Ok(())
}

/// Runs `herald pub`.
pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    if args.grpc {
        return publish_grpc(args).await;
    }
    let client = args.server.http()?;
    let content_type = if args.json { "application/json" } else { "text/plain; charset=utf-8" };
    if args.binary {
        let mut body = Vec::new();
        tokio::io::stdin().read_to_end(&mut body).await.context("reading stdin")?;
        let p = client.publish(&args.topic, "application/octet-stream", body).await?;
        return print_published(&p, args.output);
    }
    if let Some(message) = args.message {
        let p = client.publish(&args.topic, content_type, message).await?;
        return print_published(&p, args.output);
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        let p = client.publish(&args.topic, content_type, line).await?;
        print_published(&p, args.output)?;
    }
    Ok(())
}

/// `herald pub --grpc`: the same inputs, published with `Topics.Publish`.
async fn publish_grpc(args: PubArgs) -> anyhow::Result<()> {
    let client = args.server.grpc().await?;
    if args.binary {
        let mut body = Vec::new();
        tokio::io::stdin().read_to_end(&mut body).await.context("reading stdin")?;
        return print_published(&client.publish(&args.topic, pb::Kind::Binary, body).await?, args.output);
    }
    let kind = if args.json { pb::Kind::Json } else { pb::Kind::Text };
    if let Some(message) = args.message {
        return print_published(&client.publish(&args.topic, kind, message).await?, args.output);
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        print_published(&client.publish(&args.topic, kind, line).await?, args.output)?;
    }
    Ok(())
}

/// Runs `herald enqueue`: MESSAGE, or each line of stdin (in batch requests of what has
/// been read, up to 1000), or stdin whole with `--binary`, one job each; prints each
/// job's message id.
pub async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    let client = args.server.http()?;
    let delay = std::time::Duration::from_millis(args.delay_ms);
    let print = |message_id: u64| -> anyhow::Result<()> {
        match args.output {
            Output::Text => println!("{message_id}"),
            Output::Json => {
                println!("{}", serde_json::json!({ "queue": args.queue, "message_id": message_id }))
            }
        }
        Ok(())
    };
    if args.binary {
        let body = match &args.message {
            Some(message) => message.clone().into_bytes(),
            None => {
                let mut body = Vec::new();
                tokio::io::stdin().read_to_end(&mut body).await.context("reading stdin")?;
                body
            }
        };
        return print(client.enqueue(&args.queue, "application/octet-stream", body, delay).await?);
    }
    let content_type = if args.json { "application/json" } else { "text/plain; charset=utf-8" };
    if let Some(message) = &args.message {
        return print(client.enqueue(&args.queue, content_type, message.clone(), delay).await?);
    }
    // A reader task hands the lines on; what has been read by the time a request goes
    // out makes one batch (up to the server's 1000), so a piped file goes in batches
    // and a line typed by hand goes at once.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(ENQUEUE_BATCH);
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.context("reading stdin")? {
            if tx.send(line).await.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    });
    let mut done = 0;
    while let Some(first) = rx.recv().await {
        let mut lines = vec![first];
        while lines.len() < ENQUEUE_BATCH {
            let Ok(line) = rx.try_recv() else { break };
            lines.push(line);
        }
        if lines.len() == 1 {
            let line = lines.pop().unwrap_or_default();
            print(client.enqueue(&args.queue, content_type, line, delay).await.with_context(|| line_no(done))?)?;
            done += 1;
            continue;
        }
        let n = lines.len();
        let jobs: Vec<NewJob> = lines
            .into_iter()
            .map(|line| NewJob { delay, ..if args.json { NewJob::json(line) } else { NewJob::text(line) } })
            .collect();
        let what = || format!("lines {}-{}", done + 1, done + n);
        let outcomes = client.enqueue_batch(&args.queue, &jobs).await.with_context(what)?;
        let mut refused = None;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Ok(id) => print(id)?,
                Err(e) => {
                    refused.get_or_insert(format!("{}: {} {}", line_no(done + i), e.code, e.message));
                }
            }
        }
        if let Some(refused) = refused {
            anyhow::bail!("{refused}; the message ids printed were enqueued, no line after {} was sent", what());
        }
        done += n;
    }
    reader.await.context("stdin reader")?
}

/// Lines of stdin `herald enqueue` sends in one batch request, at most (the server's most).
const ENQUEUE_BATCH: usize = 1000;

/// Names stdin line `i` (from 0) in an error.
fn line_no(i: usize) -> String {
    format!("line {}", i + 1)
}

/// Names one list call asks for at a time (the server's most).
const LIST_PAGE: u32 = 1000;

/// Runs `herald topics`: every topic the caller may administer, paged through.
pub async fn topics(args: ListArgs) -> anyhow::Result<()> {
    let client = args.server.http()?;
    let mut all = Vec::new();
    loop {
        let after = all.last().map(|t: &herald_client::ListedTopic| t.topic.clone());
        let options = ListOptions { prefix: &args.prefix, after: after.as_deref(), limit: LIST_PAGE };
        let page = client.list_topics(options).await.context("listing topics")?;
        // An empty page is the end (servers before the list filled its pages from the
        // names the caller administers could answer a short page before it).
        if page.is_empty() {
            break;
        }
        all.extend(page);
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&all)?),
        Output::Text => {
            let rows = all.iter().map(|t| {
                vec![t.topic.clone(), t.last.to_string(), t.subscribers.to_string(), t.publishers.to_string()]
            });
            print_table(&["TOPIC", "LAST", "SUBSCRIBERS", "PUBLISHERS"], rows.collect());
        }
    }
    Ok(())
}

/// Runs `herald queues`: every queue the caller may administer, with its counts.
pub async fn queues(args: ListArgs) -> anyhow::Result<()> {
    let client = args.server.http()?;
    let mut all = Vec::new();
    loop {
        let after = all.last().map(|q: &herald_client::ListedQueue| q.queue.clone());
        let options = ListOptions { prefix: &args.prefix, after: after.as_deref(), limit: LIST_PAGE };
        let page = client.list_queues(options).await.context("listing queues")?;
        let done = page.len() < LIST_PAGE as usize;
        all.extend(page);
        if done {
            break;
        }
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&all)?),
        Output::Text => {
            let rows = all.iter().map(|q| {
                let s = &q.stats;
                vec![
                    q.queue.clone(),
                    s.ready.to_string(),
                    s.in_flight.to_string(),
                    s.delayed.to_string(),
                    s.dead.to_string(),
                ]
            });
            print_table(&["QUEUE", "READY", "IN_FLIGHT", "DELAYED", "DEAD"], rows.collect());
        }
    }
    Ok(())
}

/// Prints a header and rows in columns two spaces apart: the first column (a name) left
/// aligned, the others (counts) right aligned.
fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, &w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                out.push_str(&format!("{cell:<w$}"));
            } else {
                out.push_str(&format!("  {cell:>w$}"));
            }
        }
        out.trim_end().to_owned()
    };
    println!("{}", line(header.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        println!("{}", line(row));
    }
}

/// Runs `herald sub` until interrupted (or `--count` messages), reconnecting and
/// resuming as needed.
pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let mut remaining = Remaining(args.count);
    if remaining.done() {
        return Ok(());
    }
    if args.grpc {
        return subscribe_grpc(args, remaining).await;
    }
    let client = args.server.http()?;
    let mut subscription = client.subscribe(&args.topic, args.from);
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = subscription.next().await {
        match event {
            Event::Message(m) => {
                if args.offsets {
                    writeln!(stdout, "{}\t{}", m.offset, m.payload.to_line())?;
                } else {
                    writeln!(stdout, "{}", m.payload.to_line())?;
                }
                if remaining.printed() {
                    stdout.flush()?;
                    return Ok(());
                }
            }
            Event::Subscribed { recovered: false, next, .. } => {
                eprintln!("herald: could not resume without loss; continuing live from offset {next}")
            }
            Event::Subscribed { .. } => {}
            Event::Disconnected(why) => eprintln!("herald: disconnected ({why}); reconnecting"),
        }
        stdout.flush()?;
    }
    Ok(())
}

/// `herald sub --grpc`: a Subscribe stream, reopened after a failure from the offset
/// after the last message printed, with the epoch check (as the WebSocket client does).
async fn subscribe_grpc(args: SubArgs, mut remaining: Remaining) -> anyhow::Result<()> {
    let mut from = args.from;
    let mut epoch: Option<String> = None;
    loop {
        let why = match subscribe_grpc_once(&args, &mut from, &mut epoch, &mut remaining).await {
            Ok(()) if remaining.done() => return Ok(()),
            Ok(()) => "the stream ended".to_owned(),
            // stdout is gone (a closed pipe): nothing more to do.
            Err(e) if e.downcast_ref::<std::io::Error>().is_some() => return Err(e),
            Err(e) => e.to_string(),
        };
        eprintln!("herald: disconnected ({why}); reconnecting");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn subscribe_grpc_once(
    args: &SubArgs,
    from: &mut StartFrom,
    epoch: &mut Option<String>,
    remaining: &mut Remaining,
) -> anyhow::Result<()> {
    let client = args.server.grpc().await?;
    let mut subscription = client.subscribe(&args.topic, *from, epoch.clone()).await?;
    let subscribed = &subscription.subscribed;
    if !subscribed.recovered {
        eprintln!("herald: could not resume without loss; continuing live from offset {}", subscribed.next);
    }
    *epoch = Some(subscribed.epoch.clone());
    while let Some(m) = subscription.next().await? {
        let mut stdout = std::io::stdout().lock();
        if args.offsets {
            writeln!(stdout, "{}\t{}", m.offset, m.to_line())?;
        } else {
            writeln!(stdout, "{}", m.to_line())?;
        }
        stdout.flush()?;
        *from = StartFrom::Offset(m.offset + 1);
        if remaining.printed() {
            return Ok(());
        }
    }
    Ok(())
}

/// An error and its causes on one line, each text once. Errors that print their source
/// in their own message (thiserror's `"http: {0}"` with `#[from]`, hyper's and tonic's
/// transport errors) would otherwise show it twice, as `{:#}` appends every source: a
/// cause whose text the one before it already contains is left out.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() || !previous.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        previous = text;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_line;

    /// Shows its source in its own message, as `#[error("http: {0}")]` with `#[from]` does.
    #[derive(Debug)]
    struct Http(std::io::Error);

    impl std::fmt::Display for Http {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "http: {}", self.0)
        }
    }

    impl std::error::Error for Http {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let e = anyhow::Error::from(Http(std::io::Error::other("refused"))).context("publishing");
        assert_eq!(format!("{e:#}"), "publishing: http: refused: refused", "what it fixes");
        assert_eq!(error_line(&e), "publishing: http: refused");
    }
}
