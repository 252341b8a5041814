//! `herald work QUEUE -- COMMAND [ARGS...]`: a queue worker that runs COMMAND per job,
//! payload on stdin, extending the lease while it runs; exit 0 acks the job, anything
//! else requeues it (so `max_attempts` dead-letters repeat failures). The first SIGINT
//! or SIGTERM stops fetching and lets running commands finish, a second kills them
//! (each in a process group of its own) and requeues their jobs. Called by `main.rs`;
//! speaks to the server only through the client crate. Behaviour: docs/queues.md.

use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use herald_client::{Client, ClientError, FetchOptions, Job};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::cli::{Output, ServerArgs};

/// Longest a fetch waits for a job (the server's most).
const LONG_POLL: Duration = Duration::from_secs(20);
/// Longest lease the server grants (12 h).
const MAX_VISIBILITY_MS: u64 = 43_200_000;

/// Flags of `herald work`.
#[derive(Debug, Args)]
pub struct WorkArgs {
    /// Queue to take jobs from.
    pub queue: String,
    /// Jobs run at once (each by its own worker).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub concurrency: usize,
    /// Lease of each job; extended every third of it while the command runs.
    #[arg(long, value_name = "N", default_value_t = 30_000)]
    pub visibility_ms: u64,
    /// Exit after handling this many jobs (acked or requeued); without it, run until
    /// SIGINT or SIGTERM.
    #[arg(long, value_name = "N")]
    pub max_jobs: Option<u64>,
    /// How long a failed job waits before it is ready again.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub requeue_delay_ms: u64,
    /// Text: the commands' output as is, failures and a summary on stderr. Json: one
    /// JSON line per job handled on stdout, the commands' stdout sent to stderr.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The server and how to reach it.
    #[command(flatten)]
    pub server: ServerArgs,
    /// The command run for each job, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// How a job's command ended.
enum Ended {
    /// It exited, or was killed by a signal.
    Status(ExitStatus),
    /// It could not be started.
    SpawnFailed(std::io::Error),
}

impl Ended {
    fn succeeded(&self) -> bool {
        matches!(self, Ended::Status(s) if s.success())
    }

    fn describe(&self) -> String {
        use std::os::unix::process::ExitStatusExt;
        match self {
            Ended::Status(s) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(signal)) => format!("killed by signal {signal}"),
                (None, None) => s.to_string(),
            },
            Ended::SpawnFailed(e) => format!("could not start: {e}"),
        }
    }
}

/// Jobs handled, by how they were settled.
#[derive(Default)]
struct Tally {
    acked: u64,
    requeued: u64,
    /// The lease had ended (or the job was settled elsewhere): ack or requeue got 404.
    lost: u64,
    /// Ack or requeue failed otherwise (the server unreachable).
    errors: u64,
}

/// What every worker of one `herald work` shares.
struct Worker {
    client: Client,
    args: WorkArgs,
    /// Jobs that may still be fetched (`--max-jobs`), claimed before each fetch.
    budget: Option<AtomicU64>,
    tally: Mutex<Tally>,
    /// Cancelled at the first signal (or a fatal error): fetch no more.
    stop: CancellationToken,
    /// Cancelled at the second signal: kill the running commands.
    kill: CancellationToken,
}

impl Worker {
    /// Claims one job of the budget; false once it is spent.
    fn claim(&self) -> bool {
        match &self.budget {
            Some(left) => left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok(),
            None => true,
        }
    }

    /// Gives back a claim no job came for.
    fn unclaim(&self) {
        if let Some(left) = &self.budget {
            left.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn visibility(&self) -> Duration {
        Duration::from_millis(self.args.visibility_ms)
    }
}

/// Runs `herald work`.
pub async fn work(args: WorkArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=1000).contains(&args.concurrency), "--concurrency must be from 1 to 1000");
    anyhow::ensure!(
        (3..=MAX_VISIBILITY_MS).contains(&args.visibility_ms),
        "--visibility-ms must be from 3 to {MAX_VISIBILITY_MS}"
    );
    // Caught from before the first fetch, so no signal falls between.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let client = args.server.http()?;
    let worker = Arc::new(Worker {
        client,
        budget: args.max_jobs.map(AtomicU64::new),
        args,
        tally: Mutex::default(),
        stop: CancellationToken::new(),
        kill: CancellationToken::new(),
    });
    let signals = {
        let worker = worker.clone();
        async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            eprintln!("herald: stopping: running jobs finish first (signal again to kill them; they are requeued)");
            worker.stop.cancel();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            eprintln!("herald: killing the running jobs; they are requeued");
            worker.kill.cancel();
            // The workers settle the killed jobs and end; `all` finishes then.
            std::future::pending::<()>().await
        }
    };
    let workers: Vec<_> = (0..worker.args.concurrency).map(|_| tokio::spawn(run(worker.clone()))).collect();
    let all = async {
        let mut result = Ok(());
        for task in workers {
            let ended = task.await.map_err(anyhow::Error::from).and_then(|r| r);
            if result.is_ok() {
                result = ended;
            }
        }
        result
    };
    let result = tokio::select! {
        result = all => result,
        () = signals => unreachable!("the signal watch never ends"),
    };
    if worker.args.output == Output::Text {
        let t = match worker.tally.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        let handled = t.acked + t.requeued + t.lost + t.errors;
        let jobs = if handled == 1 { "job" } else { "jobs" };
        let mut summary = format!("herald: {handled} {jobs}: {} acked, {} requeued", t.acked, t.requeued);
        if t.lost > 0 {
            summary.push_str(&format!(", {} with their lease lost", t.lost));
        }
        if t.errors > 0 {
            summary.push_str(&format!(", {} not settled (errors)", t.errors));
        }
        eprintln!("{summary}");
    }
    result
}

/// Whether a fetch error ends `herald work` (the request itself is refused: a bad queue
/// name, missing rights) rather than being retried (the server down or busy).
fn fatal(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status, .. } if (400..500).contains(status) && *status != 429)
}

/// One worker: fetch a job, run it, settle it, until stopped or the budget is spent.
async fn run(worker: Arc<Worker>) -> anyhow::Result<()> {
    let queue = &worker.args.queue;
    let options = FetchOptions { max: 1, visibility: worker.visibility(), wait: LONG_POLL };
    while !worker.stop.is_cancelled() && worker.claim() {
        let fetched = tokio::select! {
            fetched = worker.client.fetch_jobs(queue, options) => fetched,
            () = worker.stop.cancelled() => {
                worker.unclaim();
                break;
            }
        };
        match fetched {
            Ok(jobs) => match jobs.into_iter().next() {
                Some(job) => handle(&worker, job).await?,
                None => worker.unclaim(),
            },
            Err(e) if fatal(&e) => {
                worker.unclaim();
                worker.stop.cancel();
                return Err(anyhow::Error::from(e).context(format!("fetching from {queue}")));
            }
            Err(e) => {
                worker.unclaim();
                eprintln!("herald: fetching from {queue} failed ({e}); retrying in 1 s");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = worker.stop.cancelled() => {}
                }
            }
        }
    }
    Ok(())
}

/// Runs the command for `job`, then acks or requeues it and reports the outcome.
async fn handle(worker: &Worker, job: Job) -> anyhow::Result<()> {
    let started = Instant::now();
    let ended = execute(worker, &job).await;
    let queue = &worker.args.queue;
    let (settled, verb) = if ended.succeeded() {
        (worker.client.ack(queue, &job).await, "acked")
    } else {
        let delay = Duration::from_millis(worker.args.requeue_delay_ms);
        (worker.client.requeue(queue, &job, delay).await, "requeued")
    };
    let (outcome, error) = match &settled {
        Ok(()) => (verb, None),
        Err(ClientError::Api { status: 404, .. }) => ("lost", None),
        Err(e) => ("error", Some(e.to_string())),
    };
    {
        let mut tally = match worker.tally.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        match outcome {
            "acked" => tally.acked += 1,
            "requeued" => tally.requeued += 1,
            "lost" => tally.lost += 1,
            _ => tally.errors += 1,
        }
    }
    match worker.args.output {
        Output::Json => {
            use std::os::unix::process::ExitStatusExt;
            let (exit, signal, spawn_error) = match &ended {
                Ended::Status(s) => (s.code(), s.signal(), None),
                Ended::SpawnFailed(e) => (None, None, Some(e.to_string())),
            };
            let line = serde_json::json!({
                "queue": queue,
                "message_id": job.message_id,
                "attempt": job.attempt,
                "id": job.id,
                "outcome": outcome,
                "exit": exit,
                "signal": signal,
                "error": spawn_error.or(error),
                "ms": started.elapsed().as_millis() as u64,
            });
            println!("{line}");
        }
        Output::Text if outcome != "acked" => {
            let why = error.map(|e| format!(" ({e})")).unwrap_or_default();
            let what = match outcome {
                "lost" => "not settled: its lease had ended",
                "error" => "not settled",
                other => other,
            };
            eprintln!("herald: job {} (attempt {}): {}; {what}{why}", job.message_id, job.attempt, ended.describe());
        }
        Output::Text => {}
    }
    Ok(())
}

/// Runs the command with the job's payload on stdin, extending the lease while it runs;
/// kills it at the second signal.
async fn execute(worker: &Worker, job: &Job) -> Ended {
    let args = &worker.args;
    let mut command = tokio::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("HERALD_QUEUE", &args.queue)
        .env("HERALD_DELIVERY_ID", &job.id)
        .env("HERALD_ATTEMPT", job.attempt.to_string())
        .env("HERALD_MESSAGE_ID", job.message_id.to_string())
        .stdin(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group: a terminal's Ctrl-C goes to herald, not to the jobs.
        .process_group(0)
        .kill_on_drop(true);
    match args.output {
        Output::Text => command.stdout(Stdio::inherit()),
        // stdout carries the outcome lines only.
        Output::Json => command.stdout(Stdio::from(std::io::stderr())),
    };
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return Ended::SpawnFailed(e),
    };
    let payload = job.payload.to_bytes();
    let stdin = child.stdin.take();
    // Written while the command runs (it may read as it goes); a command that does not
    // read it all just ends the write (a broken pipe is not its failure).
    let feed = async move {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(&payload).await;
        }
    };
    tokio::pin!(feed);
    let mut fed = false;
    let period = worker.visibility() / 3;
    let mut extend = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut killed = false;
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(status) => Ended::Status(status),
                    Err(e) => Ended::SpawnFailed(e),
                };
            }
            () = &mut feed, if !fed => fed = true,
            _ = extend.tick() => {
                if let Err(e) = worker.client.extend(&args.queue, job, worker.visibility()).await {
                    eprintln!("herald: job {}: extending its lease failed: {e}", job.message_id);
                }
            }
            () = worker.kill.cancelled(), if !killed => {
                killed = true;
                kill_group(&mut child, job).await;
            }
        }
    }
}

/// SIGKILL to the command's process group (it leads one of its own), so that what it
/// started (a shell's children) dies with it. Through kill(1): the workspace forbids the
/// `unsafe` a direct kill(2) needs. If that fails, the command alone.
async fn kill_group(child: &mut tokio::process::Child, job: &Job) {
    if let Some(pid) = child.id() {
        let group = format!("-{pid}");
        let killed = tokio::process::Command::new("kill").args(["-KILL", "--", &group]).status().await;
        if killed.is_ok_and(|status| status.success()) {
            return;
        }
    }
    if let Err(e) = child.start_kill() {
        eprintln!("herald: job {}: could not kill its command: {e}", job.message_id);
    }
}
