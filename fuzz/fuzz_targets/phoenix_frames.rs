//! Phoenix frame decoders: V1 text, V2 text, V2 binary. The first byte picks the decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prostaff_events::phoenix::codec::{decode_binary, decode_text, Vsn};

fuzz_target!(|data: &[u8]| {
    let Some((selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = decode_text(Vsn::V1, text);
            }
        }
        1 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = decode_text(Vsn::V2, text);
            }
        }
        _ => {
            let _ = decode_binary(Vsn::V2, &bytes::Bytes::copy_from_slice(rest));
        }
    }
});
