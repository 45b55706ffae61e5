//! `--autoscale=max,min` (`celery/worker/autoscale.py`): grow the pool at once when more
//! requests are reserved than children run, shrink it only after `AUTOSCALE_KEEPALIVE`
//! seconds (30) have passed since the last growth.

use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use crate::config::Autoscale;

#[derive(Debug)]
pub struct Autoscaler {
    pub max: usize,
    pub min: usize,
    keepalive: Duration,
    last_scale_up: Option<Instant>,
    /// When the periodic check runs next (stock checks every `keepalive` seconds and on
    /// every task message).
    pub next_check: Instant,
}

impl Autoscaler {
    pub fn new(range: Autoscale, now: Instant) -> Self {
        let keepalive = std::env::var("AUTOSCALE_KEEPALIVE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|k| *k > 0.0)
            .map_or(Duration::from_secs(30), Duration::from_secs_f64);
        Autoscaler { max: range.max, min: range.min, keepalive, last_scale_up: None, next_check: now + keepalive }
    }

    /// The pool size wanted now, if it differs from `processes`, given `qty` reserved requests.
    pub fn target(&mut self, qty: usize, processes: usize, now: Instant) -> Option<usize> {
        let up = qty.min(self.max);
        if up > processes {
            self.last_scale_up = Some(now);
            info!("Scaling up {} processes.", up - processes);
            return Some(up);
        }
        let down = qty.max(self.min);
        if down < processes && self.last_scale_up.is_some_and(|t| now.duration_since(t) > self.keepalive) {
            info!("Scaling down {} processes.", processes - down);
            return Some(down);
        }
        None
    }

    /// The periodic check ran: schedule the next.
    pub fn checked(&mut self, now: Instant) {
        self.next_check = now + self.keepalive;
    }

    /// `autoscale` remote command (`Autoscaler.update`): the new range, and the pool size it
    /// forces, if any.
    pub fn update(&mut self, max: Option<usize>, min: Option<usize>, processes: usize) -> Option<usize> {
        let mut target = None;
        if let Some(max) = max {
            if max < processes {
                info!("Scaling down {} processes.", processes - max);
                target = Some(max);
            }
            self.max = max;
        }
        if let Some(min) = min {
            let now = target.unwrap_or(processes);
            if min > now {
                info!("Scaling up {} processes.", min - now);
                target = Some(min);
            }
            self.min = min;
        }
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_at_once_shrinks_after_keepalive() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Autoscale { max: 4, min: 1 }, t0);
        let keep = a.keepalive;
        assert_eq!(a.target(0, 1, t0), None);
        assert_eq!(a.target(3, 1, t0), Some(3));
        assert_eq!(a.target(9, 3, t0), Some(4)); // capped at max
        assert_eq!(a.target(0, 4, t0 + keep / 2), None); // too soon to shrink
        assert_eq!(a.target(0, 4, t0 + keep * 2), Some(1)); // down to min, not below
        assert_eq!(a.update(Some(2), None, 4), Some(2));
        assert_eq!(a.update(None, Some(3), 2), Some(3));
        assert_eq!((a.max, a.min), (2, 3));
    }
}
