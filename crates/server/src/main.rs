//! `herald`: the broker (`herald serve`) and its command-line clients (`herald pub`,
//! `herald sub`, `herald topics`, `herald queues`, `herald enqueue`, `herald work`,
//! `herald bench`).

use std::io::IsTerminal;

use clap::{Parser, Subcommand};
use herald_server::cli::{EnqueueArgs, ListArgs, PubArgs, SubArgs};
use herald_server::config::{Config, ServeArgs};
use herald_server::work::WorkArgs;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Parser)]
#[command(name = "herald", version, about = "Herald: real-time pub/sub broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(Box<ServeArgs>),
    /// Publish a message (or each line of stdin) to a topic.
    Pub(PubArgs),
    /// Print each message of a topic, one a line.
    Sub(SubArgs),
    /// List the topics (name, last offset, subscribers).
    Topics(ListArgs),
    /// List the queues with their counts (ready, in flight, delayed, dead).
    Queues(ListArgs),
    /// Enqueue a job (or each line of stdin) into a queue; prints the message ids.
    Enqueue(EnqueueArgs),
    /// Run a command for each job of a queue: ack on exit 0, requeue otherwise.
    Work(WorkArgs),
    /// Load generators: throughput and latency against a running broker.
    #[command(subcommand)]
    Bench(herald_server::bench::BenchCommand),
    /// Print an argon2id hash of a password (read from stdin) for `password_hash`.
    Passwd,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let json = match std::env::var("HERALD_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => {
            eprintln!("herald: error: HERALD_LOG_FORMAT must be `text` or `json`, not `{other}`");
            return std::process::ExitCode::FAILURE;
        }
    };
    let telemetry = match herald_server::telemetry::init(json) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("herald: error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if telemetry.exporting() {
        tracing::info!("exporting traces over OTLP (OTEL_* variables)");
    }
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Pub(args) => herald_server::cli::publish(args).await,
        Command::Sub(args) => herald_server::cli::subscribe(args).await,
        Command::Topics(args) => herald_server::cli::topics(args).await,
        Command::Queues(args) => herald_server::cli::queues(args).await,
        Command::Enqueue(args) => herald_server::cli::enqueue(args).await,
        Command::Work(args) => herald_server::work::work(args).await,
        Command::Bench(command) => herald_server::bench::run(command).await,
        Command::Passwd => passwd(),
    };
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line, for operators; no backtrace.
            eprintln!("herald: error: {}", herald_server::cli::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `herald passwd`: reads one line (the password) from stdin, prints its hash.
fn passwd() -> anyhow::Result<()> {
    use anyhow::Context;
    if std::io::stdin().is_terminal() {
        eprintln!("password (input is shown; pipe it in to hide it):");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
    let password = line.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!password.is_empty(), "an empty password is not allowed");
    let hash = herald_auth::hash_password(password).map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
    println!("{hash}");
    Ok(())
}

async fn serve(args: Box<ServeArgs>) -> anyhow::Result<()> {
    // Listen for SIGTERM and SIGINT before anything else: one that arrives while the
    // port is bound or the store opened must still stop the server cleanly, rather than
    // kill it by the default action.
    let stop = StopSignals::install();
    // SIGHUP too, before the port is bound: its default action would end the process.
    let hangup = signal(SignalKind::hangup());
    let config = Config::load(&args)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    tracing::info!(listen = %config.listen, store = ?config.store, "starting");
    tracing::info!(config = %config.to_log_line(), "effective configuration");
    let server = herald_server::start(config).await?;
    match hangup {
        Ok(hangup) => {
            tokio::spawn(reload_on_hangup(hangup, server.auth_reloader(), *args));
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; [auth] reloads need a restart"),
    }
    server.run_until(stop.recv()).await
}

/// SIGHUP reloads the configuration's `[auth]` section (the TLS certificate watches
/// SIGHUP on its own). A configuration that does not load changes nothing.
async fn reload_on_hangup(mut hangup: Signal, reloader: herald_server::AuthReloader, args: ServeArgs) {
    while hangup.recv().await.is_some() {
        match Config::load(&args).and_then(|config| reloader.reload(config.auth.as_ref())) {
            Ok(()) => tracing::info!("SIGHUP: configuration reloaded"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: configuration not reloaded; nothing changed"),
        }
    }
}

/// SIGTERM and SIGINT, each caught from the moment [`StopSignals::install`] returns.
/// (`tokio::signal::ctrl_c` would only start listening when first polled.)
struct StopSignals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl StopSignals {
    fn install() -> Self {
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}; it will not stop the server cleanly");
                None
            }
        };
        Self { term: listen(SignalKind::terminate(), "SIGTERM"), int: listen(SignalKind::interrupt(), "SIGINT") }
    }

    /// Resolves at the first SIGTERM or SIGINT (also one that arrived before the call).
    async fn recv(mut self) {
        async fn next(signal: &mut Option<Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.term) => {}
            _ = next(&mut self.int) => {}
        }
    }
}
