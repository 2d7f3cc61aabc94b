//! Sliding-window rate limiter keyed by organisation (used for `join_queue`).
//!
//! A true sliding log: at most `max` accepted calls in any window of `window` length. Memory is
//! bounded by `max` timestamps per active key; keys idle for a whole window are swept away.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct SlidingWindow {
    max: usize,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    logs: HashMap<String, VecDeque<Instant>>,
    calls_since_sweep: u32,
}

const SWEEP_EVERY: u32 = 256;

impl SlidingWindow {
    pub fn new(max: u32, window: Duration) -> Self {
        SlidingWindow {
            max: max.max(1) as usize,
            window,
            state: Mutex::new(State::default()),
        }
    }

    /// Records a call for `key` at `now` and says whether it is allowed.
    pub fn allow(&self, key: &str, now: Instant) -> bool {
        let mut state = self.state.lock().expect("rate limiter lock");
        state.calls_since_sweep += 1;
        if state.calls_since_sweep >= SWEEP_EVERY {
            state.calls_since_sweep = 0;
            let window = self.window;
            state.logs.retain(|_, log| {
                log.back()
                    .is_some_and(|last| now.saturating_duration_since(*last) < window)
            });
        }
        let log = match state.logs.get_mut(key) {
            Some(log) => log,
            None => state.logs.entry(key.to_string()).or_default(),
        };
        while log
            .front()
            .is_some_and(|first| now.saturating_duration_since(*first) >= self.window)
        {
            log.pop_front();
        }
        if log.len() >= self.max {
            return false;
        }
        log.push_back(now);
        true
    }

    /// Number of keys currently remembered.
    pub fn tracked_keys(&self) -> usize {
        self.state.lock().expect("rate limiter lock").logs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_max_per_sliding_window() {
        let limiter = SlidingWindow::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(limiter.allow("o", t0));
        assert!(limiter.allow("o", t0 + Duration::from_secs(10)));
        assert!(limiter.allow("o", t0 + Duration::from_secs(20)));
        assert!(!limiter.allow("o", t0 + Duration::from_secs(30)));
        // A fixed window would reset at 60 s; the sliding window frees one slot per old call.
        assert!(!limiter.allow("o", t0 + Duration::from_secs(59)));
        assert!(limiter.allow("o", t0 + Duration::from_secs(60)));
        assert!(!limiter.allow("o", t0 + Duration::from_secs(65)));
        assert!(limiter.allow("o", t0 + Duration::from_secs(70)));
        assert!(limiter.allow("other", t0 + Duration::from_secs(30)));
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let limiter = SlidingWindow::new(1, Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..100 {
            limiter.allow(&format!("org-{i}"), t0);
        }
        let later = t0 + Duration::from_secs(5);
        for _ in 0..SWEEP_EVERY {
            limiter.allow("active", later);
        }
        assert_eq!(limiter.tracked_keys(), 1);
    }
}
