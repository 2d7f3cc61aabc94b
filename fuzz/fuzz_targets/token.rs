//! Token parsing: JWT verification (with a leeway, so the time-claim arithmetic is exercised),
//! the authToken subprotocol decoder, history positions and SSE resume tokens.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static VERIFIER: OnceLock<prostaff_events::auth::TokenVerifier> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let verifier = VERIFIER.get_or_init(|| {
        prostaff_events::auth::TokenVerifier::with_leeway("fuzz-secret", Some("rails"), false, 30)
    });
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = verifier.verify(text);
        let _ = prostaff_events::auth::token_from_subprotocol(text);
        if let Some(position) = prostaff_events::history::Position::parse(text) {
            // A parsed position prints as text that parses back to it.
            assert_eq!(
                prostaff_events::history::Position::parse(&position.to_string()),
                Some(position)
            );
        }
        if let Ok(positions) = prostaff_events::sse::parse_resume_token(text) {
            let again = prostaff_events::sse::resume_token(&positions);
            assert_eq!(
                prostaff_events::sse::parse_resume_token(&again).unwrap(),
                positions
            );
        }
    }
});
