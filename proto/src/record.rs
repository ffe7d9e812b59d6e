//! A DTLS record pre-parser: just enough to decide whether a datagram from an unknown address
//! deserves any state at all, before the DTLS engine sees it.
//!
//! rtc-dtls creates an association for any datagram from a new address. A server relay on the
//! open network must not: only a ClientHello in epoch 0 may start one (RFC 6347 §4.2.1: the
//! cookie exchange then proves the address before we do any expensive work).

/// DTLS record header: content type, version, epoch, sequence number (48 bits), length.
pub const RECORD_HEADER_LEN: usize = 13;
/// Handshake message header: type, length (24), message_seq (16), fragment offset and length (24 each).
pub const HANDSHAKE_HEADER_LEN: usize = 12;
pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;
pub const HANDSHAKE_CLIENT_HELLO: u8 = 1;
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

/// Handshake message types (RFC 5246 §7.4, RFC 6347 §4.2.1).
pub const HANDSHAKE_SERVER_HELLO: u8 = 2;
pub const HANDSHAKE_HELLO_VERIFY_REQUEST: u8 = 3;
pub const HANDSHAKE_CERTIFICATE: u8 = 11;
pub const HANDSHAKE_SERVER_KEY_EXCHANGE: u8 = 12;
pub const HANDSHAKE_CERTIFICATE_REQUEST: u8 = 13;
pub const HANDSHAKE_SERVER_HELLO_DONE: u8 = 14;
pub const HANDSHAKE_CERTIFICATE_VERIFY: u8 = 15;
pub const HANDSHAKE_CLIENT_KEY_EXCHANGE: u8 = 16;

/// A datagram that is not a well-formed sequence of records, or a handshake record whose
/// fragment headers do not add up. rtc-dtls drops such input too; we drop it before it costs
/// anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// One record of a datagram.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub content_type: u8,
    pub version: [u8; 2],
    pub epoch: u16,
    pub body: &'a [u8],
}

impl Record<'_> {
    /// A plaintext handshake record: the only kind whose content can be read before the
    /// handshake keys exist, and the only kind rtc-dtls reassembles.
    pub fn is_plaintext_handshake(&self) -> bool {
        self.content_type == CONTENT_HANDSHAKE && self.epoch == 0
    }
}

/// The records of a datagram, in order. Yields `Err(Malformed)` once (and then nothing) when a
/// header is truncated or a record runs past the end of the datagram.
pub fn records(datagram: &[u8]) -> Records<'_> {
    Records { rest: datagram }
}

pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.rest);
        let Some(header) = first_record(rest) else {
            return Some(Err(Malformed));
        };
        let end = RECORD_HEADER_LEN + header.length;
        self.rest = &rest[end..];
        Some(Ok(Record {
            content_type: header.content_type,
            version: header.version,
            epoch: header.epoch,
            body: &rest[RECORD_HEADER_LEN..end],
        }))
    }
}

/// One handshake message fragment's header (RFC 6347 §4.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    pub msg_type: u8,
    /// The whole message's length, as the fragment declares it.
    pub length: u32,
    pub message_seq: u16,
    pub offset: u32,
    pub fragment_length: u32,
}

impl Fragment {
    /// The whole message in this one fragment.
    pub fn is_whole(&self) -> bool {
        self.offset == 0 && self.fragment_length == self.length
    }

    /// A fragment that carries nothing of a message that has something: no sender needs one.
    pub fn is_empty_of_nonempty(&self) -> bool {
        self.fragment_length == 0 && self.length > 0
    }
}

/// The handshake fragments of a plaintext handshake record's body, in order. Yields
/// `Err(Malformed)` once (and then nothing) for a truncated header, a fragment whose data runs
/// past the record, or one that reaches past its message's declared length.
pub fn fragments(body: &[u8]) -> Fragments<'_> {
    Fragments { rest: body }
}

pub struct Fragments<'a> {
    rest: &'a [u8],
}

fn u24(b: &[u8]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}

impl Iterator for Fragments<'_> {
    type Item = Result<Fragment, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.rest);
        let Some(h) = rest.get(..HANDSHAKE_HEADER_LEN) else {
            return Some(Err(Malformed));
        };
        let fragment = Fragment {
            msg_type: h[0],
            length: u24(&h[1..4]),
            message_seq: u16::from_be_bytes([h[4], h[5]]),
            offset: u24(&h[6..9]),
            fragment_length: u24(&h[9..12]),
        };
        let end = HANDSHAKE_HEADER_LEN + fragment.fragment_length as usize;
        if rest.len() < end
            || u64::from(fragment.offset) + u64::from(fragment.fragment_length)
                > u64::from(fragment.length)
        {
            return Some(Err(Malformed));
        }
        self.rest = &rest[end..];
        Some(Ok(fragment))
    }
}

/// The ClientHello fragment a datagram holds when it is one record holding one ClientHello
/// fragment and nothing else: how real clients send it (whole when it fits, as every one we
/// know does at a usual MTU; OpenSSL at a small MTU sends a few fragments, each in its own
/// datagram). Anything else starting with a ClientHello is refused before the engine.
pub fn lone_client_hello(datagram: &[u8]) -> Option<Fragment> {
    let mut records = records(datagram);
    let (Some(Ok(record)), None) = (records.next(), records.next()) else {
        return None;
    };
    if !record.is_plaintext_handshake()
        || !(record.version == DTLS_1_0 || record.version == DTLS_1_2)
    {
        return None;
    }
    let mut fragments = fragments(record.body);
    match (fragments.next(), fragments.next()) {
        (Some(Ok(f)), None) if f.msg_type == HANDSHAKE_CLIENT_HELLO => Some(f),
        _ => None,
    }
}

/// True when the datagram is one whole ClientHello in one record, and nothing else, of at most
/// `max_len` bytes.
pub fn is_whole_client_hello(datagram: &[u8], max_len: u32) -> bool {
    lone_client_hello(datagram).is_some_and(|f| f.is_whole() && f.length <= max_len)
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

    fn fragment(msg_type: u8, length: u32, seq: u16, offset: u32, data: &[u8]) -> Vec<u8> {
        let mut out = vec![msg_type];
        out.extend_from_slice(&length.to_be_bytes()[1..]);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes()[1..]);
        out.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn records_and_fragments_are_walked_in_order() {
        let mut datagram = record(22, DTLS_1_2, 0, &fragment(11, 10, 2, 0, &[7; 4]));
        datagram.extend(record(20, DTLS_1_2, 0, &[1]));
        datagram.extend(record(22, DTLS_1_2, 1, &[0xaa; 40]));
        let all: Vec<_> = records(&datagram)
            .collect::<Result<_, _>>()
            .expect("well formed");
        assert_eq!(
            all.iter()
                .map(|r| (r.content_type, r.epoch, r.body.len()))
                .collect::<Vec<_>>(),
            vec![(22, 0, 16), (20, 0, 1), (22, 1, 40)]
        );
        assert!(all[0].is_plaintext_handshake() && !all[2].is_plaintext_handshake());
        let mut body = fragment(11, 10, 2, 0, &[7; 4]);
        body.extend(fragment(11, 10, 2, 4, &[]));
        let f: Vec<_> = fragments(&body)
            .collect::<Result<_, _>>()
            .expect("well formed");
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].msg_type, f[0].length, f[0].message_seq), (11, 10, 2));
        assert!(!f[0].is_whole() && f[1].is_empty_of_nonempty());
        // A trailing partial record, a fragment past its record, past its message.
        let mut truncated = datagram.clone();
        truncated.extend_from_slice(&[22, 0xfe]);
        assert!(records(&truncated).any(|r| r.is_err()));
        assert_eq!(records(&truncated).filter(|r| r.is_err()).count(), 1);
        let mut past_record = fragment(11, 10, 2, 0, &[7; 4]);
        past_record.truncate(14);
        assert_eq!(fragments(&past_record).next(), Some(Err(Malformed)));
        assert_eq!(
            fragments(&fragment(11, 10, 2, 8, &[7; 4])).next(),
            Some(Err(Malformed))
        );
    }

    #[test]
    fn only_one_whole_client_hello_in_one_record_is_whole() {
        let hello = fragment(1, 4, 0, 0, &[1, 2, 3, 4]);
        assert!(is_whole_client_hello(&record(22, DTLS_1_2, 0, &hello), 100));
        assert!(is_whole_client_hello(&record(22, DTLS_1_0, 0, &hello), 100));
        assert!(
            !is_whole_client_hello(&record(22, DTLS_1_2, 0, &hello), 3),
            "over the cap"
        );
        let first_half = fragment(1, 4, 0, 0, &[1, 2]);
        assert!(!is_whole_client_hello(
            &record(22, DTLS_1_2, 0, &first_half),
            100
        ));
        let mut two = hello.clone();
        two.extend(fragment(1, 4, 0, 0, &[1, 2, 3, 4]));
        assert!(!is_whole_client_hello(&record(22, DTLS_1_2, 0, &two), 100));
        let mut two_records = record(22, DTLS_1_2, 0, &hello);
        two_records.extend(record(22, DTLS_1_2, 0, &hello));
        assert!(!is_whole_client_hello(&two_records, 100));
        assert!(!is_whole_client_hello(
            &record(22, DTLS_1_2, 1, &hello),
            100
        ));
        let server_hello = fragment(2, 4, 0, 0, &[1, 2, 3, 4]);
        assert!(!is_whole_client_hello(
            &record(22, DTLS_1_2, 0, &server_hello),
            100
        ));
    }
}
