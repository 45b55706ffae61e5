//! ISO-8601 timestamps as Celery writes them (`datetime.isoformat()`).

use chrono::{DateTime, NaiveDateTime, Utc};

/// Parse an `eta`/`expires` header. A value without an offset is taken as UTC, as
/// `celery.utils.time.maybe_make_aware` does for messages sent with `enable_utc`.
pub fn parse_iso8601(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    // Python also writes a space instead of `T` and omits seconds fractions or the offset.
    let normalized = s.replacen(' ', "T", 1);
    if let Ok(dt) = DateTime::parse_from_rfc3339(&normalized) {
        return Some(dt.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(&normalized, fmt) {
            return Some(naive.and_utc());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_python_writes() {
        let a = parse_iso8601("2026-11-24T00:41:01.219773+00:00").unwrap();
        assert_eq!(a.timestamp_micros(), 1795480861219773);
        let b = parse_iso8601("2026-11-24T01:41:01.219773+01:00").unwrap();
        assert_eq!(a, b);
        let naive = parse_iso8601("2026-11-24T00:41:01.219773").unwrap();
        assert_eq!(a, naive);
        assert!(parse_iso8601("2026-11-24 00:41:01").is_some());
        assert!(parse_iso8601("tomorrow").is_none());
        assert!(parse_iso8601("").is_none());
    }
}
