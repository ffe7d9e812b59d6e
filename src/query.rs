//! `ntp-dtls query`: a one-shot NTP client, over plain UDP or straight to a server relay over
//! DTLS ("ntpdate with TLS built in"). Prints offset, delay and stratum; never sets the clock.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tokio::net::UdpSocket;

use crate::cli::{QueryArgs, QueryFormat};
use crate::config;
use ntp_dtls_proto::engine::{DtlsEngine, Engine, Event};
use ntp_dtls_proto::forward::Forward;
use ntp_dtls_proto::ntp::{self, NtpTimestamp};
use ntp_dtls_proto::stats::{RttGauge, Stats};

/// One answered query.
#[derive(Debug, Clone, Copy)]
pub struct Measurement {
    pub offset: f64,
    pub delay: f64,
    pub stratum: u8,
}

enum Transport {
    Plain(UdpSocket),
    Dtls {
        socket: UdpSocket,
        engine: Box<Engine>,
        peer: SocketAddr,
    },
}

/// Runs the queries; Ok(false) when no valid reply came.
pub async fn run(args: &QueryArgs) -> anyhow::Result<bool> {
    let server = config::resolve(&args.server, "server")?;
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let bind: IpAddr = if server.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((bind, 0))
        .await
        .context("cannot open a UDP socket")?;
    socket
        .connect(server)
        .await
        .with_context(|| format!("cannot reach {server}"))?;

    let mut transport = if args.dtls {
        let ca = args.ca.as_deref().context("--dtls needs --ca FILE")?;
        let settings = config::client_settings(
            &args.server,
            args.server_name.as_deref(),
            ca,
            args.cert.as_deref(),
            args.key.as_deref(),
        )?;
        let engine = Engine::client(&settings).context("DTLS client configuration")?;
        handshake(socket, Box::new(engine), server, timeout).await?
    } else {
        Transport::Plain(socket)
    };

    let mut answered = 0;
    for index in 0..args.count {
        if index > 0 && args.interval > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(args.interval)).await;
        }
        match exchange(&mut transport, timeout).await? {
            Some(m) => {
                answered += 1;
                match args.format {
                    QueryFormat::Text => println!(
                        "{server} stratum {} offset {:+.6} delay {:.6}",
                        m.stratum, m.offset, m.delay
                    ),
                    QueryFormat::Raw => println!("{:.9} {:.9} {}", m.offset, m.delay, m.stratum),
                }
            }
            None => eprintln!("{server}: no reply within {:.1} s", timeout.as_secs_f64()),
        }
    }
    if let Transport::Dtls {
        socket,
        engine,
        peer,
    } = &mut transport
    {
        engine.close(Instant::now(), *peer);
        flush(socket, engine).await;
    }
    Ok(answered > 0)
}

async fn flush(socket: &UdpSocket, engine: &mut Engine) {
    while let Some(transmit) = engine.poll_transmit() {
        // A lost datagram is retransmitted by the handshake or shows up as a missing reply.
        let _ = socket.send(&transmit.datagram).await;
    }
}

async fn handshake(
    socket: UdpSocket,
    mut engine: Box<Engine>,
    peer: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Transport> {
    let start = Instant::now();
    // rtc-dtls gives up after its retransmissions; give the handshake at least that long.
    let deadline = start + timeout.max(Duration::from_secs(10));
    engine
        .connect(start, peer)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut buf = [0u8; 2048];
    let mut events = Vec::new();
    loop {
        flush(&socket, &mut engine).await;
        let wake = engine
            .poll_timeout(peer)
            .map_or(deadline, |t| t.min(deadline));
        let received = tokio::time::timeout_at(wake.into(), socket.recv(&mut buf)).await;
        let now = Instant::now();
        match received {
            Ok(Ok(len)) => {
                engine.receive(now, peer, &buf[..len], &mut events);
            }
            Ok(Err(e)) => bail!("DTLS handshake with {peer} failed: {e}"),
            Err(_) if now >= deadline => bail!("DTLS handshake with {peer} timed out"),
            Err(_) => engine.handle_timeout(now, peer, &mut events),
        }
        for event in events.drain(..) {
            match event {
                Event::Established { identity, .. } => {
                    eprintln!("DTLS association with {peer} established, server {identity}");
                    flush(&socket, &mut engine).await;
                    return Ok(Transport::Dtls {
                        socket,
                        engine,
                        peer,
                    });
                }
                Event::Failed { failure, .. } => {
                    bail!("DTLS handshake with {peer} refused: {failure}")
                }
                Event::Closed { reason, .. } => {
                    bail!("DTLS association with {peer} closed: {reason}")
                }
                Event::Data { .. } => {}
            }
        }
    }
}

/// One request, one reply: Ok(None) when no valid reply came in time. The reply is matched
/// to the request by the same forward path the relays use (checks, then the pending table).
async fn exchange(
    transport: &mut Transport,
    timeout: Duration,
) -> anyhow::Result<Option<Measurement>> {
    let mut forward: Forward<()> = Forward::new(
        1,
        timeout,
        Arc::new(Stats::default()),
        Arc::new(RttGauge::default()),
    );
    let t1 = NtpTimestamp::from_system_time(SystemTime::now());
    let mut request = ntp::build_request(t1);
    let start = Instant::now();
    forward
        .request(start, SystemTime::now(), (), &mut request)
        .context("the request failed its own checks")?;
    let deadline = start + timeout;
    let mut buf = [0u8; 2048];
    match transport {
        Transport::Plain(socket) => {
            forward.request_sent(Instant::now(), SystemTime::now(), t1.0);
            socket.send(&request).await.context("send failed")?;
            loop {
                let Ok(received) =
                    tokio::time::timeout_at(deadline.into(), socket.recv(&mut buf)).await
                else {
                    return Ok(None);
                };
                let t4 = SystemTime::now();
                let len = match received {
                    Ok(len) => len,
                    // ICMP port unreachable: nothing listened there when the request arrived
                    // (a client relay still starting). This request is lost; the timeout says
                    // so and the next query tries again.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e).context("receive failed"),
                };
                if let Some(m) = measure(&mut forward, &mut buf[..len], t1, t4) {
                    return Ok(Some(m));
                }
            }
        }
        Transport::Dtls {
            socket,
            engine,
            peer,
        } => {
            forward.request_sent(Instant::now(), SystemTime::now(), t1.0);
            engine
                .send(Instant::now(), *peer, &request)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            flush(socket, engine).await;
            let mut events = Vec::new();
            loop {
                let Ok(received) =
                    tokio::time::timeout_at(deadline.into(), socket.recv(&mut buf)).await
                else {
                    return Ok(None);
                };
                let len = received.context("receive failed")?;
                engine.receive(Instant::now(), *peer, &buf[..len], &mut events);
                let t4 = SystemTime::now();
                flush(socket, engine).await;
                for event in events.drain(..) {
                    match event {
                        Event::Data { mut payload, .. } => {
                            if let Some(m) = measure(&mut forward, &mut payload, t1, t4) {
                                return Ok(Some(m));
                            }
                        }
                        Event::Closed { reason, .. } => bail!("association closed: {reason}"),
                        Event::Failed { failure, .. } => bail!("association failed: {failure}"),
                        Event::Established { .. } => {}
                    }
                }
            }
        }
    }
}

/// A reply to our request (the forward path matched its origin) with a usable clock.
fn measure(
    forward: &mut Forward<()>,
    datagram: &mut [u8],
    t1: NtpTimestamp,
    t4: SystemTime,
) -> Option<Measurement> {
    forward.reply(Instant::now(), t4, datagram)?;
    let reply = ntp::check_reply(datagram).ok()?;
    if reply.stratum == 0 || reply.stratum > 15 {
        return None;
    }
    let sample = ntp::sample(
        t1,
        reply.receive,
        reply.transmit,
        NtpTimestamp::from_system_time(t4),
    );
    Some(Measurement {
        offset: sample.offset,
        delay: sample.delay,
        stratum: reply.stratum,
    })
}
