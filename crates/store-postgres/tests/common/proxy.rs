//! A TCP forwarder to the test PostgreSQL that a test can cut (listener and every
//! forwarded connection closed, as when the server goes away) and start again on the
//! same port.

use std::net::SocketAddr;

use tokio::net::{TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Forwards `127.0.0.1:<port>` to `upstream` while running.
pub struct Proxy {
    pub port: u16,
    upstream: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts forwarding on a free port.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let mut proxy = Self { port: 0, upstream, accept: None };
        proxy.resume().await?;
        Ok(proxy)
    }

    /// Listens again (on the same port once one was given).
    pub async fn resume(&mut self) -> std::io::Result<()> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], self.port)))?;
        let listener = socket.listen(64)?;
        self.port = listener.local_addr()?.port();
        let upstream = self.upstream;
        self.accept = Some(tokio::spawn(async move {
            // Owned here: aborting the accept task drops every forwarding task too.
            let mut links = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                links.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
        Ok(())
    }

    /// Closes the listener and every forwarded connection; resolves once they are closed.
    pub async fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}
