//! The client subcommands: `herald pub` and `herald sub`, built on the client crate,
//! over HTTP and WebSocket by default or over gRPC with `--grpc`.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use herald_client::grpc::pb;
use herald_client::{Client, Event, GrpcClient, StartFrom, TlsConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

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
    /// Server URL (`https://` for TLS).
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// TLS trust and credentials.
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// How a client command connects: TLS trust and credentials (`herald pub`, `herald
/// sub`, `herald bench`).
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
    /// Server URL (`https://` for TLS).
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// TLS trust and credentials.
    #[command(flatten)]
    pub conn: ConnArgs,
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

/// Runs `herald pub`.
pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    if args.grpc {
        return publish_grpc(args).await;
    }
    let client = args.conn.http(&args.url)?;
    let content_type = if args.json { "application/json" } else { "text/plain; charset=utf-8" };
    if args.binary {
        let mut body = Vec::new();
        tokio::io::stdin().read_to_end(&mut body).await.context("reading stdin")?;
        let p = client.publish(&args.topic, "application/octet-stream", body).await?;
        println!("{}", p.offset);
        return Ok(());
    }
    if let Some(message) = args.message {
        let p = client.publish(&args.topic, content_type, message).await?;
        println!("{}", p.offset);
        return Ok(());
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        let p = client.publish(&args.topic, content_type, line).await?;
        println!("{}", p.offset);
    }
    Ok(())
}

/// `herald pub --grpc`: the same inputs, published with `Topics.Publish`.
async fn publish_grpc(args: PubArgs) -> anyhow::Result<()> {
    let client = args.conn.grpc(&args.url).await?;
    if args.binary {
        let mut body = Vec::new();
        tokio::io::stdin().read_to_end(&mut body).await.context("reading stdin")?;
        println!("{}", client.publish(&args.topic, pb::Kind::Binary, body).await?.offset);
        return Ok(());
    }
    let kind = if args.json { pb::Kind::Json } else { pb::Kind::Text };
    if let Some(message) = args.message {
        println!("{}", client.publish(&args.topic, kind, message).await?.offset);
        return Ok(());
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        println!("{}", client.publish(&args.topic, kind, line).await?.offset);
    }
    Ok(())
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
    let client = args.conn.http(&args.url)?;
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
    let client = args.conn.grpc(&args.url).await?;
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
