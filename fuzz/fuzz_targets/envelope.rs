//! Envelope decoding, routing and the catalogue's schema check, plus completion of HTTP-posted
//! bodies (logic in `prostaff_events::fuzzing::envelope`, replayed by `cargo test`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    prostaff_events::fuzzing::envelope(data);
});
