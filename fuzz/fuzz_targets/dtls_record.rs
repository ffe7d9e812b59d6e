//! The DTLS record pre-parser on arbitrary datagrams: `first_record` reads exactly the header
//! bytes and never claims more than the datagram holds, and `is_client_hello` (the only gate
//! to server state) accepts nothing but an epoch-0 handshake record that starts a ClientHello.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ntp_dtls::proto::record::{CONTENT_HANDSHAKE, RECORD_HEADER_LEN, first_record, is_client_hello};

fuzz_target!(|data: &[u8]| {
    let record = first_record(data);
    if let Some(r) = &record {
        assert!(data.len() >= RECORD_HEADER_LEN);
        assert!(
            RECORD_HEADER_LEN + r.length <= data.len(),
            "declared length {} overruns a {}-byte datagram",
            r.length,
            data.len()
        );
        assert_eq!(r.content_type, data[0]);
        assert_eq!(r.version, [data[1], data[2]]);
        assert_eq!(r.epoch, u16::from_be_bytes([data[3], data[4]]));
        assert_eq!(
            r.length,
            usize::from(u16::from_be_bytes([data[11], data[12]]))
        );
    } else {
        assert!(
            data.len() < RECORD_HEADER_LEN
                || data.len()
                    < RECORD_HEADER_LEN + usize::from(u16::from_be_bytes([data[11], data[12]]))
        );
    }

    if is_client_hello(data) {
        let r = record.expect("a ClientHello has a complete first record");
        assert_eq!(r.content_type, CONTENT_HANDSHAKE);
        assert_eq!(r.epoch, 0);
        assert!(
            r.version == [0xfe, 0xff] || r.version == [0xfe, 0xfd],
            "record version {:02x?}",
            r.version
        );
        // A handshake header (12 bytes) fits in the record, and it is a ClientHello (type 1).
        assert!(r.length >= 12 && RECORD_HEADER_LEN + r.length <= data.len());
        assert_eq!(data[RECORD_HEADER_LEN], 1);
    }
});
