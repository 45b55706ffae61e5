//! Requests waiting for their ETA/countdown, held unacked in memory until due (reference §5.2).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use chrono::{DateTime, Utc};

/// A min-heap of (due time, arrival order) → item; earliest first, FIFO among equal times.
pub struct EtaQueue<T> {
    heap: BinaryHeap<Reverse<(DateTime<Utc>, u64)>>,
    items: std::collections::HashMap<u64, T>,
    seq: u64,
}

impl<T> Default for EtaQueue<T> {
    fn default() -> Self {
        EtaQueue { heap: BinaryHeap::new(), items: Default::default(), seq: 0 }
    }
}

impl<T> EtaQueue<T> {
    pub fn push(&mut self, due: DateTime<Utc>, item: T) {
        self.seq += 1;
        self.heap.push(Reverse((due, self.seq)));
        self.items.insert(self.seq, item);
    }

    /// When the earliest item falls due.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.heap.peek().map(|Reverse((due, _))| *due)
    }

    /// Take every item due at `now`, in due order.
    pub fn pop_due(&mut self, now: DateTime<Utc>) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(Reverse((due, seq))) = self.heap.peek().copied() {
            if due > now {
                break;
            }
            self.heap.pop();
            if let Some(item) = self.items.remove(&seq) {
                out.push(item);
            }
        }
        out
    }

    /// Every waiting item with its due time, earliest first.
    pub fn iter(&self) -> impl Iterator<Item = (DateTime<Utc>, &T)> {
        let mut keys: Vec<(DateTime<Utc>, u64)> = self.heap.iter().map(|Reverse(k)| *k).collect();
        keys.sort();
        keys.into_iter().filter_map(move |(due, seq)| self.items.get(&seq).map(|t| (due, t)))
    }

    /// Take everything (shutdown).
    pub fn drain(&mut self) -> Vec<T> {
        self.heap.clear();
        self.items.drain().map(|(_, v)| v).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn releases_in_due_order() {
        let now = Utc::now();
        let mut q = EtaQueue::default();
        q.push(now + Duration::seconds(5), "late");
        q.push(now - Duration::seconds(1), "past");
        q.push(now + Duration::seconds(1), "soon-a");
        q.push(now + Duration::seconds(1), "soon-b");
        assert_eq!(q.next_due(), Some(now - Duration::seconds(1)));
        assert_eq!(q.pop_due(now), vec!["past"]);
        assert_eq!(q.pop_due(now + Duration::seconds(2)), vec!["soon-a", "soon-b"]);
        assert_eq!(q.drain(), vec!["late"]);
        assert_eq!(q.next_due(), None);
    }
}
