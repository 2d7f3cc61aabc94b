//! `prostaff_events::fuzzing::history_notice`: see its documentation for the invariants checked.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| prostaff_events::fuzzing::history_notice(data));
