//! The web console: `/` and `/console/*` serve the embedded page and assets with their
//! content types and a strict Content-Security-Policy, unknown assets are 404, and
//! `console.enabled = false` (or `HERALD_CONSOLE=false`) makes `/` a 404 like any unknown
//! route. Then the browser test of `console/test/` (headless Chromium through
//! playwright-core, against the real binary): live messages, queue counts, no console
//! errors.
//!
//! The browser test needs node, npm and chromium (`/usr/bin/chromium`, or the binary
//! `HERALD_CHROMIUM` names). Without one of them it is reported on
//! stderr and skipped, unless `HERALD_BROWSER_TESTS_NEED_TOOLS=1` (`.ci/run` sets it, after
//! installing them): then it fails.

mod common;

use common::{spawn_herald_env, start, Result};

async fn get(url: &str) -> Result<reqwest::Response> {
    Ok(common::http().get(url).send().await?)
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_and_its_assets_are_served_with_a_strict_policy() -> Result {
    let server = start(|_| {}).await?;
    let page = get(&format!("{}/", server.url)).await?;
    assert_eq!(page.status(), 200);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    let csp = header(&page, "content-security-policy").to_owned();
    for directive in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(header(&page, "cache-control"), "no-cache");
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");
    let html = page.text().await?;
    assert!(html.contains(r#"<script type="module" src="/console/app.js"></script>"#), "{html}");
    assert!(!html.contains("<script>") && !has_inline_handler(&html), "no inline script or handler");
    assert!(!html.contains("http://") && !html.contains("https://"), "no external resource");

    for (file, content_type) in [
        ("index.html", "text/html; charset=utf-8"),
        ("app.js", "text/javascript; charset=utf-8"),
        ("herald.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let asset = get(&format!("{}/console/{file}", server.url)).await?;
        assert_eq!(asset.status(), 200, "{file}");
        assert_eq!(header(&asset, "content-type"), content_type, "{file}");
        assert_eq!(header(&asset, "content-security-policy"), csp, "{file}");
        let etag = header(&asset, "etag").to_owned();
        assert!(etag.starts_with('"'), "{file}: etag {etag:?}");
        let again =
            common::http().get(format!("{}/console/{file}", server.url)).header("if-none-match", &etag).send().await?;
        assert_eq!(again.status(), 304, "{file}: unchanged");
    }

    // Every module app.js imports (`./x.js`) is served: a forgotten asset would be a
    // blank page.
    for source in ["app.js", "topics.js", "queues.js", "metrics.js", "util.js"] {
        let text = get(&format!("{}/console/{source}", server.url)).await?.text().await?;
        for import in text.lines().filter_map(|l| l.split("from './").nth(1)).filter_map(|r| r.split('\'').next()) {
            let status = get(&format!("{}/console/{import}", server.url)).await?.status();
            assert_eq!(status, 200, "{source} imports {import}");
        }
    }

    for missing in ["/console/nope.js", "/console/", "/console/../Cargo.toml", "/console/a/app.js", "/index.html"] {
        let response = get(&format!("{}{missing}", server.url)).await?;
        assert_eq!(response.status(), 404, "{missing}");
    }
    let (status, body) = server.get_json("/console/nope.js").await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_console_switched_off_is_not_found() -> Result {
    let server = start(|c| c.http.console = false).await?;
    for path in ["/", "/console/app.js", "/console/index.html"] {
        let (status, body) = server.get_json(path).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")), "{path}");
    }
    assert_eq!(get(&format!("{}/healthz", server.url)).await?.status(), 200, "the rest is served");
    Ok(())
}

/// The real binary reads the switch from its env var and its flags.
#[tokio::test(flavor = "multi_thread")]
async fn the_binary_takes_the_switch_from_env_and_flags() -> Result {
    for (args, env, served) in [
        (&[][..], &[][..], true),
        (&[][..], &[("HERALD_CONSOLE", "false")][..], false),
        (&["--no-console"][..], &[][..], false),
        (&["--console", "false"][..], &[][..], false),
        (&["--console"][..], &[("HERALD_CONSOLE", "false")][..], true),
    ] {
        let (_server, line) = spawn_herald_env(&[&["--store", "memory"], args].concat(), env, "addr=")?;
        let addr = line.split("addr=").nth(1).and_then(|r| r.split_whitespace().next()).ok_or("no address")?;
        let status = get(&format!("http://{addr}/")).await?.status();
        assert_eq!(status == 200, served, "{args:?} {env:?}: {status}");
    }
    Ok(())
}

/// Whether `html` has an attribute like ` onclick=`.
fn has_inline_handler(html: &str) -> bool {
    html.match_indices(" on").any(|(at, _)| {
        let rest = &html[at + 3..];
        let name = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        name > 0 && rest[name..].starts_with('=')
    })
}

/// `console/test/`'s `node --test` against the binary under test, in headless Chromium.
#[test]
fn the_console_works_in_a_browser() -> Result {
    common::node::run("console/test", "playwright-core", "the console's browser test", true)
}
