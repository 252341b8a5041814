//! The shell examples of README.md, ARCHITECTURE.md and docs/*.md, run as written: each
//! ` ```sh ` block against a fresh `herald serve` (the real binary, on a free port, with
//! the default disk store in a new directory), its output compared with what the block
//! shows. An example that changes fails this test until its block is updated.
//!
//! How a block reads: runs of command lines, each followed by the `# ` comment lines
//! that show its output (no blank line between; no such comment: it prints nothing). A
//! comment after a blank line, or at the top, is prose. The whole block runs as one
//! `bash` script with stderr joined to stdout, so variables carry from one command to
//! the next; every run of commands must exit 0. `herald` is the binary under test (its
//! directory first on `PATH`, `HERALD_URL` set) and `127.0.0.1:7070` stands for the
//! server's address. Epochs, timestamps and delivery ids are masked on both sides.
//!
//! A block that cannot run here (it starts a broker, streams until Ctrl-C, prints
//! timings) has `<!-- not run: why -->` on the line before it.
//!
//! Tools the blocks use: curl, jq, websocat, grpcurl. A block that needs a missing one
//! fails when `HERALD_DOC_TESTS_NEED_TOOLS=1` (`.ci/run` sets it, after installing
//! them); otherwise it is reported on stderr and left out, so that `cargo test` works
//! without them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{spawn_herald, Result};

/// The address the docs use; replaced by the test server's.
const DOC_ADDR: &str = "127.0.0.1:7070";

/// Printed after each run of commands, with its exit status.
const MARK: &str = "@@doc-step@@ ";

/// Each block's time limit (a block that waits for something that never comes).
const BLOCK_TIMEOUT_SECS: &str = "30";

const TOOLS: [&str; 4] = ["curl", "jq", "websocat", "grpcurl"];

/// A shell block of a markdown file.
#[derive(Debug)]
struct Block {
    file: String,
    /// `file:line` of the opening fence.
    at: String,
    steps: Vec<Step>,
    /// Why it is not run, from its `<!-- not run: ... -->` line.
    not_run: Option<String>,
}

/// Commands and the output shown after them.
#[derive(Debug, Default)]
struct Step {
    line: usize,
    code: String,
    expected: Vec<String>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// README.md, ARCHITECTURE.md and every docs/*.md, by path from the workspace root.
fn doc_files() -> Result<Vec<String>> {
    let mut files = vec!["README.md".to_owned(), "ARCHITECTURE.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(workspace().join("docs"))?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    files.extend(docs);
    Ok(files)
}

/// The fenced blocks of `text` with one of `infos` as their info string, with the
/// trimmed line before each fence and the 1-based line of the fence.
fn fenced<'a>(text: &'a str, file: &str, infos: &[&str]) -> Result<Vec<(usize, &'a str, Vec<&'a str>)>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].starts_with("```"))
            .ok_or_else(|| format!("{file}:{}: a code block that is not closed", i + 1))?;
        if infos.contains(&info.trim()) {
            let before = if i > 0 { lines[i - 1].trim() } else { "" };
            out.push((i + 1, before, lines[i + 1..end].to_vec()));
        }
        i = end + 1;
    }
    Ok(out)
}

fn parse(file: &str, text: &str) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    for (line, before, body) in fenced(text, file, &["sh", "bash", "shell", "console"])? {
        let at = format!("{file}:{line}");
        let not_run = before.strip_prefix("<!-- not run:").and_then(|r| r.strip_suffix("-->")).map(|r| r.trim());
        if not_run == Some("") {
            return Err(format!("{at}: `<!-- not run: -->` needs a reason").into());
        }
        let not_run = not_run.map(str::to_owned);
        blocks.push(Block { file: file.to_owned(), at, steps: steps(&body, line + 1), not_run });
    }
    Ok(blocks)
}

/// Splits a block's lines (the first is line `first` of the file) into steps.
fn steps(body: &[&str], first: usize) -> Vec<Step> {
    #[derive(PartialEq)]
    enum After {
        Prose,
        Code,
        Output,
    }
    let mut steps: Vec<Step> = Vec::new();
    let mut after = After::Prose;
    for (k, line) in body.iter().enumerate() {
        if line.trim().is_empty() {
            after = After::Prose;
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if after != After::Prose {
                if let Some(step) = steps.last_mut() {
                    step.expected.push(comment.strip_prefix(' ').unwrap_or(comment).to_owned());
                }
                after = After::Output;
            }
            continue;
        }
        match (after, steps.last_mut()) {
            (After::Code, Some(step)) => {
                step.code.push('\n');
                step.code.push_str(line);
            }
            _ => steps.push(Step { line: first + k, code: (*line).to_owned(), expected: Vec::new() }),
        }
        after = After::Code;
    }
    steps
}

/// Replaces the values of `"epoch"`, `"ts"` and string `"id"` keys (delivery ids; the
/// JSON protocol's request ids are numbers and stay), with or without a space after the
/// colon as grpcurl prints them.
fn mask(line: &str) -> String {
    let mut out = line.to_owned();
    for (key, strings_only) in [("epoch", true), ("ts", false), ("id", true)] {
        let mut from = 0;
        let pattern = format!("\"{key}\":");
        while let Some(found) = out[from..].find(&pattern) {
            let start = from + found + pattern.len();
            let value_at = start + out[start..].len() - out[start..].trim_start().len();
            let rest = &out[value_at..];
            let len = if let Some(quoted) = rest.strip_prefix('"') {
                quoted.find('"').map(|end| end + 2)
            } else if !strings_only {
                Some(rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len()))
            } else {
                None
            };
            match len {
                Some(len) if len > 0 => {
                    let quoted = rest.starts_with('"');
                    let masked = if quoted { format!("\"<{key}>\"") } else { format!("<{key}>") };
                    out.replace_range(value_at..value_at + len, &masked);
                    from = value_at + masked.len();
                }
                _ => from = start,
            }
        }
    }
    out
}

/// Whether `tool` is an executable on `PATH`.
fn installed(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// The tools of [`TOOLS`] a block's commands name.
fn tools_named(block: &Block) -> Vec<&'static str> {
    let words: Vec<&str> = block
        .steps
        .iter()
        .flat_map(|s| s.code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')))
        .collect();
    TOOLS.into_iter().filter(|tool| words.contains(tool)).collect()
}

/// What happened to one block.
enum Outcome {
    Passed,
    /// Left out: these tools are missing.
    Missing(Vec<&'static str>),
    Failed(String),
}

/// Runs `block` against a fresh server; `tmp` is a directory of its own.
fn run_block(block: &Block, tmp: &Path) -> Result<Outcome> {
    let missing: Vec<&str> = tools_named(block).into_iter().filter(|t| !installed(t)).collect();
    if !missing.is_empty() {
        if std::env::var("HERALD_DOC_TESTS_NEED_TOOLS").is_ok_and(|v| v == "1") {
            return Ok(Outcome::Failed(format!("{}: needs {} (not installed)", block.at, missing.join(", "))));
        }
        return Ok(Outcome::Missing(missing));
    }
    let _ = std::fs::remove_dir_all(tmp);
    let work = tmp.join("work");
    std::fs::create_dir_all(&work)?;
    let data_dir = tmp.join("data").to_string_lossy().into_owned();
    let (server, url) = spawn_herald(&["--data-dir", &data_dir])?;
    let addr = url.trim_start_matches("http://").to_owned();

    let mut script = String::from("exec 2>&1\n");
    for step in &block.steps {
        script.push_str(&step.code.replace(DOC_ADDR, &addr));
        script.push_str(&format!("\nprintf '\\n{MARK}%s\\n' \"$?\"\n"));
    }
    let herald = Path::new(env!("CARGO_BIN_EXE_herald")).parent().ok_or("the herald binary's directory")?;
    let path = std::env::join_paths(
        std::iter::once(herald.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    // `timeout` runs bash in a process group of its own and signals the whole group, so
    // a hung websocat or curl goes too.
    let out = Command::new("timeout")
        .args(["-k", "5", BLOCK_TIMEOUT_SECS, "bash", "-c", &script])
        .current_dir(&work)
        .env("PATH", path)
        .env("HERALD_URL", &url)
        .stdin(Stdio::null())
        .output()?;
    drop(server);
    let printed = String::from_utf8_lossy(&out.stdout).replace(&addr, DOC_ADDR);
    let _ = std::fs::remove_dir_all(tmp);
    Ok(compare(block, &printed, out.status.code()))
}

/// Checks what a block printed, step by step; reports every step that differs.
fn compare(block: &Block, printed: &str, status: Option<i32>) -> Outcome {
    let file = &block.file;
    let shown = |lines: &[String]| lines.iter().map(|l| format!("    # {l}\n")).collect::<String>();
    let mut failures = Vec::new();
    let mut rest = printed;
    for step in &block.steps {
        let command = step.code.lines().next().unwrap_or_default();
        let Some(pos) = rest.find(&format!("\n{MARK}")) else {
            let why = if status == Some(124) { "timed out".to_owned() } else { format!("bash ended ({status:?})") };
            let lines: Vec<String> = rest.lines().map(str::to_owned).collect();
            failures.push(format!(
                "{file}:{}: `{command}`: {why} before the end of this step; it printed:\n{}",
                step.line,
                shown(&lines)
            ));
            break;
        };
        let (output, after) = (&rest[..pos], &rest[pos + 1 + MARK.len()..]);
        let (code, next) = after.split_once('\n').unwrap_or((after, ""));
        rest = next;
        let output = output.strip_suffix('\n').unwrap_or(output);
        let actual: Vec<String> =
            if output.is_empty() { Vec::new() } else { output.split('\n').map(str::to_owned).collect() };
        if code != "0" {
            failures.push(format!(
                "{file}:{}: `{command}` exited with {code}; it printed:\n{}",
                step.line,
                shown(&actual)
            ));
            continue;
        }
        // Trailing blanks aside (grpcurl prints some; editors drop them from docs).
        let masked = |lines: &[String]| lines.iter().map(|l| mask(l.trim_end())).collect::<Vec<_>>();
        if masked(&actual) != masked(&step.expected) {
            failures.push(format!(
                "{file}:{}: `{command}` printed something else (epochs, ts and ids masked).\n  shown:\n{}  printed:\n{}",
                step.line,
                shown(&step.expected),
                shown(&actual)
            ));
        }
    }
    if !rest.is_empty() && failures.is_empty() {
        // Something the block left running (a background job) printed after its end.
        let lines: Vec<String> = rest.lines().map(str::to_owned).collect();
        failures.push(format!("{}: printed after its last command:\n{}", block.at, shown(&lines)));
    }
    if failures.is_empty() {
        Outcome::Passed
    } else {
        Outcome::Failed(failures.join("\n"))
    }
}

/// Runs every block of `files` that is not marked not run; fails listing every failure.
fn run_files(files: &[String], tag: &str) -> Result {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("docs-{tag}-{}", std::process::id()));
    let mut failures = Vec::new();
    let mut ran = 0;
    for file in files {
        let text = std::fs::read_to_string(workspace().join(file))?;
        for (n, block) in parse(file, &text)?.iter().enumerate() {
            if let Some(why) = &block.not_run {
                eprintln!("{}: not run: {why}", block.at);
                continue;
            }
            match run_block(block, &tmp.join(n.to_string()))? {
                Outcome::Passed => ran += 1,
                Outcome::Missing(tools) => {
                    eprintln!("{}: NOT RUN: {} not installed (CI installs them: .ci/run)", block.at, tools.join(", "))
                }
                Outcome::Failed(why) => failures.push(why),
            }
        }
    }
    eprintln!("{tag}: {ran} blocks ran as written");
    if !failures.is_empty() {
        // On stderr as is: the error's Debug form would escape every newline.
        eprintln!("\n{}", failures.join("\n\n"));
        return Err(format!(
            "{} doc block(s) failed, above; what they printed is in `# ` form, to paste",
            failures.len()
        )
        .into());
    }
    Ok(())
}

#[test]
fn readme_examples_run_as_written() -> Result {
    run_files(&["README.md".to_owned()], "readme")
}

#[test]
fn docs_examples_run_as_written() -> Result {
    let files: Vec<String> = doc_files()?.into_iter().filter(|f| f != "README.md").collect();
    run_files(&files, "docs")
}

#[test]
fn an_example_whose_output_changed_fails() -> Result {
    let doc = "```sh\nherald pub t hello\n# 1\nherald pub t again\n# 1\n```\n";
    let blocks = parse("test.md", doc)?;
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("docs-changed-{}", std::process::id()));
    match run_block(&blocks[0], &tmp)? {
        Outcome::Failed(why) => {
            assert!(why.contains("test.md:4: `herald pub t again` printed something else"), "{why}")
        }
        _ => return Err("a wrong output passed".into()),
    }
    Ok(())
}

#[test]
fn blocks_split_into_commands_and_their_output() -> Result {
    let doc = "<!-- not run: starts a broker -->\n```sh\nherald serve\n```\n\n```sh\n# Prose.\na \\\n  b\n# out 1\n#\nc\n\n# More prose.\nd\n```\n";
    let blocks = parse("t.md", doc)?;
    assert_eq!(blocks[0].not_run.as_deref(), Some("starts a broker"));
    let steps: Vec<(usize, &str, Vec<&str>)> = blocks[1]
        .steps
        .iter()
        .map(|s| (s.line, s.code.as_str(), s.expected.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(steps, [(8, "a \\\n  b", vec!["out 1", ""]), (12, "c", vec![]), (15, "d", vec![])]);
    Ok(())
}

#[test]
fn masking_hides_epochs_timestamps_and_delivery_ids_only() {
    assert_eq!(
        mask(r#"{"id":"1-1-6f3a0c2d9e41","message_id":1,"ts":1732000000000,"epoch":"4d7523ae6a4c-0","id":2}"#),
        r#"{"id":"<id>","message_id":1,"ts":<ts>,"epoch":"<epoch>","id":2}"#
    );
    assert_eq!(mask(r#"  "ts": "1732000000000","#), r#"  "ts": "<ts>","#);
}

/// ` ```rust ` blocks marked `<!-- example: path -->` are part of that file, which CI
/// compiles (`cargo test` builds examples).
#[test]
fn rust_snippets_are_parts_of_compiled_examples() -> Result {
    let mut checked = 0;
    for file in doc_files()? {
        let text = std::fs::read_to_string(workspace().join(&file))?;
        for (line, before, body) in fenced(&text, &file, &["rust"])? {
            let Some(path) = before.strip_prefix("<!-- example:").and_then(|r| r.strip_suffix("-->")) else {
                assert_ne!(file, "README.md", "README.md:{line}: a Rust block not marked <!-- example: path -->");
                continue;
            };
            let source = std::fs::read_to_string(workspace().join(path.trim()))?;
            let snippet = body.join("\n");
            assert!(source.contains(&snippet), "{file}:{line}: not found as is in {}", path.trim());
            checked += 1;
        }
    }
    assert!(checked >= 2, "README's and docs/queues.md's Rust examples are checked");
    Ok(())
}
