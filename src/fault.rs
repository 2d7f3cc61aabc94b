//! Fault injection for tests of the hub's clean-up: a test arms a panic for one topic and
//! the next session that joins it panics inside its join, as a bug would. Not reachable from
//! the network: only code linked with the hub can arm it. Disarmed, it costs one relaxed
//! atomic load per join.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ARMED: AtomicBool = AtomicBool::new(false);
static TOPICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Makes every later join of `topic` panic (in-process tests only).
#[doc(hidden)]
pub fn panic_on_join(topic: &str) {
    TOPICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(topic.to_string());
    ARMED.store(true, Ordering::Release);
}

pub(crate) fn on_join(topic: &str) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    let armed = TOPICS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|t| t == topic);
    if armed {
        panic!("fault injected on join (tests)");
    }
}
