//! The man pages of ntp-dtls: `ntp-dtls(1)` and one `ntp-dtls-COMMAND(1)` per subcommand,
//! generated from the clap definitions (what `--help` says) with the sections `--help` has no
//! room for (FILES, CONFIGURATION, SIGNALS, EXIT STATUS, EXAMPLES, SEE ALSO), and
//! `ntp-dtls.toml(5)`, the reference of both configuration files.
//!
//! Used by examples/gen_man.rs (`make man`, `make deb`, `make install`) and by
//! tests/systemd_units.rs, which checks the sections are there and that the toml(5) page
//! describes exactly the keys the parser knows.
#![allow(dead_code)] // the test uses what gen_man does not, and the other way round

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

/// Writes every page into `out` (created if missing); returns the paths written.
pub fn write_all(out: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let mut written = Vec::new();
    for (name, text) in pages()? {
        let path = out.join(&name);
        std::fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// (file name, roff text) of every page.
pub fn pages() -> io::Result<Vec<(String, String)>> {
    let mut cli = ntp_dtls::cli::Cli::command().disable_help_subcommand(true);
    cli.build();
    let mut pages = Vec::new();
    let subcommands: Vec<clap::Command> = cli.get_subcommands().cloned().collect();
    for sub in subcommands {
        let name = sub.get_name().to_string();
        let man = clap_mangen::Man::new(sub);
        let file = man.get_filename();
        let mut text = Vec::new();
        man.render(&mut text)?;
        let text = String::from_utf8_lossy(&text).into_owned();
        pages.push((file, with_sections(text, &extra_sections(&name))));
    }
    let man = clap_mangen::Man::new(cli);
    let file = man.get_filename();
    let mut text = Vec::new();
    man.render(&mut text)?;
    let text = String::from_utf8_lossy(&text).into_owned();
    pages.push((file, with_sections(text, &extra_sections(""))));
    pages.push(("ntp-dtls.toml.5".to_string(), toml_page()));
    Ok(pages)
}

/// Inserts `sections` before VERSION (or at the end): the usual order of a man page.
fn with_sections(page: String, sections: &str) -> String {
    match page.find("\n.SH VERSION") {
        Some(at) => format!("{}\n{}{}", &page[..at], sections.trim_end(), &page[at..]),
        None => format!("{page}{sections}"),
    }
}

/// Text as roff: backslashes and hyphens escaped, a leading dot or quote neutralised.
fn esc(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}

struct Roff(String);

impl Roff {
    fn new() -> Roff {
        Roff(String::new())
    }
    fn section(&mut self, title: &str) -> &mut Self {
        self.0.push_str(&format!(".SH \"{title}\"\n"));
        self
    }
    fn subsection(&mut self, title: &str) -> &mut Self {
        self.0.push_str(&format!(".SS \"{title}\"\n"));
        self
    }
    fn para(&mut self, text: &str) -> &mut Self {
        self.0.push_str(&format!(".PP\n{}\n", esc(text)));
        self
    }
    /// A tagged paragraph: `term` in bold, then its description.
    fn item(&mut self, term: &str, text: &str) -> &mut Self {
        self.0
            .push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", esc(term), esc(text)));
        self
    }
    /// Lines shown as they are (a command, a file).
    fn example(&mut self, lines: &[&str]) -> &mut Self {
        self.0.push_str(".PP\n.nf\n.RS 4\n");
        for line in lines {
            self.0.push_str(&esc(line));
            self.0.push('\n');
        }
        self.0.push_str(".RE\n.fi\n");
        self
    }
}

const EXIT_DAEMON: &str = "0 after a clean shutdown (SIGTERM, SIGINT), and with --check when \
    the daemon would start cleanly. 1 when it cannot start (the one line on stderr says why: \
    the file, the field, the fix), and with --check when it found a problem. 2 for a command \
    line clap rejects.";

fn extra_sections(command: &str) -> String {
    let mut r = Roff::new();
    match command {
        "client" => {
            r.section("CONFIGURATION").para(
                "Either --config FILE, with one [[tunnel]] table per server relay, or the \
                       flags --listen, --server, --server-name, --ca, --cert and --key for a \
                       single tunnel. The file's keys are described in ntp-dtls.toml(5); \
                       --metrics and --user override its metrics and user keys. --check reads \
                       the configuration as the daemon would, resolves every server name, \
                       probes the listen addresses and checks that --user can read every file a \
                       reload reads, prints one line per tunnel and exits.",
            );
            r.section("FILES")
                .item("/etc/ntp-dtls/client.toml", "The configuration ntp-dtls-client.service starts with.")
                .item("/etc/ntp-dtls/ca.pem", "The CA certificate(s) the server relays' chains must lead to.")
                .item("/etc/ntp-dtls/client.pem, /etc/ntp-dtls/client.key.pem", "The client certificate and key, for server relays that require mutual authentication. Mode 0640, group ntp-dtls.")
                .item("/lib/systemd/system/ntp-dtls-client.service", "The systemd unit (Type=notify, User=ntp-dtls, CAP_NET_BIND_SERVICE only).")
                .item("/usr/share/doc/ntp-dtls/examples/client.toml", "An example showing every key.");
            signals(
                &mut r,
                "the configuration file is read again, and every tunnel's CA, certificate and \
                 key files (and its server_name)",
            );
            r.section("EXIT STATUS").para(EXIT_DAEMON);
            r.section("EXAMPLES")
                .para("One tunnel by flags (the server relay's port defaults to 1123):")
                .example(&["ntp-dtls client --server time.example.net --ca /etc/ntp-dtls/ca.pem"])
                .para("Check a configuration file as the service user would run it:")
                .example(&[
                    "ntp-dtls client --check --config /etc/ntp-dtls/client.toml --user ntp-dtls",
                ])
                .para("Then point the NTP client at the tunnels, e.g. in chrony.conf:")
                .example(&[
                    "server 127.0.0.1 iburst",
                    "server 127.0.0.2 iburst",
                    "server 127.0.0.3 iburst",
                ]);
            see_also(&mut r);
        }
        "server" => {
            r.section("CONFIGURATION").para(
                "Flags, or --config FILE, or both: a flag given overrides the file's key. \
                       The file's keys, [limits] among them, are described in ntp-dtls.toml(5). \
                       --check loads the certificate, key and client CA, probes the listen and \
                       metrics addresses, checks that --user can read every file a reload reads, \
                       prints the listen address, upstream, workers, mutual authentication and \
                       limits, and exits.",
            );
            r.section("FILES")
                .item("/etc/ntp-dtls/server.toml", "The configuration ntp-dtls-server.service starts with.")
                .item("/etc/ntp-dtls/server.pem, /etc/ntp-dtls/server.key.pem", "The server certificate chain and its key. Mode 0640, group ntp-dtls. The CA's key (ca.key.pem) never belongs on a relay host.")
                .item("/etc/ntp-dtls/client-ca.pem", "With client_ca: the CA client relays' certificates must chain to.")
                .item("/lib/systemd/system/ntp-dtls-server.service", "The systemd unit (Type=notify, User=ntp-dtls, CAP_NET_BIND_SERVICE only).")
                .item("/usr/share/doc/ntp-dtls/examples/server.toml", "An example showing every key.");
            signals(&mut r, "the certificate, key and client CA files");
            r.section("EXIT STATUS").para(EXIT_DAEMON);
            r.section("EXAMPLES")
                .para("In front of chronyd on this host:")
                .example(&["ntp-dtls server --cert /etc/ntp-dtls/server.pem --key /etc/ntp-dtls/server.key.pem"])
                .para("A lab server answering from its own clock, with metrics:")
                .example(&["ntp-dtls server --listen 127.0.0.1:1123 --upstream builtin \\", "    --cert certs/server.pem --key certs/server.key.pem --metrics 127.0.0.1:9123"])
                .para("Check the packaged configuration:")
                .example(&["ntp-dtls server --check --config /etc/ntp-dtls/server.toml --user ntp-dtls"]);
            see_also(&mut r);
        }
        "certs" => {
            r.section("FILES").para("Writes ca.pem, ca.key.pem, server.pem, server.key.pem, client.pem and client.key.pem into --out (keys mode 0600). Copy ca.pem to the devices and server.pem with server.key.pem to the server host; keep ca.key.pem off both. With --request server, writes server.key.pem (0600) and server.csr.pem; with --request client, client.key.pem and client.csr.pem: a PKCS#10 request with the names as SANs, keyUsage digitalSignature and extendedKeyUsage serverAuth or clientAuth, for your own CA to sign.");
            r.section("EXIT STATUS").para("0 when every file was written; 1 otherwise (an existing file without --force, a bad name).");
            r.section("EXAMPLES").example(&[
                "ntp-dtls certs --out certs --server-name time.example.net --server-name 192.0.2.10",
                "ntp-dtls certs --out certs --server-name time.example.net --key-type rsa-3072",
                "ntp-dtls certs --out req --request server --server-name time.example.net",
                "openssl x509 -req -in req/server.csr.pem -CA ca.pem -CAkey ca.key \\",
                "    -copy_extensions copy -days 365 -out req/server.pem",
            ]);
            see_also(&mut r);
        }
        "query" => {
            r.section("EXIT STATUS").para("0 when at least one valid reply came; 1 when none did, or the handshake (with --dtls) was refused.");
            r.section("EXAMPLES")
                .example(&["ntp-dtls query 127.0.0.1:123 --count 4"])
                .para("Straight to a server relay, with the client relay's checks:")
                .example(&["ntp-dtls query --dtls --ca ca.pem --server-name time.example.net time.example.net:1123"]);
            see_also(&mut r);
        }
        "status" => {
            r.section("NOTES").para("Reads /status.json from the address a relay serves metrics on (--metrics, or metrics in its file): associations, each tunnel's state, traffic, drops by reason, refusals by reason, each upstream's state and round trip, certificate expiry (with a warning under 30 days) and the process's memory, CPU and files. Prometheus scrapes /metrics at the same address.");
            r.section("EXIT STATUS").para("0 when the relay answered; 1 when it did not (the message says what to check, e.g. that the relay runs with --metrics).");
            r.section("EXAMPLES")
                .example(&["ntp-dtls status 127.0.0.1:9123"]);
            see_also(&mut r);
        }
        _ => {
            r.section("FILES")
                .item("/etc/ntp-dtls/", "Configuration, certificates and keys (mode 0750, group ntp-dtls). See ntp-dtls.toml(5).")
                .item("/usr/share/doc/ntp-dtls/OPERATIONS.md", "The operator's guide: deployment, NTP client settings, the NDcPP mapping, metrics, troubleshooting.");
            signals(&mut r, "certificates, keys and CA files");
            r.section("EXIT STATUS").para("0 on success, 1 on an error (one line on stderr, JSON with --log-format json), 2 for a command line clap rejects. Each command's page says more.");
            r.section("EXAMPLES").example(&[
                "ntp-dtls certs --out certs --server-name time.example.net",
                "ntp-dtls server --cert certs/server.pem --key certs/server.key.pem",
                "ntp-dtls client --server time.example.net --ca certs/ca.pem",
                "ntpdate -q 127.0.0.1",
            ]);
            see_also(&mut r);
        }
    }
    r.0
}

fn signals(r: &mut Roff, reloaded: &str) {
    r.section("SIGNALS")
        .item("SIGHUP", &format!(
            "Reload: {reloaded} are loaded again; live associations go on and new handshakes use the new material. One \
             line says how it went: config reload result=ok, or result=failed with the reason \
             (the material in service stays). Other changed keys (listen addresses, upstream, \
             workers, limits, tunnels, metrics, user) take a restart; see RELOAD in \
             ntp-dtls.toml(5). systemd is told RELOADING=1, then READY=1."
        ))
        .item("SIGTERM, SIGINT", "Close every association (peers learn it at once), log the counters, exit 0. systemd is told STOPPING=1.");
}

fn see_also(r: &mut Roff) {
    r.section("SEE ALSO").para(
        "ntp-dtls(1), ntp-dtls-client(1), ntp-dtls-server(1), ntp-dtls-certs(1), \
         ntp-dtls-query(1), ntp-dtls-status(1), ntp-dtls.toml(5), chronyd(8), \
         /usr/share/doc/ntp-dtls/OPERATIONS.md",
    );
}

/// (table, key, what it is): every key of both files, as ntp-dtls.toml(5) describes them.
/// tests/systemd_units.rs checks the lists against `ntp_dtls::config::config_keys()`.
pub const CLIENT_KEYS: &[(&str, &str, &str)] = &[
    (
        "",
        "ca",
        "CA certificate file (PEM) the server relays' chains must lead to; the default of every tunnel.",
    ),
    (
        "",
        "cert",
        "Client certificate chain (PEM), presented to server relays that require mutual authentication; set with key, for every tunnel.",
    ),
    (
        "",
        "key",
        "Private key of cert (PEM: ECDSA P-256/P-384 as PKCS#8 or SEC1, RSA 2048-4096 as PKCS#8 or PKCS#1).",
    ),
    (
        "",
        "metrics",
        "TCP address to serve /metrics and /status.json on (off by default; keep it on loopback). --metrics overrides it.",
    ),
    (
        "",
        "user",
        "User to switch to once the sockets are bound, when started as root without systemd. --user overrides it.",
    ),
    (
        "",
        "dead_after_unanswered",
        "Requests in a row without a reply before the association is checked, and replaced if it is dead. Default 3.",
    ),
    (
        "",
        "dead_after_secs",
        "Seconds one request may stay unanswered before the same check. Default 5.",
    ),
    (
        "",
        "rekey_after_records",
        "Records sent before a fresh handshake (make before break). Default 50000.",
    ),
    (
        "",
        "rekey_after_secs",
        "Age in seconds before a fresh handshake. Default 21600.",
    ),
    (
        "",
        "keepalive_secs",
        "Seconds of silence before a keepalive, so the server relay's idle timeout never removes a quiet association. Default 300.",
    ),
    (
        "",
        "timestamp_correction",
        "Correct NTP replies' receive and transmit timestamps for the time the exchange spent in this relay, as a transparent clock does (packets with a MAC or extension fields pass unchanged). For a basic NTP client it also asks, through the server relay and in chronyd's interleaved mode, when the reply really left, and uses that as its transmit timestamp (at most 8 queries a second). Default true; false, or --no-timestamp-correction, turns it off. Applied at SIGHUP.",
    ),
    (
        "",
        "busy_poll_us",
        "Microseconds the relay keeps reading its sockets after each receive before it sleeps, 0 to 10000: a reply within the window is met awake, for CPU spent while traffic flows. Default 0 (the replies of a client relay come over the network, later than a window worth polling). --busy-poll-us overrides it; a change needs a restart.",
    ),
    (
        "",
        "crl",
        "CRL files (PEM or DER), a list; checked against every certificate of the server relays' chains but the trust anchor, for every tunnel. Re-read at SIGHUP. --crl on the command line.",
    ),
    (
        "",
        "revocation",
        "\"require\" (a certificate whose issuer has no CRL, or whose CRL is expired or badly signed, is refused), \"if-available\" (only CRLs present count) or \"off\". Default: require when crl is set, off when not.",
    ),
    (
        "tunnel",
        "listen",
        "Local UDP address the NTP clients query (required). Port 123 for ntpd, timesyncd, ntpdate and sntp.",
    ),
    (
        "tunnel",
        "server",
        "The server relay, HOST[:PORT] (required; port 1123 when omitted). A name is looked up each time an association is made.",
    ),
    (
        "tunnel",
        "server_name",
        "Name the server certificate must carry as a DNS or IP SAN. Default: the host of server.",
    ),
    (
        "tunnel",
        "ca",
        "This tunnel's CA file, instead of the top-level ca.",
    ),
    (
        "tunnel",
        "cert",
        "This tunnel's client certificate, instead of the top-level cert.",
    ),
    (
        "tunnel",
        "key",
        "This tunnel's client key, instead of the top-level key.",
    ),
];

pub const SERVER_KEYS: &[(&str, &str, &str)] = &[
    (
        "",
        "listen",
        "UDP address DTLS associations arrive on. Default 0.0.0.0:1123. Nothing else may hold it, another relay with SO_REUSEPORT included.",
    ),
    (
        "",
        "upstream",
        "The time server requests go to, HOST:PORT, or \"builtin\" to answer from this host's clock. Default 127.0.0.1:123.",
    ),
    (
        "",
        "cert",
        "Server certificate chain (PEM, leaf first); required.",
    ),
    (
        "",
        "key",
        "Private key of cert (PEM: ECDSA P-256/P-384 as PKCS#8 or SEC1, RSA 2048-4096 as PKCS#8 or PKCS#1); required.",
    ),
    (
        "",
        "client_ca",
        "Require every client relay to present a certificate chaining to this CA (mutual authentication). Default: unset.",
    ),
    (
        "",
        "crl",
        "CRL files (PEM or DER), a list, for client certificates (needs client_ca); every certificate of a client's chain but the trust anchor is checked. Re-read at SIGHUP. --crl replaces the list.",
    ),
    (
        "",
        "revocation",
        "\"require\", \"if-available\" or \"off\", as for the client. Default: require when crl is set, off when not.",
    ),
    (
        "",
        "stratum",
        "Stratum the builtin source announces, 1 to 15. Default 2.",
    ),
    (
        "",
        "workers",
        "Sockets and threads sharing the listen address (SO_REUSEPORT), 1 to 256. Default: the number of cores.",
    ),
    (
        "",
        "timestamp_correction",
        "Correct forwarded NTP replies' receive and transmit timestamps for the time the exchange spent in this relay, as a transparent clock does (packets with a MAC or extension fields pass unchanged; the builtin source stamps at its socket anyway). For a basic client that reaches it unmarked (a DTLS peer other than ntp-dtls) it also asks the time server, in chronyd's interleaved mode, when the reply left, and uses that as its transmit timestamp (at most 8 queries a second). Default true; false, or --no-timestamp-correction, turns it off. Applied at SIGHUP.",
    ),
    (
        "",
        "busy_poll_us",
        "Microseconds the relay keeps reading its sockets after it forwarded a request or received a reply, before it sleeps, 0 to 10000: the time server's reply, and under load the next request, are met awake rather than by waking a sleeping thread. Default 200; the price is CPU while traffic flows (under sustained load the relay never sleeps); 0 on a host whose CPU is better spent elsewhere. Peers' datagrams as such (handshakes, garbage) never open the window. --busy-poll-us overrides it; a change needs a restart.",
    ),
    (
        "",
        "metrics",
        "TCP address to serve /metrics and /status.json on (off by default). --metrics overrides it.",
    ),
    (
        "",
        "user",
        "User to switch to once the sockets are bound, when started as root without systemd. --user overrides it.",
    ),
    (
        "limits",
        "max_associations",
        "Associations held at once, established or not, split between workers. Default 100000.",
    ),
    (
        "limits",
        "max_half_open",
        "Handshakes in progress at once. Default 4096.",
    ),
    (
        "limits",
        "handshake_timeout_secs",
        "Seconds before an unfinished handshake is abandoned. Default 10.",
    ),
    (
        "limits",
        "handshake_rate",
        "New handshakes per second one source address may start. Default 5.",
    ),
    (
        "limits",
        "handshake_burst",
        "Handshakes one source address may start in a burst. Default 20.",
    ),
    (
        "limits",
        "max_handshake_bytes",
        "Bytes a peer may send before its handshake completes. Default 65536.",
    ),
    (
        "limits",
        "idle_timeout_secs",
        "Seconds of silence after which an association is removed. Default 3600.",
    ),
];

fn toml_page() -> String {
    let mut r = Roff::new();
    r.0.push_str(&format!(
        ".TH ntp-dtls.toml 5 \"\" \"ntp-dtls {}\" \"File Formats\"\n",
        env!("CARGO_PKG_VERSION")
    ));
    r.section("NAME").0.push_str(
        "ntp\\-dtls.toml \\- configuration files of the ntp\\-dtls client and server relays\n",
    );
    r.section("SYNOPSIS")
        .example(&["/etc/ntp-dtls/client.toml", "/etc/ntp-dtls/server.toml"]);
    r.section("DESCRIPTION").para(
        "Both files are TOML. Unknown keys, wrong types and bad values are start-up errors \
         that name the file, line, column and key; a key written after a [table] header belongs \
         to that table, and the error says so. ntp-dtls client --check and ntp-dtls server \
         --check read a file as the daemon would and say what would run.",
    );
    r.section("CLIENT FILE").para(
        "ntp-dtls client --config /etc/ntp-dtls/client.toml. Top-level keys come first; then \
         one [[tunnel]] table per server relay, each a local listener bound to one server relay \
         with its own DTLS association.",
    );
    r.subsection("Top-level keys");
    for (table, key, text) in CLIENT_KEYS.iter().filter(|(t, _, _)| t.is_empty()) {
        let _ = table;
        r.item(key, text);
    }
    r.subsection("[[tunnel]] keys");
    for (_, key, text) in CLIENT_KEYS.iter().filter(|(t, _, _)| *t == "tunnel") {
        r.item(key, text);
    }
    r.section("SERVER FILE").para(
        "ntp-dtls server --config /etc/ntp-dtls/server.toml; a flag given on the command line \
         overrides the key. Top-level keys come first, then the [limits] table: what \
         unauthenticated peers may make the relay hold.",
    );
    r.subsection("Top-level keys");
    for (_, key, text) in SERVER_KEYS.iter().filter(|(t, _, _)| t.is_empty()) {
        r.item(key, text);
    }
    r.subsection("[limits] keys");
    for (_, key, text) in SERVER_KEYS.iter().filter(|(t, _, _)| *t == "limits") {
        r.item(key, text);
    }
    r.section("RELOAD").para(
        "SIGHUP (systemctl reload) reloads certificate material. Certificates, keys and CA files are \
         loaded again (even when their paths did not change) and server_name changes apply to \
         the next handshakes. Every other changed key (listen, upstream, stratum, workers, \
         the [limits] keys, a tunnel's listen or server, the tunnel list, the upkeep keys, \
         metrics, user) needs a restart. Material that no longer loads leaves everything in \
         service (result=failed).",
    );
    r.section("PERMISSIONS").para(
        "The service user (ntp-dtls under systemd, or --user) must be able to read both files \
         and every certificate and key they name, at start and at every reload: chgrp ntp-dtls \
         FILE && chmod 0640 FILE, and the directory 0750 with the same group. The daemons warn \
         at start, and --check fails, when it cannot. A CA's private key never belongs on a \
         relay host.",
    );
    r.section("EXAMPLES")
        .example(&[
            "# /etc/ntp-dtls/client.toml",
            "ca = \"/etc/ntp-dtls/ca.pem\"",
            "",
            "[[tunnel]]",
            "listen = \"127.0.0.1:123\"",
            "server = \"time1.example.net\"",
            "",
            "[[tunnel]]",
            "listen = \"127.0.0.2:123\"",
            "server = \"time2.example.net:1123\"",
        ])
        .example(&[
            "# /etc/ntp-dtls/server.toml",
            "listen = \"0.0.0.0:1123\"",
            "upstream = \"127.0.0.1:123\"",
            "cert = \"/etc/ntp-dtls/server.pem\"",
            "key = \"/etc/ntp-dtls/server.key.pem\"",
            "",
            "[limits]",
            "max_half_open = 1024",
        ])
        .para("Complete examples, every key shown: /usr/share/doc/ntp-dtls/examples/.");
    r.section("SEE ALSO")
        .para("ntp-dtls(1), ntp-dtls-client(1), ntp-dtls-server(1), /usr/share/doc/ntp-dtls/OPERATIONS.md");
    r.0
}
