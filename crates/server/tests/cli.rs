//! The command-line clients against a real server: `herald pub` (stdin lines become
//! text messages, one offset printed per line, over HTTP and over gRPC; `-o json`),
//! `herald sub --count`, `herald topics` and `herald queues` (tables and `-o json`,
//! paged through), `herald enqueue`, and `herald work` (ack on exit 0, requeue on
//! failure until the dead-letter queue, lease extension, signals); with no server, one
//! error line that says each thing once.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{start, Result};
use herald_client::{FetchOptions, Payload};
use serde_json::{json, Value};

fn herald_pub(url: &str, extra: &[&str], stdin: &str) -> Result<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["pub", "--url", url, "lines"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or("stdin")?.write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    assert!(out.status.success(), "herald pub failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn pub_publishes_each_stdin_line_and_prints_its_offset() -> Result {
    let server = start(|_| {}).await?;
    let url = server.url.clone();
    let printed = tokio::task::spawn_blocking(move || -> Result<(String, String)> {
        Ok((herald_pub(&url, &[], "one\ntwo\nthree\n")?, herald_pub(&url, &["--grpc"], "four\nfive\n")?))
    })
    .await??;
    assert_eq!(printed.0, "1\n2\n3\n");
    assert_eq!(printed.1, "4\n5\n");
    let (_, page) = server.get_json("/v1/topics/lines/messages?from=0").await?;
    let data: Vec<&str> =
        page["messages"].as_array().ok_or("messages")?.iter().filter_map(|m| m["data"].as_str()).collect();
    assert_eq!(data, ["one", "two", "three", "four", "five"], "text messages, in order");
    Ok(())
}

#[test]
fn with_the_server_down_pub_prints_its_error_once() -> Result {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    for (extra, repeated) in [(None, "error sending request"), (Some("--grpc"), "tcp connect error")] {
        let out = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["pub", "--url", &url, "news", "hello"])
            .args(extra)
            .output()?;
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8(out.stderr)?;
        assert!(stderr.starts_with("herald: error: ") && stderr.ends_with('\n'), "{stderr:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
        assert_eq!(stderr.matches(repeated).count(), 1, "{stderr:?}");
        assert!(stderr.contains("Connection refused"), "{stderr:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sub_with_count_prints_that_many_messages_and_exits() -> Result {
    let server = start(|_| {}).await?;
    for text in ["one", "two", "three"] {
        server.client().publish_text("counted", text).await?;
    }
    let url = server.url.clone();
    let printed = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let mut printed = Vec::new();
        for extra in [None, Some("--grpc")] {
            let out = Command::new(env!("CARGO_BIN_EXE_herald"))
                .args(["sub", "--url", &url, "counted", "--from", "earliest", "--offsets", "--count", "2"])
                .args(extra)
                .output()?;
            assert!(out.status.success(), "herald sub failed: {}", String::from_utf8_lossy(&out.stderr));
            printed.push(String::from_utf8(out.stdout)?);
        }
        Ok(printed)
    });
    let printed = common::within(std::time::Duration::from_secs(20), "herald sub --count", printed).await???;
    assert_eq!(printed, ["1\tone\n2\ttwo\n", "1\tone\n2\ttwo\n"]);
    Ok(())
}

/// Runs `herald ARGS` with `stdin`, waits for it (within 120 s, off the test's runtime).
async fn herald(args: &[&str], stdin: &str) -> Result<Output> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.to_owned();
    let what = format!("herald {}", args.join(" "));
    let run = tokio::task::spawn_blocking(move || -> Result<Output> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().ok_or("stdin")?.write_all(stdin.as_bytes())?;
        Ok(child.wait_with_output()?)
    });
    common::within(Duration::from_secs(120), &what, run).await??
}

/// [`herald`], which must succeed; its stdout.
async fn herald_ok(args: &[&str], stdin: &str) -> Result<String> {
    let out = herald(args, stdin).await?;
    assert!(out.status.success(), "herald {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

fn json_lines(text: &str) -> Result<Vec<Value>> {
    Ok(text.lines().map(serde_json::from_str).collect::<std::result::Result<_, _>>()?)
}

/// A directory of the test's own under the system's temporary directory.
fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("herald-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn pub_and_enqueue_print_json_lines_with_output_json() -> Result {
    let server = start(|_| {}).await?;
    let url = server.url.as_str();
    // --json is the kind of what is sent; -o json the format of what is printed.
    let printed = herald_ok(&["pub", "--url", url, "prices", "--json", "-o", "json", r#"{"p":1}"#], "").await?;
    let lines = json_lines(&printed)?;
    assert_eq!((lines.len(), &lines[0]["topic"], &lines[0]["offset"]), (1, &json!("prices"), &json!(1)));
    assert!(lines[0]["ts"].as_u64().is_some_and(|ts| ts > 1_700_000_000_000), "{printed}");
    let printed = herald_ok(&["pub", "--url", url, "prices", "--grpc", "--output", "json"], "a\nb\n").await?;
    let offsets: Vec<Value> = json_lines(&printed)?.iter().map(|l| l["offset"].clone()).collect();
    assert_eq!(offsets, [json!(2), json!(3)]);

    assert_eq!(herald_ok(&["enqueue", "--url", url, "jobs"], "one\ntwo\n").await?, "1\n2\n");
    let printed = herald_ok(&["enqueue", "--url", url, "jobs", "--json", r#"{"n":3}"#, "-o", "json"], "").await?;
    assert_eq!(json_lines(&printed)?, [json!({"queue": "jobs", "message_id": 3})]);
    assert_eq!(herald_ok(&["enqueue", "--url", url, "jobs", "later", "--delay-ms", "60000"], "").await?, "4\n");
    assert_eq!(herald_ok(&["enqueue", "--url", url, "jobs", "--binary"], "\u{0}\u{1}").await?, "5\n");
    let client = server.client();
    let stats = client.queue_stats("jobs").await?;
    assert_eq!((stats.ready, stats.delayed), (4, 1));
    let jobs = client.fetch_jobs("jobs", FetchOptions { max: 10, ..FetchOptions::default() }).await?;
    let payloads: Vec<Vec<u8>> = jobs.iter().map(|j| j.payload.to_bytes()).collect();
    assert_eq!(payloads, [b"one".to_vec(), b"two".to_vec(), br#"{"n":3}"#.to_vec(), vec![0, 1]]);
    let out = herald(&["enqueue", "--url", url, "jobs.dlq", "x"], "").await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)?.contains("invalid_name"));
    Ok(())
}

/// Piped stdin goes in batch requests: every line a job, ids printed in line order,
/// kinds kept; a batch the server refuses names its lines and stores nothing of it.
#[tokio::test(flavor = "multi_thread")]
async fn enqueue_sends_piped_lines_in_batches() -> Result {
    let server = start(|_| {}).await?;
    let url = server.url.as_str();
    let lines: String = (1..=2500).map(|i| format!("line {i}\n")).collect();
    let printed = herald_ok(&["enqueue", "--url", url, "bulk"], &lines).await?;
    let want: String = (1..=2500).map(|i| format!("{i}\n")).collect();
    assert_eq!(printed, want, "one id per line, in order");
    let client = server.client();
    let jobs = client.fetch_jobs("bulk", FetchOptions { max: 2, ..FetchOptions::default() }).await?;
    let got: Vec<&Payload> = jobs.iter().map(|j| &j.payload).collect();
    assert_eq!(got, [&Payload::Json(r#""line 1""#.into()), &Payload::Json(r#""line 2""#.into())], "text jobs");
    assert_eq!(client.queue_stats("bulk").await?.ready, 2498);
    // The client's ack with the next fetch: an outcome per job, in order.
    let mut stale = jobs[0].clone();
    stale.id = "1-1-stale".into();
    let done = [jobs[0].clone(), stale, jobs[1].clone()];
    let (acks, next) = client.ack_and_fetch("bulk", &done, FetchOptions::default()).await?;
    let codes: Vec<Option<&str>> = acks.iter().map(|a| a.as_ref().err().map(|e| e.code.as_str())).collect();
    assert_eq!(codes, [None, Some("not_found"), None]);
    assert_eq!(next.iter().map(|j| &j.payload).collect::<Vec<_>>(), [&Payload::Json(r#""line 3""#.into())]);
    let stats = client.queue_stats("bulk").await?;
    assert_eq!((stats.ready, stats.in_flight), (2497, 1));

    let out = herald(&["enqueue", "--url", url, "strict", "--json"], "{\"a\":1}\n{\"b\":2}\nnot json\n").await?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr)?;
    assert!(stderr.contains("bad_request") && stderr.contains("line"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_and_queues_print_tables_and_json() -> Result {
    let server = start(|_| {}).await?;
    let client = server.client();
    for (topic, text) in [("news", "a"), ("news", "b"), ("news", "c"), ("alerts", "x")] {
        client.publish_text(topic, text).await?;
    }
    client.enqueue("jobs", "text/plain", "a", Duration::ZERO).await?;
    client.enqueue("jobs", "text/plain", "b", Duration::from_secs(60)).await?;
    client.enqueue("mail", "text/plain", "c", Duration::ZERO).await?;
    let url = server.url.as_str();
    let table = herald_ok(&["topics", "--url", url], "").await?;
    assert_eq!(
        table,
        "TOPIC   LAST  SUBSCRIBERS  PUBLISHERS\nalerts     1            0           0\nnews       3            0           0\n"
    );
    let printed = herald_ok(&["topics", "--url", url, "--prefix", "ne", "-o", "json"], "").await?;
    assert_eq!(
        serde_json::from_str::<Value>(&printed)?,
        json!([{"topic": "news", "last": 3, "subscribers": 0, "publishers": 0}])
    );
    let table = herald_ok(&["queues", "--url", url], "").await?;
    assert_eq!(
        table,
        "QUEUE  READY  IN_FLIGHT  DELAYED  DEAD\njobs       1          0        1     0\nmail       1          0        0     0\n"
    );
    let printed = herald_ok(&["queues", "--url", url, "-o", "json", "--prefix", "j"], "").await?;
    let want = json!([{"queue": "jobs", "ready": 1, "in_flight": 0, "delayed": 1, "dead": 0}]);
    assert_eq!(serde_json::from_str::<Value>(&printed)?, want);
    assert_eq!(
        herald_ok(&["queues", "--url", url, "--prefix", "none"], "").await?,
        "QUEUE  READY  IN_FLIGHT  DELAYED  DEAD\n"
    );
    assert_eq!(herald_ok(&["topics", "--url", url, "--prefix", "none", "-o", "json"], "").await?, "[]\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_and_queues_page_through_more_than_one_page() -> Result {
    let server = start(|_| {}).await?;
    let client = server.client();
    let names: Vec<String> = (0..1005).map(|i| format!("many.{i:04}")).collect();
    for name in &names {
        client.publish_text(name, "x").await?;
        client.enqueue(name, "text/plain", "x", Duration::ZERO).await?;
    }
    let url = server.url.as_str();
    for command in ["topics", "queues"] {
        let printed = herald_ok(&[command, "--url", url, "-o", "json"], "").await?;
        let listed: Vec<Value> = serde_json::from_str(&printed)?;
        let key = if command == "topics" { "topic" } else { "queue" };
        let got: Vec<&str> = listed.iter().filter_map(|t| t[key].as_str()).collect();
        assert_eq!(got, names, "{command}: every name once, in order");
    }
    Ok(())
}

/// The counts of `queue`.
async fn stats(server: &common::TestServer, queue: &str) -> Result<herald_client::QueueStats> {
    Ok(server.client().queue_stats(queue).await?)
}

/// A worker command: reads the payload, fails (exit 1) on `fail-*` jobs always, on
/// `flaky-*` jobs at their first attempt (killed by SIGKILL for `kill-*`), and appends
/// every other payload to `$OUT` on success.
const WORKER: &str = r#"p=$(cat)
case "$p" in
  fail-*) exit 1 ;;
  flaky-*) [ "$HERALD_ATTEMPT" = 1 ] && exit 3 ;;
  kill-*) [ "$HERALD_ATTEMPT" = 1 ] && kill -KILL $$ ;;
esac
[ "$HERALD_QUEUE" = jobs ] || exit 4
printf '%s\n' "$p" >> "$OUT""#;

#[tokio::test(flavor = "multi_thread")]
async fn work_acks_successes_once_and_dead_letters_repeated_failures() -> Result {
    let server = start(|c| c.broker.queues.max_attempts = 3).await?;
    let dir = scratch("work")?;
    let out = dir.join("done.txt");
    // 1000 jobs: 850 succeed at once, 50 fail their first attempt, 50 are killed at
    // their first attempt, 50 always fail.
    let mut jobs = String::new();
    let mut succeed = BTreeSet::new();
    let mut fail = BTreeSet::new();
    for i in 0..1000 {
        let payload = match i % 20 {
            0 => format!("fail-{i}"),
            1 => format!("flaky-{i}"),
            2 => format!("kill-{i}"),
            _ => format!("ok-{i}"),
        };
        if payload.starts_with("fail") {
            fail.insert(payload.clone());
        } else {
            succeed.insert(payload.clone());
        }
        jobs.push_str(&payload);
        jobs.push('\n');
    }
    let url = server.url.as_str();
    let ids = herald_ok(&["enqueue", "--url", url, "jobs"], &jobs).await?;
    assert_eq!(ids.lines().count(), 1000);
    // Deliveries: 950 successes, 100 first attempts that failed, 50 x 3 that always fail.
    let handled = 950 + 100 + 150;
    let env_out = out.to_str().ok_or("path")?.to_owned();
    let command = format!("OUT='{env_out}'; {WORKER}");
    let printed = herald_ok(
        &[
            "work",
            "jobs",
            "--url",
            url,
            "--concurrency",
            "8",
            "--max-jobs",
            &handled.to_string(),
            "-o",
            "json",
            "--",
            "sh",
            "-c",
            &command,
        ],
        "",
    )
    .await?;
    let outcomes = json_lines(&printed)?;
    assert_eq!(outcomes.len(), handled, "one JSON line per job handled");
    let count = |outcome: &str| outcomes.iter().filter(|o| o["outcome"] == outcome).count();
    assert_eq!((count("acked"), count("requeued")), (950, 250));
    let killed = outcomes.iter().filter(|o| o["signal"] == 9).count();
    assert_eq!(killed, 50, "the kill-* jobs' first attempts");
    assert!(outcomes.iter().all(|o| o["queue"] == "jobs" && o["id"].is_string() && o["ms"].is_u64()));

    // Each success appended exactly once; the always failing ones in the DLQ.
    let done = std::fs::read_to_string(&out)?;
    let lines: Vec<&str> = done.lines().collect();
    let unique: BTreeSet<String> = lines.iter().map(|l| l.to_string()).collect();
    assert_eq!(lines.len(), unique.len(), "no job done twice");
    assert_eq!(unique, succeed);
    let s = stats(&server, "jobs").await?;
    assert_eq!((s.ready, s.in_flight, s.delayed, s.dead), (0, 0, 0, 50));
    let dead = server.client().fetch_jobs("jobs.dlq", FetchOptions { max: 100, ..FetchOptions::default() }).await?;
    let dead: BTreeSet<String> = dead.iter().map(|j| j.payload.to_line()).collect();
    assert_eq!(dead, fail);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn work_extends_a_long_jobs_lease_and_requeues_what_cannot_start() -> Result {
    let server = start(|_| {}).await?;
    let client = server.client();
    client.enqueue("slow", "text/plain", "s", Duration::ZERO).await?;
    let url = server.url.as_str();
    // A 300 ms lease, a 1 s job: acked on its first attempt thanks to the extensions.
    let printed = herald_ok(
        &[
            "work",
            "slow",
            "--url",
            url,
            "--visibility-ms",
            "300",
            "--max-jobs",
            "1",
            "-o",
            "json",
            "--",
            "sh",
            "-c",
            "cat >/dev/null; sleep 1",
        ],
        "",
    )
    .await?;
    let outcome = json_lines(&printed)?;
    assert_eq!(
        (&outcome[0]["outcome"], &outcome[0]["attempt"], &outcome[0]["exit"]),
        (&json!("acked"), &json!(1), &json!(0))
    );
    assert!(outcome[0]["ms"].as_u64().is_some_and(|ms| ms >= 1000), "{printed}");
    let s = stats(&server, "slow").await?;
    assert_eq!((s.ready, s.in_flight), (0, 0));

    client.enqueue("broken", "text/plain", "b", Duration::ZERO).await?;
    let out = herald(&["work", "broken", "--url", url, "--max-jobs", "1", "--", "/nonexistent/command"], "").await?;
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr)?;
    assert!(stderr.contains("herald: job 1 (attempt 1): could not start"), "{stderr}");
    assert!(stderr.ends_with("herald: 1 job: 0 acked, 1 requeued\n"), "{stderr}");
    assert_eq!(stats(&server, "broken").await?.ready, 1, "requeued");
    Ok(())
}

/// Sends `signal` (a `kill` option: TERM, INT) to the process `pid`.
fn send_signal(pid: u32, signal: &str) -> Result {
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status()?;
    assert!(status.success(), "kill -{signal} {pid}");
    Ok(())
}

/// Waits until `path` exists: the job's command is running.
async fn started(path: &Path) -> Result {
    common::eventually(Duration::from_secs(20), "the job's command started", || async { Ok(path.exists()) }).await
}

#[tokio::test(flavor = "multi_thread")]
async fn work_finishes_running_jobs_at_a_signal_and_kills_them_at_a_second() -> Result {
    let server = start(|_| {}).await?;
    let client = server.client();
    let dir = scratch("signals")?;
    let url = server.url.clone();
    for (round, signals) in [(1, &["TERM"][..]), (2, &["INT", "TERM"][..])] {
        let queue = format!("signals{round}");
        client.enqueue(&queue, "text/plain", "job", Duration::ZERO).await?;
        let flag = dir.join(format!("started{round}"));
        // Runs 2 s after it signals its start (no sleep in the test: it awaits the flag).
        let script = format!("cat >/dev/null; touch '{}'; sleep 2", flag.display());
        let child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["work", &queue, "--url", &url, "-o", "json", "--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        started(&flag).await?;
        for signal in signals {
            send_signal(child.id(), signal)?;
        }
        let out = common::within(
            Duration::from_secs(20),
            "herald work stopped",
            tokio::task::spawn_blocking(move || child.wait_with_output()),
        )
        .await???;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let outcome = json_lines(&String::from_utf8(out.stdout)?)?;
        let s = stats(&server, &queue).await?;
        if round == 1 {
            assert_eq!((&outcome[0]["outcome"], &outcome[0]["exit"]), (&json!("acked"), &json!(0)), "finished");
            assert_eq!((s.ready, s.in_flight), (0, 0));
        } else {
            assert_eq!((&outcome[0]["outcome"], &outcome[0]["signal"]), (&json!("requeued"), &json!(9)), "killed");
            assert_eq!((s.ready, s.in_flight), (1, 0));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
