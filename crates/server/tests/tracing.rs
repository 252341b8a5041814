//! OpenTelemetry over OTLP: the real binary, with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing
//! at a small OTLP/gRPC receiver served by the test, exports the spans of a publish
//! (the request, `store.append`, `fan_out`) in one trace, parented to the caller's
//! `traceparent`, over HTTP and over gRPC.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{spawn_herald_env, within, HeraldProcess, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;

struct Receiver(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> std::result::Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// An OTLP/gRPC receiver on a free port: its URL and the spans it receives.
async fn receiver() -> Result<(String, mpsc::UnboundedReceiver<Span>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let service = TraceServiceServer::new(Receiver(tx));
    let app =
        axum::Router::new().route_service("/opentelemetry.proto.collector.trace.v1.TraceService/{*rest}", service);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, rx))
}

/// `herald serve` (memory store) exporting to `endpoint`, spans batched every 100 ms.
fn herald(endpoint: &str) -> Result<(HeraldProcess, String)> {
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_SERVICE_NAME", "herald-under-test"),
    ];
    let (child, line) = spawn_herald_env(&["--store", "memory"], &env, "addr=")?;
    let addr = line.split("addr=").nth(1).and_then(|rest| rest.split_whitespace().next()).ok_or("no address")?;
    Ok((child, format!("http://{addr}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Collects spans of `trace_id` until `names` have all arrived; returns them by name.
async fn spans_of(
    rx: &mut mpsc::UnboundedReceiver<Span>,
    trace_id: &str,
    names: &[&str],
) -> Result<HashMap<String, Span>> {
    let mut found = HashMap::new();
    while !names.iter().all(|n| found.contains_key(*n)) {
        let span = within(Duration::from_secs(20), "the exported spans", rx.recv()).await?.ok_or("receiver gone")?;
        if hex(&span.trace_id) == trace_id {
            found.insert(span.name.clone(), span);
        }
    }
    Ok(found)
}

/// The request span is the caller's span's child; `store.append` the request's;
/// `fan_out` the store's. One trace.
fn assert_chain(spans: &HashMap<String, Span>, request: &str, caller_span: &str) {
    let (req, store, fan) = (&spans[request], &spans["store.append"], &spans["fan_out"]);
    assert_eq!(hex(&req.parent_span_id), caller_span, "the request continues the caller's trace");
    assert_eq!(store.parent_span_id, req.span_id, "store.append under the request");
    assert_eq!(fan.parent_span_id, store.span_id, "fan_out under store.append");
    assert!(fan.attributes.iter().any(|a| a.key == "subscribers"), "{fan:?}");
}

#[tokio::test]
async fn a_publish_exports_its_spans_under_the_callers_traceparent() -> Result {
    let (endpoint, mut spans) = receiver().await?;
    let (_herald, url) = herald(&endpoint)?;
    let http = common::http();
    // A subscriber, so that the publish fans out.
    let mut sub = herald_client::WsConnection::connect(&url).await?;
    sub.subscribe("traced", herald_client::StartFrom::Latest, None).await?;

    // HTTP, with the caller's trace context.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let published = http
        .post(format!("{url}/v1/topics/traced/messages"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await?;
    assert_eq!(published.status(), 201);
    sub.recv().await?;
    let request = "POST /v1/topics/{topic}/messages";
    let found = spans_of(&mut spans, trace_id, &[request, "store.append", "fan_out"]).await?;
    assert_chain(&found, request, caller_span);

    // gRPC, the trace context in the metadata.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let client = herald_client::GrpcClient::connect(&url).await?;
    let mut request = tonic::Request::new(herald_client::grpc::pb::PublishRequest {
        topic: "traced".into(),
        data: "over grpc".into(),
        kind: herald_client::grpc::pb::Kind::Text as i32,
        ..Default::default()
    });
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-{caller_span}-01").parse()?);
    client.topics().publish(request).await?;
    sub.recv().await?;
    let method = "/herald.v1.Topics/Publish";
    let found = spans_of(&mut spans, trace_id, &[method, "store.append", "fan_out"]).await?;
    assert_chain(&found, method, caller_span);
    Ok(())
}
