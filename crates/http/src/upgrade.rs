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
//!
//! A connection's reader and writer share the socket through [`SharedSocket`]. The
//! writer frames data messages itself: a header of 2 to 10 bytes and the shared payload
//! go straight into [`LeanIo`]'s gather buffer (one copy; through tungstenite each was
//! formatted into its own buffer and copied again, about half of a delivery's
//! instructions). tungstenite keeps the reading side and the control frames (Pings,
//! replies to the peer's Pings and Close, the closing handshake).

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures_util::future::Either;
use futures_util::{FutureExt, Sink, Stream};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
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
/// [`WRITE_COALESCE`] bytes; a data frame of [`WRITE_DIRECT`] bytes or more with
/// nothing gathered goes to the socket at once, and only what it did not take is kept.
/// Idle, it holds two empty vectors.
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

impl<S: AsyncWrite + Unpin> LeanIo<S> {
    /// Writes one whole frame, `header` then `payload`: all of it is taken (gathered, or
    /// partly written and the rest gathered) or, while the gathered bytes wait for the
    /// socket past [`WRITE_COALESCE`], none of it. So frames written here and
    /// tungstenite's own never interleave.
    fn poll_write_frame(&mut self, cx: &mut Context<'_>, header: &[u8], payload: &[u8]) -> Poll<io::Result<()>> {
        let len = header.len() + payload.len();
        if self.pending.len() - self.sent + len > WRITE_COALESCE {
            ready!(self.poll_send(cx))?;
        }
        if len >= WRITE_DIRECT && self.pending.is_empty() {
            let parts = [IoSlice::new(header), IoSlice::new(payload)];
            if let Poll::Ready(n) = Pin::new(&mut self.inner).poll_write_vectored(cx, &parts)? {
                // What the socket did not take is gathered like any write.
                match n.checked_sub(header.len()) {
                    Some(from) => self.pending.extend_from_slice(&payload[from..]),
                    None => {
                        self.pending.reserve(len - n);
                        self.pending.extend_from_slice(&header[n..]);
                        self.pending.extend_from_slice(payload);
                    }
                }
                return Poll::Ready(Ok(()));
            }
        }
        self.pending.reserve(len);
        self.pending.extend_from_slice(header);
        self.pending.extend_from_slice(payload);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LeanIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        // Only tungstenite writes here (the handshake's answer, control frames: small);
        // data frames come through `poll_write_frame`.
        let this = &mut *self;
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

/// The kind of a data frame Herald writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataFrame {
    Text,
    Binary,
}

/// The header of an unfragmented, unmasked (server) data frame of `len` payload bytes
/// (RFC 6455 section 5.2): its bytes and how many of them are used.
fn frame_header(kind: DataFrame, len: usize) -> ([u8; 10], usize) {
    let opcode = match kind {
        DataFrame::Text => 0x1,
        DataFrame::Binary => 0x2,
    };
    let mut header = [0u8; 10];
    header[0] = 0x80 | opcode; // FIN: one frame holds the whole message
    if len < 126 {
        header[1] = len as u8;
        (header, 2)
    } else if let Ok(short) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&short.to_be_bytes());
        (header, 4)
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (header, 10)
    }
}

/// A connection's socket, shared by its reader and its writer. Both run in the
/// connection's one task and hold the lock only within one poll, never across an await,
/// so neither ever waits for the other. Data frames are written by Herald
/// ([`SharedSocket::write_data`]); everything else goes through tungstenite.
pub(crate) struct SharedSocket<T: AsyncWrite + Unpin = TokioIo<Upgraded>> {
    socket: Mutex<Box<WebSocketStream<LeanIo<T>>>>,
    /// A Close was sent or received, or the stream ended: no data frame may follow.
    closed: AtomicBool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> SharedSocket<T> {
    pub(crate) fn new(socket: Box<WebSocketStream<LeanIo<T>>>) -> Self {
        Self { socket: Mutex::new(socket), closed: AtomicBool::new(false) }
    }

    fn lock(&self) -> MutexGuard<'_, Box<WebSocketStream<LeanIo<T>>>> {
        // A panic while locked leaves nothing half-done that the other side could see
        // (a frame is written whole or not at all): go on with the socket.
        self.socket.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reading side: tungstenite's messages (it answers Pings and Close itself).
    pub(crate) fn reader(&self) -> ReadHalf<'_, T> {
        ReadHalf(self)
    }

    /// Writes one data frame of `payload` (gathered until [`SharedSocket::flush`], or
    /// written at once when large).
    pub(crate) async fn write_data(&self, kind: DataFrame, payload: &[u8]) -> Result<(), WsError> {
        let (header, used) = frame_header(kind, payload.len());
        poll_fn(|cx| {
            if self.closed.load(Ordering::Relaxed) {
                return Poll::Ready(Err(WsError::AlreadyClosed));
            }
            self.lock().get_mut().poll_write_frame(cx, &header[..used], payload).map_err(WsError::Io)
        })
        .await
    }

    /// Sends a control frame (Ping, Close) through tungstenite, and flushes.
    pub(crate) async fn send(&self, message: WsMessage) -> Result<(), WsError> {
        let close = matches!(message, WsMessage::Close(_));
        poll_fn(|cx| Pin::new(&mut **self.lock()).poll_ready(cx)).await?;
        let sent = Pin::new(&mut **self.lock()).start_send(message);
        if close {
            self.closed.store(true, Ordering::Relaxed);
        }
        sent?;
        self.flush().await
    }

    /// Writes out everything gathered (tungstenite's control frames too; also once the
    /// closing handshake is over, when tungstenite's own flush stops short of the socket).
    pub(crate) async fn flush(&self) -> Result<(), WsError> {
        poll_fn(|cx| {
            let mut socket = self.lock();
            ready!(Pin::new(&mut **socket).poll_flush(cx))?;
            Pin::new(socket.get_mut()).poll_flush(cx).map_err(WsError::Io)
        })
        .await
    }
}

/// The reading side of a [`SharedSocket`].
pub(crate) struct ReadHalf<'a, T: AsyncWrite + Unpin = TokioIo<Upgraded>>(&'a SharedSocket<T>);

impl<T: AsyncRead + AsyncWrite + Unpin> Stream for ReadHalf<'_, T> {
    type Item = Result<WsMessage, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let shared = self.0;
        let next = Pin::new(&mut **shared.lock()).poll_next(cx);
        // A read error (a frame too large) leaves the protocol able to send what is
        // queued and a Close; a broken socket fails the writes by itself.
        if let Poll::Ready(None | Some(Ok(WsMessage::Close(_)))) = &next {
            shared.closed.store(true, Ordering::Relaxed);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn frame_headers_take_the_shortest_length_form() {
        let cases = [(0, vec![0x81, 0]), (125, vec![0x81, 125]), (126, vec![0x81, 126, 0, 126])];
        for (len, want) in cases {
            let (h, used) = frame_header(DataFrame::Text, len);
            assert_eq!(&h[..used], &want[..], "{len}");
        }
        let (h, used) = frame_header(DataFrame::Binary, 65_535);
        assert_eq!(&h[..used], &[0x82, 126, 0xff, 0xff]);
        let (h, used) = frame_header(DataFrame::Binary, 65_536);
        assert_eq!(&h[..used], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    /// Frames Herald writes itself and tungstenite's own (a Ping, the reply to the
    /// peer's Close) reach a real tungstenite client whole and in order, at every length
    /// form and on both paths (gathered and written through); after the peer's Close no
    /// data frame is written.
    #[tokio::test]
    async fn data_frames_written_directly_reach_a_client_whole_and_stop_at_close() -> Result<(), WsError> {
        use futures_util::{SinkExt, StreamExt};
        let (far, near) = tokio::io::duplex(16 << 10);
        let config = WebSocketConfig::default();
        let server = WebSocketStream::from_raw_socket(LeanIo::new(near), Role::Server, Some(config)).await;
        let shared = SharedSocket::new(Box::new(server));
        let mut client = WebSocketStream::from_raw_socket(far, Role::Client, Some(config)).await;

        let sizes = [0usize, 1, 125, 126, 300, 65_535, 65_536, 200_000];
        let writer = async {
            for (i, &len) in sizes.iter().enumerate() {
                let kind = if i % 2 == 0 { DataFrame::Text } else { DataFrame::Binary };
                shared.write_data(kind, &vec![b'a' + i as u8; len]).await?;
                if i == 3 {
                    shared.send(WsMessage::Ping(bytes::Bytes::from_static(b"p"))).await?;
                }
            }
            shared.flush().await
        };
        let reader = async {
            let mut got = Vec::new();
            while got.len() < sizes.len() + 1 {
                match client.next().await {
                    Some(Ok(m)) => got.push(m),
                    other => panic!("client: {other:?}"),
                }
            }
            got
        };
        let (written, got) = tokio::join!(writer, reader);
        written?;
        let mut data = got.iter().filter(|m| !matches!(m, WsMessage::Ping(_)));
        for (i, &len) in sizes.iter().enumerate() {
            let m = data.next().expect("a data frame");
            assert_eq!(m.len(), len, "frame {i}");
            assert_eq!(m.is_text(), i % 2 == 0, "frame {i}");
            assert!(m.clone().into_data().iter().all(|&b| b == b'a' + i as u8), "frame {i}");
        }
        assert!(matches!(got[4], WsMessage::Ping(_)), "the Ping in its place: {:?}", got[4]);

        // The peer closes: the reader sees it (tungstenite answers), data is refused.
        client.send(WsMessage::Close(None)).await?;
        let mut reader = shared.reader();
        // The client's Pong comes first.
        assert!(matches!(reader.next().await, Some(Ok(WsMessage::Pong(_)))));
        assert!(matches!(reader.next().await, Some(Ok(WsMessage::Close(_)))));
        assert!(matches!(shared.write_data(DataFrame::Text, b"late").await, Err(WsError::AlreadyClosed)));
        shared.flush().await?;
        // The reply ends the client's stream, with nothing before it.
        assert!(matches!(client.next().await, None | Some(Ok(WsMessage::Close(_)))));
        Ok(())
    }

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
        // Past the coalescing bound the gathered bytes go out before more are taken.
        io.write_all(&vec![7u8; WRITE_COALESCE + 10]).await?;
        io.flush().await?;
        let mut big = vec![0u8; WRITE_COALESCE + 10];
        far.read_exact(&mut big).await?;
        assert!(big.iter().all(|&b| b == 7));
        Ok(())
    }
}
