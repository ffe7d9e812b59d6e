//! A multi-homed server relay: bound to the wildcard address on a host with two addresses on
//! one interface, it must answer each client from the address that client sent to (as chronyd
//! does). A client relay's socket is connected to the address it chose, so the kernel drops a
//! reply from any other source: the handshake never completes and no NTP reply arrives.
//!
//! Everything runs in two network namespaces made here (removed on drop): the server's, with
//! chronyd -x and the server relay, two addresses on one end of a veth pair; and the client's,
//! on the other end, with one client relay per server address and ntpdate. Needs root (CI runs
//! as root); skipped with a message otherwise.

mod common;

use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::relays::Pki;
use common::{
    CLIENT_TIMEOUT, Daemon, READY_TIMEOUT, TempDir, chronyd_server_conf, find_tool, is_root,
    ntp_dtls_bin, parse_ntpdig_output, run_command, tool,
};

/// A network namespace of our own, deleted on drop (after the daemons in it: declare it first).
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ntpdtls-mh-{role}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// `ip -n NAME args`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `program args` inside the namespace (`ip netns exec` execs it: the pid is the program's).
    fn command(&self, program: impl AsRef<OsStr>, args: &[impl AsRef<OsStr>]) -> Command {
        let mut cmd = Command::new(tool("ip"));
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        cmd
    }

    /// `ntpdate -q server` from inside the namespace: the offset, or why not.
    fn ntpdate(&self, server: IpAddr) -> Result<f64, String> {
        let cmd = self.command(tool("ntpdate"), &["-q".to_string(), server.to_string()]);
        run_command(cmd, CLIENT_TIMEOUT)
            .and_then(|out| parse_ntpdig_output(&out))
            .map(|r| r.offset_s)
    }

    /// Polls ntpdate until an answer or `timeout`: the condition waited for, with the last
    /// failure when there is none.
    fn wait_answered(&self, server: IpAddr, timeout: Duration) -> Result<f64, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.ntpdate(server) {
                Ok(offset) => return Ok(offset),
                Err(e) if Instant::now() >= deadline => return Err(e),
                // A poll interval, not a synchronisation: ntpdate itself waits for its reply.
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = run_command(
        {
            let mut cmd = Command::new(tool("ip"));
            cmd.args(args);
            cmd
        },
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(out.status.success(), "ip {args:?}: {}", out.combined());
}

/// Why this test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root for network namespaces (CI runs as root)".into());
    }
    for program in ["ip", "chronyd", "ntpdate"] {
        if find_tool(program).is_none() {
            return Some(format!("{program} not found (scripts/install-deps.sh)"));
        }
    }
    None
}

/// The two namespaces: the server's with `server_addrs` on one end of a veth pair, the
/// client's with `client_addr` on the other. `prefix` is the subnet's length.
fn topology(server_addrs: [IpAddr; 2], client_addr: IpAddr, prefix: u8) -> (Netns, Netns) {
    let (server, client) = (Netns::new("srv"), Netns::new("cli"));
    server.ip(&[
        "link",
        "add",
        "srv0",
        "type",
        "veth",
        "peer",
        "name",
        "cli0",
        "netns",
        &client.name,
    ]);
    // nodad: an IPv6 address is usable at once, not after duplicate address detection.
    let family_flags: &[&str] = if client_addr.is_ipv6() {
        &["nodad"]
    } else {
        &[]
    };
    for addr in server_addrs {
        let cidr = format!("{addr}/{prefix}");
        let mut args = vec!["addr", "add", &cidr, "dev", "srv0"];
        args.extend_from_slice(family_flags);
        server.ip(&args);
    }
    let cidr = format!("{client_addr}/{prefix}");
    let mut args = vec!["addr", "add", &cidr, "dev", "cli0"];
    args.extend_from_slice(family_flags);
    client.ip(&args);
    server.ip(&["link", "set", "srv0", "up"]);
    client.ip(&["link", "set", "cli0", "up"]);
    (server, client)
}

/// chronyd -x on 127.0.0.1:123 inside `netns`, waited for until ntpdate there gets an answer.
fn start_chronyd(netns: &Netns, dir: &TempDir) -> Daemon {
    let addr: SocketAddr = "127.0.0.1:123".parse().expect("addr");
    let conf = dir.join("chrony.conf");
    std::fs::write(&conf, chronyd_server_conf(addr, dir.path(), &[])).expect("chrony.conf");
    let args: Vec<&OsStr> = vec![
        "-x".as_ref(),
        "-d".as_ref(),
        "-4".as_ref(),
        "-f".as_ref(),
        conf.as_os_str(),
    ];
    let chronyd = Daemon::spawn_command("chronyd", netns.command(tool("chronyd"), &args));
    if let Err(e) = netns.wait_answered(addr.ip(), Duration::from_secs(15)) {
        panic!(
            "chronyd in {} never answered: {e}\n{}",
            netns.name,
            chronyd.tail(20)
        );
    }
    chronyd
}

/// The whole check for one address family: a server relay on the wildcard address with two
/// addresses, a client relay to each, and each answered.
fn each_address_is_answered_from_itself(server_addrs: [IpAddr; 2], client: IpAddr, prefix: u8) {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED multihomed: {reason}");
        return;
    }
    let (server_ns, client_ns) = topology(server_addrs, client, prefix);
    let chrony_dir = TempDir::new();
    let _chronyd = start_chronyd(&server_ns, &chrony_dir);
    let names: Vec<String> = server_addrs.iter().map(|a| a.to_string()).collect();
    let pki = Pki::generate(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let wildcard = if client.is_ipv6() {
        "[::]:1123"
    } else {
        "0.0.0.0:1123"
    };
    let mut args: Vec<String> = [
        "server",
        "--listen",
        wildcard,
        "--upstream",
        "127.0.0.1:123",
        "--workers",
        "1",
    ]
    .map(String::from)
    .to_vec();
    args.extend(pki.server_identity());
    let server = Daemon::spawn_command("server-relay", server_ns.command(ntp_dtls_bin(), &args));
    server.wait_ready(READY_TIMEOUT);

    // One client relay per server address, each on its own loopback address in its namespace.
    let mut clients = Vec::new();
    for (index, addr) in server_addrs.iter().enumerate() {
        let listen = format!("127.0.0.{}:123", index + 2);
        let args: Vec<String> = vec![
            "client".into(),
            "--listen".into(),
            listen,
            "--server".into(),
            SocketAddr::new(*addr, 1123).to_string(),
            "--ca".into(),
            pki.ca().display().to_string(),
        ];
        let name = format!("client-relay-{addr}");
        let relay = Daemon::spawn_command(&name, client_ns.command(ntp_dtls_bin(), &args));
        relay.wait_ready(READY_TIMEOUT);
        clients.push(relay);
    }
    let mut failures = Vec::new();
    for (index, addr) in server_addrs.iter().enumerate() {
        let listen: IpAddr = format!("127.0.0.{}", index + 2).parse().expect("addr");
        match client_ns.wait_answered(listen, Duration::from_secs(20)) {
            Ok(offset) => eprintln!("through {addr}: offset {offset:+.6} s"),
            Err(e) => failures.push(format!(
                "no NTP reply through the server relay's address {addr}: {e}\n\
                 client relay:\n{}",
                clients[index].tail(15)
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nserver relay:\n{}",
        failures.join("\n"),
        server.tail(30)
    );
}

#[test]
fn an_ipv4_wildcard_server_relay_answers_from_each_address() {
    each_address_is_answered_from_itself(
        [
            "10.200.0.1".parse().expect("addr"),
            "10.200.0.2".parse().expect("addr"),
        ],
        "10.200.0.3".parse().expect("addr"),
        24,
    );
}

#[test]
fn an_ipv6_wildcard_server_relay_answers_from_each_address() {
    each_address_is_answered_from_itself(
        [
            "fd00:200::1".parse().expect("addr"),
            "fd00:200::2".parse().expect("addr"),
        ],
        "fd00:200::3".parse().expect("addr"),
        64,
    );
}
