//! The WebSocket handshake of the HTTP doors, and the byte stream under each socket.
//!
//! Herald answers the upgrade itself instead of through axum's extractor so that it owns
//! what sits between tungstenite and the connection: [`LeanIo`], which holds no buffer
//! while the connection is idle. tungstenite keeps its read and write buffers for the
//! life of a connection, sized for throughput (8 KiB and more each, most of the memory
//! of an idle subscriber); here they are kept tiny, and the batching they gave (one read
//! for many frames, one write for a batch of frames) is done by [`LeanIo`] with memory
//! taken when bytes arrive or are written, and given back when the burst is over; a
//! large write (a packed frame) goes to the socket without being gathered at all.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures_util::future::Either;
use futures_util::FutureExt;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// A server-side WebSocket of the HTTP doors. Boxed: it is handed down through a few
/// async functions before it is split, and each would keep a copy of it (400 bytes) in
/// its future for the life of the connection.
pub(crate) type Socket = Box<WebSocketStream<LeanIo<TokioIo<Upgraded>>>>;

/// Bytes read from the socket at once: many small frames per read.
const READ_CHUNK: usize = 8 << 10;

/// tungstenite's own read buffer: room for a frame header (at most 14 bytes) and a
/// little; it grows to each frame's length while that frame is read, and those reads
/// are copies out of [`LeanIo`]'s chunk, not system calls. (tungstenite zeroes this
/// much before every read: its 128 KiB default once cost 19% of the server's CPU with
/// 256 publishers of small frames.)
const CODEC_READ_BUFFER: usize = 32;

/// Written bytes kept back before they go to the socket in one write (or at a flush).
const WRITE_COALESCE: usize = 64 << 10;

/// A write at least this long, with nothing kept back, goes to the socket at once (a
/// packed frame, a large message): gathering it would only copy it.
const WRITE_DIRECT: usize = 8 << 10;

/// Why a request is not a WebSocket upgrade Herald accepts.
#[derive(Debug)]
pub(crate) struct NotAnUpgrade(&'static str);

impl axum::response::IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        crate::ws::not_an_upgrade(self).into_response()
    }
}

impl std::fmt::Display for NotAnUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A valid WebSocket upgrade request (RFC 6455 section 4.2.1), not yet answered.
pub(crate) struct WsUpgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    config: WebSocketConfig,
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = NotAnUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, NotAnUpgrade> {
        if parts.method != Method::GET {
            return Err(NotAnUpgrade("the method must be GET"));
        }
        if !has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(NotAnUpgrade("the Connection header must include `upgrade`"));
        }
        if !has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(NotAnUpgrade("the Upgrade header must be `websocket`"));
        }
        if parts.headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
            return Err(NotAnUpgrade("the Sec-WebSocket-Version header must be 13"));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(NotAnUpgrade("the Sec-WebSocket-Key header is missing"));
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(NotAnUpgrade("this connection cannot be upgraded"));
        };
        let config = WebSocketConfig::default().read_buffer_size(CODEC_READ_BUFFER).write_buffer_size(0);
        Ok(Self { key, on_upgrade, config })
    }
}

impl WsUpgrade {
    /// Largest message (and frame) the socket takes; a bigger one fails the read.
    pub(crate) fn max_message_size(mut self, bytes: usize) -> Self {
        self.config = self.config.max_message_size(Some(bytes)).max_frame_size(Some(bytes));
        self
    }

    /// Answers 101 and runs `callback` with the socket on a task of its own once the
    /// client switched protocols. A connection that fails to upgrade just ends.
    pub(crate) fn on_upgrade<F, Fut>(self, callback: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self { key, on_upgrade, config } = self;
        // Combinators, not an async block: each step's state replaces the last one's in
        // the task, where an async block would keep `callback`'s captures beside the
        // connection's future for the connection's life.
        let connection = on_upgrade.then(move |upgraded| match upgraded {
            Ok(upgraded) => {
                let io = LeanIo::new(TokioIo::new(upgraded));
                let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config));
                Either::Left(socket.then(move |socket| callback(Box::new(socket))))
            }
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                Either::Right(std::future::ready(()))
            }
        });
        tokio::spawn(connection);
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// A byte stream that holds memory only while bytes are moving. A read takes up to
/// [`READ_CHUNK`] bytes from the socket into a buffer on the stack and keeps on the heap
/// only what the caller could not take yet; writes are gathered into a buffer made on
/// the first write and freed once it reached the socket, at a flush or past
/// [`WRITE_COALESCE`] bytes; a write of [`WRITE_DIRECT`] bytes or more with nothing
/// gathered goes to the socket at once, and only what it did not take is kept. Idle,
/// it holds two empty vectors.
pub(crate) struct LeanIo<S: AsyncWrite + Unpin> {
    inner: S,
    /// Read from the socket, not yet taken by the reader; `unread[taken..]` is left.
    unread: Vec<u8>,
    taken: usize,
    /// Written by the caller, not yet to the socket; `pending[sent..]` is left.
    pending: Vec<u8>,
    sent: usize,
}

impl<S: AsyncWrite + Unpin> LeanIo<S> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: S) -> Self {
        Self { inner, unread: Vec::new(), taken: 0, pending: Vec::new(), sent: 0 }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for LeanIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.taken < this.unread.len() {
            let n = buf.remaining().min(this.unread.len() - this.taken);
            buf.put_slice(&this.unread[this.taken..this.taken + n]);
            this.taken += n;
            if this.taken == this.unread.len() {
                this.unread = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_CHUNK {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut chunk = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
        let got = chunk.filled();
        let n = buf.remaining().min(got.len());
        buf.put_slice(&got[..n]);
        if n < got.len() {
            this.unread = got[n..].to_vec();
            this.taken = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> LeanIo<S> {
    /// Writes out what is pending; frees the buffer once all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LeanIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if data.len() >= WRITE_DIRECT && this.pending.is_empty() {
            // What the socket does not take now is kept back like any write.
            if let Poll::Ready(n) = Pin::new(&mut this.inner).poll_write(cx, data)? {
                this.pending.extend_from_slice(&data[n..]);
                return Poll::Ready(Ok(data.len()));
            }
        }
        if this.pending.len() - this.sent + data.len() > WRITE_COALESCE {
            ready!(this.poll_send(cx))?;
            if data.len() > WRITE_COALESCE {
                return Pin::new(&mut this.inner).poll_write(cx, data);
            }
        }
        this.pending.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncWrite + Unpin> Drop for LeanIo<S> {
    /// tungstenite writes its reply to a peer's close without flushing it when the
    /// connection ends right after: give what is pending one attempt, as a stream
    /// without a buffer would have when it was written.
    fn drop(&mut self) {
        if self.sent < self.pending.len() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(Ok(())) = self.poll_send(&mut cx) {
                let _ = Pin::new(&mut self.inner).poll_flush(&mut cx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn reads_hand_over_every_byte_and_keep_nothing_after() -> io::Result<()> {
        let (mut far, near) = tokio::io::duplex(64 << 10);
        let mut io = LeanIo::new(near);
        let sent: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        far.write_all(&sent).await?;
        let mut got = Vec::new();
        let mut small = [0u8; 100];
        while got.len() < sent.len() {
            let n = io.read(&mut small).await?;
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(io.unread.capacity(), 0, "nothing held once all was taken");
        Ok(())
    }

    #[tokio::test]
    async fn writes_are_gathered_until_a_flush_and_then_freed() -> io::Result<()> {
        let (mut far, near) = tokio::io::duplex(256 << 10);
        let mut io = LeanIo::new(near);
        for i in 0..100u8 {
            io.write_all(&[i; 10]).await?;
        }
        assert_eq!(io.pending.len(), 1000, "kept back until the flush");
        io.flush().await?;
        assert_eq!(io.pending.capacity(), 0, "freed once written");
        let mut got = vec![0u8; 1000];
        far.read_exact(&mut got).await?;
        assert!(got.chunks(10).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8)));
        // A large write with nothing gathered goes out at once, copied nowhere.
        io.write_all(&vec![5u8; WRITE_DIRECT]).await?;
        assert_eq!(io.pending.capacity(), 0, "written through");
        let mut direct = vec![0u8; WRITE_DIRECT];
        far.read_exact(&mut direct).await?;
        assert!(direct.iter().all(|&b| b == 5));
        // Past the coalescing bound the gathered bytes go out before more are taken.
        io.write_all(&vec![7u8; WRITE_COALESCE + 10]).await?;
        io.flush().await?;
        let mut big = vec![0u8; WRITE_COALESCE + 10];
        far.read_exact(&mut big).await?;
        assert!(big.iter().all(|&b| b == 7));
        Ok(())
    }
}
