//! The `herald pub` and `herald sub` command lines against a real server: stdin lines
//! become text messages, one offset printed per line, over HTTP and over gRPC; `sub
//! --count` exits after that many; with no server, one error line that says each thing
//! once.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{start, Result};

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
