//! udp_relay: a plain UDP relay for NTP, no DTLS, for benchmarks (`scripts/bench.sh`). Not part
//! of the product.
//!
//! Two of these in a row (client side, server side) are a plain blocking relay pair: the same
//! two extra hops each way as the ntp-dtls chain, with simple I/O (one blocking thread per
//! direction: a receive and a send per datagram, no event loop, no batching, the kernel's
//! default socket buffers) and no cryptography. It is a baseline, not a lower bound: a relay
//! that busy-polls, or batches, can do better (docs/BENCHMARKS.md). What ntp-dtls adds beyond
//! this pair is roughly the cost of DTLS and of its own logic; what this pair adds over direct
//! is roughly the cost of the hops with blocking I/O.
//!
//!   udp_relay 127.0.0.1:20123 127.0.0.1:11123     # listen, forward to (and back from) upstream
//!
//! Replies go back to whoever asked, matched by the reply's origin timestamp as ntp-dtls does.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

/// Outstanding requests remembered at most; beyond it the oldest are forgotten wholesale.
const CAPACITY: usize = 100_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream] = args.as_slice() else {
        eprintln!("usage: udp_relay LISTEN_ADDR UPSTREAM_ADDR");
        return ExitCode::FAILURE;
    };
    match run(listen, upstream) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp_relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(listen: &str, upstream: &str) -> std::io::Result<()> {
    let upstream: SocketAddr = upstream.parse().map_err(std::io::Error::other)?;
    let down = Arc::new(UdpSocket::bind(listen)?);
    let up = Arc::new(UdpSocket::bind(if upstream.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?);
    up.connect(upstream)?;
    let asked: Arc<Mutex<HashMap<u64, SocketAddr>>> = Arc::default();
    println!("listening on {}", down.local_addr()?);

    let replies = {
        let (down, up, asked) = (down.clone(), up.clone(), asked.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = [0u8; 2048];
            loop {
                let Ok(len) = up.recv(&mut buf) else { continue };
                let Some(origin) = timestamp(&buf[..len], 24) else {
                    continue;
                };
                let client = asked
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?
                    .remove(&origin);
                if let Some(client) = client {
                    let _ = down.send_to(&buf[..len], client);
                }
            }
        })
    };
    let mut buf = [0u8; 2048];
    loop {
        if replies.is_finished() {
            return Err(std::io::Error::other("reply thread ended"));
        }
        let Ok((len, client)) = down.recv_from(&mut buf) else {
            continue;
        };
        let Some(transmit) = timestamp(&buf[..len], 40) else {
            continue;
        };
        {
            let mut asked = asked
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            if asked.len() >= CAPACITY {
                asked.clear();
            }
            asked.insert(transmit, client);
        }
        let _ = up.send(&buf[..len]);
    }
}

/// The 64-bit NTP timestamp at `offset` of a packet of at least 48 bytes.
fn timestamp(packet: &[u8], offset: usize) -> Option<u64> {
    if packet.len() < 48 {
        return None;
    }
    let bytes: [u8; 8] = packet.get(offset..offset + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}
