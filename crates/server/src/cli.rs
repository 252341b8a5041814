//! The client subcommands: `herald pub` and `herald sub`, built on the client crate.

use std::io::{BufRead, Read, Write};

use anyhow::Context;
use clap::Args;
use herald_client::{Client, Event, StartFrom};

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
    /// Server URL.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
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
    /// Server URL.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7070")]
    pub url: String,
}

/// Runs `herald pub`.
pub async fn publish(args: PubArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.url);
    let content_type = if args.json { "application/json" } else { "text/plain; charset=utf-8" };
    if args.binary {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body).context("reading stdin")?;
        let p = client.publish(&args.topic, "application/octet-stream", body).await?;
        println!("{}", p.offset);
        return Ok(());
    }
    if let Some(message) = args.message {
        let p = client.publish(&args.topic, content_type, message).await?;
        println!("{}", p.offset);
        return Ok(());
    }
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        let p = client.publish(&args.topic, content_type, line).await?;
        println!("{}", p.offset);
    }
    Ok(())
}

/// Runs `herald sub` until interrupted, reconnecting and resuming as needed.
pub async fn subscribe(args: SubArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.url);
    let mut subscription = client.subscribe(&args.topic, args.from);
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = subscription.next().await {
        match event {
            Event::Message(m) if args.offsets => writeln!(stdout, "{}\t{}", m.offset, m.payload.to_line())?,
            Event::Message(m) => writeln!(stdout, "{}", m.payload.to_line())?,
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
