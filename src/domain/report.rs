//! The sales report's rules: which periods a request covers and what each period adds up.
//!
//! A report is a list of whole periods (UTC hours or days): `from` is rounded down to the start
//! of its period and `to` up to the end of its own, so every row covers a whole hour or day and
//! two reports of the same periods agree. Every period in the range is listed, with zeros when
//! nothing sold, so a chart needs no gap filling. The range is bounded ([`MAX_PERIODS`]) so one
//! request cannot ask the database for years of hours.

use chrono::{DateTime, Duration, NaiveDate, Utc};

use super::validation::FieldErrors;

/// Most periods one report covers (about 41 days of hours, 2.7 years of days).
pub const MAX_PERIODS: i64 = 1000;
/// Periods a report covers when `from` is not given: the last 30 days, or the last 24 hours.
pub const DEFAULT_DAYS: i64 = 30;
pub const DEFAULT_HOURS: i64 = 24;

/// How long each period of the report is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 2] = [Granularity::Day, Granularity::Hour];

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn parse(value: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|g| g.as_str() == value)
            .ok_or_else(|| "must be `day` or `hour`".to_string())
    }

    pub fn length(self) -> Duration {
        match self {
            Granularity::Hour => Duration::hours(1),
            Granularity::Day => Duration::days(1),
        }
    }

    /// The start of the period `at` falls in.
    pub fn start_of(self, at: DateTime<Utc>) -> DateTime<Utc> {
        // Whole seconds since the epoch, so any time chrono parses truncates (`duration_trunc`
        // works in nanoseconds and fails outside 1677–2262, which a client may send).
        let length = self.length().num_seconds();
        let seconds = at.timestamp().div_euclid(length) * length;
        DateTime::from_timestamp(seconds, 0).unwrap_or(at)
    }
}

/// A validated report range: whole periods from `start` (inclusive) to `end` (exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SalesRange {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub granularity: Granularity,
}

impl SalesRange {
    /// Parses the report's query parameters (already split into `from`, `to`, `granularity`),
    /// reporting every bad one under `query.<name>`. `now` is the default `to`.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        granularity: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Self, FieldErrors> {
        let mut errors = FieldErrors::new();
        let granularity = match granularity.map(Granularity::parse).transpose() {
            Ok(granularity) => granularity.unwrap_or(Granularity::Day),
            Err(message) => {
                errors.add("query.granularity", message);
                Granularity::Day
            }
        };
        let mut instant = |name: &str, value: Option<&str>| match value.map(parse_instant).transpose() {
            Ok(instant) => instant,
            Err(message) => {
                errors.add(format!("query.{name}"), message);
                None
            }
        };
        let (from, to) = (instant("from", from), instant("to", to));
        if !errors.is_empty() {
            return Err(errors);
        }
        let to = to.unwrap_or(now);
        let from = from.unwrap_or_else(|| match granularity {
            Granularity::Day => to - Duration::days(DEFAULT_DAYS),
            Granularity::Hour => to - Duration::hours(DEFAULT_HOURS),
        });
        if from >= to {
            errors.add("query.from", "must be before `to`");
            return Err(errors);
        }
        let start = granularity.start_of(from);
        let last = granularity.start_of(to - Duration::microseconds(1));
        let periods = (last - start).num_seconds() / granularity.length().num_seconds() + 1;
        if periods > MAX_PERIODS {
            errors.add(
                "query.from",
                format!(
                    "the range spans {periods} {}s; a report covers at most {MAX_PERIODS} periods (narrow it{})",
                    granularity.as_str(),
                    if granularity == Granularity::Hour {
                        " or use granularity=day"
                    } else {
                        ""
                    }
                ),
            );
            return Err(errors);
        }
        Ok(SalesRange {
            start,
            end: last + granularity.length(),
            granularity,
        })
    }

    /// The start of every period, oldest first.
    pub fn periods(&self) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        let step = self.granularity.length();
        std::iter::successors(Some(self.start), move |at| Some(*at + step)).take_while(|at| *at < self.end)
    }
}

/// An RFC 3339 time (`2026-12-01T10:00:00Z`) or a date (`2026-12-01`, midnight UTC).
fn parse_instant(value: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(value) {
        return Ok(at.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|midnight| midnight.and_utc())
        .ok_or_else(|| "must be an RFC 3339 time (2026-12-01T10:00:00Z) or a date (2026-12-01)".to_string())
}

/// What one period of the report adds up, in minor units of the store currency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SalesTotals {
    /// Orders accepted in the period whose payment was taken.
    pub orders: i64,
    /// Units on those orders.
    pub units: i64,
    /// Their totals.
    pub gross_minor: i64,
    /// Refunds accepted for them (settled or not).
    pub refunded_minor: i64,
}

impl SalesTotals {
    pub fn net_minor(&self) -> i64 {
        self.gross_minor - self.refunded_minor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn far_dates_truncate_without_panicking() {
        let far = at("2900-06-01T13:45:00Z");
        assert_eq!(Granularity::Hour.start_of(far), at("2900-06-01T13:00:00Z"));
        assert_eq!(
            Granularity::Day.start_of(at("1500-06-01T13:45:00Z")),
            at("1500-06-01T00:00:00Z")
        );
        let range = SalesRange::parse(Some("2900-01-01"), Some("2900-01-03"), None, far).unwrap();
        assert_eq!(range.periods().count(), 2);
    }

    #[test]
    fn ranges_round_out_to_whole_periods() {
        let now = at("2026-12-03T15:20:00Z");
        let hours = SalesRange::parse(
            Some("2026-12-03T10:30:00Z"),
            Some("2026-12-03T12:00:00Z"),
            Some("hour"),
            now,
        )
        .unwrap();
        assert_eq!(
            (hours.start, hours.end),
            (at("2026-12-03T10:00:00Z"), at("2026-12-03T12:00:00Z"))
        );
        assert_eq!(hours.periods().count(), 2);

        let days = SalesRange::parse(Some("2026-12-01"), None, None, now).unwrap();
        assert_eq!(days.granularity, Granularity::Day);
        assert_eq!(
            (days.start, days.end),
            (at("2026-12-01T00:00:00Z"), at("2026-12-04T00:00:00Z"))
        );
        assert_eq!(days.periods().last(), Some(at("2026-12-03T00:00:00Z")));

        let default = SalesRange::parse(None, None, Some("hour"), now).unwrap();
        assert_eq!(default.periods().count() as i64, DEFAULT_HOURS + 1);
    }

    #[test]
    fn bad_ranges_name_their_parameter() {
        let now = at("2026-12-03T15:20:00Z");
        let fields = |result: Result<SalesRange, FieldErrors>| -> Vec<String> {
            result.unwrap_err().into_vec().into_iter().map(|e| e.field).collect()
        };
        assert_eq!(
            fields(SalesRange::parse(None, None, Some("week"), now)),
            ["query.granularity"]
        );
        assert_eq!(
            fields(SalesRange::parse(Some("yesterday"), Some("12/03/2026"), None, now)),
            ["query.from", "query.to"]
        );
        assert_eq!(
            fields(SalesRange::parse(Some("2026-12-03"), Some("2026-12-02"), None, now)),
            ["query.from"]
        );
        assert_eq!(
            fields(SalesRange::parse(Some("2026-12-03"), Some("2026-12-03"), None, now)),
            ["query.from"]
        );
        // 1000 hours fit; 1001 do not, though the same range in days does.
        let (from, to) = ("2026-10-01T00:00:00Z", "2026-11-11T16:00:00Z");
        assert_eq!(
            SalesRange::parse(Some(from), Some(to), Some("hour"), now)
                .unwrap()
                .periods()
                .count(),
            1000
        );
        let longer = "2026-11-11T16:00:01Z";
        assert_eq!(
            fields(SalesRange::parse(Some(from), Some(longer), Some("hour"), now)),
            ["query.from"]
        );
        assert!(SalesRange::parse(Some(from), Some(longer), Some("day"), now).is_ok());
    }
}
