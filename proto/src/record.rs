//! A DTLS record pre-parser: just enough to decide whether a datagram from an unknown address
//! deserves any state at all, before the DTLS engine sees it.
//!
//! rtc-dtls creates an association for any datagram from a new address. A server relay on the
//! open network must not: only a ClientHello in epoch 0 may start one (RFC 6347 §4.2.1: the
//! cookie exchange then proves the address before we do any expensive work).

/// DTLS record header: content type, version, epoch, sequence number (48 bits), length.
pub const RECORD_HEADER_LEN: usize = 13;
/// Handshake message header: type, length (24), message_seq (16), fragment offset and length (24 each).
const HANDSHAKE_HEADER_LEN: usize = 12;
pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// DTLS 1.0 (0xfeff) may appear in the record layer of a first ClientHello (RFC 6347 §4.2.1);
/// the version actually negotiated is decided by the engine, which accepts DTLS 1.2 only.
const DTLS_1_0: [u8; 2] = [0xfe, 0xff];
const DTLS_1_2: [u8; 2] = [0xfe, 0xfd];

/// The first record of `datagram`, if its header is complete and its length fits.
pub struct RecordHeader {
    pub content_type: u8,
    pub version: [u8; 2],
    pub epoch: u16,
    pub length: usize,
}

pub fn first_record(datagram: &[u8]) -> Option<RecordHeader> {
    let header = datagram.get(..RECORD_HEADER_LEN)?;
    let length = usize::from(u16::from_be_bytes([header[11], header[12]]));
    if datagram.len() < RECORD_HEADER_LEN + length {
        return None;
    }
    Some(RecordHeader {
        content_type: header[0],
        version: [header[1], header[2]],
        epoch: u16::from_be_bytes([header[3], header[4]]),
        length,
    })
}

/// True when the datagram starts with an epoch-0 handshake record carrying a ClientHello (or
/// its first fragment): the only thing that may open an association.
pub fn is_client_hello(datagram: &[u8]) -> bool {
    let Some(record) = first_record(datagram) else {
        return false;
    };
    if record.content_type != CONTENT_HANDSHAKE
        || record.epoch != 0
        || !(record.version == DTLS_1_0 || record.version == DTLS_1_2)
        || record.length < HANDSHAKE_HEADER_LEN
    {
        return false;
    }
    datagram.get(RECORD_HEADER_LEN) == Some(&HANDSHAKE_CLIENT_HELLO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(content_type: u8, version: [u8; 2], epoch: u16, body: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, version[0], version[1]];
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn hello_body() -> Vec<u8> {
        let mut body = vec![HANDSHAKE_CLIENT_HELLO];
        body.extend_from_slice(&[0; 11]);
        body.extend_from_slice(&[0xfe, 0xfd]);
        body
    }

    #[test]
    fn a_client_hello_in_epoch_zero_is_accepted_with_either_record_version() {
        assert!(is_client_hello(&record(22, DTLS_1_2, 0, &hello_body())));
        assert!(is_client_hello(&record(22, DTLS_1_0, 0, &hello_body())));
    }

    #[test]
    fn anything_else_is_refused() {
        let mut server_hello = hello_body();
        server_hello[0] = 2;
        assert!(!is_client_hello(&record(22, DTLS_1_2, 0, &server_hello)));
        assert!(!is_client_hello(&record(22, DTLS_1_2, 1, &hello_body())));
        assert!(!is_client_hello(&record(23, DTLS_1_2, 0, &hello_body())));
        assert!(!is_client_hello(&record(22, [3, 3], 0, &hello_body())));
        assert!(!is_client_hello(&record(22, DTLS_1_2, 0, &[1, 0, 0])));
        // a plain NTP request
        let mut ntp = vec![0u8; 48];
        ntp[0] = 0x23;
        assert!(!is_client_hello(&ntp));
    }

    #[test]
    fn truncated_input_never_panics() {
        let full = record(22, DTLS_1_2, 0, &hello_body());
        for len in 0..full.len() {
            assert!(!is_client_hello(&full[..len]), "prefix of {len} bytes");
        }
    }
}
