//! Fixtures for the relay pair: a lab PKI made by `ntp-dtls certs`, both relays as real
//! processes on loopback, and a blocking DTLS client built on the crate's own engine, for
//! putting arbitrary datagrams into an association.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ntp_dtls::proto::engine::{ClientSettings, DtlsEngine, Engine, Event};

use super::{Daemon, READY_TIMEOUT, TempDir, ntp_dtls_bin, run_command, spawn_ntp_dtls};

/// A lab PKI in a temporary directory.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// `ntp-dtls certs` with these server names (and the default client name).
    pub fn generate(server_names: &[&str]) -> Pki {
        Pki::generate_with(server_names, &[])
    }

    /// `ntp-dtls certs` with these server names and `extra` arguments (`--key-type rsa-3072`).
    pub fn generate_with(server_names: &[&str], extra: &[&str]) -> Pki {
        let dir = TempDir::new();
        let mut cmd = Command::new(ntp_dtls_bin());
        cmd.args(["certs", "--out"]).arg(dir.path()).args(extra);
        for name in server_names {
            cmd.args(["--server-name", name]);
        }
        // RSA-3072 keys take a few seconds each to generate on a loaded machine.
        let out = run_command(cmd, Duration::from_secs(120)).expect("ntp-dtls certs ran");
        assert!(
            out.status.success(),
            "ntp-dtls certs failed: {}",
            out.combined()
        );
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// `--cert FILE --key FILE` for the server's identity.
    pub fn server_identity(&self) -> Vec<String> {
        identity_args(&self.path("server.pem"), &self.path("server.key.pem"))
    }
    /// `--cert FILE --key FILE` for the client's identity.
    pub fn client_identity(&self) -> Vec<String> {
        identity_args(&self.path("client.pem"), &self.path("client.key.pem"))
    }
}

fn identity_args(cert: &Path, key: &Path) -> Vec<String> {
    vec![
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ]
}

/// A relay daemon and the address it reported in its `ready` line.
pub struct Relay {
    pub daemon: Daemon,
    pub addr: SocketAddr,
}

/// `ntp-dtls server` on `listen` (port 0 for any) towards `upstream`, waited for until ready.
pub fn start_server_on(pki: &Pki, listen: SocketAddr, upstream: &str, extra: &[&str]) -> Relay {
    let mut args: Vec<String> = vec![
        "server".into(),
        "--listen".into(),
        listen.to_string(),
        "--upstream".into(),
        upstream.into(),
    ];
    args.extend(pki.server_identity());
    args.extend(extra.iter().map(|s| s.to_string()));
    let daemon = spawn_ntp_dtls("server-relay", &args);
    let addr = daemon.wait_ready(READY_TIMEOUT)[0];
    Relay { daemon, addr }
}

/// `ntp-dtls server` on 127.0.0.1 with a kernel-chosen port.
pub fn start_server(pki: &Pki, upstream: &str, extra: &[&str]) -> Relay {
    start_server_on(pki, "127.0.0.1:0".parse().expect("addr"), upstream, extra)
}

/// `ntp-dtls client` listening on `listen`, trusting `ca`, towards `server`; waited for until
/// ready (its first association is up or has failed once).
pub fn start_client(ca: &Path, listen: SocketAddr, server: SocketAddr, extra: &[&str]) -> Relay {
    let mut args: Vec<String> = vec![
        "client".into(),
        "--listen".into(),
        listen.to_string(),
        "--server".into(),
        server.to_string(),
        "--ca".into(),
        ca.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let daemon = spawn_ntp_dtls("client-relay", &args);
    let addr = daemon.wait_ready(READY_TIMEOUT)[0];
    Relay { daemon, addr }
}

/// A blocking DTLS client on the crate's engine: the test's own hand inside an association.
pub struct DtlsTestClient {
    socket: UdpSocket,
    engine: Engine,
    server: SocketAddr,
}

impl DtlsTestClient {
    /// Handshakes with `server`, trusting `ca`, expecting `server_name`.
    pub fn connect(
        server: SocketAddr,
        ca: &Path,
        server_name: &str,
        identity: Option<(&Path, &Path)>,
    ) -> Result<DtlsTestClient, String> {
        let local: SocketAddr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
        DtlsTestClient::connect_from(local, server, ca, server_name, identity)
    }

    /// Like connect, from a chosen local address (to come back on the same port).
    pub fn connect_from(
        local: SocketAddr,
        server: SocketAddr,
        ca: &Path,
        server_name: &str,
        identity: Option<(&Path, &Path)>,
    ) -> Result<DtlsTestClient, String> {
        let settings: ClientSettings = ntp_dtls::config::client_settings(
            &server.to_string(),
            Some(server_name),
            ca,
            identity.map(|(c, _)| c),
            identity.map(|(_, k)| k),
        )
        .map_err(|e| e.to_string())?;
        let engine = Engine::client(&settings).map_err(|e| e.to_string())?;
        let socket = UdpSocket::bind(local).map_err(|e| e.to_string())?;
        socket.connect(server).map_err(|e| e.to_string())?;
        let mut client = DtlsTestClient {
            socket,
            engine,
            server,
        };
        client
            .engine
            .connect(Instant::now(), server)
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            client.flush();
            match client.next_events(deadline)? {
                None => return Err("handshake timed out".into()),
                Some(events) => {
                    for event in events {
                        match event {
                            Event::Established { .. } => {
                                client.flush();
                                return Ok(client);
                            }
                            Event::Failed { failure, .. } => return Err(failure.to_string()),
                            Event::Closed { reason, .. } => return Err(reason),
                            Event::Data { .. } => {}
                        }
                    }
                }
            }
        }
    }

    fn flush(&mut self) {
        while let Some(t) = self.engine.poll_transmit() {
            let _ = self.socket.send(&t.datagram);
        }
    }

    /// Events from the next datagram or timer, or None at the deadline.
    fn next_events(&mut self, deadline: Instant) -> Result<Option<Vec<Event>>, String> {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let wake = self
            .engine
            .poll_timeout(self.server)
            .map_or(deadline, |t| t.min(deadline));
        let wait = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        self.socket
            .set_read_timeout(Some(wait))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2048];
        let mut events = Vec::new();
        match self.socket.recv(&mut buf) {
            Ok(len) => {
                self.engine
                    .receive(Instant::now(), self.server, &buf[..len], &mut events);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.engine
                    .handle_timeout(Instant::now(), self.server, &mut events);
            }
            Err(e) => return Err(e.to_string()),
        }
        self.flush();
        Ok(Some(events))
    }

    /// The local address the association runs from.
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("bound socket")
    }

    /// Ends the association with a close_notify, as the client relay does after a rekey.
    pub fn close(&mut self) {
        self.engine.close(Instant::now(), self.server);
        self.flush();
    }

    /// Sends one datagram as one DTLS record.
    pub fn send(&mut self, payload: &[u8]) {
        self.engine
            .send(Instant::now(), self.server, payload)
            .expect("association is up");
        self.flush();
    }

    /// The next application datagram, or None within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.next_events(deadline).ok()??;
            for event in events {
                if let Event::Data { payload, .. } = event {
                    return Some(payload.to_vec());
                }
            }
        }
    }
}

/// `ntp-dtls client --config` with this TOML, waited for until ready.
pub fn start_client_config(dir: &TempDir, toml: &str) -> (Daemon, Vec<SocketAddr>) {
    let config = dir.write("client.toml", toml);
    let daemon = spawn_ntp_dtls(
        "client-relay",
        &["client", "--config", &config.display().to_string()],
    );
    let listening = daemon.wait_ready(READY_TIMEOUT);
    (daemon, listening)
}

/// `ntp-dtls server --config` with this TOML (plus identity and listen flags), until ready.
pub fn start_server_config(pki: &Pki, dir: &TempDir, upstream: &str, toml: &str) -> Relay {
    let config = dir.write("server.toml", toml);
    let mut args: Vec<String> = vec![
        "server".into(),
        "--config".into(),
        config.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--upstream".into(),
        upstream.into(),
    ];
    args.extend(pki.server_identity());
    let daemon = spawn_ntp_dtls("server-relay", &args);
    let addr = daemon.wait_ready(READY_TIMEOUT)[0];
    Relay { daemon, addr }
}

/// A UDP proxy that drops a share of datagrams both ways, deterministically (fixed seed).
/// Each client address gets its own upstream socket, so replies find their way back.
pub struct LossyProxy {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl LossyProxy {
    pub fn start(target: SocketAddr, loss: f64, seed: u64) -> LossyProxy {
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicBool, Ordering};
        let front = UdpSocket::bind("127.0.0.1:0").expect("proxy bind");
        front.set_nonblocking(true).expect("nonblocking");
        let addr = front.local_addr().expect("addr");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut state = seed | 1;
            let mut keep = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 10_000) as f64 / 10_000.0 >= loss
            };
            let mut backs: HashMap<SocketAddr, UdpSocket> = HashMap::new();
            let mut buf = [0u8; 4096];
            while !stop2.load(Ordering::Relaxed) {
                let mut idle = true;
                while let Ok((len, from)) = front.recv_from(&mut buf) {
                    idle = false;
                    let back = backs.entry(from).or_insert_with(|| {
                        let s = UdpSocket::bind("127.0.0.1:0").expect("proxy back bind");
                        s.connect(target).expect("proxy connect");
                        s.set_nonblocking(true).expect("nonblocking");
                        s
                    });
                    if keep() {
                        let _ = back.send(&buf[..len]);
                    }
                }
                for (client, back) in &backs {
                    while let Ok(len) = back.recv(&mut buf) {
                        idle = false;
                        if keep() {
                            let _ = front.send_to(&buf[..len], client);
                        }
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        LossyProxy {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// utime + stime of a process, in seconds (/proc/PID/stat, USER_HZ = 100).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // state is field 3 of stat, i.e. index 0 here; utime is 14 (index 11), stime 15 (12).
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Resident set size of a process, in KiB (VmRSS in /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
