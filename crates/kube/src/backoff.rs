//! How watches retry after a failure (a 410 Expired only asks for a relist
//! and is not waited for: `source.rs`): from 200 ms doubling, with ±25 % jitter, never more
//! than 5 s; back to the start after a minute without failure. kube's
//! default caps at 30 s, which would leave an agent up to half a minute
//! behind an API server that came back; 5 s keeps the catch-up short
//! while a thousand agents send at most ~270 requests/s per watch to a
//! server that is down (the jitter spreads them from 3.75 to 5 s).

use kube::runtime::utils::Backoff;
use std::time::{Duration, Instant};

const FIRST: Duration = Duration::from_millis(200);
const MAX: Duration = Duration::from_secs(5);
const RESET_AFTER: Duration = Duration::from_secs(60);

/// The watches' retry policy.
#[derive(Debug)]
pub struct WatchBackoff {
    next: Duration,
    last: Option<Instant>,
    seed: u64,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Self {
            next: FIRST,
            last: None,
            seed: u64::from(nanos) | 1,
        }
    }
}

impl WatchBackoff {
    /// A number in [0, 1): xorshift, enough to spread agents apart.
    fn unit(&mut self) -> f64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) > RESET_AFTER)
        {
            self.next = FIRST;
        }
        self.last = Some(now);
        let base = self.next;
        self.next = (self.next * 2).min(MAX);
        let jitter = 0.75 + self.unit() * 0.5;
        Some(base.mul_f64(jitter).min(MAX))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_five_seconds_with_jitter_and_resets() {
        let mut b = WatchBackoff::default();
        let waits: Vec<Duration> = (&mut b).take(8).collect();
        assert!(waits[0] >= Duration::from_millis(150) && waits[0] <= Duration::from_millis(250));
        for w in &waits[5..] {
            assert!(*w >= Duration::from_millis(3750) && *w <= MAX, "{waits:?}");
        }
        b.reset();
        assert!(b.next().expect("wait") <= Duration::from_millis(250));
    }
}
