//! The revoked-task set: celery's `LimitedSet(maxlen=50000, expires=10800)`
//! (`celery/worker/state.py`, env `CELERY_WORKER_REVOKES_MAX` / `CELERY_WORKER_REVOKE_EXPIRES`).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub struct RevokedSet {
    max_len: usize,
    expires: Duration,
    added: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl RevokedSet {
    pub fn new(max_len: usize, expires: Duration) -> Self {
        RevokedSet { max_len, expires, added: HashMap::new(), order: VecDeque::new() }
    }

    /// With the limits stock reads from the environment.
    pub fn from_env() -> Self {
        let num = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok()).map_or(d, |v| v as u64);
        RevokedSet::new(
            num("CELERY_WORKER_REVOKES_MAX", 50_000) as usize,
            Duration::from_secs(num("CELERY_WORKER_REVOKE_EXPIRES", 10_800)),
        )
    }

    /// A set already holding `ids` (restored from `--statedb`).
    pub fn from_ids(mut set: RevokedSet, ids: &[String]) -> Self {
        for id in ids {
            set.add(id);
        }
        set
    }

    pub fn add(&mut self, id: &str) {
        let now = Instant::now();
        self.purge(now);
        self.added.insert(id.to_owned(), now);
        self.order.push_back((now, id.to_owned()));
        while self.added.len() > self.max_len {
            let Some((at, old)) = self.order.pop_front() else { break };
            if self.added.get(&old) == Some(&at) {
                self.added.remove(&old);
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.added.get(id).is_some_and(|at| at.elapsed() < self.expires)
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> =
            self.added.iter().filter(|(_, at)| at.elapsed() < self.expires).map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids
    }

    fn purge(&mut self, now: Instant) {
        while let Some((at, id)) = self.order.front().cloned() {
            if now.duration_since(at) < self.expires {
                break;
            }
            self.order.pop_front();
            if self.added.get(&id) == Some(&at) {
                self.added.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_expiring() {
        let mut s = RevokedSet::new(2, Duration::from_secs(60));
        s.add("a");
        s.add("b");
        s.add("c");
        assert!(!s.contains("a") && s.contains("b") && s.contains("c"));
        assert_eq!(s.ids(), vec!["b", "c"]);
        let mut e = RevokedSet::new(10, Duration::from_millis(0));
        e.add("x");
        assert!(!e.contains("x"));
    }
}
