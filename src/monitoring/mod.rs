//! Operators' view of the system: Prometheus metrics ([`metrics`]), alarms evaluated against the
//! database ([`alarms`]) and their signed alert webhooks ([`webhook`]).

pub mod alarms;
pub mod metrics;
pub mod webhook;

use std::sync::Arc;

pub use alarms::AlarmSettings;
pub use metrics::Metrics;

/// Who may read `/metrics`.
#[derive(Clone, Debug, Default)]
pub enum MetricsAccess {
    /// Anyone (the default: keep the port private, or choose another option).
    #[default]
    Public,
    /// A bearer token with the admin role, or the scrape token when one is configured.
    Restricted { scrape_token: Option<ScrapeToken> },
}

/// A static bearer token for Prometheus scrapers; never printed.
#[derive(Clone)]
pub struct ScrapeToken(pub String);

impl std::fmt::Debug for ScrapeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// What the HTTP layer needs for metrics and alarm reporting. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Monitoring {
    /// This app's metric registry (shared with its workers).
    pub metrics: Metrics,
    /// Thresholds (the stuck-order limits are also reported as gauges).
    pub alarms: Arc<AlarmSettings>,
    /// Who may scrape `/metrics`.
    pub access: Arc<MetricsAccess>,
}
