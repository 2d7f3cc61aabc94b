//! `prostaff_events::fuzzing::resume`: see its documentation for the input layout and the
//! invariants checked.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| prostaff_events::fuzzing::resume(data));
