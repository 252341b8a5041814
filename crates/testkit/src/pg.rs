//! For the PostgreSQL fault tests (the store's and the server's): where a test
//! database URL points ([`server`]), and a TCP forwarder to it ([`Proxy`]) that a test
//! can cut (listener and every forwarded connection closed, as when the server goes
//! away) and start again on the same port.

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

/// The address, user and database a PostgreSQL URL names (a TCP host only).
pub fn server(url: &str) -> Result<(SocketAddr, String, String), Box<dyn std::error::Error + Send + Sync>> {
    let config: tokio_postgres::Config = url.parse()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => return Err("the test URL must name a TCP host".into()),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))?
        .next()
        .ok_or("the test host has no address")?;
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let db = config.get_dbname().unwrap_or("postgres").to_owned();
    Ok((addr, user, db))
}
