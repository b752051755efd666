//! The one source of "now" for anything that gets stored. PostgreSQL keeps microseconds, so
//! timestamps are cut to microseconds before use: the value a response shows is then exactly
//! the value a later read returns (and an idempotent replay is byte-for-byte the first answer).

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

/// The current time at storage precision.
pub fn now() -> DateTime<Utc> {
    let now = Utc::now();
    now.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    #[test]
    fn has_no_sub_microsecond_part() {
        assert_eq!(super::now().timestamp_subsec_nanos() % 1000, 0);
    }
}
