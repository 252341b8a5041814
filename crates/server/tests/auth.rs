//! Authentication and grants on every door (docs/security.md): REST, WebSocket JSON, raw
//! WebSocket, SSE and gRPC refuse a caller without valid credentials (401 with
//! `WWW-Authenticate`, a refused upgrade, UNAUTHENTICATED), refuse an action not granted
//! (403 `forbidden`, an error frame on a connection that stays, PERMISSION_DENIED) with
//! nothing published or consumed, and serve what is granted. Basic users have argon2 or
//! bcrypt hashes; bearer tokens are JWTs with a pinned algorithm, `exp`, `iss`, `aud`.
//! Browsers' SSE streams and WebSockets may carry the token in a cookie, taken only from
//! the pages of the allowed origins.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{start, within, Result, TestServer};
use futures_util::{SinkExt, StreamExt};
use herald_auth::{AuthConfig, GrantsSpec, JwtConfig, SecretSource, UserConfig};
use herald_client::grpc::pb;
use herald_client::GrpcClient;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &str = "the test secret, at least thirty-two bytes long";
const ISSUER: &str = "https://auth.test";
const AUDIENCE: &str = "herald";

fn list(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// alice may do everything on `chat.>` and `jobs.*`, except publish to `chat.announce`;
/// bob may only read `chat.public`; tokens carry their own grants.
async fn server() -> Result<TestServer> {
    let auth = auth_config()?;
    start(move |c| c.auth = Some(auth)).await
}

/// The `[auth]` of [`server`].
fn auth_config() -> Result<AuthConfig> {
    let dir =
        std::env::temp_dir().join(format!("herald-auth-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir)?;
    let secret = dir.join("jwt.secret");
    std::fs::write(&secret, format!("{SECRET}\n"))?;
    let alice = UserConfig {
        name: "alice".into(),
        password_hash: Some(herald_auth::hash_password("alice-pw").map_err(|e| e.to_string())?),
        password: None,
        grants: GrantsSpec {
            publish: list(&["chat.>"]),
            subscribe: list(&["chat.>"]),
            enqueue: list(&["jobs.*"]),
            consume: list(&["jobs.*"]),
            admin: list(&["chat.>", "jobs.*"]),
            deny: Some(Box::new(GrantsSpec { publish: list(&["chat.announce"]), ..Default::default() })),
        },
    };
    let bob = UserConfig {
        name: "bob".into(),
        password_hash: Some(bcrypt::hash("bob-pw", 4)?),
        password: None,
        grants: GrantsSpec { subscribe: list(&["chat.public"]), ..Default::default() },
    };
    let jwt = JwtConfig {
        algorithm: "HS256".into(),
        secret: Some(SecretSource { file: Some(secret), env: None }),
        previous_secret: None,
        previous_until: None,
        public_key_file: None,
        jwks_file: None,
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        claim: None,
        leeway_secs: Some(0),
    };
    Ok(AuthConfig { users: vec![alice, bob], jwt: Some(jwt), ..Default::default() })
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

fn token_with(alg: Algorithm, secret: &str, claims: Value) -> String {
    let token = encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap_or_default();
    format!("Bearer {token}")
}

fn now() -> u64 {
    herald_auth::now_secs()
}

/// carol's token: publish and subscribe on `chat.>`.
fn claims() -> Value {
    json!({"sub": "carol", "exp": now() + 600, "iss": ISSUER, "aud": AUDIENCE,
           "herald": {"publish": ["chat.>"], "subscribe": ["chat.>"]}})
}

/// carol's claims, expiring in two seconds.
fn brief_claims() -> Value {
    let mut brief = claims();
    brief["exp"] = json!(now() + 2);
    brief
}

async fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> Result<(u16, Value, Vec<String>)> {
    let url = format!("{}{path}", server.url);
    let mut req = match method {
        "GET" => server.http.get(url),
        "DELETE" => server.http.delete(url),
        _ => server.http.post(url).header("content-type", "text/plain").body(body.to_owned()),
    };
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let challenges =
        r.headers().get_all("www-authenticate").iter().filter_map(|v| v.to_str().ok()).map(str::to_owned).collect();
    let bytes = r.bytes().await?;
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes)? };
    Ok((status, body, challenges))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_refuses_missing_and_bad_credentials_and_what_is_not_granted() -> Result {
    let server = server().await?;
    let (alice, bob) = (basic("alice", "alice-pw"), basic("bob", "bob-pw"));

    let (s, v, challenges) = call(&server, "POST", "/v1/topics/chat.room/messages", None, "x").await?;
    assert_eq!((s, code(&v)), (401, "unauthorized"), "{v}");
    assert_eq!(challenges, vec![r#"Basic realm="herald""#, r#"Bearer realm="herald""#]);
    let wrong = basic("alice", "guess");
    assert_eq!(call(&server, "POST", "/v1/topics/chat.room/messages", Some(&wrong), "x").await?.0, 401);
    assert_eq!(call(&server, "POST", "/v1/topics/chat.room/messages", Some("Digest x"), "x").await?.0, 401);
    // Health and metrics stay open (probes carry no credentials).
    assert_eq!(common::http().get(format!("{}/readyz", server.url)).send().await?.status(), 200);

    let (s, v, _) = call(&server, "POST", "/v1/topics/chat.room/messages", Some(&alice), "hello").await?;
    assert_eq!((s, v["offset"].as_u64()), (201, Some(1)), "{v}");
    let (s, v, _) = call(&server, "POST", "/v1/topics/chat.announce/messages", Some(&alice), "x").await?;
    assert_eq!((s, code(&v)), (403, "forbidden"), "deny wins: {v}");
    let (s, v, _) = call(&server, "POST", "/v1/topics/chat.room/messages", Some(&bob), "x").await?;
    assert_eq!((s, code(&v)), (403, "forbidden"), "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("bob may not publish on chat.room")), "{v}");
    let (_, info, _) = call(&server, "GET", "/v1/topics/chat.room", Some(&alice), "").await?;
    assert_eq!(info["last"], 1, "nothing published by the refused calls");
    assert_eq!(call(&server, "GET", "/v1/topics/chat.room/messages", Some(&bob), "").await?.0, 403);
    assert_eq!(call(&server, "GET", "/v1/topics/chat.public/messages", Some(&bob), "").await?.0, 200);
    assert_eq!(call(&server, "DELETE", "/v1/topics/chat.room", Some(&bob), "").await?.0, 403);
    let (_, listed, _) = call(&server, "GET", "/v1/topics", Some(&bob), "").await?;
    assert_eq!(listed["topics"], json!([]), "bob administers no topic: {listed}");

    // Queues: enqueue and consume are separate rights; a refused fetch takes nothing.
    assert_eq!(call(&server, "POST", "/v1/queues/jobs.a/messages", Some(&alice), "job").await?.0, 201);
    assert_eq!(call(&server, "POST", "/v1/queues/jobs.a/messages", Some(&bob), "job").await?.0, 403);
    assert_eq!(call(&server, "POST", "/v1/queues/jobs.a/fetch", Some(&bob), "").await?.0, 403);
    let (_, stats, _) = call(&server, "GET", "/v1/queues/jobs.a", Some(&alice), "").await?;
    assert_eq!((stats["ready"].as_u64(), stats["in_flight"].as_u64()), (Some(1), Some(0)), "{stats}");
    let (s, fetched, _) = call(&server, "POST", "/v1/queues/jobs.a/fetch", Some(&alice), "").await?;
    assert_eq!((s, fetched["messages"][0]["data"].as_str()), (200, Some("job")));
    let id = fetched["messages"][0]["id"].as_str().ok_or("id")?;
    assert_eq!(call(&server, "POST", &format!("/v1/queues/jobs.a/ack/{id}"), Some(&bob), "").await?.0, 403);
    assert_eq!(call(&server, "POST", &format!("/v1/queues/jobs.a/ack/{id}"), Some(&alice), "").await?.0, 204);
    assert_eq!(call(&server, "GET", "/v1/queues/jobs.a", Some(&bob), "").await?.0, 403);
    // The list of queues has only those the caller administers.
    let (s, listed, _) = call(&server, "GET", "/v1/queues", Some(&alice), "").await?;
    let want = json!([{"queue": "jobs.a", "ready": 0, "in_flight": 0, "delayed": 0, "dead": 0}]);
    assert_eq!((s, &listed["queues"]), (200, &want), "{listed}");
    let (_, listed, _) = call(&server, "GET", "/v1/queues", Some(&bob), "").await?;
    assert_eq!(listed["queues"], json!([]), "bob administers no queue: {listed}");
    assert_eq!(call(&server, "GET", "/v1/queues", None, "").await?.0, 401);
    // Purge and redrive are admin actions.
    assert_eq!(call(&server, "POST", "/v1/queues/jobs.a/purge", Some(&bob), "").await?.0, 403);
    assert_eq!(call(&server, "POST", "/v1/queues/jobs.a/redrive", Some(&bob), "").await?.0, 403);
    let (s, purged, _) = call(&server, "POST", "/v1/queues/jobs.a/purge", Some(&alice), "").await?;
    assert_eq!((s, purged["purged"].as_u64()), (200, Some(0)), "{purged}");
    // Connections are everyone's: admin on some names is not enough.
    assert_eq!(call(&server, "GET", "/v1/admin/connections", Some(&alice), "").await?.0, 403);
    assert_eq!(call(&server, "DELETE", "/v1/admin/connections/1", Some(&bob), "").await?.0, 403);

    // Bearer tokens: good, and every way of being wrong.
    let good = token_with(Algorithm::HS256, SECRET, claims());
    assert_eq!(call(&server, "POST", "/v1/topics/chat.room/messages", Some(&good), "from carol").await?.0, 201);
    assert_eq!(call(&server, "POST", "/v1/queues/jobs.a/messages", Some(&good), "x").await?.0, 403);
    // A topic alice may not administer, sorted before hers: a page of one is read past it.
    let mut elsewhere = claims();
    elsewhere["herald"] = json!({"publish": ["a.>"]});
    let elsewhere = token_with(Algorithm::HS256, SECRET, elsewhere);
    assert_eq!(call(&server, "POST", "/v1/topics/a.first/messages", Some(&elsewhere), "x").await?.0, 201);
    let (_, listed, _) = call(&server, "GET", "/v1/topics?limit=1", Some(&alice), "").await?;
    assert_eq!(
        listed["topics"],
        json!([{"topic": "chat.room", "last": 2, "subscribers": 0, "publishers": 0}]),
        "{listed}"
    );
    let mut expired = claims();
    expired["exp"] = json!(now() - 5);
    let mut audience = claims();
    audience["aud"] = json!("someone-else");
    let mut issuer = claims();
    issuer["iss"] = json!("https://evil.test");
    let refused = [
        ("expired", token_with(Algorithm::HS256, SECRET, expired)),
        ("badly signed", token_with(Algorithm::HS256, "not the secret, but also thirty-two+ bytes", claims())),
        ("another algorithm", token_with(Algorithm::HS384, SECRET, claims())),
        ("wrong audience", token_with(Algorithm::HS256, SECRET, audience)),
        ("wrong issuer", token_with(Algorithm::HS256, SECRET, issuer)),
        ("garbage", "Bearer not.a.token".to_owned()),
    ];
    for (what, token) in refused {
        let (s, v, _) = call(&server, "POST", "/v1/topics/chat.room/messages", Some(&token), "x").await?;
        assert_eq!((s, code(&v)), (401, "unauthorized"), "{what}: {v}");
    }
    let (_, info, _) = call(&server, "GET", "/v1/topics/chat.room", Some(&alice), "").await?;
    assert_eq!(info["last"], 2, "only alice's and carol's good publishes are stored");
    // Each refusal above counted once: 4 + 6 without valid credentials, 13 not granted.
    assert_eq!(server.metric("herald_auth_refused_total").await?, 10);
    assert_eq!(server.metric("herald_forbidden_total").await?, 13);
    Ok(())
}

/// A WebSocket to `path` with an optional Authorization header.
async fn ws(
    server: &TestServer,
    path: &str,
    auth: Option<&str>,
) -> std::result::Result<common::RawSocket, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("{}{path}", server.ws).into_client_request()?;
    if let Some(a) = auth {
        request.headers_mut().insert(
            "authorization",
            a.parse().map_err(|_| tokio_tungstenite::tungstenite::Error::Utf8("header".into()))?,
        );
    }
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

fn refused_status(e: tokio_tungstenite::tungstenite::Error) -> u16 {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => r.status().as_u16(),
        _ => 0,
    }
}

async fn next_json(socket: &mut common::RawSocket) -> Result<Value> {
    loop {
        match within(Duration::from_secs(5), "a frame", socket.next()).await?.ok_or("closed")?? {
            WsMessage::Text(t) => return Ok(serde_json::from_str(t.as_str())?),
            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
}

async fn send(socket: &mut common::RawSocket, frame: Value) -> Result {
    socket.send(WsMessage::text(frame.to_string())).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_json_refuses_frames_not_granted_and_keeps_the_connection() -> Result {
    let server = server().await?;
    // Without credentials the upgrade opens (a browser authenticates in its first frame)
    // but nothing else is served: a subscribe is refused and the socket closed with 4401.
    let mut anonymous = ws(&server, "/v1/ws", None).await?;
    send(&mut anonymous, json!({"op": "subscribe", "id": 1, "topic": "chat.public"})).await?;
    assert_eq!(next_json(&mut anonymous).await?["code"], "unauthorized");
    assert_eq!(close_of(&mut anonymous, Duration::from_secs(5)).await?.0, 4401);
    let refused =
        ws(&server, "/v1/ws", Some(&basic("bob", "nope"))).await.err().ok_or("a wrong password was accepted")?;
    assert_eq!(refused_status(refused), 401);

    let mut bob = ws(&server, "/v1/ws", Some(&basic("bob", "bob-pw"))).await?;
    send(&mut bob, json!({"op": "subscribe", "id": 1, "topic": "chat.room", "from": "earliest"})).await?;
    let reply = next_json(&mut bob).await?;
    assert_eq!(
        (reply["type"].as_str(), reply["id"].as_u64(), reply["code"].as_str()),
        (Some("error"), Some(1), Some("forbidden")),
        "{reply}"
    );
    send(&mut bob, json!({"op": "publish", "id": 2, "topic": "chat.public", "data": "x"})).await?;
    let reply = next_json(&mut bob).await?;
    assert_eq!((reply["id"].as_u64(), reply["code"].as_str()), (Some(2), Some("forbidden")), "{reply}");
    send(&mut bob, json!({"op": "subscribe", "id": 3, "topic": "chat.public", "from": "earliest"})).await?;
    assert_eq!(next_json(&mut bob).await?["type"], "subscribed", "the connection stays and serves what is granted");

    let mut carol = ws(&server, "/v1/ws", Some(&token_with(Algorithm::HS256, SECRET, claims()))).await?;
    send(&mut carol, json!({"op": "publish", "id": 7, "topic": "chat.public", "data": "hi bob"})).await?;
    assert_eq!(next_json(&mut carol).await?["type"], "published");
    let delivered = next_json(&mut bob).await?;
    assert_eq!(
        (delivered["type"].as_str(), delivered["data"].as_str()),
        (Some("message"), Some("hi bob")),
        "{delivered}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_websocket_and_sse_check_the_rights_of_their_mode() -> Result {
    let server = server().await?;
    let bob = basic("bob", "bob-pw");
    assert_eq!(refused_status(ws(&server, "/v1/topics/chat.public/ws?mode=sub", None).await.err().ok_or("open")?), 401);
    assert_eq!(
        refused_status(ws(&server, "/v1/topics/chat.room/ws?mode=sub", Some(&bob)).await.err().ok_or("open")?),
        403
    );
    assert_eq!(
        refused_status(ws(&server, "/v1/topics/chat.public/ws?mode=pub", Some(&bob)).await.err().ok_or("open")?),
        403
    );
    assert_eq!(
        refused_status(ws(&server, "/v1/topics/chat.public/ws", Some(&bob)).await.err().ok_or("open")?),
        403,
        "both needs publish too"
    );
    let mut raw = ws(&server, "/v1/topics/chat.public/ws?mode=sub&from=earliest", Some(&bob)).await?;

    assert_eq!(call(&server, "GET", "/v1/topics/chat.public/sse", None, "").await?.0, 401);
    assert_eq!(call(&server, "GET", "/v1/topics/chat.room/sse", Some(&bob), "").await?.0, 403);
    let mut sse = server
        .http
        .get(format!("{}/v1/topics/chat.public/sse?from=earliest", server.url))
        .header("authorization", &bob)
        .send()
        .await?;
    assert_eq!(sse.status(), 200);

    let alice = basic("alice", "alice-pw");
    assert_eq!(call(&server, "POST", "/v1/topics/chat.public/messages", Some(&alice), "for bob").await?.0, 201);
    let frame = within(Duration::from_secs(5), "raw frame", raw.next()).await?.ok_or("closed")??;
    assert_eq!(frame.into_text()?.as_str(), "for bob");
    let mut seen = String::new();
    while !seen.contains("for bob") {
        let chunk = within(Duration::from_secs(5), "sse", sse.chunk()).await??.ok_or("sse ended")?;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok(())
}

fn with_auth<T>(message: T, auth: Option<&str>) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(a) = auth {
        request.metadata_mut().insert("authorization", a.parse()?);
    }
    Ok(request)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_answers_unauthenticated_and_permission_denied() -> Result {
    let server = server().await?;
    let client = GrpcClient::connect(&server.url).await?;
    let publish = |topic: &str| pb::PublishRequest {
        topic: topic.into(),
        data: b"x".to_vec().into(),
        kind: pb::Kind::Text as i32,
        ..Default::default()
    };
    let (alice, bob) = (basic("alice", "alice-pw"), basic("bob", "bob-pw"));

    let e = client.topics().publish(with_auth(publish("chat.room"), None)?).await.err().ok_or("accepted")?;
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = client
        .topics()
        .publish(with_auth(publish("chat.room"), Some(&basic("bob", "x")))?)
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = client.topics().publish(with_auth(publish("chat.room"), Some(&bob))?).await.err().ok_or("accepted")?;
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("forbidden:"), "{e:?}");
    let ok = client.topics().publish(with_auth(publish("chat.room"), Some(&alice))?).await?.into_inner();
    assert_eq!(ok.offset, 1);
    let token = token_with(Algorithm::HS256, SECRET, claims());
    assert_eq!(client.topics().publish(with_auth(publish("chat.room"), Some(&token))?).await?.into_inner().offset, 2);

    let subscribe = |topic: &str| pb::SubscribeRequest {
        topic: topic.into(),
        from: Some(pb::subscribe_request::From::Offset(0)),
        ..Default::default()
    };
    let e = client.topics().subscribe(with_auth(subscribe("chat.room"), Some(&bob))?).await.err().ok_or("accepted")?;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = client
        .queues()
        .enqueue(with_auth(
            pb::EnqueueRequest { queue: "jobs.a".into(), data: b"j".to_vec().into(), ..Default::default() },
            Some(&bob),
        )?)
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let mut stream = client.topics().subscribe(with_auth(subscribe("chat.room"), Some(&alice))?).await?.into_inner();
    let first = within(Duration::from_secs(5), "subscribed", stream.message()).await??.ok_or("ended")?;
    assert!(first.event.is_some());
    Ok(())
}

#[tokio::test]
async fn plain_text_passwords_are_refused_at_start_and_passwd_makes_a_hash() -> Result {
    let plain = UserConfig { name: "eve".into(), password: Some("hunter2".into()), ..Default::default() };
    let auth = AuthConfig { users: vec![plain], jwt: None, ..Default::default() };
    let err = start(move |c| c.auth = Some(auth)).await.err().ok_or("started with a plain-text password")?;
    let err = format!("{err:#}");
    assert!(err.contains("plain-text passwords are refused") && err.contains("herald passwd"), "{err}");

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("passwd")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child.stdin.take().ok_or("stdin")?.write_all(b"correct horse\n")?;
    let out = child.wait_with_output()?;
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout)?.trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let user = UserConfig { name: "dave".into(), password_hash: Some(hash), ..Default::default() };
    let auth = herald_auth::Authenticator::new(&AuthConfig { users: vec![user], jwt: None, ..Default::default() })?;
    let ok = herald_auth::Credentials::Basic { user: "dave".into(), password: "correct horse".into() };
    assert!(auth.authenticate(&ok).is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_credentials_from_user_or_token() -> Result {
    let dir = std::env::temp_dir().join(format!("herald-auth-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let hash = herald_auth::hash_password("pw").map_err(|e| e.to_string())?;
    std::fs::write(dir.join("jwt.secret"), SECRET)?;
    let config = format!(
        r#"[auth.jwt]
algorithm = "HS256"
secret = {{ file = "{secret}" }}
issuer = "{ISSUER}"
audience = "{AUDIENCE}"

[[auth.users]]
name = "alice"
password_hash = "{hash}"
grants = {{ publish = ["chat.>"], subscribe = ["chat.>"] }}
"#,
        secret = dir.join("jwt.secret").display()
    );
    let path = dir.join("herald.toml");
    std::fs::write(&path, config)?;
    let (_server, url) = common::spawn_herald(&["--store", "memory", "--config", path.to_str().ok_or("path")?])?;
    let herald = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_herald")).args(args).env("HERALD_URL", &url).output()
    };
    let out = herald(&["pub", "chat.room", "nobody"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401 unauthorized"), "{out:?}");
    let out = herald(&["pub", "--user", "alice:pw", "chat.room", "from alice"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n", "{out:?}");
    let token = token_with(Algorithm::HS256, SECRET, claims());
    let token = token.trim_start_matches("Bearer ");
    let out = herald(&["pub", "--grpc", "--token", token, "chat.room", "from carol"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n", "{out:?}");
    let out = herald(&["sub", "--user", "alice:pw", "--from", "earliest", "-n", "2", "chat.room"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from alice\nfrom carol\n", "{out:?}");
    let out = herald(&["sub", "--grpc", "--token", token, "--from", "earliest", "-n", "1", "chat.room"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from alice\n", "{out:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The close code and reason that end `socket`, skipping frames before it.
async fn close_of(socket: &mut common::RawSocket, limit: Duration) -> Result<(u16, String)> {
    loop {
        match within(limit, "the close", socket.next()).await? {
            Some(Ok(WsMessage::Close(Some(frame)))) => return Ok((u16::from(frame.code), frame.reason.to_string())),
            Some(Ok(_)) => {}
            other => return Err(format!("ended without a close frame: {other:?}").into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_socket_authenticates_in_band_refreshes_and_is_closed_when_its_token_expires() -> Result {
    let server = server().await?;
    // Opened without credentials (as a browser does), then an auth frame.
    let mut socket = ws(&server, "/v1/ws", None).await?;
    let token = token_with(Algorithm::HS256, SECRET, claims());
    send(&mut socket, json!({"op": "auth", "id": 1, "token": token.trim_start_matches("Bearer ")})).await?;
    let reply = next_json(&mut socket).await?;
    assert_eq!((reply["type"].as_str(), reply["user"].as_str()), (Some("authenticated"), Some("carol")), "{reply}");
    assert!(reply["expires"].as_u64().is_some_and(|e| e > now()), "{reply}");
    send(&mut socket, json!({"op": "subscribe", "id": 2, "topic": "chat.a", "from": "earliest"})).await?;
    assert_eq!(next_json(&mut socket).await?["type"], "subscribed");
    send(&mut socket, json!({"op": "subscribe", "id": 3, "topic": "chat.b", "from": "earliest"})).await?;
    assert_eq!(next_json(&mut socket).await?["type"], "subscribed");

    // A refresh whose grants no longer cover chat.b ends that subscription only.
    let mut fewer = claims();
    fewer["herald"] = json!({"subscribe": ["chat.a"]});
    let refreshed = token_with(Algorithm::HS256, SECRET, fewer);
    send(&mut socket, json!({"op": "auth", "id": 4, "token": refreshed.trim_start_matches("Bearer ")})).await?;
    let ended = next_json(&mut socket).await?;
    assert_eq!(ended["code"], "forbidden", "{ended}");
    assert!(ended["message"].as_str().is_some_and(|m| m.contains("chat.b")), "{ended}");
    assert_eq!(next_json(&mut socket).await?["type"], "authenticated");
    let alice = basic("alice", "alice-pw");
    call(&server, "POST", "/v1/topics/chat.b/messages", Some(&alice), "b").await?;
    call(&server, "POST", "/v1/topics/chat.a/messages", Some(&alice), "a").await?;
    let delivered = next_json(&mut socket).await?;
    assert_eq!(
        (delivered["topic"].as_str(), delivered["data"].as_str()),
        (Some("chat.a"), Some("a")),
        "chat.b ended: {delivered}"
    );

    // A frame before the auth frame: refused, and the socket closed with 4401.
    let mut early = ws(&server, "/v1/ws", None).await?;
    send(&mut early, json!({"op": "subscribe", "id": 1, "topic": "chat.a"})).await?;
    assert_eq!(next_json(&mut early).await?["code"], "unauthorized");
    assert_eq!(close_of(&mut early, Duration::from_secs(5)).await?.0, 4401);
    // A bad token in the auth frame: the same.
    let mut forged = ws(&server, "/v1/ws", None).await?;
    let bad = token_with(Algorithm::HS256, "not the secret, though over thirty-two bytes", claims());
    send(&mut forged, json!({"op": "auth", "token": bad.trim_start_matches("Bearer ")})).await?;
    assert_eq!(next_json(&mut forged).await?["code"], "unauthorized");
    assert_eq!(close_of(&mut forged, Duration::from_secs(5)).await?.0, 4401);
    // No auth frame at all: closed once the time allowed has passed.
    let mut silent = ws(&server, "/v1/ws", None).await?;
    assert_eq!(close_of(&mut silent, Duration::from_secs(10)).await?, (4401, "authentication required".to_owned()));

    // A token that expires while connected: the connection is closed with 4401.
    let brief = token_with(Algorithm::HS256, SECRET, brief_claims());
    let mut expiring = ws(&server, "/v1/ws", Some(&brief)).await?;
    send(&mut expiring, json!({"op": "subscribe", "id": 1, "topic": "chat.a"})).await?;
    assert_eq!(next_json(&mut expiring).await?["type"], "subscribed");
    assert_eq!(close_of(&mut expiring, Duration::from_secs(10)).await?, (4401, "token expired".to_owned()));
    Ok(())
}

/// A config file with alice (`subscribe` grants as given) and, if `with_bob`, bob.
fn users_config(alice_subscribe: &[&str], with_bob: bool, alice_hash: &str, bob_hash: &str) -> String {
    let quoted: Vec<String> = alice_subscribe.iter().map(|p| format!("\"{p}\"")).collect();
    let mut config = format!(
        "[[auth.users]]\nname = \"alice\"\npassword_hash = \"{alice_hash}\"\ngrants = {{ publish = [\"chat.>\"], subscribe = [{}] }}\n",
        quoted.join(", ")
    );
    if with_bob {
        config.push_str(&format!(
            "\n[[auth.users]]\nname = \"bob\"\npassword_hash = \"{bob_hash}\"\ngrants = {{ subscribe = [\"chat.>\"] }}\n"
        ));
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_ends_subscriptions_no_longer_granted_and_keeps_the_socket() -> Result {
    let dir = std::env::temp_dir().join(format!("herald-auth-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let alice_hash = herald_auth::hash_password("alice-pw").map_err(|e| e.to_string())?;
    let bob_hash = herald_auth::hash_password("bob-pw").map_err(|e| e.to_string())?;
    let path = dir.join("herald.toml");
    std::fs::write(&path, users_config(&["chat.a", "chat.b"], true, &alice_hash, &bob_hash))?;
    let (process, url) = common::spawn_herald(&["--store", "memory", "--config", path.to_str().ok_or("path")?])?;
    let ws_url = url.replacen("http://", "ws://", 1);
    let open = |auth: String| {
        let ws_url = ws_url.clone();
        async move {
            let mut request = format!("{ws_url}/v1/ws").into_client_request()?;
            request.headers_mut().insert("authorization", auth.parse()?);
            Result::Ok(tokio_tungstenite::connect_async(request).await?.0)
        }
    };
    let mut alice = open(basic("alice", "alice-pw")).await?;
    for (id, topic) in [(1, "chat.a"), (2, "chat.b")] {
        send(&mut alice, json!({"op": "subscribe", "id": id, "topic": topic})).await?;
        assert_eq!(next_json(&mut alice).await?["type"], "subscribed");
    }
    let mut bob = open(basic("bob", "bob-pw")).await?;
    send(&mut bob, json!({"op": "subscribe", "id": 1, "topic": "chat.a"})).await?;
    assert_eq!(next_json(&mut bob).await?["type"], "subscribed");
    // A raw socket and an SSE stream of alice on chat.b: their one topic's grant goes.
    let mut raw = {
        let mut request = format!("{ws_url}/v1/topics/chat.b/ws?mode=sub").into_client_request()?;
        request.headers_mut().insert("authorization", basic("alice", "alice-pw").parse()?);
        tokio_tungstenite::connect_async(request).await?.0
    };
    let mut sse = common::http()
        .get(format!("{url}/v1/topics/chat.b/sse"))
        .header("authorization", basic("alice", "alice-pw"))
        .send()
        .await?;
    assert_eq!(sse.status(), 200);

    // The operator takes chat.b from alice and removes bob, then sends SIGHUP.
    std::fs::write(&path, users_config(&["chat.a"], false, &alice_hash, &bob_hash))?;
    let hup = std::process::Command::new("kill").args(["-HUP", &process.id().to_string()]).status()?;
    assert!(hup.success());
    let t0 = std::time::Instant::now();
    let ended = next_json(&mut alice).await?;
    assert_eq!(ended["code"], "forbidden", "{ended}");
    assert!(ended["message"].as_str().is_some_and(|m| m.contains("chat.b")), "{ended}");
    assert!(t0.elapsed() < Duration::from_secs(1), "ended within a second: {:?}", t0.elapsed());
    assert_eq!(close_of(&mut bob, Duration::from_secs(5)).await?, (4401, "credentials no longer accepted".to_owned()));
    assert_eq!(close_of(&mut raw, Duration::from_secs(5)).await?, (4403, "grant withdrawn".to_owned()));
    while within(Duration::from_secs(5), "the SSE stream to end", sse.chunk()).await??.is_some() {}

    // alice's socket and its chat.a subscription go on; chat.b is no longer delivered.
    let http = common::http();
    for topic in ["chat.b", "chat.a"] {
        let r = http
            .post(format!("{url}/v1/topics/{topic}/messages"))
            .header("authorization", basic("alice", "alice-pw"))
            .header("content-type", "text/plain")
            .body(format!("to {topic}"))
            .send()
            .await?;
        assert_eq!(r.status(), 201);
    }
    let delivered = next_json(&mut alice).await?;
    assert_eq!(
        (delivered["topic"].as_str(), delivered["data"].as_str()),
        (Some("chat.a"), Some("to chat.a")),
        "{delivered}"
    );
    // A broken file on the next SIGHUP changes nothing.
    std::fs::write(&path, "[[auth.users]]\nname = \"alice\"\npassword = \"plain\"\n")?;
    std::process::Command::new("kill").args(["-HUP", &process.id().to_string()]).status()?;
    send(&mut alice, json!({"op": "ping", "id": 9})).await?;
    assert_eq!(next_json(&mut alice).await?["type"], "pong");
    let r = http
        .post(format!("{url}/v1/topics/chat.a/messages"))
        .header("authorization", basic("alice", "alice-pw"))
        .header("content-type", "text/plain")
        .body("still")
        .send()
        .await?;
    assert_eq!(r.status(), 201, "the previous [auth] stays in force");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_sockets_sse_and_grpc_streams_end_when_their_token_expires() -> Result {
    let server = server().await?;
    let brief = token_with(Algorithm::HS256, SECRET, brief_claims());
    let mut raw = ws(&server, "/v1/topics/chat.a/ws?mode=sub", Some(&brief)).await?;
    let mut sse =
        server.http.get(format!("{}/v1/topics/chat.a/sse", server.url)).header("authorization", &brief).send().await?;
    assert_eq!(sse.status(), 200);
    let grpc = GrpcClient::connect(&server.url).await?.authorized(&brief)?;
    let mut stream = grpc.subscribe("chat.a", herald_client::StartFrom::Latest, None).await?;
    assert_eq!(close_of(&mut raw, Duration::from_secs(10)).await?, (4401, "token expired".to_owned()));
    while within(Duration::from_secs(10), "the SSE stream to end", sse.chunk()).await??.is_some() {}
    match within(Duration::from_secs(10), "the gRPC stream to end", stream.next()).await? {
        Err(herald_client::ClientError::Grpc(status)) => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
            assert!(status.message().contains("token expired"), "{status:?}");
        }
        other => return Err(format!("the gRPC stream went on: {other:?}").into()),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Browsers: the token in an HttpOnly cookie, with an Origin check

const APP: &str = "https://app.example.com";
const EVIL: &str = "https://evil.example";

/// [`server`] with `cookie = "herald_token"` and `allowed_origins = [APP]`.
async fn cookie_server() -> Result<TestServer> {
    let mut auth = auth_config()?;
    auth.cookie = Some("herald_token".into());
    auth.allowed_origins = vec![APP.into()];
    start(move |c| c.auth = Some(auth)).await
}

/// A `Cookie` header as a browser sends it: the token among the page's other cookies.
fn cookie_header(claims: Value) -> String {
    let token = token_with(Algorithm::HS256, SECRET, claims);
    format!("theme=dark; herald_token={}; lang=en", token.trim_start_matches("Bearer "))
}

/// A WebSocket to `path` as a browser opens it: with a `Cookie` and an `Origin`, if given.
async fn browser_ws(
    server: &TestServer,
    path: &str,
    cookie: Option<&str>,
    origin: Option<&str>,
) -> std::result::Result<common::RawSocket, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("{}{path}", server.ws).into_client_request()?;
    let bad = |_| tokio_tungstenite::tungstenite::Error::Utf8("header".into());
    if let Some(c) = cookie {
        request.headers_mut().insert("cookie", c.parse().map_err(bad)?);
    }
    if let Some(o) = origin {
        request.headers_mut().insert("origin", o.parse().map_err(bad)?);
    }
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

/// An SSE request as a browser's `EventSource` (`withCredentials`) sends it.
async fn browser_sse(
    server: &TestServer,
    topic: &str,
    cookie: Option<&str>,
    origin: Option<&str>,
) -> Result<reqwest::Response> {
    let mut request = server.http.get(format!("{}/v1/topics/{topic}/sse?from=earliest", server.url));
    if let Some(c) = cookie {
        request = request.header("cookie", c);
    }
    if let Some(o) = origin {
        request = request.header("origin", o);
    }
    Ok(request.send().await?)
}

/// Reads an SSE stream until `text` came.
async fn sse_until(sse: &mut reqwest::Response, text: &str) -> Result {
    let mut seen = String::new();
    while !seen.contains(text) {
        let chunk = within(Duration::from_secs(5), "an SSE event", sse.chunk()).await??.ok_or("sse ended")?;
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok(())
}

/// The error code and message of a refused request's JSON body.
async fn refusal(response: reqwest::Response) -> Result<(u16, String, String)> {
    let status = response.status().as_u16();
    let body: Value = serde_json::from_slice(&within(Duration::from_secs(5), "the body", response.bytes()).await??)?;
    Ok((status, code(&body).to_owned(), body["error"]["message"].as_str().unwrap_or_default().to_owned()))
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_streams_sse_with_its_cookie_and_gets_cors_for_an_allowed_origin() -> Result {
    let server = cookie_server().await?;
    let cookie = cookie_header(claims());
    let alice = basic("alice", "alice-pw");

    // From a page of the allowed origin: streamed, with CORS for that origin.
    let mut from_app = browser_sse(&server, "chat.room", Some(&cookie), Some(APP)).await?;
    assert_eq!(from_app.status(), 200);
    assert_eq!(header(&from_app, "access-control-allow-origin"), Some(APP));
    assert_eq!(header(&from_app, "access-control-allow-credentials"), Some("true"));
    assert_eq!(header(&from_app, "vary"), Some("Origin"));
    // Without Origin (a same-origin EventSource may send none): streamed, without CORS.
    let mut no_origin = browser_sse(&server, "chat.room", Some(&cookie), None).await?;
    assert_eq!(no_origin.status(), 200);
    assert_eq!(header(&no_origin, "access-control-allow-origin"), None);
    assert_eq!(header(&no_origin, "vary"), None);
    assert_eq!(call(&server, "POST", "/v1/topics/chat.room/messages", Some(&alice), "to the page").await?.0, 201);
    sse_until(&mut from_app, "to the page").await?;
    sse_until(&mut no_origin, "to the page").await?;

    // A page of another site: 403, and no subscription was made.
    let (status, code, message) = refusal(browser_sse(&server, "chat.room", Some(&cookie), Some(EVIL)).await?).await?;
    assert_eq!((status, code.as_str()), (403, "forbidden"), "{message}");
    assert_eq!(message, format!("origin {EVIL} not allowed"));
    let (_, info, _) = call(&server, "GET", "/v1/topics/chat.room", Some(&alice), "").await?;
    assert_eq!(info["subscribers"], 2, "only the two streams above: {info}");

    // Expired or forged tokens in the cookie: 401, as in a header.
    let mut expired = claims();
    expired["exp"] = json!(now() - 5);
    let forged = format!(
        "herald_token={}",
        token_with(Algorithm::HS256, "not the secret, though over thirty-two bytes", claims())
            .trim_start_matches("Bearer ")
    );
    for (what, cookie) in [("expired", cookie_header(expired)), ("forged", forged)] {
        let (status, code, message) =
            refusal(browser_sse(&server, "chat.room", Some(&cookie), Some(APP)).await?).await?;
        assert_eq!((status, code.as_str()), (401, "unauthorized"), "{what}: {message}");
    }
    // A token whose grants do not include the topic: 403.
    let mut elsewhere = claims();
    elsewhere["herald"] = json!({"subscribe": ["news.>"]});
    let (status, _, message) =
        refusal(browser_sse(&server, "chat.room", Some(&cookie_header(elsewhere)), Some(APP)).await?).await?;
    assert_eq!(status, 403, "{message}");
    assert!(message.contains("carol may not subscribe on chat.room"), "{message}");

    // REST never takes the cookie: 401, nothing published.
    for (method, path) in [("POST", "/v1/topics/chat.room/messages"), ("GET", "/v1/topics/chat.room/messages")] {
        let url = format!("{}{path}", server.url);
        let request = if method == "POST" { server.http.post(url).body("x") } else { server.http.get(url) };
        let response = request.header("cookie", &cookie).header("origin", APP).send().await?;
        assert_eq!(response.status(), 401, "{method} {path}");
    }
    let (_, info, _) = call(&server, "GET", "/v1/topics/chat.room", Some(&alice), "").await?;
    assert_eq!(info["last"], 1, "{info}");

    // The Authorization header wins over the cookie: bob may not read chat.room, and a
    // bad header is not rescued by a good cookie.
    let as_bob = server
        .http
        .get(format!("{}/v1/topics/chat.room/sse", server.url))
        .header("authorization", basic("bob", "bob-pw"))
        .header("cookie", &cookie)
        .header("origin", APP)
        .send()
        .await?;
    assert_eq!(as_bob.status(), 403);
    let bad_header = server
        .http
        .get(format!("{}/v1/topics/chat.room/sse", server.url))
        .header("authorization", basic("bob", "wrong"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(bad_header.status(), 401);
    // A header-authenticated stream from an allowed origin gets CORS too; a foreign
    // origin none (and is not refused: the header cannot come from another site's page).
    let with_header = |origin: &'static str| {
        server
            .http
            .get(format!("{}/v1/topics/chat.public/sse", server.url))
            .header("authorization", basic("bob", "bob-pw"))
            .header("origin", origin)
            .send()
    };
    let r = with_header(APP).await?;
    assert_eq!((r.status().as_u16(), header(&r, "access-control-allow-origin")), (200, Some(APP)));
    let r = with_header(EVIL).await?;
    assert_eq!((r.status().as_u16(), header(&r, "access-control-allow-origin")), (200, None));

    // Refusals counted: 1 foreign origin, 1 ungranted topic, bob's 403: forbidden; 2 bad
    // cookies, 2 REST calls with the cookie only, bob's bad password: unauthorized.
    assert_eq!(server.metric("herald_forbidden_total").await?, 3);
    assert_eq!(server.metric("herald_auth_refused_total").await?, 5);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_websockets_take_the_cookie_from_allowed_origins_only() -> Result {
    let server = cookie_server().await?;
    let cookie = cookie_header(claims());
    let alice = basic("alice", "alice-pw");

    // A raw socket and a JSON socket from a page of the allowed origin.
    let mut raw = browser_ws(&server, "/v1/topics/chat.room/ws?mode=sub", Some(&cookie), Some(APP)).await?;
    let mut json = browser_ws(&server, "/v1/ws", Some(&cookie), Some(APP)).await?;
    send(&mut json, json!({"op": "subscribe", "id": 1, "topic": "chat.room"})).await?;
    assert_eq!(next_json(&mut json).await?["type"], "subscribed");
    send(&mut json, json!({"op": "publish", "id": 2, "topic": "chat.other", "data": "from the page"})).await?;
    assert_eq!(next_json(&mut json).await?["type"], "published", "carol's grants, from the cookie's token");
    assert_eq!(call(&server, "POST", "/v1/topics/chat.room/messages", Some(&alice), "to the page").await?.0, 201);
    let frame = within(Duration::from_secs(5), "raw frame", common::raw_next(&mut raw)).await??;
    assert_eq!(frame.into_text()?.as_str(), "to the page");
    let delivered = next_json(&mut json).await?;
    assert_eq!((delivered["type"].as_str(), delivered["data"].as_str()), (Some("message"), Some("to the page")));

    // Another site's page, or no Origin at all (not a browser's page): 403.
    for origin in [Some(EVIL), Some("null"), None] {
        for path in ["/v1/ws", "/v1/topics/chat.room/ws?mode=sub"] {
            let e = browser_ws(&server, path, Some(&cookie), origin).await.err().ok_or("opened")?;
            assert_eq!(refused_status(e), 403, "{path} from {origin:?}");
        }
    }
    let (_, info, _) = call(&server, "GET", "/v1/topics/chat.room", Some(&alice), "").await?;
    assert_eq!(info["subscribers"], 2, "only the two sockets above: {info}");

    // Expired or forged tokens in the cookie: 401.
    let mut expired = claims();
    expired["exp"] = json!(now() - 5);
    let forged = format!("herald_token={}", "e30.e30.c2lnbmF0dXJl");
    for cookie in [cookie_header(expired), forged] {
        for path in ["/v1/ws", "/v1/topics/chat.room/ws?mode=sub"] {
            let e = browser_ws(&server, path, Some(&cookie), Some(APP)).await.err().ok_or("opened")?;
            assert_eq!(refused_status(e), 401, "{path} with {cookie}");
        }
    }
    // A token not granted the topic: the raw socket is refused with 403.
    let mut elsewhere = claims();
    elsewhere["herald"] = json!({"subscribe": ["news.>"]});
    let e = browser_ws(&server, "/v1/topics/chat.room/ws?mode=sub", Some(&cookie_header(elsewhere)), Some(APP))
        .await
        .err()
        .ok_or("opened")?;
    assert_eq!(refused_status(e), 403);

    // Without the cookie, /v1/ws still opens and waits for an auth frame.
    let mut pending = browser_ws(&server, "/v1/ws", None, Some(APP)).await?;
    let token = token_with(Algorithm::HS256, SECRET, claims());
    send(&mut pending, json!({"op": "auth", "id": 1, "token": token.trim_start_matches("Bearer ")})).await?;
    assert_eq!(next_json(&mut pending).await?["type"], "authenticated");

    // 6 origin refusals and 1 ungranted topic; 4 bad cookies.
    assert_eq!(server.metric("herald_forbidden_total").await?, 7);
    assert_eq!(server.metric("herald_auth_refused_total").await?, 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_connections_end_when_their_token_expires_or_a_reload_drops_their_origin() -> Result {
    let server = cookie_server().await?;
    // Expiry: each long-lived door closes a cookie connection as it does a header's.
    let brief = cookie_header(brief_claims());
    let mut raw = browser_ws(&server, "/v1/topics/chat.a/ws?mode=sub", Some(&brief), Some(APP)).await?;
    let mut json = browser_ws(&server, "/v1/ws", Some(&brief), Some(APP)).await?;
    let mut sse = browser_sse(&server, "chat.a", Some(&brief), Some(APP)).await?;
    assert_eq!(sse.status(), 200);
    assert_eq!(close_of(&mut raw, Duration::from_secs(10)).await?, (4401, "token expired".to_owned()));
    assert_eq!(close_of(&mut json, Duration::from_secs(10)).await?, (4401, "token expired".to_owned()));
    while within(Duration::from_secs(10), "the SSE stream to end", sse.chunk()).await??.is_some() {}

    // A reload that no longer allows the page's origin ends its cookie connections; a
    // connection authenticated by header goes on.
    let cookie = cookie_header(claims());
    let mut raw = browser_ws(&server, "/v1/topics/chat.a/ws?mode=sub", Some(&cookie), Some(APP)).await?;
    let mut json = browser_ws(&server, "/v1/ws", Some(&cookie), Some(APP)).await?;
    send(&mut json, json!({"op": "subscribe", "id": 1, "topic": "chat.a"})).await?;
    assert_eq!(next_json(&mut json).await?["type"], "subscribed");
    let mut sse = browser_sse(&server, "chat.a", Some(&cookie), Some(APP)).await?;
    assert_eq!(sse.status(), 200);
    let alice = basic("alice", "alice-pw");
    let mut by_header = ws(&server, "/v1/topics/chat.a/ws?mode=sub", Some(&alice)).await?;
    let mut moved = auth_config()?;
    moved.cookie = Some("herald_token".into());
    moved.allowed_origins = vec!["https://new.example.com".into()];
    server.server.as_ref().ok_or("server")?.auth_reloader().reload(Some(&moved))?;
    let refused = (4401, "credentials no longer accepted".to_owned());
    assert_eq!(close_of(&mut raw, Duration::from_secs(5)).await?, refused);
    assert_eq!(close_of(&mut json, Duration::from_secs(5)).await?, refused);
    while within(Duration::from_secs(5), "the SSE stream to end", sse.chunk()).await??.is_some() {}
    assert_eq!(call(&server, "POST", "/v1/topics/chat.a/messages", Some(&alice), "still here").await?.0, 201);
    let frame = within(Duration::from_secs(5), "raw frame", common::raw_next(&mut by_header)).await??;
    assert_eq!(frame.into_text()?.as_str(), "still here");
    let e = browser_ws(&server, "/v1/ws", Some(&cookie), Some(APP)).await.err().ok_or("opened")?;
    assert_eq!(refused_status(e), 403, "new requests from the old origin are refused too");
    Ok(())
}

#[tokio::test]
async fn cookie_settings_are_refused_at_start_with_a_clear_message() -> Result {
    let refused = |cookie: Option<&str>, origins: &[&str]| {
        let mut auth = auth_config();
        if let Ok(a) = &mut auth {
            a.cookie = cookie.map(str::to_owned);
            a.allowed_origins = list(origins);
        }
        async move {
            let auth = auth?;
            let err = start(move |c| c.auth = Some(auth)).await.err().ok_or("started")?;
            Result::Ok(format!("{err:#}"))
        }
    };
    let err = refused(Some("herald_token"), &[]).await?;
    assert!(err.contains("auth.cookie is set but auth.allowed_origins is empty"), "{err}");
    let err = refused(Some("herald_token"), &["https://app.example.com/app"]).await?;
    assert!(err.contains(r#"auth.allowed_origins "https://app.example.com/app""#), "{err}");
    assert!(err.contains("without a path"), "{err}");
    let err = refused(Some("herald token"), &[APP]).await?;
    assert!(err.contains("is not a cookie name"), "{err}");
    let err = refused(None, &[APP]).await?;
    assert!(err.contains("auth.allowed_origins is set without auth.cookie"), "{err}");
    Ok(())
}
