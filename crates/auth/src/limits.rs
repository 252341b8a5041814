//! Abuse limits: how much one connection, one user and one client address may ask of
//! the server (docs/security.md, "Abuse limits").
//!
//! - Token buckets (GCRA, the `governor` crate) for the messages and bytes a client
//!   publishes or enqueues, per connection ([`Peer`]) and per user (the authenticated
//!   name, or the client's address when the server does not authenticate).
//! - New connections per second per client address ([`Limits::connect`]).
//! - A budget of errors per connection ([`Peer::error`]), after which the door closes it.
//!
//! Addresses in `trusted_networks` (loopback by default: benchmarks, sidecars, a load
//! balancer in front) are not limited. The doors decide what "over the limit" means:
//! streams stop reading until the bucket refills (back-pressure through TCP), request
//! doors answer `429 rate_limited` / `RESOURCE_EXHAUSTED` with when to retry. Every
//! refusal and pause is counted in [`LimitCounters`] for `/metrics`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
pub use ipnet::IpNet;

/// The abuse limits in force (`[limits]` and `[timeouts]` of the config file). A rate
/// of 0 turns that limit off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Messages a connection may publish or enqueue per second (the burst is one
    /// second's worth).
    pub messages_per_second: u32,
    /// Payload bytes a connection may publish or enqueue per second.
    pub bytes_per_second: u32,
    /// Messages per second per user, across all its connections and requests.
    pub user_messages_per_second: u32,
    /// Payload bytes per second per user.
    pub user_bytes_per_second: u32,
    /// New connections per second from one client address.
    pub connections_per_second_per_ip: u32,
    /// Errors a connection may cause per minute before it is closed.
    pub errors_per_minute: u32,
    /// Client addresses no limit applies to.
    pub trusted_networks: Vec<IpNet>,
    /// Time a client has to send a request's headers (and, on a new connection, its
    /// first byte); also how long an HTTP/1 connection may sit idle between requests.
    pub header_timeout: Duration,
    /// Time a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            messages_per_second: 10_000,
            bytes_per_second: 64 << 20,
            user_messages_per_second: 0,
            user_bytes_per_second: 0,
            connections_per_second_per_ip: 100,
            errors_per_minute: 100,
            trusted_networks: loopback(),
            header_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// `127.0.0.0/8` and `::1/128`.
pub fn loopback() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"].iter().filter_map(|s| s.parse().ok()).collect()
}

/// Why limits cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// A network in `trusted_networks` does not parse.
    #[error("limits.trusted_networks: {0:?} is not a network such as 10.0.0.0/8 or ::1/128")]
    Network(String),
    /// The byte rate cannot pass the largest message.
    #[error("limits.{key} ({rate}) must be 0 or at least limits.max_message_bytes ({max}), or no message that large could ever pass")]
    BytesBelowMessage {
        /// The key.
        key: &'static str,
        /// Its value.
        rate: u32,
        /// `max_message_bytes`.
        max: usize,
    },
    /// A timeout of zero.
    #[error("timeouts.{0} must be more than 0")]
    ZeroTimeout(&'static str),
}

/// Parses `trusted_networks` entries (`10.0.0.0/8`, `::1/128`, or a bare address).
pub fn parse_networks(entries: &[String]) -> Result<Vec<IpNet>, LimitsError> {
    entries
        .iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| LimitsError::Network(s.to_owned()))
        })
        .collect()
}

impl LimitsConfig {
    /// Refuses settings that cannot work with messages of up to `max_message_bytes`.
    pub fn validate(&self, max_message_bytes: usize) -> Result<(), LimitsError> {
        for (key, rate) in
            [("bytes_per_second", self.bytes_per_second), ("user_bytes_per_second", self.user_bytes_per_second)]
        {
            if rate != 0 && (rate as usize) < max_message_bytes {
                return Err(LimitsError::BytesBelowMessage { key, rate, max: max_message_bytes });
            }
        }
        if self.header_timeout.is_zero() {
            return Err(LimitsError::ZeroTimeout("header_timeout"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(LimitsError::ZeroTimeout("handshake_timeout"));
        }
        Ok(())
    }
}

/// What the limits refused or slowed, for `/metrics`.
#[derive(Debug, Default)]
pub struct LimitCounters {
    /// Connections closed at once: over the new-connections rate of their address.
    pub connections_refused: AtomicU64,
    /// Times a stream stopped reading until its bucket refilled.
    pub paused: AtomicU64,
    /// Requests answered `rate_limited`.
    pub refused: AtomicU64,
    /// Connections closed for spending their error budget.
    pub error_closes: AtomicU64,
    /// Connections dropped for not sending their request headers in time (or idle).
    pub header_timeouts: AtomicU64,
    /// Connections dropped for not finishing their TLS handshake in time.
    pub handshake_timeouts: AtomicU64,
}

impl LimitCounters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whose bucket a message is taken from: the user's name, or the client's address when
/// the server does not authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum UserKey {
    Name(Arc<str>),
    Address(IpAddr),
}

/// One bucket a message is taken from.
#[derive(Clone, Copy)]
enum Bucket<'a> {
    /// The connection's own.
    Direct(&'a DefaultDirectRateLimiter),
    /// The user's (or the address's), shared by its connections.
    Keyed(&'a DefaultKeyedRateLimiter<UserKey>),
}

/// A bucket of `rate` per second with a burst of one second's worth.
fn per_second(rate: u32) -> Option<Quota> {
    NonZeroU32::new(rate).map(Quota::per_second)
}

/// The limits of a server, shared by every door and connection.
pub struct Limits {
    config: LimitsConfig,
    clock: DefaultClock,
    user_messages: Option<DefaultKeyedRateLimiter<UserKey>>,
    user_bytes: Option<DefaultKeyedRateLimiter<UserKey>>,
    connections: Option<DefaultKeyedRateLimiter<IpAddr>>,
    counters: LimitCounters,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(LimitsConfig::default())
    }
}

/// How long until a request over the limit could pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// Retry after this long.
    Wait(Duration),
    /// Never in one piece: more messages or bytes than one second's allowance.
    Never,
}

impl Limits {
    /// Limits as `config` says (checked by [`LimitsConfig::validate`] first).
    pub fn new(config: LimitsConfig) -> Self {
        let keyed = |rate: u32| per_second(rate).map(RateLimiter::dashmap);
        Self {
            user_messages: keyed(config.user_messages_per_second),
            user_bytes: keyed(config.user_bytes_per_second),
            connections: per_second(config.connections_per_second_per_ip).map(RateLimiter::dashmap),
            clock: DefaultClock::default(),
            counters: LimitCounters::default(),
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// What was refused or slowed so far.
    pub fn counters(&self) -> &LimitCounters {
        &self.counters
    }

    /// Whether no limit applies to `ip`.
    pub fn trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config.trusted_networks.iter().any(|net| net.contains(&ip))
    }

    /// A new connection from `peer`, with its own buckets; `None` (and counted) when its
    /// address opened more connections per second than allowed: close it at once.
    pub fn connect(self: &Arc<Self>, peer: SocketAddr) -> Option<Arc<Peer>> {
        let trusted = self.trusted(peer.ip());
        if !trusted {
            if let Some(connections) = &self.connections {
                if connections.check_key(&peer.ip().to_canonical()).is_err() {
                    LimitCounters::bump(&self.counters.connections_refused);
                    return None;
                }
            }
        }
        Some(Arc::new(Peer::new(self.clone(), peer, trusted)))
    }

    /// Forgets the buckets of users and addresses that are full again, so their memory
    /// stays bounded by the clients active in the last second or so. Call it now and then.
    pub fn sweep(&self) {
        for keyed in [&self.user_messages, &self.user_bytes].into_iter().flatten() {
            keyed.retain_recent();
            keyed.shrink_to_fit();
        }
        if let Some(connections) = &self.connections {
            connections.retain_recent();
            connections.shrink_to_fit();
        }
    }
}

/// One connection's buckets and address (an HTTP/1 connection, an HTTP/2 connection
/// with all its streams, a WebSocket).
pub struct Peer {
    limits: Arc<Limits>,
    addr: SocketAddr,
    trusted: bool,
    messages: Option<DefaultDirectRateLimiter>,
    bytes: Option<DefaultDirectRateLimiter>,
    errors: Option<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("addr", &self.addr).field("trusted", &self.trusted).finish_non_exhaustive()
    }
}

impl Peer {
    fn new(limits: Arc<Limits>, addr: SocketAddr, trusted: bool) -> Self {
        let c = &limits.config;
        let direct = |rate: u32| if trusted { None } else { per_second(rate).map(RateLimiter::direct) };
        let errors = if trusted {
            None
        } else {
            NonZeroU32::new(c.errors_per_minute).map(|n| RateLimiter::direct(Quota::per_minute(n)))
        };
        Self {
            messages: direct(c.messages_per_second),
            bytes: direct(c.bytes_per_second),
            errors,
            addr,
            trusted,
            limits,
        }
    }

    /// The client's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The buckets a message is taken from, in order, each with how much of it it
    /// takes: the connection's messages and bytes, then its user's.
    fn buckets(&self, messages: usize, bytes: usize) -> [(Option<Bucket<'_>>, usize); 4] {
        let l = &self.limits;
        [
            (self.messages.as_ref().map(Bucket::Direct), messages),
            (self.bytes.as_ref().map(Bucket::Direct), bytes),
            (l.user_messages.as_ref().map(Bucket::Keyed), messages),
            (l.user_bytes.as_ref().map(Bucket::Keyed), bytes),
        ]
    }

    /// Takes `n` from `bucket` (keyed by `user`, or by this connection's address for an
    /// anonymous caller), or says when it could.
    fn take(&self, bucket: Bucket<'_>, user: Option<&Arc<str>>, n: usize) -> Result<(), Over> {
        let Some(n) = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else { return Ok(()) };
        let taken = match bucket {
            Bucket::Direct(limiter) => limiter.check_n(n),
            Bucket::Keyed(limiter) => {
                let key = match user {
                    Some(name) => UserKey::Name(name.clone()),
                    None => UserKey::Address(self.addr.ip().to_canonical()),
                };
                limiter.check_key_n(&key, n)
            }
        };
        match taken {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Over::Wait(not_until.wait_time_from(self.limits.clock.now()))),
            Err(_) => Err(Over::Never),
        }
    }

    /// Takes `messages` messages of `bytes` payload bytes in all from this connection's
    /// and `user`'s buckets (`None`: an anonymous caller, limited by its address), or
    /// says when they could pass. Tokens taken from a bucket before a later one refused
    /// are spent: a client over its user's rate is held a little longer.
    pub fn try_admit(&self, user: Option<&Arc<str>>, messages: usize, bytes: usize) -> Result<(), Over> {
        if self.trusted {
            return Ok(());
        }
        for (bucket, n) in self.buckets(messages, bytes) {
            if let Some(bucket) = bucket {
                self.take(bucket, user, n)?;
            }
        }
        Ok(())
    }

    /// As [`Peer::try_admit`] for a request: `Err` is counted as a refusal.
    pub fn admit_request(&self, user: Option<&Arc<str>>, messages: usize, bytes: usize) -> Result<(), Over> {
        self.try_admit(user, messages, bytes).inspect_err(|_| LimitCounters::bump(&self.limits.counters.refused))
    }

    /// Waits until one message of `bytes` read from a stream fits the buckets, taking
    /// from each in turn (nothing is taken twice): the caller stops reading meanwhile,
    /// which is how a stream's sender is slowed. Each wait is counted as a pause.
    pub async fn admit_stream(&self, user: Option<&Arc<str>>, bytes: usize) {
        if self.trusted {
            return;
        }
        for (bucket, n) in self.buckets(1, bytes) {
            let Some(bucket) = bucket else { continue };
            // `Never` cannot happen once validated (every message fits a burst): let it pass.
            while let Err(Over::Wait(wait)) = self.take(bucket, user, n) {
                LimitCounters::bump(&self.limits.counters.paused);
                tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
            }
        }
    }

    /// Counts an error answered to this connection; `true` once it spent its budget
    /// (counted as an error close: the door should close the connection).
    pub fn error(&self) -> bool {
        let Some(errors) = &self.errors else { return false };
        let spent = errors.check().is_err();
        if spent {
            LimitCounters::bump(&self.limits.counters.error_closes);
        }
        spent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LimitsConfig {
        LimitsConfig {
            messages_per_second: 10,
            bytes_per_second: 1000,
            connections_per_second_per_ip: 3,
            errors_per_minute: 2,
            trusted_networks: parse_networks(&["10.1.0.0/16".into()]).unwrap_or_default(),
            ..LimitsConfig::default()
        }
    }

    fn addr(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])), 4000)
    }

    #[test]
    fn a_connection_gets_its_burst_then_waits() {
        let limits = Arc::new(Limits::new(config()));
        let peer = limits.connect(addr("192.0.2.1")).expect("admitted");
        for _ in 0..10 {
            assert_eq!(peer.try_admit(None, 1, 10), Ok(()));
        }
        match peer.try_admit(None, 1, 10) {
            Err(Over::Wait(d)) => assert!(d > Duration::ZERO && d <= Duration::from_millis(100), "{d:?}"),
            other => panic!("expected a wait, got {other:?}"),
        }
        // Bytes: one message of the whole second's bytes passes on a fresh connection,
        // one more than a second's worth never does.
        let other = limits.connect(addr("192.0.2.2")).expect("admitted");
        assert_eq!(other.try_admit(None, 1, 1000), Ok(()));
        assert_eq!(limits.connect(addr("192.0.2.3")).expect("admitted").try_admit(None, 1, 1001), Err(Over::Never));
    }

    #[test]
    fn trusted_networks_are_not_limited() {
        let limits = Arc::new(Limits::new(config()));
        for _ in 0..10 {
            let peer = limits.connect(addr("10.1.2.3")).expect("trusted connections are never refused");
            for _ in 0..100 {
                assert_eq!(peer.try_admit(None, 1, 1000), Ok(()));
            }
            assert!(!peer.error());
        }
        assert!(limits.trusted("::ffff:10.1.0.9".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))));
    }

    #[test]
    fn new_connections_per_address_are_limited() {
        let limits = Arc::new(Limits::new(config()));
        let admitted = (0..10).filter(|_| limits.connect(addr("192.0.2.9")).is_some()).count();
        assert_eq!(admitted, 3);
        assert!(limits.connect(addr("192.0.2.10")).is_some(), "another address has its own bucket");
        assert_eq!(limits.counters().connections_refused.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn users_share_a_bucket_across_connections() {
        let limits = Arc::new(Limits::new(LimitsConfig { user_messages_per_second: 5, ..config() }));
        let a = limits.connect(addr("192.0.2.1")).expect("admitted");
        let b = limits.connect(addr("192.0.2.2")).expect("admitted");
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        let passed =
            (0..10).filter(|i| (if i % 2 == 0 { &a } else { &b }).try_admit(Some(&alice), 1, 1).is_ok()).count();
        assert_eq!(passed, 5);
        assert_eq!(a.try_admit(Some(&bob), 1, 1), Ok(()), "bob has his own bucket");
        // Anonymous callers are limited by address.
        assert!(b.try_admit(None, 1, 1).is_ok());
    }

    #[test]
    fn the_error_budget_runs_out() {
        let limits = Arc::new(Limits::new(config()));
        let peer = limits.connect(addr("192.0.2.1")).expect("admitted");
        assert!(!peer.error());
        assert!(!peer.error());
        assert!(peer.error());
        assert_eq!(limits.counters().error_closes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn settings_are_checked() {
        assert!(parse_networks(&["10.0.0.0/33".into()]).is_err());
        assert!(parse_networks(&["fe80::/10".into(), "192.0.2.7".into()]).is_ok());
        let small = LimitsConfig { bytes_per_second: 100, ..LimitsConfig::default() };
        assert!(small.validate(1000).is_err());
        assert!(LimitsConfig::default().validate(1 << 20).is_ok());
    }

    #[tokio::test]
    async fn a_stream_waits_for_its_tokens() {
        let limits = Arc::new(Limits::new(config()));
        let peer = limits.connect(addr("192.0.2.1")).expect("admitted");
        for _ in 0..10 {
            peer.admit_stream(None, 1).await;
        }
        assert_eq!(limits.counters().paused.load(Ordering::Relaxed), 0);
        assert!(peer.try_admit(None, 1, 1).is_err());
    }
}
