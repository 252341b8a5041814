//! The one listener and what it lets in: accepts TCP connections, refuses an address
//! opening more per second than `[limits]` allows, completes TLS handshakes (with ALPN
//! picking HTTP/2 or HTTP/1.1) and serves each connection with hyper; without TLS, the
//! client's first bytes tell HTTP/2 (gRPC) from HTTP/1.1. Every request carries its
//! connection's [`Peer`](herald_auth::limits::Peer) (address and buckets) as an
//! extension, for the doors' limits, and with TLS the user of a verified client
//! certificate ([`ClientCert`]).
//!
//! A client that connects and stalls holds nothing for long: the TLS handshake, the
//! first bytes and each HTTP/1 request's headers (also the idle time between requests)
//! have timeouts, every handshake and first read runs on the connection's own task, and
//! at most [`MAX_PENDING`] connections may be at that stage at once, so neither a
//! slowloris client nor a thousand half-open sockets delay anyone else's accept.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use herald_auth::limits::{LimitCounters, Limits};
use herald_auth::ClientCert;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::tls::Tls;

/// Connections at once that have not finished their TLS handshake or sent their first
/// bytes; past it, a new connection is closed at once (and counted as refused).
pub const MAX_PENDING: usize = 10_000;

/// The HTTP/2 connection preface every HTTP/2 client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Interval of HTTP/2 keep-alive pings, which find dead peers of idle connections.
const H2_PING_EVERY: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` (over `tls` when set) until `shutdown`, then waits for
/// the connections to finish their requests (upgraded WebSockets are the doors' own).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    app: Router,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let builders = Builders::new(limits.config().header_timeout);
    let server = Arc::new(Serving { app, limits, tls, builders });
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(peer) = server.limits.connect(addr) else {
            tracing::debug!(%addr, "connection refused: over the new-connections rate of its address");
            continue;
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            LimitCounters::bump(&server.limits.counters().connections_refused);
            tracing::warn!(%addr, "connection refused: {MAX_PENDING} connections are still handshaking");
            continue;
        };
        // Small frames (replies, acks) must not wait for Nagle's algorithm.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let server = server.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some(opened) = server.open(tcp, addr).await else { return };
            drop(permit);
            let (builder, io, cert) = match opened {
                Opened::Plain(http, tcp) => (server.builders.get(http), Either::Left(tcp), None),
                Opened::Tls(http, tls) => {
                    let cert = crate::tls::client_user(tls.get_ref().1).map(ClientCert);
                    (server.builders.get(http), Either::Right(tls), cert)
                }
            };
            let app = server.app.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                if let Some(cert) = &cert {
                    req.extensions_mut().insert(cert.clone());
                }
                let mut app = app.clone();
                async move { app.call(req).await }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                let timed_out = e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout);
                if timed_out {
                    tracing::debug!(%addr, "connection dropped: request headers not sent in time");
                    LimitCounters::bump(&server.limits.counters().header_timeouts);
                } else {
                    tracing::debug!(%addr, error = %e, "connection ended with an error");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// What every connection task shares.
struct Serving {
    app: Router,
    limits: Arc<Limits>,
    tls: Option<Arc<Tls>>,
    builders: Builders,
}

/// Which HTTP a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Http {
    One,
    Two,
}

/// A connection past its handshake and first bytes.
enum Opened {
    Plain(Http, TcpStream),
    Tls(Http, Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Serving {
    /// Finishes the TLS handshake or waits for the first bytes, within the timeouts;
    /// `None` when the client did not (counted).
    async fn open(&self, tcp: TcpStream, addr: SocketAddr) -> Option<Opened> {
        let config = self.limits.config();
        let counters = self.limits.counters();
        match &self.tls {
            Some(tls) => {
                let accept = tls.acceptor().accept(tcp);
                let stream =
                    in_time(addr, "TLS handshake", config.handshake_timeout, &counters.handshake_timeouts, accept)
                        .await?;
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                Some(Opened::Tls(if h2 { Http::Two } else { Http::One }, Box::new(stream)))
            }
            None => {
                let http =
                    in_time(addr, "first bytes", config.header_timeout, &counters.header_timeouts, sniff(&tcp)).await?;
                Some(Opened::Plain(http, tcp))
            }
        }
    }
}

/// What `step` gives if it finishes within `limit`; `None` if it fails or times out
/// (a timeout counted in `timeouts`).
async fn in_time<T>(
    addr: SocketAddr,
    step: &str,
    limit: Duration,
    timeouts: &AtomicU64,
    work: impl std::future::Future<Output = std::io::Result<T>>,
) -> Option<T> {
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(done)) => Some(done),
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "connection dropped: {step} failed");
            None
        }
        Err(_) => {
            tracing::debug!(%addr, "connection dropped: {step} not done in time");
            LimitCounters::bump(timeouts);
            None
        }
    }
}

/// Waits for a cleartext client's first bytes and tells HTTP/2 (its preface) from
/// HTTP/1.1, without taking them off the socket.
async fn sniff(tcp: &TcpStream) -> std::io::Result<Http> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Http::One);
        }
        if n == H2_PREFACE.len() {
            return Ok(Http::Two);
        }
        // Part of the preface: the rest is on its way (peek would return at once again).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One hyper builder per HTTP version, so the version is never sniffed twice.
struct Builders {
    one: Builder<TokioExecutor>,
    two: Builder<TokioExecutor>,
}

impl Builders {
    fn new(header_timeout: Duration) -> Self {
        let mut one = Builder::new(TokioExecutor::new()).http1_only();
        // Without a timer hyper has no header timeout at all.
        one.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
        let mut two = Builder::new(TokioExecutor::new()).http2_only();
        two.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_EVERY)
            .keep_alive_timeout(Duration::from_secs(20));
        Self { one, two }
    }

    fn get(&self, http: Http) -> &Builder<TokioExecutor> {
        match http {
            Http::One => &self.one,
            Http::Two => &self.two,
        }
    }
}
