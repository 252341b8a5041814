//! The server's configuration: every setting is a flag, a `HERALD_*` env var and a TOML
//! key, with precedence flag > env > file > default, validated at start with a message
//! that names the key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use herald_auth::limits::LimitsConfig;
use herald_core::{BrokerConfig, OutboundConfig, QueueConfig, RetentionConfig, Role};
use herald_grpc::GrpcConfig;
use herald_http::HttpConfig;
use herald_store_disk::FsyncPolicy;
use serde::Deserialize;

/// Which store holds topic history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// In process memory; nothing survives a restart.
    Memory,
    /// The embedded disk store.
    Disk,
    /// Redis, shared by the nodes of a cluster (set by `cluster.redis`).
    Redis,
    /// PostgreSQL (`[postgres]`, `--postgres-url`): topics and queues in tables.
    Postgres,
}

impl std::str::FromStr for StoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "memory" => Ok(StoreKind::Memory),
            "disk" => Ok(StoreKind::Disk),
            "redis" => Ok(StoreKind::Redis),
            "postgres" => Ok(StoreKind::Postgres),
            other => Err(format!("store must be memory, disk, postgres or redis, not {other:?}")),
        }
    }
}

impl StoreKind {
    fn as_str(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Disk => "disk",
            StoreKind::Redis => "redis",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// The effective configuration of `herald serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address for HTTP, WebSocket and (later) gRPC.
    pub listen: SocketAddr,
    /// The store.
    pub store: StoreKind,
    /// Where the disk store keeps its files.
    pub data_dir: PathBuf,
    /// When the disk store calls fsync.
    pub fsync: FsyncPolicy,
    /// Size at which the disk store starts a new log segment.
    pub segment_bytes: u64,
    /// Bytes of recent messages the disk store keeps in memory (older history is read
    /// from disk).
    pub cache_bytes: u64,
    /// Cut a damaged disk log at the damage instead of refusing to start.
    pub repair: bool,
    /// Core limits.
    pub broker: BrokerConfig,
    /// History retention.
    pub retention: RetentionConfig,
    /// Front-door limits and timers.
    pub http: HttpConfig,
    /// gRPC limits (its `max_connections` is `http.max_connections`: one key).
    pub grpc: GrpcConfig,
    /// Longest a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout: Duration,
    /// How long a shutdown first serves as before with `/readyz` answering 503 (lame
    /// duck), so load balancers stop sending new clients before connections close.
    pub drain_delay: Duration,
    /// The cluster this node joins, if any.
    pub cluster: ClusterConfig,
    /// The PostgreSQL store's database (used with `store = "postgres"`).
    pub postgres: PostgresConfig,
    /// TLS on the listener (certificate and key files), if set.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Authentication and grants (`[auth]` in the config file), if set: then every
    /// `/v1` request and gRPC call must authenticate.
    pub auth: Option<herald_auth::AuthConfig>,
    /// Abuse limits: rates per connection, user and address, error budget, header and
    /// handshake timeouts (`[limits]`, `[timeouts]`).
    pub limits: LimitsConfig,
}

/// Scale-out over Redis (docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis every node shares (`redis://` or `rediss://`); `None` for a single node.
    pub redis: Option<String>,
    /// Prepended to every Redis key and channel, so deployments can share one Redis.
    pub prefix: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { redis: None, prefix: "herald:".to_owned() }
    }
}

/// The PostgreSQL store's database (docs/storage.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/database[?sslmode=require&sslrootcert=...]`; a password
    /// in it is never printed.
    pub url: String,
    /// A file holding the password (its first line), when the URL has none; else
    /// `PGPASSWORD`, if set.
    pub password_file: Option<PathBuf>,
    /// The schema every table lives in, so deployments can share a database.
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Longest any statement may run.
    pub statement_timeout: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        let d = herald_store_postgres::PgConfig::default();
        Self {
            url: d.url,
            password_file: None,
            schema: d.schema,
            pool_size: d.pool_size,
            statement_timeout: d.statement_timeout,
        }
    }
}

impl PostgresConfig {
    /// The store's settings, with the password read from `password_file` or
    /// `PGPASSWORD` when the URL has none.
    pub fn store_config(&self, retention: RetentionConfig) -> anyhow::Result<herald_store_postgres::PgConfig> {
        let password = match &self.password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading postgres.password_file {}", path.display()))?;
                Some(text.lines().next().unwrap_or_default().to_owned())
            }
            None => std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()),
        };
        Ok(herald_store_postgres::PgConfig {
            url: self.url.clone(),
            schema: self.schema.clone(),
            pool_size: self.pool_size,
            statement_timeout: self.statement_timeout,
            retention,
            password,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            store: StoreKind::Disk,
            data_dir: PathBuf::from("./herald-data"),
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 << 20,
            cache_bytes: 128 << 20,
            repair: false,
            broker: BrokerConfig::default(),
            retention: RetentionConfig::default(),
            http: HttpConfig::default(),
            grpc: GrpcConfig::default(),
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            cluster: ClusterConfig::default(),
            postgres: PostgresConfig::default(),
            tls: None,
            auth: None,
            limits: LimitsConfig::default(),
        }
    }
}

/// Flags of `herald serve`; each also reads its `HERALD_*` env var.
#[derive(Debug, Default, Clone, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Address to listen on (HTTP, WebSocket).
    #[arg(long, env = "HERALD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Store: disk (default), memory or postgres; redis with --cluster.
    #[arg(long, env = "HERALD_STORE")]
    pub store: Option<StoreKind>,
    /// The PostgreSQL store's database: postgres://user@host:port/database (sslmode=require for TLS).
    #[arg(long, env = "HERALD_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// A file whose first line is the PostgreSQL password (else PGPASSWORD, when the URL has none).
    #[arg(long, env = "HERALD_POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<PathBuf>,
    /// The schema the PostgreSQL store's tables live in (default herald).
    #[arg(long, env = "HERALD_POSTGRES_SCHEMA")]
    pub postgres_schema: Option<String>,
    /// Connections in the PostgreSQL pool (default 16).
    #[arg(long, env = "HERALD_POSTGRES_POOL_SIZE")]
    pub postgres_pool_size: Option<usize>,
    /// Join a cluster over this Redis (redis://host:port/ or rediss://...; for a Redis
    /// Cluster, seed nodes separated by commas).
    #[arg(long, env = "HERALD_CLUSTER")]
    pub cluster: Option<String>,
    /// Role in the cluster: all (default), ingest (publishes and queues) or fanout
    /// (subscriptions and history).
    #[arg(long, env = "HERALD_ROLE")]
    pub role: Option<Role>,
    /// Prefix of every Redis key and channel of the cluster (default herald:).
    #[arg(long, env = "HERALD_CLUSTER_PREFIX")]
    pub cluster_prefix: Option<String>,
    /// Data directory of the disk store.
    #[arg(long, env = "HERALD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, env = "HERALD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "HERALD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) of client certificates: clients may log in with one; its
    /// Common Name is the user name.
    #[arg(long, env = "HERALD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Disk store fsync policy: always, never, or an interval such as 100ms.
    #[arg(long, env = "HERALD_FSYNC", value_parser = parse_fsync)]
    pub fsync: Option<FsyncPolicy>,
    /// Disk store segment size in bytes.
    #[arg(long, env = "HERALD_SEGMENT_BYTES")]
    pub segment_bytes: Option<u64>,
    /// Disk store: bytes of recent messages kept in memory; older history is read from disk.
    #[arg(long, env = "HERALD_DISK_CACHE_BYTES")]
    pub disk_cache_bytes: Option<u64>,
    /// Cut a damaged disk log at the damage (losing what follows) instead of refusing to start.
    #[arg(long)]
    pub repair: bool,
    /// Largest payload in bytes.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Open WebSocket and SSE connections allowed.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Subscriptions per WebSocket connection.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS_PER_CONNECTION")]
    pub max_subscriptions_per_connection: Option<usize>,
    /// Presence join and leave events per topic and second; past it they are dropped
    /// and counted in one `presence_lost` event.
    #[arg(long, env = "HERALD_PRESENCE_EVENTS_PER_SECOND")]
    pub presence_events_per_second: Option<u32>,
    /// Outbound buffer per connection, bytes.
    #[arg(long, env = "HERALD_MAX_PENDING_BYTES")]
    pub max_pending_bytes: Option<usize>,
    /// Largest gRPC request message decoded, bytes.
    #[arg(long, env = "HERALD_MAX_GRPC_REQUEST_BYTES")]
    pub max_grpc_request_bytes: Option<usize>,
    /// Messages kept per topic.
    #[arg(long, env = "HERALD_RETENTION_MAX_MESSAGES")]
    pub retention_max_messages: Option<u64>,
    /// Age after which messages are trimmed (e.g. 24h).
    #[arg(long, env = "HERALD_RETENTION_MAX_AGE", value_parser = parse_duration)]
    pub retention_max_age: Option<Duration>,
    /// Payload bytes kept per topic, the newest message always kept (0: no limit).
    #[arg(long, env = "HERALD_RETENTION_MAX_BYTES")]
    pub retention_max_bytes: Option<u64>,
    /// Interval between WebSocket Pings (e.g. 25s).
    #[arg(long, env = "HERALD_PING_INTERVAL", value_parser = parse_duration)]
    pub ping_interval: Option<Duration>,
    /// Silence after a Ping that drops a connection (e.g. 10s).
    #[arg(long, env = "HERALD_PONG_TIMEOUT", value_parser = parse_duration)]
    pub pong_timeout: Option<Duration>,
    /// How long a connection may stay full before it is closed (e.g. 5s).
    #[arg(long, env = "HERALD_SLOW_CONSUMER_TIMEOUT", value_parser = parse_duration)]
    pub slow_consumer_timeout: Option<Duration>,
    /// Deliveries before an unacked queue message is dead-lettered.
    #[arg(long, env = "HERALD_QUEUE_MAX_ATTEMPTS")]
    pub queue_max_attempts: Option<u32>,
    /// Messages one queue may hold.
    #[arg(long, env = "HERALD_MAX_QUEUE_MESSAGES")]
    pub max_queue_messages: Option<usize>,
    /// Long polls that may wait on one queue at once.
    #[arg(long, env = "HERALD_MAX_WAITERS_PER_QUEUE")]
    pub max_waiters_per_queue: Option<usize>,
    /// Longest graceful shutdown (e.g. 10s).
    #[arg(long, env = "HERALD_SHUTDOWN_TIMEOUT", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// On SIGTERM, serve this long with /readyz at 503 before closing (e.g. 5s).
    #[arg(long, env = "HERALD_DRAIN_DELAY", value_parser = parse_duration)]
    pub drain_delay: Option<Duration>,
    /// Topics with series of their own on /metrics: names, `prefix.>` or `>`, comma-separated (at most 100 topics).
    #[arg(long, env = "HERALD_METRICS_TOPICS", value_delimiter = ',')]
    pub metrics_topics: Option<Vec<String>>,
    /// Serve the web console at / (default true); `--console false` or `--no-console` turns it off.
    #[arg(
        long,
        env = "HERALD_CONSOLE",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub console: Option<bool>,
    /// Do not serve the web console (the same as `--console false`; wins over it).
    #[arg(long)]
    pub no_console: bool,
}

/// The TOML file's shape; unknown keys are errors, so a typo is never silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    store: Option<String>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    retention: FileRetention,
    #[serde(default)]
    timeouts: FileTimeouts,
    #[serde(default)]
    queues: FileQueues,
    #[serde(default)]
    disk: FileDisk,
    #[serde(default)]
    cluster: FileCluster,
    #[serde(default)]
    postgres: FilePostgres,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    console: FileConsole,
    auth: Option<herald_auth::AuthConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    topics: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConsole {
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    redis: Option<String>,
    role: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePostgres {
    url: Option<String>,
    password_file: Option<PathBuf>,
    schema: Option<String>,
    pool_size: Option<usize>,
    statement_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDisk {
    fsync: Option<String>,
    segment_bytes: Option<u64>,
    cache_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQueues {
    max_attempts: Option<u32>,
    max_queue_messages: Option<usize>,
    max_waiters_per_queue: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_message_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_subscriptions_per_connection: Option<usize>,
    presence_events_per_second: Option<u32>,
    max_pending_bytes: Option<usize>,
    max_grpc_request_bytes: Option<usize>,
    messages_per_second: Option<u32>,
    bytes_per_second: Option<u32>,
    user_messages_per_second: Option<u32>,
    user_bytes_per_second: Option<u32>,
    connections_per_second_per_ip: Option<u32>,
    errors_per_minute: Option<u32>,
    trusted_networks: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetention {
    max_messages: Option<u64>,
    max_age: Option<String>,
    max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    ping_interval: Option<String>,
    pong_timeout: Option<String>,
    slow_consumer_timeout: Option<String>,
    shutdown_timeout: Option<String>,
    drain_delay: Option<String>,
    header_timeout: Option<String>,
    handshake_timeout: Option<String>,
}

/// Parses an fsync policy: `always`, `never`, or an interval such as `100ms`.
pub fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    match s {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        other => parse_duration(other)
            .ok()
            .filter(|d| !d.is_zero())
            .map(FsyncPolicy::Interval)
            .ok_or_else(|| format!("fsync must be always, never or an interval like 100ms, not {other:?}")),
    }
}

fn format_fsync(p: FsyncPolicy) -> String {
    match p {
        FsyncPolicy::Always => "always".into(),
        FsyncPolicy::Never => "never".into(),
        FsyncPolicy::Interval(d) => format_duration(d),
    }
}

/// Parses `500ms`, `30s`, `5m`, `24h` or `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 5m, 24h"))?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?} has no unit: write e.g. 500ms, 30s, 5m, 24h or 7d")),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(|| format!("{s:?} is too long"))
}

/// Renders a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Redis URLs (comma-separated) without their passwords (`redis://user:***@host/`), for
/// printing.
pub fn redact(urls: &str) -> String {
    urls.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(parts) => parts,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

fn file_duration(key: &str, value: Option<String>) -> anyhow::Result<Option<Duration>> {
    value.map(|v| parse_duration(&v).map_err(|e| anyhow::anyhow!("config key {key}: {e}"))).transpose()
}

impl Config {
    /// Builds the effective configuration: flags and env (already merged by clap), then
    /// the file, then defaults.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<File>(&text).with_context(|| format!("config file {}", path.display()))?
            }
            None => File::default(),
        };
        let d = Config::default();
        let tls = match (args.tls_cert.clone().or(file.tls.cert), args.tls_key.clone().or(file.tls.key)) {
            (Some(cert), Some(key)) => {
                let client_ca = args.tls_client_ca.clone().or(file.tls.client_ca);
                Some(crate::tls::TlsFiles { cert, key, client_ca })
            }
            (None, None) if args.tls_client_ca.is_some() || file.tls.client_ca.is_some() => {
                bail!("config key tls.client_ca is set without tls.cert and tls.key (client certificates need TLS)")
            }
            (None, None) => None,
            (Some(_), None) => bail!("config key tls.cert is set without tls.key (--tls-key)"),
            (None, Some(_)) => bail!("config key tls.key is set without tls.cert (--tls-cert)"),
        };
        let cluster = ClusterConfig {
            redis: args.cluster.clone().or(file.cluster.redis).filter(|u| !u.is_empty()),
            prefix: args.cluster_prefix.clone().or(file.cluster.prefix).unwrap_or(d.cluster.prefix),
        };
        let postgres = PostgresConfig {
            url: args.postgres_url.clone().or(file.postgres.url).unwrap_or(d.postgres.url),
            password_file: args.postgres_password_file.clone().or(file.postgres.password_file),
            schema: args.postgres_schema.clone().or(file.postgres.schema).unwrap_or(d.postgres.schema),
            pool_size: args.postgres_pool_size.or(file.postgres.pool_size).unwrap_or(d.postgres.pool_size),
            statement_timeout: file_duration("postgres.statement_timeout", file.postgres.statement_timeout)?
                .unwrap_or(d.postgres.statement_timeout),
        };
        let store = match (args.store, file.store) {
            (Some(s), _) => s,
            (None, Some(s)) => s.parse().map_err(|e| anyhow::anyhow!("config key store: {e}"))?,
            (None, None) if cluster.redis.is_some() => StoreKind::Redis,
            (None, None) => d.store,
        };
        let role = match (args.role, file.cluster.role) {
            (Some(r), _) => r,
            (None, Some(r)) => r.parse().map_err(|e| anyhow::anyhow!("config key cluster.role: {e}"))?,
            (None, None) => Role::All,
        };
        let max_connections = args.max_connections.or(file.limits.max_connections).unwrap_or(d.http.max_connections);
        let l = &file.limits;
        let dl = &d.limits;
        let limits = LimitsConfig {
            messages_per_second: l.messages_per_second.unwrap_or(dl.messages_per_second),
            bytes_per_second: l.bytes_per_second.unwrap_or(dl.bytes_per_second),
            user_messages_per_second: l.user_messages_per_second.unwrap_or(dl.user_messages_per_second),
            user_bytes_per_second: l.user_bytes_per_second.unwrap_or(dl.user_bytes_per_second),
            connections_per_second_per_ip: l.connections_per_second_per_ip.unwrap_or(dl.connections_per_second_per_ip),
            errors_per_minute: l.errors_per_minute.unwrap_or(dl.errors_per_minute),
            trusted_networks: match &l.trusted_networks {
                Some(nets) => herald_auth::limits::parse_networks(nets)?,
                None => dl.trusted_networks.clone(),
            },
            header_timeout: file_duration("timeouts.header_timeout", file.timeouts.header_timeout.clone())?
                .unwrap_or(dl.header_timeout),
            handshake_timeout: file_duration("timeouts.handshake_timeout", file.timeouts.handshake_timeout.clone())?
                .unwrap_or(dl.handshake_timeout),
        };
        let config = Config {
            listen: args.listen.or(file.listen).unwrap_or(d.listen),
            store,
            data_dir: args.data_dir.clone().or(file.data_dir).unwrap_or(d.data_dir),
            fsync: match (args.fsync, file.disk.fsync) {
                (Some(p), _) => p,
                (None, Some(s)) => parse_fsync(&s).map_err(|e| anyhow::anyhow!("config key disk.fsync: {e}"))?,
                (None, None) => d.fsync,
            },
            segment_bytes: args.segment_bytes.or(file.disk.segment_bytes).unwrap_or(d.segment_bytes),
            cache_bytes: args.disk_cache_bytes.or(file.disk.cache_bytes).unwrap_or(d.cache_bytes),
            repair: args.repair,
            broker: BrokerConfig {
                max_message_bytes: args
                    .max_message_bytes
                    .or(file.limits.max_message_bytes)
                    .unwrap_or(d.broker.max_message_bytes),
                outbound: OutboundConfig {
                    max_pending_bytes: args
                        .max_pending_bytes
                        .or(file.limits.max_pending_bytes)
                        .unwrap_or(d.broker.outbound.max_pending_bytes),
                    slow_consumer_timeout: args
                        .slow_consumer_timeout
                        .or(file_duration("timeouts.slow_consumer_timeout", file.timeouts.slow_consumer_timeout)?)
                        .unwrap_or(d.broker.outbound.slow_consumer_timeout),
                },
                shards: d.broker.shards,
                role,
                presence_events_per_second: args
                    .presence_events_per_second
                    .or(file.limits.presence_events_per_second)
                    .unwrap_or(d.broker.presence_events_per_second),
                queues: QueueConfig {
                    max_attempts: args
                        .queue_max_attempts
                        .or(file.queues.max_attempts)
                        .unwrap_or(d.broker.queues.max_attempts),
                    max_queue_messages: args
                        .max_queue_messages
                        .or(file.queues.max_queue_messages)
                        .unwrap_or(d.broker.queues.max_queue_messages),
                    max_waiters_per_queue: args
                        .max_waiters_per_queue
                        .or(file.queues.max_waiters_per_queue)
                        .unwrap_or(d.broker.queues.max_waiters_per_queue),
                },
            },
            retention: RetentionConfig {
                max_messages: args
                    .retention_max_messages
                    .or(file.retention.max_messages)
                    .unwrap_or(d.retention.max_messages),
                max_age: args
                    .retention_max_age
                    .or(file_duration("retention.max_age", file.retention.max_age)?)
                    .unwrap_or(d.retention.max_age),
                max_bytes: args.retention_max_bytes.or(file.retention.max_bytes).unwrap_or(d.retention.max_bytes),
            },
            http: HttpConfig {
                max_connections,
                max_subscriptions_per_connection: args
                    .max_subscriptions_per_connection
                    .or(file.limits.max_subscriptions_per_connection)
                    .unwrap_or(d.http.max_subscriptions_per_connection),
                ping_interval: args
                    .ping_interval
                    .or(file_duration("timeouts.ping_interval", file.timeouts.ping_interval)?)
                    .unwrap_or(d.http.ping_interval),
                pong_timeout: args
                    .pong_timeout
                    .or(file_duration("timeouts.pong_timeout", file.timeouts.pong_timeout)?)
                    .unwrap_or(d.http.pong_timeout),
                metrics_topics: {
                    let topics = args.metrics_topics.clone().or(file.metrics.topics).unwrap_or_default();
                    for entry in &topics {
                        herald_http::metrics::check_topic_entry(entry)
                            .map_err(|e| anyhow::anyhow!("metrics.topics: {e}"))?;
                    }
                    topics
                },
                console: match args.no_console {
                    true => false,
                    false => args.console.or(file.console.enabled).unwrap_or(d.http.console),
                },
            },
            grpc: GrpcConfig {
                // One limit for every long-lived connection, whichever front door.
                max_connections,
                max_request_bytes: args
                    .max_grpc_request_bytes
                    .or(file.limits.max_grpc_request_bytes)
                    .unwrap_or(d.grpc.max_request_bytes),
            },
            shutdown_timeout: args
                .shutdown_timeout
                .or(file_duration("timeouts.shutdown_timeout", file.timeouts.shutdown_timeout)?)
                .unwrap_or(d.shutdown_timeout),
            drain_delay: args
                .drain_delay
                .or(file_duration("timeouts.drain_delay", file.timeouts.drain_delay)?)
                .unwrap_or(d.drain_delay),
            cluster,
            postgres,
            tls,
            auth: file.auth,
            limits,
        };
        config.validate()?;
        Ok(config)
    }

    /// Refuses values the broker cannot run with, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let q = &self.broker.queues;
        let checks: [(&str, bool); 13] = [
            ("disk.segment_bytes", self.segment_bytes >= 4096),
            ("queues.max_attempts", q.max_attempts >= 1),
            ("queues.max_queue_messages", q.max_queue_messages >= 1),
            ("queues.max_waiters_per_queue", q.max_waiters_per_queue >= 1),
            ("limits.max_message_bytes", self.broker.max_message_bytes >= 1),
            ("limits.max_connections", self.http.max_connections >= 1),
            ("limits.max_subscriptions_per_connection", self.http.max_subscriptions_per_connection >= 1),
            ("limits.max_pending_bytes", self.broker.outbound.max_pending_bytes >= 1024),
            ("limits.max_grpc_request_bytes", self.grpc.max_request_bytes >= 1024),
            ("retention.max_messages", self.retention.max_messages >= 1),
            ("retention.max_age", !self.retention.max_age.is_zero()),
            ("timeouts.ping_interval", !self.http.ping_interval.is_zero()),
            ("timeouts.pong_timeout", !self.http.pong_timeout.is_zero()),
        ];
        for (key, ok) in checks {
            if !ok {
                bail!("config key {key} is out of range (see docs/configuration.md)");
            }
        }
        match (&self.cluster.redis, self.store) {
            (Some(_), StoreKind::Redis) | (None, StoreKind::Memory | StoreKind::Disk | StoreKind::Postgres) => {}
            (Some(_), _) => {
                bail!("config key store: a cluster keeps its history in Redis; leave store unset or set it to redis")
            }
            (None, StoreKind::Redis) => {
                bail!("config key store: redis is the store of a cluster; set cluster.redis (--cluster URL)")
            }
        }
        if self.cluster.redis.is_some() && self.retention.max_bytes > 0 {
            bail!("config key retention.max_bytes: a cluster's history in Redis is trimmed by count and age only; leave it 0");
        }
        if self.cluster.redis.is_none() && self.broker.role != Role::All {
            bail!("config key cluster.role: a single node serves everything; set cluster.redis (--cluster URL) to split roles");
        }
        if self.store == StoreKind::Postgres {
            herald_store_postgres::validate_schema(&self.postgres.schema).context("config key postgres.schema")?;
            if self.postgres.pool_size < 4 {
                bail!("config key postgres.pool_size must be at least 4");
            }
            if self.retention.max_bytes > 0 {
                bail!("config key retention.max_bytes: the PostgreSQL store trims by count and age only; leave it 0");
            }
        }
        if self.cluster.prefix.contains(['{', '}']) {
            bail!("config key cluster.prefix must not contain '{{' or '}}' (Redis Cluster hash tags)");
        }
        self.limits.validate(self.broker.max_message_bytes)?;
        let max_disk = herald_store_disk::MAX_MESSAGE_BYTES;
        if self.store == StoreKind::Disk && self.broker.max_message_bytes > max_disk {
            bail!("config key limits.max_message_bytes is over the disk store's limit of {max_disk} bytes");
        }
        Ok(())
    }

    /// The effective configuration on one line for the start-up log: `key=value` pairs,
    /// `section.key` within a section, secrets redacted as in [`Config::to_toml`].
    pub fn to_log_line(&self) -> String {
        let mut section = String::new();
        let mut pairs = Vec::new();
        for line in self.to_toml().lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = format!("{name}.");
            } else if let Some((key, value)) = line.split_once(" = ").filter(|_| !line.starts_with('#')) {
                pairs.push(format!("{section}{key}={value}"));
            }
        }
        pairs.join(" ")
    }

    /// The configuration as a TOML file that [`Config::load`] reads back unchanged
    /// (except a Redis password, printed as `***`).
    pub fn to_toml(&self) -> String {
        format!(
            r#"listen = "{listen}"
store = "{store}"
data_dir = "{data_dir}"

[disk]
fsync = "{fsync}"
segment_bytes = {segment_bytes}
cache_bytes = {cache_bytes}

[limits]
max_message_bytes = {max_message_bytes}
max_connections = {max_connections}
max_subscriptions_per_connection = {max_subs}
presence_events_per_second = {presence_events}
max_pending_bytes = {max_pending_bytes}
max_grpc_request_bytes = {max_grpc_request_bytes}
messages_per_second = {messages_per_second}
bytes_per_second = {bytes_per_second}
user_messages_per_second = {user_messages_per_second}
user_bytes_per_second = {user_bytes_per_second}
connections_per_second_per_ip = {connections_per_second_per_ip}
errors_per_minute = {errors_per_minute}
trusted_networks = [{trusted_networks}]

[retention]
max_messages = {max_messages}
max_age = "{max_age}"
max_bytes = {max_bytes}

[queues]
max_attempts = {max_attempts}
max_queue_messages = {max_queue_messages}
max_waiters_per_queue = {max_waiters}

[timeouts]
ping_interval = "{ping}"
pong_timeout = "{pong}"
slow_consumer_timeout = "{slow}"
shutdown_timeout = "{shutdown}"
drain_delay = "{drain}"
header_timeout = "{header_timeout}"
handshake_timeout = "{handshake_timeout}"

[cluster]
{redis}role = "{role}"
prefix = "{prefix}"

[postgres]
url = "{pg_url}"
{pg_password_file}schema = "{pg_schema}"
pool_size = {pg_pool_size}
statement_timeout = "{pg_statement_timeout}"

[metrics]
topics = [{metrics_topics}]

[console]
enabled = {console}

[tls]
{tls}{auth}"#,
            listen = self.listen,
            store = self.store.as_str(),
            data_dir = self.data_dir.display(),
            fsync = format_fsync(self.fsync),
            segment_bytes = self.segment_bytes,
            cache_bytes = self.cache_bytes,
            max_message_bytes = self.broker.max_message_bytes,
            max_connections = self.http.max_connections,
            max_subs = self.http.max_subscriptions_per_connection,
            presence_events = self.broker.presence_events_per_second,
            max_pending_bytes = self.broker.outbound.max_pending_bytes,
            max_grpc_request_bytes = self.grpc.max_request_bytes,
            messages_per_second = self.limits.messages_per_second,
            bytes_per_second = self.limits.bytes_per_second,
            user_messages_per_second = self.limits.user_messages_per_second,
            user_bytes_per_second = self.limits.user_bytes_per_second,
            connections_per_second_per_ip = self.limits.connections_per_second_per_ip,
            errors_per_minute = self.limits.errors_per_minute,
            trusted_networks =
                self.limits.trusted_networks.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", "),
            header_timeout = format_duration(self.limits.header_timeout),
            handshake_timeout = format_duration(self.limits.handshake_timeout),
            max_messages = self.retention.max_messages,
            max_age = format_duration(self.retention.max_age),
            max_bytes = self.retention.max_bytes,
            max_attempts = self.broker.queues.max_attempts,
            max_queue_messages = self.broker.queues.max_queue_messages,
            max_waiters = self.broker.queues.max_waiters_per_queue,
            ping = format_duration(self.http.ping_interval),
            pong = format_duration(self.http.pong_timeout),
            slow = format_duration(self.broker.outbound.slow_consumer_timeout),
            shutdown = format_duration(self.shutdown_timeout),
            drain = format_duration(self.drain_delay),
            metrics_topics = self.http.metrics_topics.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", "),
            console = self.http.console,
            redis = match &self.cluster.redis {
                Some(url) => format!("redis = \"{}\"\n", redact(url)),
                None => "# redis = \"redis://127.0.0.1:6379/\"\n".to_owned(),
            },
            role = self.broker.role.as_str(),
            prefix = self.cluster.prefix,
            pg_url =
                herald_store_postgres::PgConfig { url: self.postgres.url.clone(), ..Default::default() }.redacted_url(),
            pg_password_file = match &self.postgres.password_file {
                Some(path) => format!("password_file = \"{}\"\n", path.display()),
                None => String::new(),
            },
            pg_schema = self.postgres.schema,
            pg_pool_size = self.postgres.pool_size,
            pg_statement_timeout = format_duration(self.postgres.statement_timeout),
            tls = match &self.tls {
                Some(files) => format!(
                    "cert = \"{}\"\nkey = \"{}\"\n{}",
                    files.cert.display(),
                    files.key.display(),
                    match &files.client_ca {
                        Some(ca) => format!("client_ca = \"{}\"\n", ca.display()),
                        None => String::new(),
                    }
                ),
                None => "# cert = \"/etc/herald/tls/cert.pem\"\n# key = \"/etc/herald/tls/key.pem\"\n".to_owned(),
            },
            auth = match &self.auth {
                Some(a) => format!(
                    "\n# [auth] is set in the config file ({} users, jwt {}); not printed here\n",
                    a.users.len(),
                    if a.jwt.is_some() { "on" } else { "off" }
                ),
                None => String::new(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip() -> Result<(), String> {
        for s in ["500ms", "30s", "5m", "24h", "1500ms"] {
            assert_eq!(format_duration(parse_duration(s)?), s);
        }
        assert_eq!(parse_duration("7d")?, Duration::from_secs(7 * 86_400));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        Ok(())
    }

    #[test]
    fn abuse_limits_are_read_and_checked() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("herald-config-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("herald.toml");
        let args = ServeArgs { config: Some(path.clone()), ..Default::default() };
        std::fs::write(
            &path,
            "[limits]\nmessages_per_second = 5\ntrusted_networks = [\"10.0.0.0/8\", \"192.0.2.7\"]\n[timeouts]\nheader_timeout = \"2s\"\n",
        )?;
        let c = Config::load(&args)?;
        assert_eq!(c.limits.messages_per_second, 5);
        assert_eq!(c.limits.bytes_per_second, LimitsConfig::default().bytes_per_second, "default");
        assert_eq!(c.limits.trusted_networks.len(), 2);
        assert_eq!(c.limits.header_timeout, Duration::from_secs(2));
        std::fs::write(&path, "[limits]\ntrusted_networks = [\"10.0.0.0/33\"]\n")?;
        let err = format!("{:#}", Config::load(&args).expect_err("bad network refused"));
        assert!(err.contains("trusted_networks") && err.contains("10.0.0.0/33"), "{err}");
        std::fs::write(&path, "[limits]\nbytes_per_second = 1000\n")?;
        let err = format!("{:#}", Config::load(&args).expect_err("a byte rate below the largest message refused"));
        assert!(err.contains("limits.bytes_per_second"), "{err}");
        std::fs::write(&path, "[metrics]\ntopics = [\"orders\", \"chat.>\", \">\"]\n")?;
        assert_eq!(Config::load(&args)?.http.metrics_topics, ["orders", "chat.>", ">"]);
        std::fs::write(&path, "[metrics]\ntopics = [\"a..b\"]\n")?;
        let err = format!("{:#}", Config::load(&args).expect_err("a bad topic entry refused"));
        assert!(err.contains("metrics.topics") && err.contains("a..b"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn console_switch_reads_flags_then_file() -> anyhow::Result<()> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |flags: &[&str]| -> anyhow::Result<bool> {
            use clap::Parser;
            let cli = Cli::try_parse_from(std::iter::once("herald").chain(flags.iter().copied()))?;
            Ok(Config::load(&cli.serve)?.http.console)
        };
        assert!(parse(&[])?, "on by default");
        assert!(parse(&["--console"])?);
        assert!(!parse(&["--console", "false"])?);
        assert!(!parse(&["--console=off"])?);
        assert!(!parse(&["--no-console"])?);
        assert!(!parse(&["--console", "--no-console"])?, "--no-console wins");
        assert!(parse(&["--console", "--listen", "127.0.0.1:0"])?, "a bare --console before another flag");

        let dir = std::env::temp_dir().join(format!("herald-config-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("herald.toml");
        std::fs::write(&path, "[console]\nenabled = false\n")?;
        let file = path.to_string_lossy().into_owned();
        assert!(!parse(&["--config", &file])?, "file");
        assert!(parse(&["--config", &file, "--console", "true"])?, "flag beats file");
        std::fs::write(&path, "[console]\nenable = false\n")?;
        let err = format!("{:#}", parse(&["--config", &file]).expect_err("typo refused"));
        assert!(err.contains("enable"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn precedence_is_flag_then_file_then_default() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("herald-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("herald.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\n[limits]\nmax_message_bytes = 2048\n[timeouts]\npong_timeout = \"3s\"\n",
        )?;
        let args = ServeArgs { config: Some(path.clone()), max_message_bytes: Some(4096), ..Default::default() };
        let c = Config::load(&args)?;
        assert_eq!(c.broker.max_message_bytes, 4096, "flag beats file");
        assert_eq!(c.listen.port(), 9000, "file beats default");
        assert_eq!(c.http.pong_timeout, Duration::from_secs(3));
        assert_eq!(c.http.ping_interval, Duration::from_secs(25), "default");
        std::fs::write(&path, "[limits]\nmax_mesage_bytes = 1\n")?;
        let err = format!("{:#}", Config::load(&args).expect_err("typo refused"));
        assert!(err.contains("max_mesage_bytes"), "{err}");
        std::fs::write(&path, "[retention]\nmax_bytes = 1048576\n")?;
        assert_eq!(Config::load(&args)?.retention.max_bytes, 1 << 20);
        let flag = ServeArgs { retention_max_bytes: Some(7), ..args.clone() };
        assert_eq!(Config::load(&flag)?.retention.max_bytes, 7, "flag beats file");
        std::fs::write(&path, "[retention]\nmax_age = \"forever\"\n")?;
        let err = format!("{:#}", Config::load(&args).expect_err("bad duration refused"));
        assert!(err.contains("retention.max_age"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn cluster_settings_are_checked_together() -> anyhow::Result<()> {
        let cluster = || ServeArgs { cluster: Some("redis://u:secret@127.0.0.1:6379/".into()), ..Default::default() };
        let c = Config::load(&cluster())?;
        assert_eq!(c.store, StoreKind::Redis, "a cluster implies the redis store");
        assert!(c.to_toml().contains("redis = \"redis://u:***@127.0.0.1:6379/\""), "password redacted");
        let line = c.to_log_line();
        assert!(line.contains("cluster.redis=\"redis://u:***@127.0.0.1:6379/\""), "{line}");
        assert!(line.contains(" disk.cache_bytes=") && line.contains(" timeouts.drain_delay="), "{line}");
        assert!(!line.contains('\n') && !line.contains('#'), "{line}");
        assert_eq!(
            redact("redis://a:x@h1/,redis://h2/,rediss://:y@h3/"),
            "redis://a:***@h1/,redis://h2/,rediss://:***@h3/"
        );
        let err =
            format!("{:#}", Config::load(&ServeArgs { store: Some(StoreKind::Disk), ..cluster() }).expect_err("disk"));
        assert!(err.contains("config key store"), "{err}");
        let err = format!(
            "{:#}",
            Config::load(&ServeArgs { role: Some(Role::Fanout), ..Default::default() }).expect_err("role")
        );
        assert!(err.contains("cluster.role"), "{err}");
        let err = format!(
            "{:#}",
            Config::load(&ServeArgs { store: Some(StoreKind::Redis), ..Default::default() }).expect_err("redis")
        );
        assert!(err.contains("cluster.redis"), "{err}");
        let err = format!(
            "{:#}",
            Config::load(&ServeArgs { cluster_prefix: Some("a{b}".into()), ..cluster() }).expect_err("{")
        );
        assert!(err.contains("cluster.prefix"), "{err}");
        let err = format!(
            "{:#}",
            Config::load(&ServeArgs { retention_max_bytes: Some(1 << 20), ..cluster() }).expect_err("max_bytes")
        );
        assert!(err.contains("retention.max_bytes"), "{err}");
        Ok(())
    }

    #[test]
    fn tls_takes_both_files_and_round_trips() -> anyhow::Result<()> {
        let err = format!(
            "{:#}",
            Config::load(&ServeArgs { tls_cert: Some("c.pem".into()), ..Default::default() }).expect_err("no key")
        );
        assert!(err.contains("tls.key"), "{err}");
        let err = format!(
            "{:#}",
            Config::load(&ServeArgs { tls_key: Some("k.pem".into()), ..Default::default() }).expect_err("no cert")
        );
        assert!(err.contains("tls.cert"), "{err}");
        let err = format!(
            "{:#}",
            Config::load(&ServeArgs { tls_client_ca: Some("ca.pem".into()), ..Default::default() })
                .expect_err("a client CA without TLS")
        );
        assert!(err.contains("tls.client_ca"), "{err}");
        let args = ServeArgs { tls_cert: Some("c.pem".into()), tls_key: Some("k.pem".into()), ..Default::default() };
        let c = Config::load(&args)?;
        assert_eq!(c.tls, Some(crate::tls::TlsFiles { cert: "c.pem".into(), key: "k.pem".into(), client_ca: None }));
        let dir = std::env::temp_dir().join(format!("herald-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("herald.toml");
        std::fs::write(&path, c.to_toml())?;
        let again = Config::load(&ServeArgs { config: Some(path), ..Default::default() })?;
        std::fs::remove_dir_all(&dir)?;
        assert_eq!(again, c);
        Ok(())
    }

    #[test]
    fn default_config_round_trips_through_toml() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("herald-config-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("herald.toml");
        std::fs::write(&path, Config::default().to_toml())?;
        let c = Config::load(&ServeArgs { config: Some(path), ..Default::default() })?;
        assert_eq!(c, Config::default());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn configuration_reference_matches_the_defaults() -> anyhow::Result<()> {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md"))?;
        let defaults = Config::default().to_toml();
        assert!(
            doc.contains(&defaults),
            "docs/configuration.md must contain the output of `herald serve --print-config`:\n{defaults}"
        );
        Ok(())
    }
}
