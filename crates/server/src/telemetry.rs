//! Logs and traces of the `herald` binary: the `tracing` subscriber with the log layer
//! (text or JSON on stderr, filtered by `HERALD_LOG`) and, when the standard `OTEL_*`
//! variables ask for it, an OpenTelemetry layer that exports Herald's spans (target
//! `herald::trace`: requests, `store.append`, `fan_out`) over OTLP/gRPC. Off by
//! default: without an endpoint nothing listens to those spans and they cost a
//! disabled-callsite check.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// What must be flushed at exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered (bounded by the exporter's timeout).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The batch processor's flush blocks; the OTLP client needs the runtime.
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = flushed {
                eprintln!("herald: warning: exporting the last spans failed: {e}");
            }
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Whether the `OTEL_*` variables ask for trace export: an OTLP endpoint set
/// (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), or
/// `OTEL_TRACES_EXPORTER=otlp` (to the default endpoint, http://localhost:4317); never
/// with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Only the gRPC protocol.
pub fn otlp_wanted() -> Result<bool, String> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    let wanted = match env("OTEL_TRACES_EXPORTER").as_deref() {
        Some("none") => return Ok(false),
        Some("otlp") => true,
        Some(other) => return Err(format!("OTEL_TRACES_EXPORTER must be `otlp` or `none`, not `{other}`")),
        None => env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some(),
    };
    if wanted {
        for var in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(protocol) = env(var).filter(|p| p != "grpc") {
                return Err(format!("{var}={protocol} is not supported: Herald exports OTLP over gRPC (`grpc`)"));
            }
        }
    }
    Ok(wanted)
}

/// Installs the global subscriber. `json`: one JSON object per log line.
pub fn init(json: bool) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // Spans for export, not for the log.
        .add_directive(format!("{}=off", herald_core::TRACE_TARGET).parse().map_err(|e| format!("{e}"))?);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if json { logs.json().boxed() } else { logs.with_ansi(std::io::stderr().is_terminal()).boxed() };
    let provider = if otlp_wanted()? { Some(provider()?) } else { None };
    let export = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("herald"))
            .with_filter(Targets::new().with_target(herald_core::TRACE_TARGET, tracing::Level::INFO))
    });
    tracing_subscriber::registry().with(logs.with_filter(filter)).with(export).init();
    Ok(Telemetry { provider })
}

/// The tracer provider: OTLP/gRPC to the endpoint the variables name, batched; service
/// name `herald` unless `OTEL_SERVICE_NAME` (or `OTEL_RESOURCE_ATTRIBUTES`) says.
fn provider() -> Result<SdkTracerProvider, String> {
    let exporter =
        opentelemetry_otlp::SpanExporter::builder().with_tonic().build().map_err(|e| format!("OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("herald");
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}
