//! The `herald` binary's library half: configuration, wiring of store, broker and front
//! doors, and the shutdown order. The only crate that names every other one.
//!
//! One listener serves HTTP/1 (REST, SSE, WebSocket) and HTTP/2 (gRPC): the HTTP and
//! gRPC routers are merged into one axum app, served in cleartext or over TLS (`tls`,
//! where ALPN picks HTTP/2 or HTTP/1.1).
//!
//! Shutdown order: `/readyz` answers 503 at once and, for `drain_delay` (lame duck),
//! everything else is served as before; then stop accepting, close every WebSocket with
//! 1001, end SSE streams and gRPC Subscribe streams (UNAVAILABLE), finish in-flight
//! requests, then the store; all that within `shutdown_timeout`.

pub mod bench;
pub mod bench_fanout;
pub mod bench_grpc;
pub mod cli;
pub mod config;
pub mod listen;
pub mod telemetry;
pub mod tls;
pub mod work;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use herald_core::{Broker, Bus, MemoryStore, QueueService, Store, SystemClock};
use herald_grpc::{GrpcConfig, GrpcState};
use herald_http::AppState;
use herald_store_disk::{DiskConfig, DiskStore};
use herald_store_postgres::PgStore;
use herald_store_redis::{RedisBus, RedisConfig, RedisQueues, RedisStore};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{Config, StoreKind};
use herald_auth::limits::Limits;
use herald_auth::LiveAuth;
use tls::Tls;

/// How often retention by age and TTL is applied to idle topics.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A running server: its address and the means to stop it.
pub struct Server {
    addr: SocketAddr,
    /// Whether it serves TLS.
    tls: bool,
    /// Reloads the authentication in force.
    auth: AuthReloader,
    /// Cancelled when a graceful shutdown begins; `shutdown` follows after the drain delay.
    draining: CancellationToken,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` (or with TLS `https://`) URL of the server.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// What reloads this server's `[auth]` (see [`AuthReloader::reload`]).
    pub fn auth_reloader(&self) -> AuthReloader {
        self.auth.clone()
    }

    /// Begins a graceful shutdown: `/readyz` answers 503 at once, connections are closed
    /// after `drain_delay`. Called again, it cuts the drain delay short.
    pub fn shutdown(&self) {
        if self.draining.is_cancelled() {
            self.shutdown.cancel();
        }
        self.draining.cancel();
    }

    /// Serves until `signal` resolves (or the server fails), then shuts down gracefully.
    pub async fn run_until(mut self, signal: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            r = &mut self.task => return r.context("server task panicked")?,
            _ = signal => {}
        }
        self.shutdown();
        self.wait().await
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task panicked")?
    }
}

/// The store, and the bus when the node is part of a cluster.
pub struct Backend {
    /// Where history and queue records live.
    pub store: Arc<dyn Store>,
    /// Delivers every node's appends, and the queues every node shares (cluster only).
    pub cluster: Option<(Arc<dyn Bus>, Arc<dyn QueueService>)>,
    /// Queues kept by the store's database itself rather than by this node's engine
    /// over the store (PostgreSQL).
    pub queues: Option<Arc<dyn QueueService>>,
}

async fn open_backend(config: &Config) -> anyhow::Result<Backend> {
    if let Some(url) = &config.cluster.redis {
        let redis =
            RedisConfig { url: url.clone(), prefix: config.cluster.prefix.clone(), retention: config.retention };
        let shown = config::redact(url);
        let store = RedisStore::connect(redis, Arc::new(SystemClock))
            .await
            .with_context(|| format!("connecting to the cluster's Redis at {shown}"))?;
        let bus = RedisBus::start(&store).await.with_context(|| format!("opening pub/sub on {shown}"))?;
        let b = &config.broker;
        let queues = RedisQueues::new(&store, &bus, Arc::new(SystemClock), b.queues, b.max_message_bytes);
        return Ok(Backend { store: Arc::new(store), cluster: Some((Arc::new(bus), Arc::new(queues))), queues: None });
    }
    if config.store == StoreKind::Postgres {
        let pg = config.postgres.store_config(config.retention)?;
        let shown = pg.to_string();
        let store = PgStore::connect(pg, Arc::new(SystemClock))
            .await
            .with_context(|| format!("opening the PostgreSQL store at {shown}"))?;
        let b = &config.broker;
        let queues = store
            .queue_service(b.queues, b.max_message_bytes)
            .await
            .with_context(|| format!("opening the PostgreSQL queues at {shown}"))?;
        return Ok(Backend { store: Arc::new(store), cluster: None, queues: Some(Arc::new(queues)) });
    }
    let store = open_store(config)?;
    Ok(Backend { store, cluster: None, queues: None })
}

fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match config.store {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new(config.retention))),
        StoreKind::Redis => anyhow::bail!("the redis store needs cluster.redis (--cluster URL)"),
        StoreKind::Postgres => anyhow::bail!("the postgres store is opened with its queues (open_backend)"),
        StoreKind::Disk => {
            let disk = DiskConfig {
                dir: config.data_dir.clone(),
                fsync: config.fsync,
                segment_bytes: config.segment_bytes,
                repair: config.repair,
                retention: config.retention,
                cache_bytes: config.cache_bytes,
            };
            let store = DiskStore::open(disk)
                .with_context(|| format!("opening the disk store in {}", config.data_dir.display()))?;
            Ok(Arc::new(store))
        }
    }
}

/// Binds `config.listen` and serves in the background until [`Server::shutdown`].
pub async fn start(config: Config) -> anyhow::Result<Server> {
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let (draining, shutdown) = (CancellationToken::new(), CancellationToken::new());
    let tls = config.tls.clone().map(Tls::new).transpose()?;
    // A wrong [auth] section fails the start here, before anything is opened.
    let auth = live_auth(&config)?;
    let backend = open_backend(&config).await?;
    let served = tls.is_some();
    let stop = (draining.clone(), shutdown.clone());
    let task = tokio::spawn(serve_with(config, backend, listener, tls, auth.clone(), stop));
    Ok(Server { addr, tls: served, auth: AuthReloader(auth), draining, shutdown, task })
}

/// Reloads a running server's `[auth]` section. Cheap to clone.
#[derive(Clone)]
pub struct AuthReloader(Option<Arc<LiveAuth>>);

impl AuthReloader {
    /// Puts a reloaded `[auth]` section in force: new requests use it at once, and every
    /// live JSON WebSocket checks its caller again (subscriptions no longer granted end,
    /// refused credentials close it with 4401). A wrong section changes nothing;
    /// `[auth]` cannot be turned on or off without a restart.
    pub fn reload(&self, config: Option<&herald_auth::AuthConfig>) -> anyhow::Result<()> {
        match (&self.0, config) {
            (Some(live), Some(config)) => {
                live.reload(config).map_err(|e| anyhow::anyhow!("config section [auth]: {e}"))
            }
            (None, None) => Ok(()),
            _ => anyhow::bail!("[auth] cannot be turned on or off by a reload; restart the server"),
        }
    }
}

/// The `[auth]` section, checked, as the live authenticator the doors share.
fn live_auth(config: &Config) -> anyhow::Result<Option<Arc<LiveAuth>>> {
    config
        .auth
        .as_ref()
        .map(|a| {
            herald_auth::Authenticator::new(a)
                .map(|auth| Arc::new(LiveAuth::new(auth)))
                .map_err(|e| anyhow::anyhow!("config section [auth]: {e}"))
        })
        .transpose()
}

/// Serves on `listener` until `shutdown` is cancelled, then drains in order (with TLS
/// if `config.tls` is set).
pub async fn serve(
    config: Config,
    backend: Backend,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = config.tls.clone().map(Tls::new).transpose()?;
    let auth = live_auth(&config)?;
    serve_with(config, backend, listener, tls, auth, (shutdown.clone(), shutdown)).await
}

async fn serve_with(
    config: Config,
    backend: Backend,
    listener: TcpListener,
    tls: Option<Tls>,
    auth: Option<Arc<LiveAuth>>,
    (draining, shutdown): (CancellationToken, CancellationToken),
) -> anyhow::Result<()> {
    let broker = match (backend.cluster, backend.queues) {
        (Some((bus, queues)), _) => Broker::clustered(backend.store, bus, queues, config.broker.clone()),
        (None, Some(queues)) => Broker::with_queues(backend.store, queues, config.broker.clone()),
        (None, None) => Broker::new(backend.store, config.broker.clone()),
    };
    // process_cpu_seconds_total, process_resident_memory_bytes, open fds, ... on /metrics.
    #[cfg(target_os = "linux")]
    if let Err(e) =
        broker.metrics().registry().register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
    {
        tracing::warn!(error = %e, "process metrics not registered");
    }
    let limits = Arc::new(Limits::new(config.limits.clone()));
    let state = AppState::with_auth(broker.clone(), config.http.clone(), shutdown.clone(), auth.clone())
        .with_limits(limits.clone())
        .with_draining(draining.clone());
    // gRPC shares the HTTP front door's connection limit and task tracker.
    let grpc_config = GrpcConfig { max_connections: config.http.max_connections, ..config.grpc.clone() };
    let grpc = GrpcState::new(broker.clone(), grpc_config, shutdown.clone(), state.tracker().clone()).with_auth(auth);
    let grpc = herald_grpc::router(grpc).context("building the gRPC services")?;
    let app =
        herald_http::router(state.clone()).merge(grpc).layer(axum::middleware::from_fn(herald_http::trace_request));

    let sweeper = {
        let broker = broker.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        state.tracker().spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        broker.sweep();
                        limits.sweep();
                    }
                }
            }
        })
    };

    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), store = ?config.store, role = config.broker.role.as_str(), "herald listening");
    let tls = tls.map(Arc::new);
    if let Some(tls) = &tls {
        state.tracker().spawn(tls.clone().watch(shutdown.clone()));
    }
    let http = listen::serve(listener, tls, app, limits, shutdown.clone());
    let drained = async {
        http.await.context("http server")?;
        // WebSocket and gRPC stream tasks were told by the same token; wait for them.
        state.tracker().close();
        state.tracker().wait().await;
        // Last: make everything acknowledged so far durable.
        broker.flush().await.context("flushing the store")?;
        anyhow::Ok(())
    };
    // Serve until the drain begins; serve on as before for `drain_delay` (only `/readyz`
    // changes), then close everything within `shutdown_timeout`.
    tokio::pin!(drained);
    tokio::select! {
        r = &mut drained => return r,
        _ = draining.cancelled() => {}
    }
    if !shutdown.is_cancelled() && !config.drain_delay.is_zero() {
        tracing::info!(drain_delay = ?config.drain_delay, "draining: /readyz answers 503; closing connections after the drain delay");
        tokio::select! {
            r = &mut drained => return r,
            _ = tokio::time::sleep(config.drain_delay) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    shutdown.cancel();
    tracing::info!("shutting down");
    match tokio::time::timeout(config.shutdown_timeout, drained).await {
        Ok(r) => r?,
        Err(_) => {
            tracing::warn!(timeout = ?config.shutdown_timeout, "shutdown timed out; exiting anyway")
        }
    }
    sweeper.abort();
    tracing::info!("stopped");
    Ok(())
}
