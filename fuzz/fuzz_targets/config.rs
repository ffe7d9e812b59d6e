//! The config file parsers on arbitrary text: every input is a clean `Ok` or an `Err` with a
//! message, never a panic (toml's error spans are sliced into the message, so byte offsets
//! that miss a character boundary would show up here).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ntp_dtls::config::{check_client_toml, check_server_toml};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for result in [check_client_toml(text), check_server_toml(text)] {
        if let Err(message) = result {
            assert!(!message.is_empty());
        }
    }
});
