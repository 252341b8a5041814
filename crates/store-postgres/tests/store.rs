//! The PostgreSQL store's own behaviour beyond the conformance suite: migrations
//! (refusing a newer database, two nodes starting at once), schema names, order and
//! numbering of many concurrent appends, the sweep, listing, what errors and configs
//! show of the password, and outages (a closed port, a silent server, a server that
//! goes away and comes back).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, connect_blocking, raw, text, Result, Schema};
use herald_core::{ListedTopic, ManualClock, RetentionConfig, Store, StoreError, SystemClock, TopicName};
use herald_store_postgres::{latest_migration, PgConfig, PgError, PgStore};
use herald_testkit::pg::Proxy;

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_700_000_000_000))
}

fn topic(name: &str) -> Result<TopicName> {
    Ok(TopicName::parse(name)?)
}

/// Waits (bounded) until `done` holds: for what the probe task changes on its own.
async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Result {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_by_a_newer_binary_is_refused() -> Result {
    let schema = Schema::new();
    let store = PgStore::connect(config(&schema.0, RetentionConfig::default()), clock()).await?;
    drop(store);
    let future = latest_migration() + 1;
    raw()
        .await?
        .execute(
            &format!("INSERT INTO \"{}\".herald_migrations (version, name) VALUES ($1, 'from the future')", schema.0),
            &[&future],
        )
        .await?;
    let refused = PgStore::connect(config(&schema.0, RetentionConfig::default()), clock()).await;
    match refused {
        Err(PgError::NewerDatabase { database, binary, .. }) => {
            assert_eq!((database, binary), (future, latest_migration()));
        }
        Err(e) => return Err(format!("wrong error: {e}").into()),
        Ok(_) => return Err("a newer database was accepted".into()),
    }
    let Err(e) = PgStore::connect(config(&schema.0, RetentionConfig::default()), clock()).await else {
        return Err("accepted on the second try".into());
    };
    let message = e.to_string();
    assert!(message.contains(&format!("version {future}")), "{message}");
    assert!(message.contains(&format!("the {} this binary knows", latest_migration())), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once() -> Result {
    let schema = Schema::new();
    let starts = (0..4).map(|_| PgStore::connect(config(&schema.0, RetentionConfig::default()), clock()));
    let stores = futures_join_all(starts.collect()).await;
    for store in &stores {
        assert!(store.is_ok(), "{:?}", store.as_ref().err());
    }
    let rows = raw()
        .await?
        .query(&format!("SELECT version FROM \"{}\".herald_migrations ORDER BY version", schema.0), &[])
        .await?;
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=latest_migration()).collect::<Vec<_>>());
    let identities: Vec<&str> = stores.iter().flatten().map(PgStore::identity).collect();
    assert!(identities.windows(2).all(|w| w[0] == w[1]), "one identity: {identities:?}");
    Ok(())
}

/// Awaits every future (on tasks of their own, so they run at once).
async fn futures_join_all<T: Send + 'static>(
    futures: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schema_names_are_refused_before_connecting() -> Result {
    for bad in ["", "Herald", "a-b", "x; DROP TABLE y", "a\"b", "pg_catalog", "ünï", &"s".repeat(64)] {
        let config = PgConfig { schema: bad.to_owned(), ..config("unused", RetentionConfig::default()) };
        match PgStore::connect(config, clock()).await {
            Err(PgError::Schema(name)) => assert_eq!(name, bad),
            Err(e) => return Err(format!("{bad:?}: wrong error {e}").into()),
            Ok(_) => return Err(format!("{bad:?} accepted").into()),
        }
    }
    let e = PgError::Schema("A".into()).to_string();
    assert!(e.contains("lowercase") && e.contains("63"), "{e}");
    Ok(())
}

/// 64 tasks append to 8 topics at once, each issuing rounds of 4 appends without
/// waiting in between: every topic holds exactly 1..=N, each append got consecutive
/// offsets holding its own payloads, and each task's appends got increasing offsets in
/// the order it issued them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_64_tasks_to_8_topics() -> Result {
    let schema = Schema::new();
    let store = Arc::new(PgStore::connect(config(&schema.0, RetentionConfig::default()), clock()).await?);
    let topics: Vec<TopicName> = (0..8).map(|i| topic(&format!("many.t{i}"))).collect::<Result<_>>()?;
    let start = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for task in 0..64usize {
        let (store, start, t) = (store.clone(), start.clone(), topics[task % 8].clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            // (offset, payload) of each message, in the order this task issued them.
            let mut mine: Vec<(u64, String)> = Vec::new();
            for round in 0..5 {
                let issued: Vec<_> = (0..4)
                    .map(|k| {
                        let n = 1 + (task + round + k) % 3;
                        let batch = (0..n).map(|j| text(&format!("{task}/{round}/{k}/{j}"))).collect();
                        (n, store.append(&t, batch))
                    })
                    .collect();
                for (n, append) in issued {
                    let appended = append.await?;
                    assert_eq!(appended.messages.len(), n);
                    for m in &appended.messages {
                        mine.push((m.offset, String::from_utf8_lossy(&m.payload).into_owned()));
                    }
                }
            }
            Ok::<_, StoreError>((t, mine))
        }));
    }
    let mut by_topic: BTreeMap<TopicName, BTreeMap<u64, String>> = BTreeMap::new();
    for task in tasks {
        let (t, mine) = task.await??;
        assert!(mine.windows(2).all(|w| w[0].0 < w[1].0), "a task's offsets follow its order of issue: {mine:?}");
        for (offset, payload) in mine {
            assert!(by_topic.entry(t.clone()).or_default().insert(offset, payload).is_none(), "offset given twice");
        }
    }
    for t in &topics {
        let want = &by_topic[t];
        let n = want.len() as u64;
        assert_eq!(want.keys().copied().collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>(), "no gap in {t}");
        let history = store.read(t, 0, u64::MAX, 100_000).await?;
        let got: BTreeMap<u64, String> =
            history.messages.iter().map(|m| (m.offset, String::from_utf8_lossy(&m.payload).into_owned())).collect();
        assert_eq!(&got, want, "what {t} holds is what the appends said");
        assert_eq!(store.head(t).await?.next, n + 1);
    }
    Ok(())
}

/// The sweep deletes trimmed fronts and deleted epochs from the table itself, in
/// batches, and `head` agrees before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_deletes_trimmed_rows_in_batches() -> Result {
    let schema = Schema::new();
    let retention = RetentionConfig { max_messages: 100, ..RetentionConfig::default() };
    let store = PgStore::connect(config(&schema.0, retention), clock()).await?;
    let t = topic("sweep.busy")?;
    for _ in 0..25 {
        store.append(&t, (0..1000).map(|i| text(&i.to_string())).collect()).await?;
    }
    let head = store.head(&t).await?;
    assert_eq!((head.first, head.last, head.retained), (24_901, 25_000, 100));
    let db = raw().await?;
    let count = |tid_filter: &'static str| format!("SELECT count(*) FROM \"{}\".topic_messages {tid_filter}", schema.0);
    let rows: i64 = db.query_one(&count(""), &[]).await?.get(0);
    assert_eq!(rows, 25_000, "trimmed rows stay until the sweep");
    assert_eq!(store.sweep_now().await?, 24_900);
    let rows: i64 = db.query_one(&count(""), &[]).await?.get(0);
    assert_eq!(rows, 100);
    assert_eq!(store.head(&t).await?, head, "the sweep changes nothing a reader sees");
    assert_eq!(store.sweep_now().await?, 0, "nothing more to do");
    // A delete leaves the old epoch's rows to the sweep.
    store.delete(&t).await?;
    assert_eq!(store.head(&t).await?.retained, 0);
    assert_eq!(store.sweep_now().await?, 100);
    let rows: i64 = db.query_one(&count(""), &[]).await?.get(0);
    let dropped: i64 = db.query_one(&format!("SELECT count(*) FROM \"{}\".topic_dropped", schema.0), &[]).await?.get(0);
    assert_eq!((rows, dropped), (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prefixes_are_literal_and_pages_follow_names() -> Result {
    let schema = Schema::new();
    let store = PgStore::connect(config(&schema.0, RetentionConfig::default()), clock()).await?;
    for name in ["a_b.x", "aXb.y", "a_b", "a_c", "b"] {
        store.append(&topic(name)?, vec![text(name)]).await?;
    }
    let names = |listed: Vec<ListedTopic>| listed.into_iter().map(|l| l.topic.as_str().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(store.list("a_", None, 10).await?), ["a_b", "a_b.x", "a_c"], "'_' is not a wildcard");
    assert_eq!(names(store.list("a_", Some("a_b"), 1).await?), ["a_b.x"]);
    assert_eq!(names(store.list("", None, 10).await?), ["aXb.y", "a_b", "a_b.x", "a_c", "b"], "byte order: 'X' < '_'");
    assert_eq!(names(store.list("", Some("a_c"), 10).await?), ["b"]);
    assert_eq!(names(store.list("a%", None, 10).await?), Vec::<String>::new());
    assert_eq!(names(store.list("é", None, 10).await?), Vec::<String>::new());
    store.delete(&topic("b")?).await?;
    assert_eq!(names(store.list("b", None, 10).await?), Vec::<String>::new(), "nothing retained, not listed");
    Ok(())
}

const SECRET: &str = "S3cretPw-never-shown";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_is_never_shown() -> Result {
    let port = closed_port().await?;
    let mut config = config("herald_pw", RetentionConfig::default());
    for url in [
        format!("postgres://herald:{SECRET}@127.0.0.1:{port}/test"),
        format!("postgres://herald@127.0.0.1:{port}/test?password={SECRET}"),
        format!("host=127.0.0.1 port={port} user=herald password={SECRET} dbname=test"),
    ] {
        config.url = url;
        let shown = [format!("{config}"), format!("{config:?}"), config.redacted_url()];
        for s in &shown {
            assert!(!s.contains(SECRET) && s.contains("***"), "{s}");
        }
        let Err(e) = PgStore::connect(config.clone(), clock()).await else {
            return Err("connected to a closed port".into());
        };
        for s in [e.to_string(), format!("{e:?}")] {
            assert!(!s.contains(SECRET), "{s}");
        }
    }
    // A URL tokio-postgres refuses: the error names the option, never the password.
    config.url = format!("postgres://herald:{SECRET}@127.0.0.1/test?sslmode=sometimes");
    let Err(e) = PgStore::connect(config.clone(), clock()).await else { return Err("accepted".into()) };
    assert!(matches!(e, PgError::Url { .. }), "{e}");
    assert!(!e.to_string().contains(SECRET) && !format!("{e:?}").contains(SECRET), "{e}");
    Ok(())
}

/// A port nothing listens on.
async fn closed_port() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    drop(listener);
    Ok(port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_unavailable_at_once() -> Result {
    let port = closed_port().await?;
    let config =
        PgConfig { url: format!("postgres://postgres@127.0.0.1:{port}/test"), ..config("x", Default::default()) };
    let started = Instant::now();
    let Err(e) = PgStore::connect(config, clock()).await else { return Err("connected".into()) };
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(matches!(e, PgError::Unavailable { .. }), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_does_not_hang_the_start() -> Result {
    // Connections complete in the kernel's backlog, but nothing ever answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = silent.local_addr()?.port();
    let config =
        PgConfig { url: format!("postgres://postgres@127.0.0.1:{port}/test"), ..config("x", Default::default()) };
    let started = Instant::now();
    let connect = tokio::time::timeout(Duration::from_secs(20), PgStore::connect(config, clock())).await;
    let Ok(Err(e)) = connect else { return Err("hung, or connected".into()) };
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(matches!(e, PgError::Unavailable { .. }), "{e}");
    drop(silent);
    Ok(())
}

/// The server goes away (every connection cut, nothing listening) and comes back:
/// meanwhile every call resolves `Unavailable` with its cause, none hangs and none
/// pretends; afterwards the pool reconnects by itself and offsets go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_unavailable_and_the_store_recovers() -> Result {
    let schema = Schema::new();
    let (upstream, user, db) = common::server()?;
    let mut proxy = Proxy::start(upstream).await?;
    let url = format!("host=127.0.0.1 port={} user={user} dbname={db} password={SECRET}", proxy.port);
    let config = PgConfig { url, ..config(&schema.0, RetentionConfig::default()) };
    let store = PgStore::connect(config, clock()).await?;
    let t = topic("outage")?;
    assert_eq!(store.append(&t, vec![text("before")]).await?.messages[0].offset, 1);
    assert!(store.is_ready());

    proxy.cut().await;
    let started = Instant::now();
    let failed = tokio::time::timeout(Duration::from_secs(30), store.append(&t, vec![text("during")])).await?;
    let Err(StoreError::Unavailable(why)) = failed else { return Err(format!("not refused: {failed:?}").into()) };
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    // Said by this append, or by the probe if it noticed first.
    assert!(why.starts_with("postgres ") && !why.contains(SECRET), "{why}");
    assert!(!store.is_ready());
    // Known down: refused at once, with the cause.
    for result in [
        store.head(&t).await.map(|_| ()),
        store.read(&t, 0, u64::MAX, 10).await.map(|_| ()),
        store.append(&t, vec![text("during")]).await.map(|_| ()),
        store.list("", None, 10).await.map(|_| ()),
        store.delete(&t).await.map(|_| ()),
    ] {
        let Err(StoreError::Unavailable(e)) = result else { return Err(format!("not refused: {result:?}").into()) };
        assert!(e.starts_with("postgres ") && !e.contains(SECRET), "{e}");
    }
    // The probe keeps finding it down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!store.is_ready());

    proxy.resume().await?;
    until("the store to be ready again", Duration::from_secs(15), || store.is_ready()).await?;
    let after = store.append(&t, vec![text("after")]).await?;
    assert_eq!(after.messages[0].offset, 2, "the failed appends consumed no offset");
    let read = store.read(&t, 0, u64::MAX, 10).await?;
    assert_eq!(read.messages.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), ["before", "after"]);
    store.flush().await?;
    Ok(())
}

/// The group commit survives the store being dropped while appends are in flight:
/// each resolves (committed, or closed), none hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_in_flight_when_the_store_is_dropped_resolve() -> Result {
    let schema = Schema::new();
    let store = connect_blocking(config(&schema.0, RetentionConfig::default()), Arc::new(SystemClock))?;
    let t = topic("dropped")?;
    let pending: Vec<_> = (0..200).map(|i| store.append(&t, vec![text(&i.to_string())])).collect();
    drop(store);
    let mut committed = Vec::new();
    for append in pending {
        if let Ok(a) = tokio::time::timeout(Duration::from_secs(10), append).await? {
            committed.push(a.messages[0].offset);
        }
    }
    assert_eq!(committed, (1..=committed.len() as u64).collect::<Vec<_>>());
    Ok(())
}

/// A statement stuck behind a lock is cancelled by the statement timeout set on the
/// pooled connections: the append fails (and consumes no offset), the store stays
/// ready, and appends go on once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_statement_is_cancelled_by_the_statement_timeout() -> Result {
    let schema = Schema::new();
    let config = PgConfig { statement_timeout: Duration::from_millis(300), ..config(&schema.0, Default::default()) };
    let store = PgStore::connect(config, clock()).await?;
    let t = topic("stuck")?;
    store.append(&t, vec![text("1")]).await?;
    let mut holder = raw().await?;
    let tx = holder.transaction().await?;
    tx.execute(&format!("SELECT 1 FROM \"{}\".topics WHERE name = 'stuck' FOR UPDATE", schema.0), &[]).await?;
    let started = Instant::now();
    let Err(StoreError::Unavailable(why)) = store.append(&t, vec![text("2")]).await else {
        return Err("an append behind a lock succeeded".into());
    };
    assert!(why.contains("statement timeout"), "{why}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(store.is_ready(), "a cancelled statement is no outage");
    tx.rollback().await?;
    assert_eq!(store.append(&t, vec![text("2")]).await?.messages[0].offset, 2);
    Ok(())
}

/// `sslmode=require` means TLS with the certificate and the name verified: the local
/// server's certificate (for `localhost`) is refused when reached as `127.0.0.1`, and
/// accepted as `localhost` with it as `sslrootcert`; the store's connections are then
/// encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_against_the_roots_given() -> Result {
    let db = raw().await?;
    let ssl: String = db.query_one("SHOW ssl", &[]).await?.get(0);
    if ssl != "on" {
        eprintln!("the test server has ssl off: nothing to check");
        return Ok(());
    }
    let cert: String = db.query_one("SHOW ssl_cert_file", &[]).await?.get(0);
    let schema = Schema::new();
    let (addr, user, dbname) = common::server()?;
    let url = |host: &str| {
        format!(
            "postgres://{user}@{host}:{}/{dbname}?sslmode=require&application_name={}&sslrootcert={cert}",
            addr.port(),
            schema.0
        )
    };
    let wrong_name = PgConfig { url: url("127.0.0.1"), ..config(&schema.0, Default::default()) };
    let Err(e) = PgStore::connect(wrong_name, clock()).await else {
        return Err("a certificate for another name was accepted".into());
    };
    assert!(matches!(e, PgError::Unavailable { .. }) && e.to_string().contains("certificate"), "{e}");
    let missing =
        PgConfig { url: url("localhost").replace(&cert, "/nonexistent.pem"), ..config(&schema.0, Default::default()) };
    let Err(e) = PgStore::connect(missing, clock()).await else { return Err("connected without roots".into()) };
    assert!(matches!(e, PgError::Tls(_)) && e.to_string().contains("/nonexistent.pem"), "{e}");

    let right = PgConfig { url: url("localhost"), ..config(&schema.0, Default::default()) };
    let store = PgStore::connect(right, clock()).await?;
    store.append(&topic("tls")?, vec![text("over tls")]).await?;
    let encrypted: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1 AND s.ssl",
            &[&schema.0],
        )
        .await?
        .get(0);
    assert!(encrypted >= 1, "no encrypted connection of the store");
    Ok(())
}
