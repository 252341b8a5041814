//! Runs a Node test suite of the repository (`node --test` in a folder with its own
//! package.json) against the binary under test: the JavaScript client's and the web
//! console's. They need node and npm (and the console's also Debian's chromium); a
//! missing tool is reported on stderr and the suite skipped, unless
//! `HERALD_BROWSER_TESTS_NEED_TOOLS=1` (`.ci/run` sets it, after installing them): then
//! it fails.

use std::path::Path;
use std::process::Command;

use super::Result;

/// Whether `tool` is a file in a directory of `PATH`.
fn installed(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// `npm ci` in `dir` (relative to the workspace) unless `probe` is installed there, then
/// `node --test` with `HERALD_BIN` set (and `HERALD_CHROMIUM` when `chromium`).
pub fn run(dir: &str, probe: &str, what: &str, chromium: bool) -> Result {
    let browser = std::env::var("HERALD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let mut missing: Vec<&str> = ["node", "npm"].into_iter().filter(|t| !installed(t)).collect();
    if chromium && !Path::new(&browser).is_file() {
        missing.push("chromium");
    }
    if !missing.is_empty() {
        if std::env::var("HERALD_BROWSER_TESTS_NEED_TOOLS").is_ok_and(|v| v == "1") {
            return Err(format!("{what} needs {} (not installed)", missing.join(", ")).into());
        }
        eprintln!(
            "SKIPPED {what}: {} not installed (apt-get install nodejs npm chromium); \
             HERALD_BROWSER_TESTS_NEED_TOOLS=1 makes this a failure",
            missing.join(", ")
        );
        return Ok(());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(dir);
    if !dir.join("node_modules").join(probe).is_dir() {
        let status = Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir).status()?;
        assert!(status.success(), "npm ci in {} failed: {status}", dir.display());
    }
    let mut node = Command::new("node");
    node.args(["--test", "--test-reporter=spec"]).current_dir(&dir).env("HERALD_BIN", env!("CARGO_BIN_EXE_herald"));
    if chromium {
        node.env("HERALD_CHROMIUM", &browser);
    }
    let status = node.status()?;
    assert!(status.success(), "{what} failed (its output is above): {status}");
    Ok(())
}
