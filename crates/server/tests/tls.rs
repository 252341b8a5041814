//! TLS on the one port (docs/security.md): HTTP, WebSocket, SSE and gRPC (ALPN h2) over
//! TLS with a private CA made here; a certificate replaced on disk is served to new
//! connections while an old one stays up; a client that never finishes its handshake
//! delays nobody; a bad key pair is refused at start, naming the file.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, start, within, Result, TestServer};
use herald_auth::{AuthConfig, GrantsSpec, UserConfig};
use herald_client::grpc::pb;
use herald_client::{Client, GrpcClient, StartFrom, TlsConfig, WsConnection};
use herald_server::tls::{Tls, TlsFiles};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let dir = std::env::temp_dir().join(format!("herald-tls-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private CA, and server certificates for 127.0.0.1 and localhost it signs.
struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Herald test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let dir = TempDir::new(name)?;
        std::fs::write(dir.0.join("ca.pem"), ca.pem())?;
        Ok(Self { dir, ca })
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.0.join("ca.pem")
    }

    /// Writes a new server certificate named `cn` (and a new key) as cert.pem / key.pem.
    fn issue(&self, cn: &str) -> Result<TlsFiles> {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let files = TlsFiles { cert: self.dir.0.join("cert.pem"), key: self.dir.0.join("key.pem"), client_ca: None };
        // Key first, then the certificate: the server reloads once both changed, and a
        // pair caught half-written is refused and retried at the next change.
        write_atomically(&files.key, key.serialize_pem().as_bytes())?;
        write_atomically(&files.cert, cert.pem().as_bytes())?;
        Ok(files)
    }
}

impl Pki {
    /// A client certificate for the user `cn` and its key, as files `{cn}.pem` and
    /// `{cn}.key`.
    fn issue_client(&self, cn: &str) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        let (cert_file, key_file) = (self.dir.0.join(format!("{cn}.pem")), self.dir.0.join(format!("{cn}.key")));
        std::fs::write(&cert_file, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        Ok((cert_file, key_file))
    }
}

/// Writes `bytes` beside `path` and renames it over `path` (as certificate tools do).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn tls_server(files: &TlsFiles) -> Result<TestServer> {
    let server = start(|c| c.tls = Some(files.clone())).await?;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    Ok(server)
}

/// A rustls client configuration trusting the CA in `ca`, offering `alpn`.
fn client_config(ca: &Path, alpn: &[&[u8]]) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in <CertificateDer<'static> as rustls::pki_types::pem::PemObject>::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The leaf certificate a fresh handshake gets, and the protocol ALPN chose.
async fn handshake(server: &TestServer, ca: &Path, alpn: &[&[u8]]) -> Result<(CertificateDer<'static>, Vec<u8>)> {
    let addr = server.url.trim_start_matches("https://").to_owned();
    let config = client_config(ca, alpn)?;
    let tcp = tokio::net::TcpStream::connect(&addr).await?;
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let (_, session) = tls.get_ref();
    let leaf = session.peer_certificates().and_then(|c| c.first()).ok_or("no certificate")?.clone().into_owned();
    Ok((leaf, session.alpn_protocol().unwrap_or_default().to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_door_over_tls_on_one_port() -> Result {
    let pki = Pki::new("doors")?;
    let files = pki.issue("herald one")?;
    let server = tls_server(&files).await?;
    let trust = TlsConfig::with_ca_file(pki.ca_file())?;
    let client = Client::with_tls(&server.url, trust.clone());

    // ALPN: gRPC's h2 and HTTP/1.1 on the same port.
    assert_eq!(handshake(&server, &pki.ca_file(), &[b"h2", b"http/1.1"]).await?.1, b"h2");
    assert_eq!(handshake(&server, &pki.ca_file(), &[b"http/1.1"]).await?.1, b"http/1.1");

    // WebSocket (wss://), SSE and gRPC subscribers; publishes over HTTPS and gRPC.
    let mut ws = WsConnection::connect_with(&server.url, &trust).await?;
    let reply = ws.subscribe("tls.t", StartFrom::Earliest, None).await?;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let https =
        reqwest::Client::builder().tls_backend_preconfigured(client_config(&pki.ca_file(), &[b"http/1.1"])?).build()?;
    let sse = https.get(format!("{}/v1/topics/tls.t/sse?from=earliest", server.url)).send().await?;
    assert_eq!(sse.status(), 200);
    let grpc = GrpcClient::connect_with(&server.url, &trust).await?;
    let mut grpc_sub = grpc.subscribe("tls.t", StartFrom::Earliest, None).await?;

    assert_eq!(client.publish("tls.t", "text/plain", "over https").await?.offset, 1);
    assert_eq!(grpc.publish("tls.t", pb::Kind::Text, b"over grpc+tls".to_vec()).await?.offset, 2);

    for want in ["over https", "over grpc+tls"] {
        let text = within(Duration::from_secs(5), "ws delivery", ws.recv_text()).await??;
        assert!(text.contains(want), "{text}");
        let m = within(Duration::from_secs(5), "grpc delivery", grpc_sub.next()).await??.ok_or("grpc ended")?;
        assert_eq!(m.to_line(), want);
    }
    let mut sse = sse;
    let mut seen = String::new();
    while !seen.contains("over grpc+tls") {
        let chunk = within(Duration::from_secs(5), "sse event", sse.chunk()).await??.ok_or("sse ended")?;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("over https"), "{seen}");

    // A client that trusts only the system's store refuses the private CA's certificate.
    let untrusting = Client::new(&server.url);
    let refused = untrusting.publish("tls.t", "text/plain", "x").await;
    assert!(refused.is_err(), "a certificate from an unknown CA was accepted");
    // Cleartext HTTP on the TLS port gets no HTTP answer.
    let plain = common::http().get(server.url.replacen("https://", "http://", 1) + "/healthz").send().await;
    assert!(plain.is_err(), "cleartext HTTP was answered: {plain:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_certificate_is_served_to_new_connections_while_old_ones_stay() -> Result {
    let pki = Pki::new("renew")?;
    let files = pki.issue("herald first")?;
    let server = tls_server(&files).await?;
    let trust = TlsConfig::with_ca_file(pki.ca_file())?;
    let (first, _) = handshake(&server, &pki.ca_file(), &[b"http/1.1"]).await?;

    // A subscriber connected under the first certificate.
    let mut ws = WsConnection::connect_with(&server.url, &trust).await?;
    ws.subscribe("tls.renew", StartFrom::Latest, None).await?;

    pki.issue("herald second")?;
    eventually(Duration::from_secs(10), "the new certificate served", || async {
        Ok(handshake(&server, &pki.ca_file(), &[b"http/1.1"]).await?.0 != first)
    })
    .await?;

    // The old connection still works, and new clients connect (trusting the same CA).
    let client = Client::with_tls(&server.url, trust);
    client.publish("tls.renew", "text/plain", "after the renewal").await?;
    let text = within(Duration::from_secs(5), "delivery on the old connection", ws.recv_text()).await??;
    assert!(text.contains("after the renewal"), "{text}");

    // A broken pair on disk (a key that does not match) is refused; the current
    // certificate stays.
    let (current, _) = handshake(&server, &pki.ca_file(), &[b"http/1.1"]).await?;
    write_atomically(&files.key, KeyPair::generate()?.serialize_pem().as_bytes())?;
    // Give the watcher a few rounds to see the change and refuse it.
    for _ in 0..3 {
        tokio::time::sleep(herald_server::tls::WATCH_EVERY).await;
    }
    assert_eq!(handshake(&server, &pki.ca_file(), &[b"http/1.1"]).await?.0, current);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_finishes_its_handshake_delays_nobody() -> Result {
    let pki = Pki::new("stall")?;
    let files = pki.issue("herald")?;
    let timeout = Duration::from_secs(2);
    let server = start(|c| {
        c.tls = Some(files.clone());
        c.limits.handshake_timeout = timeout;
    })
    .await?;
    let addr = server.url.trim_start_matches("https://").to_owned();
    // 1000 connections that never send a ClientHello: their handshakes wait on tasks of
    // their own, so a new client is served at once.
    let opened = std::time::Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..1000 {
        stalled.push(tokio::net::TcpStream::connect(&addr).await?);
    }
    let client = Client::with_tls(&server.url, TlsConfig::with_ca_file(pki.ca_file())?);
    let published =
        within(Duration::from_secs(5), "a publish past stalled handshakes", client.publish("tls.s", "text/plain", "x"))
            .await??;
    assert_eq!(published.offset, 1);
    assert!(opened.elapsed() < timeout, "served only after {:?}", opened.elapsed());
    // Each is dropped once the handshake timeout passes.
    let reads = stalled.into_iter().map(|mut tcp| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    within(timeout + Duration::from_secs(5), "every stalled handshake dropped", futures_util::future::join_all(reads))
        .await?;
    let https =
        reqwest::Client::builder().tls_backend_preconfigured(client_config(&pki.ca_file(), &[b"http/1.1"])?).build()?;
    let text = https.get(format!("{}/metrics", server.url)).send().await?.text().await?;
    let dropped = text
        .lines()
        .find_map(|l| l.strip_prefix("herald_limited_total{limit=\"handshake_timeout\"} "))
        .ok_or("no handshake_timeout count")?;
    assert!(dropped.parse::<u64>()? >= 1000, "{dropped}");
    Ok(())
}

#[tokio::test]
async fn a_client_certificate_logs_in_as_its_common_name() -> Result {
    let pki = Pki::new("mtls")?;
    let mut files = pki.issue("herald")?;
    files.client_ca = Some(pki.ca_file());
    let alice = pki.issue_client("alice")?;
    let mallory = pki.issue_client("mallory")?;
    let stranger = Pki::new("mtls-stranger")?;
    let forged = stranger.issue_client("alice")?;
    // alice logs in with her certificate only (no password_hash); bob with a password.
    let granted = vec!["certs.>".to_owned()];
    let users = vec![
        UserConfig {
            name: "alice".into(),
            grants: GrantsSpec { publish: granted.clone(), subscribe: granted, ..Default::default() },
            ..Default::default()
        },
        UserConfig {
            name: "bob".into(),
            password_hash: Some(herald_auth::hash_password("bob-pw").map_err(|e| e.to_string())?),
            ..Default::default()
        },
    ];
    let server = start(|c| {
        c.tls = Some(files.clone());
        c.auth = Some(AuthConfig { users, ..Default::default() });
    })
    .await?;
    let with_cert =
        |(cert, key): &(PathBuf, PathBuf)| TlsConfig::with_ca_file(pki.ca_file())?.with_client_cert(cert, key);

    // REST, WebSocket and gRPC: the certificate is the credential, the grants alice's.
    let rest = Client::with_tls(&server.url, with_cert(&alice)?);
    assert_eq!(rest.publish("certs.a", "text/plain", "by certificate").await?.offset, 1);
    let refused = rest.publish("other.a", "text/plain", "x").await.err().ok_or("a topic not granted was accepted")?;
    assert!(refused.to_string().contains("403 forbidden"), "{refused}");
    let mut ws = WsConnection::connect_with(&server.url, &with_cert(&alice)?).await?;
    let reply = ws.subscribe("certs.a", StartFrom::Earliest, None).await?;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(ws.recv().await?["data"], "by certificate");
    let grpc = GrpcClient::connect_with(&server.url, &with_cert(&alice)?).await?;
    assert_eq!(grpc.publish("certs.a", pb::Kind::Text, b"over grpc".to_vec()).await?.offset, 2);
    assert_eq!(ws.recv().await?["data"], "over grpc");

    // A certificate of the CA naming no user: 401; no certificate and no header: 401.
    let e = Client::with_tls(&server.url, with_cert(&mallory)?).publish("certs.a", "text/plain", "x").await.err();
    let e = e.ok_or("an unknown user's certificate was accepted")?.to_string();
    assert!(e.contains("401 unauthorized") && e.contains("mallory"), "{e}");
    let e = Client::with_tls(&server.url, TlsConfig::with_ca_file(pki.ca_file())?)
        .publish("certs.a", "text/plain", "x")
        .await
        .err()
        .ok_or("a client without credentials was accepted")?;
    assert!(e.to_string().contains("401 unauthorized"), "{e}");
    // A certificate another CA signed fails the handshake itself.
    let e = Client::with_tls(&server.url, with_cert(&forged)?).publish("certs.a", "text/plain", "x").await.err();
    assert!(matches!(e, Some(herald_client::ClientError::Http(_))), "{e:?}");
    // A password still works beside certificates; nothing refused was stored.
    let bob = Client::with_tls(&server.url, TlsConfig::with_ca_file(pki.ca_file())?)
        .authorized(herald_client::basic_auth("bob", "bob-pw"))?;
    let e = bob.publish("certs.a", "text/plain", "x").await.err().ok_or("bob has no grant")?;
    assert!(e.to_string().contains("403 forbidden"), "{e}");
    assert_eq!(rest.info("certs.a").await?.last, 2);
    Ok(())
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused_at_start() -> Result {
    let pki = Pki::new("mismatch")?;
    let files = pki.issue("herald")?;
    std::fs::write(&files.key, KeyPair::generate()?.serialize_pem())?;
    let err = format!("{:#}", Tls::new(files.clone()).err().ok_or("a mismatched pair was accepted")?);
    assert!(err.contains("does not match") && err.contains("key.pem"), "{err}");
    std::fs::write(&files.cert, "not a certificate")?;
    let err = format!("{:#}", Tls::new(files).err().ok_or("a file without a certificate was accepted")?);
    assert!(err.contains("cert.pem"), "{err}");
    Ok(())
}
