//! Replays every input kept under `fuzz/regressions/<target>/` (crashes found by `fuzz/run.sh`
//! and hand-made edge cases) through the same entry points as the fuzz targets. None may panic;
//! hand-made frame seeds named `malformed-…` must be refused and `valid-…` accepted.

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "no regression inputs in {}",
        dir.display()
    );
    inputs
}

#[test]
fn phoenix_frame_decoders() {
    use prostaff_events::phoenix::codec::{decode_binary, decode_text, Vsn};
    for (name, data) in inputs("phoenix_frames") {
        let Some((selector, rest)) = data.split_first() else {
            continue;
        };
        let outcome = match selector % 3 {
            0 => std::str::from_utf8(rest)
                .map(|t| decode_text(Vsn::V1, t).is_ok())
                .unwrap_or(false),
            1 => std::str::from_utf8(rest)
                .map(|t| decode_text(Vsn::V2, t).is_ok())
                .unwrap_or(false),
            _ => decode_binary(Vsn::V2, &bytes::Bytes::copy_from_slice(rest)).is_ok(),
        };
        // Nothing may panic; hand-made seeds also say by name what the decoder must answer.
        let file = name.rsplit('/').next().unwrap_or(&name);
        if file.starts_with("malformed-") {
            assert!(!outcome, "{name} was accepted");
        } else if file.starts_with("valid-") {
            assert!(outcome, "{name} was refused");
        }
    }
}

#[test]
fn envelope_decoder_catalogue_and_http_completion() {
    for (name, data) in inputs("envelope") {
        println!("{name}");
        prostaff_events::fuzzing::envelope(&data);
    }
}

#[test]
fn token_parsers() {
    let verifier = prostaff_events::auth::TokenVerifier::new("fuzz-secret", Some("rails"), false);
    for (name, data) in inputs("token") {
        let text = String::from_utf8_lossy(&data);
        assert!(verifier.verify(&text).is_err(), "{name} verified");
        let _ = prostaff_events::auth::token_from_subprotocol(&text);
    }
}

/// The targets whose logic lives in `prostaff_events::fuzzing` (one entry point shared with
/// the fuzzer).
#[test]
fn websocket_frames_long_poll_and_resume_parsers() {
    for (name, data) in inputs("ws_frames") {
        println!("{name}");
        prostaff_events::fuzzing::ws_frames(&data);
    }
    for (name, data) in inputs("longpoll") {
        println!("{name}");
        prostaff_events::fuzzing::longpoll(&data);
    }
    for (name, data) in inputs("resume") {
        println!("{name}");
        prostaff_events::fuzzing::resume(&data);
    }
}

#[test]
fn presence_diffs_and_stored_hashes() {
    for (name, data) in inputs("presence_diff") {
        println!("{name}");
        prostaff_events::fuzzing::presence_diff(&data);
    }
}

#[test]
fn history_notices() {
    for (name, data) in inputs("history_notice") {
        println!("{name}");
        prostaff_events::fuzzing::history_notice(&data);
    }
}
