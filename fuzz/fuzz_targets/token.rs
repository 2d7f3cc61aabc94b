//! Token parsing: JWT verification and the authToken subprotocol decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static VERIFIER: OnceLock<prostaff_events::auth::TokenVerifier> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let verifier = VERIFIER.get_or_init(|| prostaff_events::auth::TokenVerifier::new("fuzz-secret", Some("rails"), false));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = verifier.verify(text);
        let _ = prostaff_events::auth::token_from_subprotocol(text);
    }
});
