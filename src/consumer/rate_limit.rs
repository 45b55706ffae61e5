//! Per-task rate limits (`rate_limit='10/s'`), per worker as stock (`Consumer._limit_task`,
//! kombu's `TokenBucket` with capacity 1). Requests over the limit wait here, unacked.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// `celery.utils.time.rate`: "N/s", "N/m", "N/h" or a plain number (per second) → per second.
pub fn parse_rate(rate: &serde_json::Value) -> Option<f64> {
    let per_second = match rate {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => {
            let (ops, unit) = s.trim().split_once('/').unwrap_or((s.trim(), "s"));
            let ops: f64 = ops.trim().parse().ok()?;
            match unit.trim() {
                "" | "s" => ops,
                "m" => ops / 60.0,
                "h" => ops / 3600.0,
                _ => return None,
            }
        }
        _ => return None,
    };
    (per_second > 0.0 && per_second.is_finite()).then_some(per_second)
}

/// kombu's TokenBucket with capacity 1: one request per 1/rate seconds.
#[derive(Debug)]
struct TokenBucket {
    fill_rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(fill_rate: f64, now: Instant) -> Self {
        TokenBucket { fill_rate, tokens: 1.0, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.fill_rate).min(1.0);
        self.last = now;
    }

    fn try_consume(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn expected_wait(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / self.fill_rate).max(0.0))
    }
}

/// Buckets and their waiting requests, by task name.
pub struct RateLimits<T> {
    buckets: HashMap<String, (TokenBucket, VecDeque<T>, Option<Instant>)>,
}

impl<T> Default for RateLimits<T> {
    fn default() -> Self {
        RateLimits { buckets: HashMap::new() }
    }
}

impl<T> RateLimits<T> {
    /// Admit `item` now if the task's bucket allows, else keep it waiting in order.
    pub fn admit(&mut self, task: &str, per_second: f64, item: T, now: Instant) -> Option<T> {
        let entry = self
            .buckets
            .entry(task.to_owned())
            .or_insert_with(|| (TokenBucket::new(per_second, now), VecDeque::new(), None));
        entry.0.fill_rate = per_second;
        if entry.1.is_empty() && entry.0.try_consume(now) {
            return Some(item);
        }
        entry.1.push_back(item);
        if entry.2.is_none() {
            entry.2 = Some(now + entry.0.expected_wait());
        }
        None
    }

    /// The next time a waiting request may be admitted.
    pub fn next_wake(&self) -> Option<Instant> {
        self.buckets.values().filter_map(|(_, _, wake)| *wake).min()
    }

    /// Requests whose turn has come, in order.
    pub fn release(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        for (bucket, waiting, wake) in self.buckets.values_mut() {
            if wake.is_none_or(|w| w > now) {
                continue;
            }
            *wake = None;
            while !waiting.is_empty() && bucket.try_consume(now) {
                out.extend(waiting.pop_front());
            }
            if !waiting.is_empty() {
                *wake = Some(now + bucket.expected_wait());
            }
        }
        out
    }

    /// Every waiting item.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.buckets.values().flat_map(|(_, waiting, _)| waiting.iter())
    }

    /// Everything still waiting (shutdown, connection loss).
    pub fn drain(&mut self) -> Vec<T> {
        self.buckets
            .values_mut()
            .flat_map(|(_, waiting, wake)| {
                *wake = None;
                waiting.drain(..).collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_celery_rates() {
        assert_eq!(parse_rate(&json!("10/s")), Some(10.0));
        assert_eq!(parse_rate(&json!("120/m")), Some(2.0));
        assert_eq!(parse_rate(&json!("3600/h")), Some(1.0));
        assert_eq!(parse_rate(&json!("5")), Some(5.0));
        assert_eq!(parse_rate(&json!(2.5)), Some(2.5));
        assert_eq!(parse_rate(&json!("0/s")), None);
        assert_eq!(parse_rate(&json!("x/s")), None);
        assert_eq!(parse_rate(&json!("1/d")), None);
        assert_eq!(parse_rate(&json!(null)), None);
    }

    #[test]
    fn admits_one_per_period_in_order() {
        let t0 = Instant::now();
        let mut rl = RateLimits::default();
        assert_eq!(rl.admit("t", 2.0, 1, t0), Some(1));
        assert_eq!(rl.admit("t", 2.0, 2, t0), None);
        assert_eq!(rl.admit("t", 2.0, 3, t0), None);
        let wake = rl.next_wake().unwrap();
        assert_eq!(wake, t0 + Duration::from_millis(500));
        assert!(rl.release(t0 + Duration::from_millis(100)).is_empty());
        assert_eq!(rl.release(wake), vec![2]);
        assert_eq!(rl.release(wake + Duration::from_millis(500)), vec![3]);
        assert_eq!(rl.next_wake(), None);
        // Another task has its own bucket.
        assert_eq!(rl.admit("u", 1.0, 9, t0), Some(9));
        assert!(rl.drain().is_empty());
    }
}
