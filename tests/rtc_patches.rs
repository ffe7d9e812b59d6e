//! The in-tree patches to rtc-dtls 0.21.1 (vendor/PATCHES.md), one test per patch, each failing
//! without its patch. rtc-dtls is driven only through its public `Endpoint`: two endpoints wired
//! together in memory, or hand-made records into one, with a simulated clock and no socket.
//! Where a test needs to see what a handshake message would do if a peer sent it differently,
//! a man in the middle rewrites the plaintext (epoch 0) records on their way.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use rtc_dtls::cipher_suite::{CipherSuite, CipherSuiteId, cipher_suite_for_id};
use rtc_dtls::config::{ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig};
use rtc_dtls::content::ContentType;
use rtc_dtls::crypto::Certificate;
use rtc_dtls::crypto_provider::{
    ActiveKeyExchange, AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CbcAlgorithm, CbcCipher,
    CryptoAlgorithm, CryptoError, HashAlgorithm, HmacAlgorithm, KeyExchangeAlgorithm, Mac,
    PublicKey, RTCCrypto, RTCCryptoProvider, RTCRandom, SignatureScheme as KeyScheme, SigningKey,
    StreamCipher, StreamCipherAlgorithm,
};
use rtc_dtls::endpoint::{Endpoint, EndpointEvent};
use rtc_dtls::record_layer::record_layer_header::{PROTOCOL_VERSION1_2, RecordLayerHeader};
use rtc_dtls::signature_hash_algorithm::SignatureScheme;
use rtc_shared::TransportProtocol;

// ---------------------------------------------------------------------------------------------
// Counting the work: bytes allocated, per thread (tests run on threads of their own).

struct CountingAllocator;

thread_local! {
    /// Every byte this thread has asked the allocator for (a reallocation counts its new size).
    static ALLOCATED: Cell<u64> = const { Cell::new(0) };
    /// Bytes this thread holds right now (allocated minus freed by it).
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

fn count(allocated: usize, live: isize) {
    let _ = ALLOCATED.try_with(|a| a.set(a.get() + allocated as u64));
    let _ = LIVE.try_with(|l| l.set(l.get() + live as i64));
}

// SAFETY: every call is passed straight to the system allocator; the counters are plain
// thread-local cells with no destructor, read with `try_with` so they are never touched after
// the thread's locals are gone.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), layout.size() as isize);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), layout.size() as isize);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(0, -(layout.size() as isize));
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size, new_size as isize - layout.size() as isize);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocated() -> u64 {
    ALLOCATED.with(Cell::get)
}

fn live() -> i64 {
    LIVE.with(Cell::get)
}

// ---------------------------------------------------------------------------------------------
// The wire: records, handshake messages, alerts.

const CLIENT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4444);
const SERVER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4445);

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

const HELLO_REQUEST: u8 = 0;
const CLIENT_HELLO: u8 = 1;
const SERVER_HELLO: u8 = 2;
const HELLO_VERIFY_REQUEST: u8 = 3;
const SERVER_KEY_EXCHANGE: u8 = 12;
const CERTIFICATE_VERIFY: u8 = 15;
const CLIENT_KEY_EXCHANGE: u8 = 16;

const WARNING: u8 = 1;
const FATAL: u8 = 2;
const HANDSHAKE_FAILURE: u8 = 40;
const NO_CERTIFICATE: u8 = 41;
const ILLEGAL_PARAMETER: u8 = 47;
const UNEXPECTED_MESSAGE: u8 = 10;
const NO_RENEGOTIATION: u8 = 100;

const EXT_SUPPORTED_GROUPS: u16 = 10;
const EXT_EC_POINT_FORMATS: u16 = 11;
const EXT_SIGNATURE_ALGORITHMS: u16 = 13;
const EXT_EXTENDED_MASTER_SECRET: u16 = 23;
const EXT_RENEGOTIATION_INFO: u16 = 0xff01;
const EXT_PADDING: u16 = 21;

const P256: u16 = 0x0017;
const P384: u16 = 0x0018;

/// One DTLS record as it is on the wire (an encrypted record's body is its ciphertext).
#[derive(Clone, Debug, PartialEq)]
struct Record {
    content_type: u8,
    epoch: u16,
    seq: u64,
    body: Vec<u8>,
}

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.content_type);
        out.extend_from_slice(&[0xfe, 0xfd]);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes()[2..]);
        out.extend_from_slice(&(self.body.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.body);
    }

    /// The handshake message this plaintext record starts with.
    fn handshake(&self) -> Option<Handshake> {
        if self.content_type != HANDSHAKE || self.epoch != 0 {
            return None;
        }
        Handshake::parse(&self.body)
    }

    /// (level, description) of a plaintext alert.
    fn alert(&self) -> Option<(u8, u8)> {
        (self.content_type == ALERT && self.epoch == 0 && self.body.len() == 2)
            .then(|| (self.body[0], self.body[1]))
    }
}

fn records(datagram: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= 13 {
        let len = u16::from_be_bytes([rest[11], rest[12]]) as usize;
        if rest.len() < 13 + len {
            break;
        }
        let mut seq = [0u8; 8];
        seq[2..].copy_from_slice(&rest[5..11]);
        out.push(Record {
            content_type: rest[0],
            epoch: u16::from_be_bytes([rest[3], rest[4]]),
            seq: u64::from_be_bytes(seq),
            body: rest[13..13 + len].to_vec(),
        });
        rest = &rest[13 + len..];
    }
    out
}

fn datagram(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        record.encode(&mut out);
    }
    out
}

/// One handshake message (or fragment of one): its 12-byte header and its bytes.
#[derive(Clone, Debug, PartialEq)]
struct Handshake {
    typ: u8,
    length: u32,
    message_seq: u16,
    offset: u32,
    fragment: Vec<u8>,
}

impl Handshake {
    fn parse(bytes: &[u8]) -> Option<Handshake> {
        if bytes.len() < 12 {
            return None;
        }
        let u24 = |b: &[u8]| u32::from_be_bytes([0, b[0], b[1], b[2]]);
        let fragment_length = u24(&bytes[9..12]) as usize;
        Some(Handshake {
            typ: bytes[0],
            length: u24(&bytes[1..4]),
            message_seq: u16::from_be_bytes([bytes[4], bytes[5]]),
            offset: u24(&bytes[6..9]),
            fragment: bytes.get(12..12 + fragment_length)?.to_vec(),
        })
    }

    /// A whole, unfragmented message.
    fn whole(typ: u8, message_seq: u16, body: Vec<u8>) -> Handshake {
        Handshake {
            typ,
            length: body.len() as u32,
            message_seq,
            offset: 0,
            fragment: body,
        }
    }

    fn is_whole(&self) -> bool {
        self.offset == 0 && self.fragment.len() == self.length as usize
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.typ];
        out.extend_from_slice(&self.length.to_be_bytes()[1..]);
        out.extend_from_slice(&self.message_seq.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes()[1..]);
        out.extend_from_slice(&(self.fragment.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&self.fragment);
        out
    }

    fn record(&self, seq: u64) -> Record {
        Record {
            content_type: HANDSHAKE,
            epoch: 0,
            seq,
            body: self.encode(),
        }
    }
}

/// The handshake messages of plaintext records in `datagrams`, in order.
fn handshakes(datagrams: &[Vec<u8>]) -> Vec<Handshake> {
    datagrams
        .iter()
        .flat_map(|d| records(d))
        .filter_map(|r| r.handshake())
        .collect()
}

fn handshake_types(datagrams: &[Vec<u8>]) -> Vec<u8> {
    handshakes(datagrams).iter().map(|h| h.typ).collect()
}

fn plaintext_alerts(datagrams: &[Vec<u8>]) -> Vec<(u8, u8)> {
    datagrams
        .iter()
        .flat_map(|d| records(d))
        .filter_map(|r| r.alert())
        .collect()
}

/// A ClientHello or ServerHello body, split into the fields the tests rewrite.
#[derive(Clone, Debug)]
struct Hello {
    /// version and random
    head: Vec<u8>,
    session_id: Vec<u8>,
    /// ClientHello only
    cookie: Option<Vec<u8>>,
    /// cipher suites and compression methods, or the chosen suite and method
    middle: Vec<u8>,
    extensions: Vec<(u16, Vec<u8>)>,
}

impl Hello {
    fn parse(body: &[u8], client: bool) -> Hello {
        let head = body[..34].to_vec();
        let mut at = 34;
        let take = |n: usize, at: &mut usize| {
            let field = body[*at..*at + n].to_vec();
            *at += n;
            field
        };
        let n = body[at] as usize;
        at += 1;
        let session_id = take(n, &mut at);
        let cookie = client.then(|| {
            let n = body[at] as usize;
            at += 1;
            take(n, &mut at)
        });
        let middle_start = at;
        if client {
            at += 2 + u16::from_be_bytes([body[at], body[at + 1]]) as usize;
            at += 1 + body[at] as usize;
        } else {
            at += 3;
        }
        let middle = body[middle_start..at].to_vec();
        let ext_len = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
        at += 2;
        let end = at + ext_len;
        let mut extensions = Vec::new();
        while at < end {
            let typ = u16::from_be_bytes([body[at], body[at + 1]]);
            let len = u16::from_be_bytes([body[at + 2], body[at + 3]]) as usize;
            extensions.push((typ, body[at + 4..at + 4 + len].to_vec()));
            at += 4 + len;
        }
        Hello {
            head,
            session_id,
            cookie,
            middle,
            extensions,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        out.push(self.session_id.len() as u8);
        out.extend_from_slice(&self.session_id);
        if let Some(cookie) = &self.cookie {
            out.push(cookie.len() as u8);
            out.extend_from_slice(cookie);
        }
        out.extend_from_slice(&self.middle);
        let mut exts = Vec::new();
        for (typ, data) in &self.extensions {
            exts.extend_from_slice(&typ.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(data);
        }
        out.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        out.extend_from_slice(&exts);
        out
    }

    fn extension(&self, typ: u16) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|(t, _)| *t == typ)
            .map(|(_, d)| &d[..])
    }

    fn set_extension(&mut self, typ: u16, data: Vec<u8>) {
        match self.extensions.iter_mut().find(|(t, _)| *t == typ) {
            Some(ext) => ext.1 = data,
            None => self.extensions.push((typ, data)),
        }
    }
}

/// A supported_groups (elliptic_curves) extension body.
fn groups(curves: &[u16]) -> Vec<u8> {
    let mut out = ((2 * curves.len()) as u16).to_be_bytes().to_vec();
    for curve in curves {
        out.extend_from_slice(&curve.to_be_bytes());
    }
    out
}

/// A ClientHello body as a DTLS 1.2 client offering what the test configurations accept.
fn client_hello_body(session_id: &[u8], cookie: &[u8], padding: usize) -> Vec<u8> {
    let mut head = vec![0xfe, 0xfd];
    head.extend((0..32u8).map(|i| i.wrapping_mul(7)));
    let mut extensions = vec![
        (EXT_SIGNATURE_ALGORITHMS, vec![0, 2, 4, 3]),
        (EXT_RENEGOTIATION_INFO, vec![0]),
        (EXT_SUPPORTED_GROUPS, groups(&[P256, P384])),
        (EXT_EC_POINT_FORMATS, vec![1, 0]),
        (EXT_EXTENDED_MASTER_SECRET, vec![]),
    ];
    if padding > 0 {
        extensions.push((EXT_PADDING, vec![0; padding]));
    }
    Hello {
        head,
        session_id: session_id.to_vec(),
        cookie: Some(cookie.to_vec()),
        // one suite, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256; null compression
        middle: vec![0, 2, 0xc0, 0x2b, 1, 0],
        extensions,
    }
    .encode()
}

/// Rewrites every whole plaintext handshake message of type `typ` in `datagram` with `edit`,
/// fixing up the lengths. Everything else passes unchanged.
fn rewrite(datagram_in: &[u8], typ: u8, mut edit: impl FnMut(&mut Handshake)) -> Vec<u8> {
    let mut out = Vec::new();
    for mut record in records(datagram_in) {
        if let Some(mut h) = record.handshake().filter(|h| h.typ == typ && h.is_whole()) {
            // Only one message per record is rewritten; rtc-dtls sends one a record.
            let rest = record.body[12 + h.fragment.len()..].to_vec();
            edit(&mut h);
            h.length = h.fragment.len() as u32;
            record.body = h.encode();
            record.body.extend_from_slice(&rest);
        }
        record.encode(&mut out);
    }
    out
}

/// Rewrites every ClientHello (or ServerHello) in `datagram` through `edit`.
fn rewrite_hello(datagram_in: &[u8], typ: u8, mut edit: impl FnMut(&mut Hello, u16)) -> Vec<u8> {
    rewrite(datagram_in, typ, |h| {
        let mut hello = Hello::parse(&h.fragment, typ == CLIENT_HELLO);
        edit(&mut hello, h.message_seq);
        h.fragment = hello.encode();
    })
}

// ---------------------------------------------------------------------------------------------
// Configurations and a crypto provider the tests can restrict and watch.

/// The default provider, optionally claiming fewer key exchange groups (what rtc-dtls offers
/// is what the provider claims), and keeping every 48-byte HMAC key it is handed: the PRF keys
/// HMAC with the master secret, so a test can protect records of its own for an association.
struct TestProvider {
    inner: Arc<dyn RTCCryptoProvider>,
    groups: Option<Vec<KeyExchangeAlgorithm>>,
    master_secrets: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl TestProvider {
    fn new(groups: Option<Vec<KeyExchangeAlgorithm>>) -> Arc<TestProvider> {
        Arc::new(TestProvider {
            inner: rtc_dtls::crypto_provider::default_provider().expect("default provider"),
            groups,
            master_secrets: Arc::default(),
        })
    }

    fn master_secret(&self) -> Vec<u8> {
        self.master_secrets
            .lock()
            .expect("lock")
            .first()
            .cloned()
            .expect("a handshake has derived a master secret")
    }
}

impl RTCCryptoProvider for TestProvider {
    fn name(&self) -> &'static str {
        "test"
    }
    fn crypto(&self) -> &dyn RTCCrypto {
        self
    }
    fn random(&self) -> &dyn RTCRandom {
        self.inner.random()
    }
}

impl RTCCrypto for TestProvider {
    fn supports(&self, algorithm: CryptoAlgorithm) -> bool {
        if let (CryptoAlgorithm::KeyExchange(group), Some(groups)) = (algorithm, &self.groups) {
            if !groups.contains(&group) {
                return false;
            }
        }
        self.inner.crypto().supports(algorithm)
    }
    fn hash(&self, algorithm: HashAlgorithm, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.crypto().hash(algorithm, data)
    }
    fn block_encrypt(
        &self,
        algorithm: BlockCipherAlgorithm,
        key: &[u8],
        block: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.inner.crypto().block_encrypt(algorithm, key, block)
    }
    fn new_hmac(&self, algorithm: HmacAlgorithm, key: &[u8]) -> Result<Box<dyn Mac>, CryptoError> {
        if key.len() == 48 {
            let mut secrets = self.master_secrets.lock().expect("lock");
            if !secrets.iter().any(|s| s == key) {
                secrets.push(key.to_vec());
            }
        }
        self.inner.crypto().new_hmac(algorithm, key)
    }
    fn new_stream_cipher(
        &self,
        algorithm: StreamCipherAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn StreamCipher>, CryptoError> {
        self.inner.crypto().new_stream_cipher(algorithm, key)
    }
    fn new_aead(
        &self,
        algorithm: AeadAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn AeadCipher>, CryptoError> {
        self.inner.crypto().new_aead(algorithm, key)
    }
    fn new_cbc(
        &self,
        algorithm: CbcAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn CbcCipher>, CryptoError> {
        self.inner.crypto().new_cbc(algorithm, key)
    }
    fn start_key_exchange(
        &self,
        algorithm: KeyExchangeAlgorithm,
    ) -> Result<Box<dyn ActiveKeyExchange>, CryptoError> {
        // Deliberately not filtered by `groups`: a client must refuse a group it did not offer
        // because it did not offer it, not because its provider happens to lack it.
        self.inner.crypto().start_key_exchange(algorithm)
    }
    fn generate_signing_key(&self, scheme: KeyScheme) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().generate_signing_key(scheme)
    }
    fn import_signing_key(
        &self,
        scheme: KeyScheme,
        pkcs8_der: &[u8],
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().import_signing_key(scheme, pkcs8_der)
    }
    fn verify_signature(
        &self,
        scheme: KeyScheme,
        public_key: PublicKey<'_>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.inner
            .crypto()
            .verify_signature(scheme, public_key, message, signature)
    }
}

/// The project's policy (src/engine/rtc.rs): one suite, ECDSA P-256 with SHA-256, EMS required.
fn policy(provider: Arc<dyn RTCCryptoProvider>) -> ConfigBuilder {
    ConfigBuilder::default()
        .with_crypto_provider(provider)
        .with_cipher_suites(vec![CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256])
        .with_signature_schemes(vec![SignatureScheme::EcdsaWithP256AndSha256])
        .with_extended_master_secret(ExtendedMasterSecretType::Require)
}

fn certificate(provider: &Arc<dyn RTCCryptoProvider>) -> Certificate {
    Certificate::generate_self_signed(vec!["localhost".to_owned()], provider.crypto())
        .expect("self-signed certificate")
}

fn server_config(
    provider: Arc<dyn RTCCryptoProvider>,
    more: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> Arc<HandshakeConfig> {
    let builder = policy(provider.clone()).with_certificates(vec![certificate(&provider)]);
    Arc::new(more(builder).build(false, None).expect("server config"))
}

/// A client that does not check the server's (self-signed) certificate chain: these tests are
/// about the handshake, not about PKI. Signatures are still verified.
fn client_config(
    provider: Arc<dyn RTCCryptoProvider>,
    more: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> Arc<HandshakeConfig> {
    let builder = policy(provider).with_insecure_skip_verify(true);
    Arc::new(more(builder).build(true, None).expect("client config"))
}

fn default_provider() -> Arc<dyn RTCCryptoProvider> {
    TestProvider::new(None)
}

fn server_endpoint(config: Arc<HandshakeConfig>) -> Endpoint {
    Endpoint::new(SERVER, TransportProtocol::UDP, Some(config))
}

// ---------------------------------------------------------------------------------------------
// Two endpoints wired together, with an optional man in the middle.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Direction {
    ToServer,
    ToClient,
}

/// A client endpoint and a server endpoint, and what passed between them.
struct Link {
    now: Instant,
    client: Endpoint,
    server: Endpoint,
    /// Datagrams as delivered (after the man in the middle).
    to_server: Vec<Vec<u8>>,
    to_client: Vec<Vec<u8>>,
    client_complete: bool,
    server_complete: bool,
    client_data: Vec<Vec<u8>>,
    server_data: Vec<Vec<u8>>,
    client_errors: Vec<String>,
    server_errors: Vec<String>,
}

impl Link {
    fn new(client_config: Arc<HandshakeConfig>, server_config: Arc<HandshakeConfig>) -> Link {
        let now = Instant::now();
        let mut client = Endpoint::new(CLIENT, TransportProtocol::UDP, None);
        client
            .connect(now, SERVER, client_config, None)
            .expect("connect");
        Link {
            now,
            client,
            server: server_endpoint(server_config),
            to_server: Vec::new(),
            to_client: Vec::new(),
            client_complete: false,
            server_complete: false,
            client_data: Vec::new(),
            server_data: Vec::new(),
            client_errors: Vec::new(),
            server_errors: Vec::new(),
        }
    }

    /// Delivers one datagram, unless the receiving side's association has failed: rtc-dtls
    /// keeps a failed association and answers every alert with the same alert, so two of its
    /// endpoints would bounce a fatal alert for ever. An application drops a failed association
    /// (as src/engine/rtc.rs does); the link stops delivering to it.
    fn deliver(&mut self, direction: Direction, datagram: Vec<u8>) {
        let (endpoint, from, log, complete, data, errors) = match direction {
            Direction::ToServer => (
                &mut self.server,
                CLIENT,
                &mut self.to_server,
                &mut self.server_complete,
                &mut self.server_data,
                &mut self.server_errors,
            ),
            Direction::ToClient => (
                &mut self.client,
                SERVER,
                &mut self.to_client,
                &mut self.client_complete,
                &mut self.client_data,
                &mut self.client_errors,
            ),
        };
        if !errors.is_empty() {
            return;
        }
        log.push(datagram.clone());
        match endpoint.read(self.now, from, None, BytesMut::from(&datagram[..])) {
            Ok(events) => {
                for event in events {
                    match event {
                        EndpointEvent::HandshakeComplete => *complete = true,
                        EndpointEvent::ApplicationData(payload) => data.push(payload.to_vec()),
                        _ => {}
                    }
                }
            }
            Err(err) => errors.push(err.to_string()),
        }
    }

    /// Moves datagrams both ways until both sides are quiet, each passed through `mitm` (which
    /// may rewrite it, or drop it by returning None).
    fn pump_with(&mut self, mut mitm: impl FnMut(Direction, Vec<u8>) -> Option<Vec<u8>>) {
        for _ in 0..50 {
            let mut moved = false;
            while let Some(t) = self.client.poll_transmit() {
                moved = true;
                if let Some(d) = mitm(Direction::ToServer, t.message.to_vec()) {
                    self.deliver(Direction::ToServer, d);
                }
            }
            while let Some(t) = self.server.poll_transmit() {
                moved = true;
                if let Some(d) = mitm(Direction::ToClient, t.message.to_vec()) {
                    self.deliver(Direction::ToClient, d);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the endpoints never went quiet");
    }

    fn pump(&mut self) {
        self.pump_with(|_, d| Some(d));
    }

    fn established(&self) -> bool {
        self.client_complete && self.server_complete
    }

    /// Application data both ways, over the association as it stands.
    fn exchange(&mut self) {
        let (c, s) = (self.client_data.len(), self.server_data.len());
        self.client
            .write(self.now, SERVER, b"ping")
            .expect("client write");
        self.pump();
        self.server
            .write(self.now, CLIENT, b"pong")
            .expect("server write");
        self.pump();
        assert_eq!(
            self.server_data[s..],
            [b"ping".to_vec()],
            "client to server"
        );
        assert_eq!(
            self.client_data[c..],
            [b"pong".to_vec()],
            "server to client"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (a) Quadratic fragment reassembly.

/// A 60 000-byte ClientHello arriving as 250 fragments of 240 bytes, in order. rtc-dtls 0.21.1
/// rebuilt every message by recursion over its fragment list, allocating a fresh copy of the
/// message so far at each level: 240 x 250^2 / 2, about 7.5 MB copied for 60 kB received (and
/// rescanned every fragment for every fragment on every record). Linear reassembly allocates
/// a small multiple of the bytes received. The bytes this thread allocates are the measure of
/// work, so the result does not depend on the machine's speed.
#[test]
fn quadratic_fragment_reassembly() {
    const FRAGMENT: usize = 240;
    const FRAGMENTS: usize = 250;
    let body = client_hello_body(&[], &[], 0);
    let padding = FRAGMENT * FRAGMENTS - body.len() - 4;
    let body = client_hello_body(&[], &[], padding);
    assert_eq!(body.len(), FRAGMENT * FRAGMENTS);

    let now = Instant::now();
    let mut server = server_endpoint(server_config(default_provider(), |b| b));
    let mut replies = Vec::new();
    let before = allocated();
    for (i, chunk) in body.chunks(FRAGMENT).enumerate() {
        let fragment = Handshake {
            typ: CLIENT_HELLO,
            length: body.len() as u32,
            message_seq: 0,
            offset: (i * FRAGMENT) as u32,
            fragment: chunk.to_vec(),
        };
        let d = datagram(&[fragment.record(i as u64)]);
        server
            .read(now, CLIENT, None, BytesMut::from(&d[..]))
            .expect("a fragment is accepted");
        while let Some(t) = server.poll_transmit() {
            replies.push((i, t.message.to_vec()));
        }
    }
    let work = allocated() - before;

    // The whole message was reassembled and understood: the last fragment, and only it,
    // brought the HelloVerifyRequest.
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].0, FRAGMENTS - 1);
    assert_eq!(
        handshake_types(&[replies[0].1.clone()]),
        [HELLO_VERIFY_REQUEST]
    );
    // Linear: a few copies of the 60 kB plus a constant per record. Quadratic: 7.5 MB.
    let limit = 30 * body.len() as u64;
    assert!(
        work < limit,
        "reassembling {} bytes in {FRAGMENTS} fragments allocated {work} bytes (limit {limit})",
        body.len()
    );
}

// ---------------------------------------------------------------------------------------------
// (b) Zero-length fragments were not counted against the 2 MB cap.

/// Feeds `fragments` to `server` from `from`, one record each.
fn feed(server: &mut Endpoint, now: Instant, from: SocketAddr, fragments: &[Handshake]) {
    for (i, fragment) in fragments.iter().enumerate() {
        let d = datagram(&[fragment.record(i as u64)]);
        // A refused record is dropped silently, not an error of the association.
        let _ = server.read(now, from, None, BytesMut::from(&d[..]));
    }
}

/// Whether a ClientHello from `from` now gets its HelloVerifyRequest.
fn answers_client_hello(server: &mut Endpoint, now: Instant, from: SocketAddr) -> bool {
    answers_client_hello_body(server, now, from, &client_hello_body(&[], &[], 0))
}

/// A fragment of a (forged) message that never completes: `length` bytes claimed.
fn forged(message_seq: u16, length: u32, offset: u32, fragment: Vec<u8>) -> Handshake {
    Handshake {
        typ: CLIENT_HELLO,
        length,
        message_seq,
        offset,
        fragment,
    }
}

/// 90 000 forged zero-length fragment records counted 0 bytes against the 2 MB cap, and were
/// all kept (in 0.21.1, about 6 MB for one association, and no limit). Now a fragment that adds
/// nothing to its message is not kept, every fragment kept counts its data plus a fixed
/// overhead, and a message keeps at most 256 fragments; past either limit a record is refused
/// like any fragment buffer overflow.
#[test]
fn zero_length_fragments_are_counted() {
    let now = Instant::now();
    let config = server_config(default_provider(), |b| b);

    // 90 000 zero-length fragments of one claimed message: memory stays flat.
    let mut server = server_endpoint(config.clone());
    let flood: Vec<Handshake> = (0..90_000u32)
        .map(|i| forged(1, 1000, i % 1000, vec![]))
        .collect();
    let before = live();
    feed(&mut server, now, CLIENT, &flood);
    let grown = live() - before;
    drop(flood);
    assert!(
        grown < 256 * 1024,
        "90 000 zero-length fragments grew this association by {grown} bytes"
    );
    assert!(answers_client_hello(&mut server, now, CLIENT));

    // One-byte fragments of many messages, each message well under the per-message limit: each
    // costs more than its byte, so 40 000 of them reach the 2 MB cap. What the cap promises is
    // that the forger's records stop being buffered; rtc-dtls cannot tell them from the peer's,
    // so from then on this address's handshake records are refused too, as after any fragment
    // buffer overflow: the handshake fails by timeout rather than growing without bound.
    let peer = SocketAddr::new(CLIENT.ip(), 5000);
    let mut server = server_endpoint(config.clone());
    let flood: Vec<Handshake> = (0..40_000u32)
        .map(|i| forged(1 + (i / 200) as u16, 1000, 1 + i % 200, vec![0]))
        .collect();
    feed(&mut server, now, peer, &flood);
    assert!(
        !answers_client_hello(&mut server, now, peer),
        "40 000 one-byte fragments did not reach the 2 MB cap"
    );

    // One message may hold 256 fragments: 300 one-byte pieces of a ClientHello (true bytes of
    // it, at distinct offsets) fill it, and the ClientHello itself is then refused.
    let peer = SocketAddr::new(CLIENT.ip(), 5001);
    let mut server = server_endpoint(config);
    let body = client_hello_body(&[], &[], 400);
    let pieces: Vec<Handshake> = (1..=300u32)
        .map(|offset| forged(0, body.len() as u32, offset, vec![body[offset as usize]]))
        .collect();
    feed(&mut server, now, peer, &pieces);
    assert!(
        !answers_client_hello_body(&mut server, now, peer, &body),
        "a message kept more than 256 fragments"
    );
}

/// Like `answers_client_hello`, with a given ClientHello body.
fn answers_client_hello_body(
    server: &mut Endpoint,
    now: Instant,
    from: SocketAddr,
    body: &[u8],
) -> bool {
    while server.poll_transmit().is_some() {}
    let hello = Handshake::whole(CLIENT_HELLO, 0, body.to_vec());
    let d = datagram(&[hello.record(1_000_000)]);
    let _ = server.read(now, from, None, BytesMut::from(&d[..]));
    let mut replies = Vec::new();
    while let Some(t) = server.poll_transmit() {
        replies.push(t.message.to_vec());
    }
    handshake_types(&replies).contains(&HELLO_VERIFY_REQUEST)
}

// ---------------------------------------------------------------------------------------------
// (c) A ClientHello with a session_id.

/// A client resuming (OpenSSL's `-sess_in`, or any client holding a session) sends a non-empty
/// session_id. 0.21.1 read its length byte and went on to parse the session_id's bytes as the
/// cookie, so the ClientHello was dropped without a reply. The server must parse past it and
/// answer with a full handshake (an empty session_id in its ServerHello: rtc-dtls never resumes).
#[test]
fn session_id_in_client_hello() {
    let session_id: Vec<u8> = (1..=32).collect();

    // The session_id in the first ClientHello only, which RFC 6347 4.2.1 leaves out of the
    // transcript: the handshake completes.
    let provider = default_provider();
    let mut link = Link::new(
        client_config(provider.clone(), |b| b),
        server_config(provider, |b| b),
    );
    link.pump_with(|direction, d| {
        Some(match direction {
            Direction::ToServer => rewrite_hello(&d, CLIENT_HELLO, |hello, seq| {
                if seq == 0 {
                    hello.session_id = session_id.clone();
                }
            }),
            Direction::ToClient => d,
        })
    });
    assert!(
        handshake_types(&link.to_client).contains(&HELLO_VERIFY_REQUEST),
        "no HelloVerifyRequest for a ClientHello with a session_id: {:?}",
        handshake_types(&link.to_client)
    );
    assert!(link.established(), "{:?}", link.server_errors);
    let server_hello = handshakes(&link.to_client)
        .into_iter()
        .find(|h| h.typ == SERVER_HELLO)
        .expect("a ServerHello");
    assert!(
        Hello::parse(&server_hello.fragment, false)
            .session_id
            .is_empty()
    );
    link.exchange();

    // The session_id in both ClientHellos: the server parses the second and goes on with a
    // full handshake, and its transcript holds the ClientHello as received. The client's holds
    // the one it sent, without the session_id, so the handshake must not complete: a session_id
    // changed on the way is detected like any other change to a hashed message.
    let provider = default_provider();
    let mut link = Link::new(
        client_config(provider.clone(), |b| b),
        server_config(provider, |b| b),
    );
    link.pump_with(|direction, d| {
        Some(match direction {
            Direction::ToServer => rewrite_hello(&d, CLIENT_HELLO, |hello, _| {
                hello.session_id = session_id.clone();
            }),
            Direction::ToClient => d,
        })
    });
    let types = handshake_types(&link.to_client);
    assert!(
        types.contains(&HELLO_VERIFY_REQUEST) && types.contains(&SERVER_HELLO),
        "{types:?}"
    );
    assert!(!link.server_complete && !link.client_complete);
}

// ---------------------------------------------------------------------------------------------
// (d) The alert for a missing client certificate.

/// A server that requires a client certificate answered a client that sent none with alert 41,
/// no_certificate, which only SSLv3 had: RFC 5246 7.2.2 says it MUST NOT be sent, and 7.4.6 that
/// a server refusing a client without a certificate sends handshake_failure. Both the
/// "require any" and the "require and verify" policies are covered, and the case of a
/// CertificateVerify with no certificate before it, which is an unexpected message.
#[test]
fn missing_client_certificate_alert() {
    for policy in [
        ClientAuthType::RequireAnyClientCert,
        ClientAuthType::RequireAndVerifyClientCert,
    ] {
        let provider = default_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(certificate(&provider).certificate[0].clone())
            .expect("a root");
        let mut link = Link::new(
            client_config(provider.clone(), |b| b),
            server_config(provider, |b| {
                b.with_client_auth(policy).with_client_cas(roots)
            }),
        );
        link.pump();
        assert!(!link.server_complete);
        let alerts = plaintext_alerts(&link.to_client);
        assert_eq!(
            alerts,
            [(FATAL, HANDSHAKE_FAILURE)],
            "{policy:?}: the server's alerts {alerts:?} (41 is no_certificate)"
        );
        assert!(!alerts.contains(&(FATAL, NO_CERTIFICATE)));
    }

    // A CertificateVerify after an empty Certificate, slipped into the client's last flight.
    let provider = default_provider();
    let mut link = Link::new(
        client_config(provider.clone(), |b| b),
        server_config(provider, |b| {
            b.with_client_auth(ClientAuthType::RequireAnyClientCert)
        }),
    );
    link.pump_with(|direction, d| {
        if direction == Direction::ToClient {
            return Some(d);
        }
        let mut recs = records(&d);
        let Some(key_exchange) = recs.iter().find_map(|r| {
            r.handshake()
                .filter(|h| h.typ == CLIENT_KEY_EXCHANGE)
                .map(|h| (h, r.seq))
        }) else {
            return Some(d);
        };
        let last_seq = recs
            .iter()
            .filter(|r| r.epoch == 0)
            .map(|r| r.seq)
            .max()
            .unwrap_or(0);
        let verify = Handshake::whole(
            CERTIFICATE_VERIFY,
            key_exchange.0.message_seq + 1,
            vec![4, 3, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8],
        );
        recs.push(verify.record(last_seq.max(key_exchange.1) + 1));
        Some(datagram(&recs))
    });
    let alerts = plaintext_alerts(&link.to_client);
    assert_eq!(
        alerts,
        [(FATAL, UNEXPECTED_MESSAGE)],
        "a CertificateVerify without a certificate: the server's alerts {alerts:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// (e) Renegotiation attempts.

const GCM: CipherSuiteId = CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256;

/// An established association, and record protection for it with the keys of either side, so
/// that a test can send what the peer's own rtc-dtls would never send.
struct Established {
    link: Link,
    /// Protects as the client does; opens what the server sends.
    as_client: Box<dyn CipherSuite>,
    /// Protects as the server does; opens what the client sends.
    as_server: Box<dyn CipherSuite>,
}

impl Established {
    fn new() -> Established {
        let provider = TestProvider::new(None);
        let shared: Arc<dyn RTCCryptoProvider> = provider.clone();
        let mut link = Link::new(
            client_config(shared.clone(), |b| b),
            server_config(shared.clone(), |b| b),
        );
        link.pump();
        assert!(link.established());
        let random = |datagrams: &[Vec<u8>], typ: u8| {
            let hello = handshakes(datagrams)
                .into_iter()
                .find(|h| h.typ == typ)
                .expect("a hello");
            hello.fragment[2..34].to_vec()
        };
        let client_random = random(&link.to_server, CLIENT_HELLO);
        let server_random = random(&link.to_client, SERVER_HELLO);
        let master_secret = provider.master_secret();
        let keys = |is_client: bool| {
            let mut suite = cipher_suite_for_id(GCM).expect("suite");
            suite
                .init(
                    shared.clone(),
                    &master_secret,
                    &client_random,
                    &server_random,
                    is_client,
                )
                .expect("keys");
            suite
        };
        Established {
            as_client: keys(true),
            as_server: keys(false),
            link,
        }
    }

    /// An epoch-1 record of `content_type` carrying `plaintext`, protected by `suite`.
    fn protect(
        suite: &mut Box<dyn CipherSuite>,
        content_type: ContentType,
        seq: u64,
        plaintext: &[u8],
    ) -> Vec<u8> {
        let header = RecordLayerHeader {
            content_type,
            protocol_version: PROTOCOL_VERSION1_2,
            epoch: 1,
            sequence_number: seq,
            content_len: plaintext.len() as u16,
        };
        let mut raw = Vec::new();
        header.marshal(&mut raw).expect("header");
        raw.extend_from_slice(plaintext);
        suite.encrypt(&header, &raw).expect("encrypt")
    }

    /// What `suite` makes of the records in `datagrams`: (content type, epoch, plaintext).
    fn open(suite: &mut Box<dyn CipherSuite>, datagrams: &[Vec<u8>]) -> Vec<(u8, u16, Vec<u8>)> {
        let mut out = Vec::new();
        for d in datagrams {
            for record in records(d) {
                if record.epoch == 0 || record.content_type == CHANGE_CIPHER_SPEC {
                    out.push((record.content_type, record.epoch, record.body));
                    continue;
                }
                let raw = datagram(std::slice::from_ref(&record));
                let plain = suite.decrypt(&raw).expect("a record of this association");
                out.push((record.content_type, record.epoch, plain[13..].to_vec()));
            }
        }
        out
    }
}

fn drain(endpoint: &mut Endpoint) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(t) = endpoint.poll_transmit() {
        out.push(t.message.to_vec());
    }
    out
}

/// rtc-dtls advertises renegotiation_info but never renegotiates, and said nothing when asked
/// to: an encrypted ClientHello on an established server association, or a HelloRequest on a
/// client, was buffered and cached like a handshake message and taken for a repeat of the
/// peer's last flight, so the answer was our own last flight again (a full Flight 5, certificate
/// and all, from a client). RFC 5746 4.4 and 5 (and RFC 5246 7.2.2) have such an attempt
/// refused with a warning no_renegotiation alert, the association going on; and the attempt
/// must cost no handshake state.
///
/// The test speaks for one side with that side's keys, in its record sequence numbers, so the
/// real endpoint of that side cannot send afterwards (its numbers are behind); the test sends
/// its application data instead, and the other side's real endpoint sends its own.
#[test]
fn renegotiation_is_refused_with_a_warning() {
    let no_renegotiation = (ALERT, 1u16, vec![WARNING, NO_RENEGOTIATION]);

    // The client "renegotiates": 200 ClientHellos under the association's keys, numbered as the
    // next messages of the handshake so that 0.21.1 would take each for new.
    let mut e = Established::new();
    let next = handshakes(&e.link.to_server)
        .iter()
        .find(|h| h.typ == CLIENT_KEY_EXCHANGE)
        .map(|h| h.message_seq + 2)
        .expect("a ClientKeyExchange");
    let before = live();
    for i in 0..200u16 {
        let hello = Handshake::whole(CLIENT_HELLO, next + i, client_hello_body(&[], &[], 1000));
        let d = Established::protect(
            &mut e.as_client,
            ContentType::Handshake,
            100 + u64::from(i),
            &hello.encode(),
        );
        // Straight to the endpoint: the link would keep a copy of every datagram.
        let events = e
            .link
            .server
            .read(e.link.now, CLIENT, None, BytesMut::from(&d[..]));
        assert!(events.is_ok_and(|events| events.is_empty()));
        let answer = Established::open(&mut e.as_client, &drain(&mut e.link.server));
        assert_eq!(
            answer,
            std::slice::from_ref(&no_renegotiation),
            "the server's answer to renegotiation attempt {i}"
        );
    }
    let grown = live() - before;
    assert!(
        grown < 32 * 1024,
        "200 renegotiation attempts left {grown} bytes behind"
    );
    // The association goes on, both ways.
    let d = Established::protect(&mut e.as_client, ContentType::ApplicationData, 300, b"ping");
    e.link.deliver(Direction::ToServer, d);
    assert_eq!(e.link.server_data, [b"ping".to_vec()]);
    e.link
        .server
        .write(e.link.now, CLIENT, b"pong")
        .expect("server write");
    e.link.pump();
    assert_eq!(e.link.client_data, [b"pong".to_vec()]);
    assert!(
        e.link.server_errors.is_empty(),
        "{:?}",
        e.link.server_errors
    );

    // The server asks the client to renegotiate (HelloRequest, RFC 5246 7.4.1.1).
    let mut e = Established::new();
    let request = Handshake::whole(HELLO_REQUEST, 0, vec![]);
    let d = Established::protect(
        &mut e.as_server,
        ContentType::Handshake,
        100,
        &request.encode(),
    );
    e.link.deliver(Direction::ToClient, d);
    let answer = Established::open(&mut e.as_server, &drain(&mut e.link.client));
    assert_eq!(
        answer,
        [no_renegotiation],
        "the client's answer to a HelloRequest"
    );
    let d = Established::protect(&mut e.as_server, ContentType::ApplicationData, 101, b"pong");
    e.link.deliver(Direction::ToClient, d);
    assert_eq!(e.link.client_data, [b"pong".to_vec()]);
    e.link
        .client
        .write(e.link.now, SERVER, b"ping")
        .expect("client write");
    e.link.pump();
    assert_eq!(e.link.server_data, [b"ping".to_vec()]);
    assert!(
        e.link.client_errors.is_empty(),
        "{:?}",
        e.link.client_errors
    );
}

// ---------------------------------------------------------------------------------------------
// (f) The contents of renegotiation_info on an initial handshake.

/// A renegotiation_info whose renegotiated_connection holds 12 bytes, as a client's would on a
/// renegotiation (its last verify_data).
fn renegotiating_info() -> Vec<u8> {
    let mut data = vec![12];
    data.extend(1..=12u8);
    data
}

/// RFC 5746 3.4: on an initial handshake a client MUST abort with a fatal handshake_failure if
/// the ServerHello's renegotiation_info has a non-empty renegotiated_connection; 3.6: a server
/// MUST likewise if a ClientHello's has. 0.21.1 parsed the extension only when it was the one
/// byte of an empty field, dropped it as unsupported otherwise, and never looked at it.
#[test]
fn renegotiation_info_must_be_empty() {
    // In the first ClientHello, then in the second only.
    for which in [0u16, 1] {
        let provider = default_provider();
        let mut link = Link::new(
            client_config(provider.clone(), |b| b),
            server_config(provider, |b| b),
        );
        link.pump_with(|direction, d| {
            Some(match direction {
                Direction::ToServer => rewrite_hello(&d, CLIENT_HELLO, |hello, seq| {
                    if seq == which {
                        hello.set_extension(EXT_RENEGOTIATION_INFO, renegotiating_info());
                    }
                }),
                Direction::ToClient => d,
            })
        });
        let alerts = plaintext_alerts(&link.to_client);
        assert_eq!(
            alerts,
            [(FATAL, HANDSHAKE_FAILURE)],
            "ClientHello {which} with a renegotiated_connection: the server sent {:?}",
            handshake_types(&link.to_client)
        );
        assert!(!handshake_types(&link.to_client).contains(&SERVER_HELLO));
        assert_eq!(
            handshake_types(&link.to_client).contains(&HELLO_VERIFY_REQUEST),
            which == 1
        );
    }

    // In the ServerHello.
    let provider = default_provider();
    let mut link = Link::new(
        client_config(provider.clone(), |b| b),
        server_config(provider, |b| b),
    );
    link.pump_with(|direction, d| {
        Some(match direction {
            Direction::ToClient => rewrite_hello(&d, SERVER_HELLO, |hello, _| {
                assert_eq!(hello.extension(EXT_RENEGOTIATION_INFO), Some(&[0u8][..]));
                hello.set_extension(EXT_RENEGOTIATION_INFO, renegotiating_info());
            }),
            Direction::ToServer => d,
        })
    });
    let alerts = plaintext_alerts(&link.to_server);
    assert_eq!(
        alerts,
        [(FATAL, HANDSHAKE_FAILURE)],
        "a ServerHello with a renegotiated_connection: the client sent {:?}",
        handshake_types(&link.to_server)
    );
    assert!(!handshake_types(&link.to_server).contains(&CLIENT_KEY_EXCHANGE));
}

// ---------------------------------------------------------------------------------------------
// (g) Duplicate extensions.

/// Appends a second copy of extension `typ`.
fn duplicate(hello: &mut Hello, typ: u16) {
    let copy = hello.extension(typ).expect("the extension").to_vec();
    hello.extensions.push((typ, copy));
}

/// RFC 5246 7.4.1.4: "There MUST NOT be more than one extension of the same type." 0.21.1 kept
/// both copies, and the last one won (a second supported_groups replaced the first). A
/// ClientHello (either of the two) or a ServerHello with a repeated extension must be refused
/// with a fatal illegal_parameter.
#[test]
fn duplicate_extensions_are_refused() {
    for which in [0u16, 1] {
        let provider = default_provider();
        let mut link = Link::new(
            client_config(provider.clone(), |b| b),
            server_config(provider, |b| b),
        );
        link.pump_with(|direction, d| {
            Some(match direction {
                Direction::ToServer => rewrite_hello(&d, CLIENT_HELLO, |hello, seq| {
                    if seq == which {
                        duplicate(hello, EXT_SUPPORTED_GROUPS);
                    }
                }),
                Direction::ToClient => d,
            })
        });
        assert_eq!(
            plaintext_alerts(&link.to_client),
            [(FATAL, ILLEGAL_PARAMETER)],
            "ClientHello {which} with two supported_groups: the server sent {:?}",
            handshake_types(&link.to_client)
        );
        assert!(!handshake_types(&link.to_client).contains(&SERVER_HELLO));
    }

    let provider = default_provider();
    let mut link = Link::new(
        client_config(provider.clone(), |b| b),
        server_config(provider, |b| b),
    );
    link.pump_with(|direction, d| {
        Some(match direction {
            Direction::ToClient => rewrite_hello(&d, SERVER_HELLO, |hello, _| {
                duplicate(hello, EXT_EXTENDED_MASTER_SECRET);
            }),
            Direction::ToServer => d,
        })
    });
    assert_eq!(
        plaintext_alerts(&link.to_server),
        [(FATAL, ILLEGAL_PARAMETER)],
        "a ServerHello with two extended_master_secret: the client sent {:?}",
        handshake_types(&link.to_server)
    );
    assert!(!handshake_types(&link.to_server).contains(&CLIENT_KEY_EXCHANGE));
}

// ---------------------------------------------------------------------------------------------
// (h) Groups and signature algorithms.

/// The ServerKeyExchange's named curve and signature scheme, (curve, hash, signature).
fn server_key_exchange(datagrams: &[Vec<u8>]) -> Option<(u16, u8, u8)> {
    let ske = handshakes(datagrams)
        .into_iter()
        .find(|h| h.typ == SERVER_KEY_EXCHANGE)?;
    let b = &ske.fragment;
    let at = 4 + b[3] as usize;
    Some((u16::from_be_bytes([b[1], b[2]]), b[at], b[at + 1]))
}

fn restricted(groups: &[KeyExchangeAlgorithm]) -> Arc<dyn RTCCryptoProvider> {
    TestProvider::new(Some(groups.to_vec()))
}

/// The server chose its ECDHE group by walking the client's supported_groups in the client's
/// order and, when none of them was one of its own, went on with its own first choice, a group
/// the client never offered; it chose its ServerKeyExchange signature from its own list alone,
/// whatever the client's signature_algorithms said. It must pick from the intersection, in its
/// own order of preference, and refuse with a fatal handshake_failure when the intersection is
/// empty. The client checked the scheme the server chose against what it offered, but not the
/// group: it must refuse a group it did not offer (illegal_parameter).
#[test]
fn groups_and_signature_algorithms_are_honoured() {
    use KeyExchangeAlgorithm::{P256 as KX_P256, P384 as KX_P384, X25519 as KX_X25519};

    // A client offering only X25519, a server with the NIST curves only (our relays' policy).
    let mut link = Link::new(
        client_config(restricted(&[KX_X25519]), |b| b),
        server_config(restricted(&[KX_P256, KX_P384]), |b| b),
    );
    link.pump();
    assert_eq!(
        plaintext_alerts(&link.to_client),
        [(FATAL, HANDSHAKE_FAILURE)],
        "no group in common: the server sent {:?}, ServerKeyExchange {:?}",
        handshake_types(&link.to_client),
        server_key_exchange(&link.to_client)
    );
    assert!(!link.client_complete);

    // Groups in common, in the opposite order of preference (the first ClientHello, which picks
    // the group, rewritten to prefer P-384): the server's preference, P-256, wins.
    let provider = default_provider();
    let mut link = Link::new(
        client_config(provider.clone(), |b| b),
        server_config(provider, |b| b),
    );
    link.pump_with(|direction, d| {
        Some(match direction {
            Direction::ToServer => rewrite_hello(&d, CLIENT_HELLO, |hello, seq| {
                if seq == 0 {
                    hello.set_extension(EXT_SUPPORTED_GROUPS, groups(&[P384, P256]));
                }
            }),
            Direction::ToClient => d,
        })
    });
    assert!(link.established());
    assert_eq!(server_key_exchange(&link.to_client), Some((P256, 4, 3)));

    // No signature scheme in common: the client accepts only ECDSA P-384 with SHA-384, the
    // server's key and policy make only ECDSA P-256 with SHA-256.
    let provider = default_provider();
    let mut link = Link::new(
        client_config(provider.clone(), |b| {
            b.with_signature_schemes(vec![SignatureScheme::EcdsaWithP384AndSha384])
        }),
        server_config(provider, |b| b),
    );
    link.pump();
    assert_eq!(
        plaintext_alerts(&link.to_client),
        [(FATAL, HANDSHAKE_FAILURE)],
        "no signature scheme in common: the server sent {:?}, ServerKeyExchange {:?}",
        handshake_types(&link.to_client),
        server_key_exchange(&link.to_client)
    );

    // The client offers P-256 only; its first ClientHello, rewritten on the way, offers P-384
    // only, so the server (rightly, for what it was told) picks P-384 and signs it. The client
    // must refuse the group it never offered.
    let mut link = Link::new(
        client_config(restricted(&[KX_P256]), |b| b),
        server_config(default_provider(), |b| b),
    );
    link.pump_with(|direction, d| {
        Some(match direction {
            Direction::ToServer => rewrite_hello(&d, CLIENT_HELLO, |hello, seq| {
                if seq == 0 {
                    hello.set_extension(EXT_SUPPORTED_GROUPS, groups(&[P384]));
                }
            }),
            Direction::ToClient => d,
        })
    });
    assert_eq!(server_key_exchange(&link.to_client), Some((P384, 4, 3)));
    assert_eq!(
        plaintext_alerts(&link.to_server),
        [(FATAL, ILLEGAL_PARAMETER)],
        "a group the client did not offer: the client sent {:?}",
        handshake_types(&link.to_server)
    );
    assert!(!link.established());

    // Regression only (0.21.1 already did this): a ServerKeyExchange signature scheme the
    // client did not offer is refused (insufficient_security), before the signature is checked.
    let provider = default_provider();
    let mut link = Link::new(
        client_config(provider.clone(), |b| b),
        server_config(provider, |b| b),
    );
    link.pump_with(|direction, d| {
        Some(match direction {
            Direction::ToClient => rewrite(&d, SERVER_KEY_EXCHANGE, |ske| {
                let at = 4 + ske.fragment[3] as usize;
                ske.fragment[at] = 5; // SHA-384
            }),
            Direction::ToServer => d,
        })
    });
    assert_eq!(plaintext_alerts(&link.to_server), [(FATAL, 71)]);
    assert!(!link.established());
}

// ---------------------------------------------------------------------------------------------
// (i) The fragment buffer's message counter overflowed on a remote sender's say.

/// 65 536 empty HelloRequests with ascending message_seq from one address: each completes and
/// is taken from the fragment buffer, whose u16 message counter then overflowed (a panic in a
/// debug build, a silent wrap in a release one). Now the association refuses the message that
/// would overflow it, and the endpoint goes on serving.
#[test]
fn the_message_counter_never_overflows() {
    const HELLO_REQUEST: u8 = 0;
    let now = Instant::now();
    let config = server_config(default_provider(), |b| b);
    let mut server = server_endpoint(config);
    for seq in 0..=u16::MAX {
        let record = Handshake::whole(HELLO_REQUEST, seq, vec![]).record(u64::from(seq));
        let _ = server.read(now, CLIENT, None, BytesMut::from(&datagram(&[record])[..]));
        while server.poll_transmit().is_some() {}
    }
    let peer = SocketAddr::new(CLIENT.ip(), 5002);
    assert!(
        answers_client_hello(&mut server, now, peer),
        "the endpoint stopped serving"
    );
}

// ---------------------------------------------------------------------------------------------
// (p13) AES-GCM's explicit nonce was 8 random bytes per record: unique only by chance (a
// repeated nonce under one key gives GCM's authentication key away), and a random draw per
// record. It is now the record's epoch and sequence number, as RFC 9325 section 7.2.1 asks.

/// Every protected record either side sends, handshake Finished and application data, carries
/// its own epoch and sequence number as its explicit nonce; and the data still gets through.
#[test]
fn explicit_nonces_are_the_record_sequence() {
    let mut e = Established::new();
    for i in 0..5u8 {
        e.link
            .client
            .write(e.link.now, SERVER, &[i; 48])
            .expect("client write");
        e.link
            .server
            .write(e.link.now, CLIENT, &[i; 48])
            .expect("server write");
        e.link.pump();
    }
    assert_eq!(e.link.server_data.len(), 5);
    assert_eq!(e.link.client_data.len(), 5);
    let mut protected = 0;
    for datagram in e.link.to_server.iter().chain(&e.link.to_client) {
        for record in records(datagram).into_iter().filter(|r| r.epoch == 1) {
            let mut sequence = record.epoch.to_be_bytes().to_vec();
            sequence.extend_from_slice(&record.seq.to_be_bytes()[2..]);
            assert_eq!(
                record.body[..8],
                sequence[..],
                "explicit nonce of the epoch-1 record number {} (type {})",
                record.seq,
                record.content_type
            );
            protected += 1;
        }
    }
    // Both Finished messages and ten records of data.
    assert!(protected >= 12, "{protected} protected records seen");
}

// ---------------------------------------------------------------------------------------------
// (p14) Every application data record was decrypted into a new allocation. A caller that has
// a buffer it is done with (a datagram it sent) now hands it over, and the data is made in it.

#[test]
fn application_data_is_decrypted_into_a_spare_buffer() {
    let mut e = Established::new();
    let spare = BytesMut::with_capacity(512);
    let at = spare.as_ptr();
    let mut spares = vec![spare];
    let mut events = Vec::new();
    let d = Established::protect(&mut e.as_client, ContentType::ApplicationData, 300, b"ping");
    e.link
        .server
        .read_slice_reusing(e.link.now, CLIENT, None, &d, &mut events, &mut spares)
        .expect("read");
    let data: Vec<&BytesMut> = events
        .iter()
        .filter_map(|event| match event {
            EndpointEvent::ApplicationData(data) => Some(data),
            _ => None,
        })
        .collect();
    assert_eq!(data, [&BytesMut::from(&b"ping"[..])]);
    assert_eq!(data[0].as_ptr(), at, "the data is not in the spare buffer");
    assert!(spares.is_empty());
    // A datagram that decrypts nothing (a replay of the same record) leaves the spare alone.
    let spare = BytesMut::with_capacity(512);
    let mut spares = vec![spare];
    events.clear();
    let _ =
        e.link
            .server
            .read_slice_reusing(e.link.now, CLIENT, None, &d, &mut events, &mut spares);
    assert!(events.is_empty());
    assert_eq!(spares.len(), 1);
}
