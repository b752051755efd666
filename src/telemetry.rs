//! Logs and traces.
//!
//! **Logs**: readable text for development, JSON lines for log pipelines (`--log-format`). The
//! level comes from `ORDERFLOW_LOG` (or `RUST_LOG`), e.g. `info,orderflow=debug`. Every JSON line
//! is flat: the event's fields plus the fields of every span it happened in — the request span
//! (`correlation_id`, method, route) and the job span (`correlation_id`, `order_id`, `job_id`,
//! `step`, `attempt`) — plus `region` when configured and `trace_id` when tracing is on. The
//! spans that carry those fields are recorded whatever the level filter says, so a
//! `warn`-only log still tells which request or step a warning belongs to.
//!
//! **Traces**: with `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) orderflow's spans
//! (requests, store transactions, job steps) are exported as OpenTelemetry traces over OTLP/HTTP
//! (JSON). Without it no tracing layer is installed at all. A request continues the caller's W3C
//! `traceparent`; each job remembers the trace context of whoever enqueued it (in its payload), so
//! the payment, inventory, fulfilment and e-mail steps — in whichever process runs them — are
//! children in the order's one trace; the outgoing provider call carries `traceparent` too.

use std::collections::HashMap;
use std::fmt;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::{Context, Filter, Layer, SubscriberExt};
use tracing_subscriber::registry::{LookupSpan, Registry};
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// The service name traces are reported under unless configured otherwise.
pub const SERVICE_NAME: &str = "orderflow";

/// How logs and traces are set up.
#[derive(Clone, Debug)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// A static `region` field on every JSON log line and a `cloud.region` resource attribute.
    pub region: Option<String>,
    /// Base URL of an OTLP/HTTP collector (`/v1/traces` is appended unless already there).
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
}

impl TelemetrySettings {
    pub fn logs_only(log_format: LogFormat) -> Self {
        Self {
            log_format,
            region: None,
            otlp_endpoint: None,
            service_name: SERVICE_NAME.to_string(),
        }
    }
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] sends the spans still buffered.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the trace exporter (a no-op when tracing is off).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(error) = provider.shutdown() {
                    eprintln!("orderflow: flushing traces failed: {error}");
                }
            })
            .await;
        }
    }
}

/// Installs the global subscriber. A second call (tests, embedding) keeps the first one.
pub fn init(settings: &TelemetrySettings) -> anyhow::Result<Telemetry> {
    let env = EnvFilter::try_from_env("ORDERFLOW_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::new();

    let provider = match settings.otlp_endpoint.as_deref().filter(|e| !e.trim().is_empty()) {
        None => None,
        Some(endpoint) => {
            let provider = tracer_provider(endpoint, settings)?;
            let tracer = provider.tracer(SERVICE_NAME);
            layers.push(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_location(false)
                    .with_threads(false)
                    .with_tracked_inactivity(false)
                    .with_filter(TraceFilter)
                    .boxed(),
            );
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            opentelemetry::global::set_tracer_provider(provider.clone());
            Some(provider)
        }
    };

    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let filter = LogFilter { env };
    layers.push(match settings.log_format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson {
                region: settings.region.clone(),
            })
            .with_filter(filter)
            .boxed(),
    });
    if tracing_subscriber::registry().with(layers).try_init().is_err() {
        // Someone else's subscriber is in place: ours would never see a span.
        if let Some(provider) = &provider {
            let _ = provider.shutdown();
        }
        return Ok(Telemetry { provider: None });
    }
    Ok(Telemetry { provider })
}

fn tracer_provider(endpoint: &str, settings: &TelemetrySettings) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let endpoint = endpoint.trim().trim_end_matches('/');
    let url = if endpoint.ends_with("/v1/traces") {
        endpoint.to_string()
    } else {
        format!("{endpoint}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(url.clone())
        .build()
        .map_err(|error| anyhow::anyhow!("the OTLP endpoint {url}: {error}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ));
    if let Some(region) = &settings.region {
        resource = resource.with_attribute(opentelemetry::KeyValue::new("cloud.region", region.clone()));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// orderflow's own spans: they carry the correlation id and the ids of the order and job.
fn is_context_span(meta: &Metadata<'_>) -> bool {
    meta.is_span() && meta.target().starts_with("orderflow")
}

/// The log filter: events as `ORDERFLOW_LOG` says; orderflow's spans always, so that the fields
/// they carry reach every line logged inside them.
struct LogFilter {
    env: EnvFilter,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Filter<S> for LogFilter {
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        is_context_span(meta) || Filter::<S>::enabled(&self.env, meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if is_context_span(meta) {
            Interest::always()
        } else {
            Filter::<S>::callsite_enabled(&self.env, meta)
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Filter::<S>::max_level_hint(&self.env).map(|hint| hint.max(LevelFilter::INFO))
    }

    fn event_enabled(&self, event: &Event<'_>, cx: &Context<'_, S>) -> bool {
        Filter::<S>::event_enabled(&self.env, event, cx)
    }

    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        Filter::<S>::on_new_span(&self.env, attrs, id, ctx)
    }

    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, ctx: Context<'_, S>) {
        Filter::<S>::on_record(&self.env, id, values, ctx)
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        Filter::<S>::on_enter(&self.env, id, ctx)
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: Context<'_, S>) {
        Filter::<S>::on_exit(&self.env, id, ctx)
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        Filter::<S>::on_close(&self.env, id, ctx)
    }
}

/// What becomes a trace: orderflow's spans, and warnings and errors inside them (as span events).
struct TraceFilter;

impl TraceFilter {
    fn wants(meta: &Metadata<'_>) -> bool {
        is_context_span(meta) || (meta.is_event() && *meta.level() <= tracing::Level::WARN)
    }
}

impl<S> Filter<S> for TraceFilter {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        Self::wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::wants(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }
}

/// One flat JSON object per line: `timestamp`, `level`, `target`, `message`, the event's fields,
/// the fields of the spans it is in (outermost first; inner ones and the event's win), `span`
/// (the innermost span's name), `trace_id` when traced, and `region` when configured.
struct FlatJson {
    region: Option<String>,
}

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_string()));
        if let Some(region) = &self.region {
            line.insert("region".into(), Value::String(region.clone()));
        }
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                let extensions = span.extensions();
                let fields = extensions
                    .get::<FormattedFields<N>>()
                    .and_then(|fields| serde_json::from_str::<Map<String, Value>>(fields).ok());
                for (key, value) in fields.into_iter().flatten() {
                    if !key.starts_with("otel.") {
                        line.insert(key, value);
                    }
                }
                if let Some(trace_id) = extensions
                    .get::<tracing_opentelemetry::OtelData>()
                    .and_then(|data| data.trace_id())
                    .filter(|id| *id != opentelemetry::TraceId::INVALID)
                {
                    line.insert("trace_id".into(), Value::String(trace_id.to_string()));
                }
                innermost = Some(span.name());
            }
            if let Some(name) = innermost {
                line.insert("span".into(), Value::String(name.to_string()));
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::String(value.to_string()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), Value::String(value.to_string()));
    }
}

/// The trace id of a valid W3C `traceparent` header (`00-<trace-id>-<parent-id>-<flags>`), as 32
/// lowercase hex digits.
pub fn traceparent_trace_id(value: &str) -> Option<String> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version.eq_ignore_ascii_case("ff") || !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
        return None;
    }
    // Version 00 has exactly four parts; later versions may append more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(trace.to_ascii_lowercase())
}

struct HeaderMapCarrier<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderMapCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` continue the trace in `headers` (`traceparent`/`tracestate`), when tracing is on
/// and there is one. Call before the span is first entered.
pub fn continue_remote_trace(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let context = TraceContextPropagator::new().extract(&HeaderMapCarrier(headers));
        if context.span().span_context().is_valid() {
            let _ = span.set_parent(context);
        }
    }
}

/// Renames a started span (e.g. after routing found the route template) and records
/// `http.route` on it; a no-op when tracing is off.
pub fn name_span(span: &tracing::Span, name: String, route: &str) {
    let context = span.context();
    let otel = context.span();
    if otel.span_context().is_valid() {
        otel.update_name(name);
        otel.set_attribute(opentelemetry::KeyValue::new("http.route", route.to_string()));
    }
}

/// Makes `span` a child of the span a job's enqueuer recorded (see [`with_trace_context`]).
pub fn continue_job_trace(span: &tracing::Span, payload: &Value) {
    let Some(Value::Object(stored)) = payload.get(TRACE_CONTEXT_KEY) else {
        return;
    };
    let carrier: HashMap<String, String> = stored
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Where a job's payload keeps the trace context of the span that enqueued it.
pub const TRACE_CONTEXT_KEY: &str = "trace_context";

/// `payload` plus the current span's trace context (`traceparent`, `tracestate`) when tracing is
/// on, so the job's span joins the same trace wherever it runs.
pub fn with_trace_context(mut payload: Value) -> Value {
    let headers = current_trace_headers();
    if let (false, Value::Object(object)) = (headers.is_empty(), &mut payload) {
        let stored = headers.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
        object.insert(TRACE_CONTEXT_KEY.into(), Value::Object(stored));
    }
    payload
}

/// The current span's W3C trace context headers; empty when tracing is off.
pub fn current_trace_headers() -> HashMap<String, String> {
    let mut headers = HashMap::new();
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut HashMapInjector(&mut headers));
    }
    headers
}

struct HashMapInjector<'a>(&'a mut HashMap<String, String>);

impl Injector for HashMapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_trace_ids() {
        assert_eq!(
            traceparent_trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            traceparent_trace_id("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-00").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert_eq!(traceparent_trace_id(bad), None, "{bad}");
        }
    }

    /// A writer into a shared buffer, for capturing log lines.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn json_lines(filter: &str, emit: impl FnOnce()) -> Vec<Value> {
        let captured = Captured::default();
        let writer = captured.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson {
                region: Some("eu-test-1".into()),
            })
            .with_filter(LogFilter {
                env: EnvFilter::new(filter),
            });
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    #[test]
    fn json_lines_are_flat_and_carry_the_span_fields_whatever_the_level() {
        let lines = json_lines("warn", || {
            let request = tracing::info_span!("request", correlation_id = "c-1", otel.name = "GET");
            let _request = request.enter();
            tracing::info!("filtered out");
            let job = tracing::info_span!("job", step = "charge_payment", attempt = 2u32, order_id = "o-1");
            let _job = job.enter();
            tracing::warn!(elapsed_ms = 5u64, "slow");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["message"], "slow");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["correlation_id"], "c-1");
        assert_eq!(line["step"], "charge_payment");
        assert_eq!(line["attempt"], 2);
        assert_eq!(line["order_id"], "o-1");
        assert_eq!(line["elapsed_ms"], 5);
        assert_eq!(line["region"], "eu-test-1");
        assert_eq!(line["span"], "job");
        assert!(line.get("otel.name").is_none(), "{line}");
        assert!(line.get("trace_id").is_none(), "{line}");
    }

    #[test]
    fn no_trace_context_without_tracing() {
        let payload = with_trace_context(serde_json::json!({"order_id": "x"}));
        assert_eq!(payload, serde_json::json!({"order_id": "x"}));
    }
}
