//! Envelope decoding and routing, plus completion of HTTP-posted bodies.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = prostaff_events::envelope::decode(bytes::Bytes::copy_from_slice(data)) {
        let route = prostaff_events::router::route(&envelope);
        assert!(!route.topics.is_empty());
    }
    if let Ok(accepted) = prostaff_events::ingest::publish::complete_envelope(data) {
        // Whatever the HTTP path accepts must decode as a valid envelope.
        prostaff_events::envelope::decode(accepted.raw).expect("completed envelopes are valid");
    }
});
