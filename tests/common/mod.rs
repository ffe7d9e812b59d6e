#![allow(dead_code)]
//! Process harness for the ntp-dtls integration tests (std only): temporary directories,
//! loopback ports, daemons with captured logs, a real chronyd upstream, a scripted fake NTP
//! server, and the real NTP clients (ntpdate, sntp/ntpdig, chronyd -Q) with parsed results.
//!
//! Nothing here ever sets the system clock: chronyd servers run with `-x`, chronyd clients with
//! `-Q`, and ntpdate/ntpdig without any step/slew option.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod relays;

/// How long a daemon may take to print its readiness line in most tests.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Wall-clock limit for one run of ntpdate / sntp.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Wall-clock limit for one `chronyd -Q` measurement (its own `-t` limit is 20 s).
pub const CHRONY_CLIENT_TIMEOUT: Duration = Duration::from_secs(25);
/// Poll interval for readiness conditions that have no event to wait on.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Binaries and environment
// ---------------------------------------------------------------------------------------------

/// Path of the binary under test: Cargo's CARGO_BIN_EXE_ntp-dtls, else the NTP_DTLS_BIN env var.
pub fn ntp_dtls_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_ntp-dtls") {
        return PathBuf::from(p);
    }
    match std::env::var_os("NTP_DTLS_BIN") {
        Some(p) => PathBuf::from(p),
        None => panic!("no ntp-dtls binary: CARGO_BIN_EXE_ntp-dtls unset and NTP_DTLS_BIN unset"),
    }
}

/// Finds a program in PATH or the sbin directories (non-root PATHs on Debian lack /usr/sbin).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(sbin)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Like find_tool but panics with an install hint when the program is missing.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name)
        .unwrap_or_else(|| panic!("{name} not found; run `make deps` (scripts/install-deps.sh)"))
}

/// True when the test process runs as uid 0 (needed to bind port 123).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------------------------

/// A fresh directory under std::env::temp_dir(), removed recursively on Drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new unique directory named ntp-dtls-test-<pid>-<n>-<nanos>.
    pub fn new() -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let name = format!("ntp-dtls-test-{}-{n}-{nanos}", std::process::id());
            let path = std::env::temp_dir().join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create temp dir {}: {e}", path.display()),
            }
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of `name` inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `contents` to `name` inside the directory and returns the file's path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Ports and addresses
// ---------------------------------------------------------------------------------------------

/// A UDP port that was free on `ip` a moment ago (bind port 0, read it, drop the socket).
pub fn free_udp_port(ip: IpAddr) -> u16 {
    UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .unwrap_or_else(|e| panic!("cannot bind UDP on {ip}: {e}"))
        .port()
}

/// A SocketAddr on `ip` with a port from free_udp_port.
pub fn free_udp_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, free_udp_port(ip))
}

/// 127.0.0.n; tests that need port 123 each use their own n so parallel tests never collide.
pub fn loopback(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// IpAddr form of loopback(n).
pub fn loopback_ip(n: u8) -> IpAddr {
    IpAddr::V4(loopback(n))
}

/// ::1 as an IpAddr.
pub fn loopback_v6() -> IpAddr {
    IpAddr::V6(Ipv6Addr::LOCALHOST)
}

/// True if a UDP socket can be bound to `addr` right now (e.g. port 123 needs root).
pub fn can_bind_udp(addr: SocketAddr) -> bool {
    UdpSocket::bind(addr).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Daemons with captured output
// ---------------------------------------------------------------------------------------------

struct OutputState {
    lines: Vec<String>,
    open_streams: usize,
}

struct Output {
    state: Mutex<OutputState>,
    cv: Condvar,
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes ANSI escape sequences (colours) so log lines can be matched as plain text.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn spawn_reader(
    name: String,
    stream: impl Read + Send + 'static,
    out: Arc<Output>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let raw = String::from_utf8_lossy(&buf);
                    let line = strip_ansi(raw.trim_end_matches(['\n', '\r']));
                    eprintln!("[{name}] {line}");
                    out.lock().lines.push(line);
                    out.cv.notify_all();
                }
            }
        }
        out.lock().open_streams -= 1;
        out.cv.notify_all();
    })
}

/// A spawned child process whose stdout and stderr are captured line by line (and echoed to the
/// test's stderr prefixed with its name); SIGKILLed and reaped on Drop.
pub struct Daemon {
    name: String,
    child: Mutex<Child>,
    out: Arc<Output>,
    _readers: Vec<JoinHandle<()>>,
}

impl Daemon {
    /// Spawns `program args` with stdin null, NO_COLOR=1 and RUST_LOG removed (set
    /// NTP_DTLS_TEST_LOG to pass a RUST_LOG value through to daemons).
    pub fn spawn(name: &str, program: impl AsRef<OsStr>, args: &[impl AsRef<OsStr>]) -> Daemon {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Daemon::spawn_command(name, cmd)
    }

    /// Like spawn, with extra environment variables (e.g. RUST_LOG) for the child.
    pub fn spawn_with_env(
        name: &str,
        program: impl AsRef<OsStr>,
        args: &[impl AsRef<OsStr>],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut cmd = Command::new(program);
        cmd.args(args).envs(env.iter().copied());
        Daemon::spawn_command(name, cmd)
    }

    /// Spawns a prepared Command (stdio overridden, NO_COLOR=1; RUST_LOG unless the Command sets
    /// it is removed, or taken from NTP_DTLS_TEST_LOG when that is set).
    pub fn spawn_command(name: &str, mut cmd: Command) -> Daemon {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env_remove("RUST_LOG");
            if let Some(v) = std::env::var_os("NTP_DTLS_TEST_LOG") {
                cmd.env("RUST_LOG", v);
            }
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let desc = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("daemon {name}: cannot spawn {desc}: {e}"));
        eprintln!("[{name}] spawned pid {}: {desc}", child.id());
        let out = Arc::new(Output {
            state: Mutex::new(OutputState {
                lines: Vec::new(),
                open_streams: 2,
            }),
            cv: Condvar::new(),
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let readers = vec![
            spawn_reader(name.to_string(), stdout, out.clone()),
            spawn_reader(name.to_string(), stderr, out.clone()),
        ];
        Daemon {
            name: name.to_string(),
            child: Mutex::new(child),
            out,
            _readers: readers,
        }
    }

    /// The name used to prefix this daemon's echoed output.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.lock_child().id()
    }

    fn lock_child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        self.lock_child().try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself; None if it is still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit_status() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// Number of lines captured so far (use as `after` for wait_for_new_line).
    pub fn line_count(&self) -> usize {
        self.out.lock().lines.len()
    }

    /// A copy of all lines captured so far (stdout and stderr interleaved as read).
    pub fn lines(&self) -> Vec<String> {
        self.out.lock().lines.clone()
    }

    /// Number of captured lines containing `needle`, now: a snapshot. A line the daemon wrote
    /// may still be in the pipe; to count what must have been logged, use wait_for_count, or
    /// terminate_and_drain and count what it returns.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.out
            .lock()
            .lines
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The last `n` captured lines joined with newlines (for panic messages).
    pub fn tail(&self, n: usize) -> String {
        let st = self.out.lock();
        let start = st.lines.len().saturating_sub(n);
        st.lines[start..].join("\n")
    }

    /// First captured line (from process start) containing `needle`; panics on timeout or exit.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_new_line(needle, 0, timeout)
    }

    /// First captured line with index >= `after` containing `needle`; panics on timeout or exit.
    pub fn wait_for_new_line(&self, needle: &str, after: usize, timeout: Duration) -> String {
        let what = format!("a line containing {needle:?}");
        self.wait_until(&what, after, timeout, |l| l.contains(needle))
            .1
    }

    /// First line with index >= `after` satisfying `pred`, as (index, line); panics on timeout
    /// or when the process exits first (the message includes the last 30 lines).
    pub fn wait_until(
        &self,
        what: &str,
        after: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut exited: Option<(Instant, ExitStatus)> = None;
        loop {
            let streams_open;
            {
                let st = self.out.lock();
                if let Some((i, l)) = st
                    .lines
                    .iter()
                    .enumerate()
                    .skip(after)
                    .find(|(_, l)| pred(l))
                {
                    return (i, l.clone());
                }
                streams_open = st.open_streams > 0;
            }
            if exited.is_none() {
                exited = self.try_exit_status().map(|s| (Instant::now(), s));
            }
            let now = Instant::now();
            // After exit, give the readers a moment to drain pipes a grandchild might hold.
            let gone = exited
                .map(|(t, _)| !streams_open || now >= t + Duration::from_millis(500))
                .unwrap_or(false);
            if gone || now >= deadline {
                let reason = match exited {
                    Some((_, st)) => format!("the process exited first ({st})"),
                    None => format!("timed out after {:?}", start.elapsed()),
                };
                panic!(
                    "daemon {}: waiting for {what} (from line {after}): {reason}; last 30 lines:\n{}",
                    self.name,
                    self.tail(30)
                );
            }
            let st = self.out.lock();
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            // Re-check under the lock so a line pushed in between is not missed.
            if st.lines.len() > after && st.lines.iter().skip(after).any(|l| pred(l)) {
                continue;
            }
            drop(
                self.out
                    .cv
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
    }

    /// Waits until at least `at_least` captured lines contain `needle` and returns how many do
    /// at that moment; panics on timeout or when the process exits first. Log lines reach the
    /// test through a pipe and a reader thread, so a line a daemon wrote before the reply the
    /// test just got may still be on its way: count only through this, or after exit.
    pub fn wait_for_count(&self, needle: &str, at_least: usize, timeout: Duration) -> usize {
        let what = format!("{at_least} lines containing {needle:?}");
        self.wait_for_count_where(&what, at_least, timeout, |l| l.contains(needle))
    }

    /// Like wait_for_count, for the lines satisfying `pred`.
    pub fn wait_for_count_where(
        &self,
        what: &str,
        at_least: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> usize {
        let mut seen = 0;
        let mut from = 0;
        while seen < at_least {
            let (i, _) = self.wait_until(what, from, timeout, &pred);
            seen += 1;
            from = i + 1;
        }
        seen + self
            .lines()
            .iter()
            .skip(from)
            .filter(|l| pred(l.as_str()))
            .count()
    }

    /// SIGTERMs the process (SIGKILL after 5 s), waits until its stdout and stderr are closed
    /// and read to the end (bounded: 5 s), and returns every line it wrote. Counts taken on
    /// these are final: nothing more can be logged.
    pub fn terminate_and_drain(&self) -> Vec<String> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut st = self.out.lock();
        while st.open_streams > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "daemon {}: output still open 5 s after exit (a grandchild holds it?)",
                self.name
            );
            st = self
                .out
                .cv
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.lines.clone()
    }

    /// terminate_and_drain, then the number of lines containing `needle`: a final count.
    pub fn count_after_exit(&self, needle: &str) -> usize {
        self.terminate_and_drain()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits for the readiness line (contains " ready" and `listen=ADDR[,ADDR...]`) and returns
    /// the listen addresses.
    pub fn wait_ready(&self, timeout: Duration) -> Vec<SocketAddr> {
        let (_, line) =
            self.wait_until("the readiness line (ready ... listen=)", 0, timeout, |l| {
                is_ready_line(l)
            });
        parse_listen(&line)
            .unwrap_or_else(|e| panic!("daemon {}: bad readiness line {line:?}: {e}", self.name))
    }

    /// SIGKILLs the process (if still running) and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.lock_child();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM, waits up to 5 s for exit, then SIGKILLs; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop()
    }

    /// terminate, through a shared reference.
    fn stop(&self) -> ExitStatus {
        if let Some(st) = self.try_exit_status() {
            return st;
        }
        send_signal("TERM", &self.pid().to_string());
        if let Some(st) = self.wait_exit(Duration::from_secs(5)) {
            return st;
        }
        eprintln!(
            "[{}] did not exit within 5 s of SIGTERM; killing",
            self.name
        );
        let mut child = self.lock_child();
        let _ = child.kill();
        child.wait().expect("wait for killed daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `kill -SIG target` through sh's builtin (a negative target is a process group).
fn send_signal(sig: &str, target: &str) {
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -{sig} {target}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// True for a readiness line: contains " ready " or ends with " ready", and contains "listen=".
pub fn is_ready_line(line: &str) -> bool {
    (line.contains(" ready ") || line.ends_with(" ready")) && find_field(line, "listen").is_some()
}

/// The value of a `key=value` field (value runs to the next whitespace, quotes trimmed).
pub fn find_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    let mut from = 0;
    while let Some(pos) = line[from..].find(&pat) {
        let at = from + pos;
        let boundary = at == 0 || line[..at].ends_with(char::is_whitespace);
        if boundary {
            let rest = &line[at + pat.len()..];
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            return Some(rest[..end].trim_matches('"'));
        }
        from = at + pat.len();
    }
    None
}

/// Parses the `listen=` field of a readiness line into socket addresses.
pub fn parse_listen(line: &str) -> Result<Vec<SocketAddr>, String> {
    let value = find_field(line, "listen").ok_or("no listen= field")?;
    let addrs = value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<SocketAddr>().map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err("empty listen= field".into());
    }
    Ok(addrs)
}

/// Spawns the binary under test as a Daemon.
pub fn spawn_ntp_dtls(name: &str, args: &[impl AsRef<OsStr>]) -> Daemon {
    Daemon::spawn(name, ntp_dtls_bin(), args)
}

// ---------------------------------------------------------------------------------------------
// One-shot commands with a wall-clock limit
// ---------------------------------------------------------------------------------------------

/// Result of run_command: exit status and the complete stdout and stderr.
#[derive(Debug)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    /// stdout followed by stderr, for parsing and error messages.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` (stdin null) in its own process group; kills the whole group after `timeout`.
pub fn run_command(mut cmd: Command, timeout: Duration) -> Result<CommandOutput, String> {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .process_group(0);
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot spawn {desc}: {e}"))?;
    let read_all = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let err = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            _ => break None,
        }
    };
    // Kill the group either way: no grandchild may keep the pipes (and the readers) alive.
    send_signal("KILL", &format!("-{}", child.id()));
    let _ = child.kill();
    let status = match status {
        Some(st) => st,
        None => {
            let _ = child.wait();
            let (o, e) = (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
            return Err(format!("{desc} timed out after {timeout:?}\n{o}{e}"));
        }
    };
    Ok(CommandOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------------
// NTP packets
// ---------------------------------------------------------------------------------------------

/// Seconds between the NTP era-0 epoch (1900) and the Unix epoch.
pub const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// The current time as a 64-bit NTP timestamp (32.32 fixed point).
pub fn ntp_now() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let secs = d.as_secs() + NTP_UNIX_OFFSET;
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// Difference a - b of two NTP timestamps in seconds (same era assumed).
pub fn ntp_diff(a: u64, b: u64) -> f64 {
    (i128::from(a) - i128::from(b)) as f64 / 4_294_967_296.0
}

/// A client (mode 3, version 4) request with the given transmit timestamp.
/// The Prometheus text a relay serves at `addr` (`--metrics`), read over plain HTTP.
pub fn metrics_text(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// The value of the sample `series` (a name with its labels, as printed) at `addr`.
pub fn metric(addr: &str, series: &str) -> f64 {
    let text = metrics_text(addr);
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
}

pub fn ntp_client_request(transmit: u64) -> [u8; 48] {
    let mut p = [0u8; 48];
    p[0] = 0x23; // LI 0, VN 4, mode 3
    p[40..48].copy_from_slice(&transmit.to_be_bytes());
    p
}

/// The header fields of an NTP packet.
#[derive(Debug, Clone, PartialEq)]
pub struct NtpPacket {
    pub leap: u8,
    pub version: u8,
    pub mode: u8,
    pub stratum: u8,
    pub poll: i8,
    pub precision: i8,
    pub root_delay: u32,
    pub root_dispersion: u32,
    pub reference_id: [u8; 4],
    pub reference_ts: u64,
    pub origin_ts: u64,
    pub receive_ts: u64,
    pub transmit_ts: u64,
}

/// Parses the 48-byte NTP header (extension fields and MACs are ignored); None if too short.
pub fn parse_ntp(b: &[u8]) -> Option<NtpPacket> {
    if b.len() < 48 {
        return None;
    }
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    Some(NtpPacket {
        leap: b[0] >> 6,
        version: (b[0] >> 3) & 7,
        mode: b[0] & 7,
        stratum: b[1],
        poll: b[2] as i8,
        precision: b[3] as i8,
        root_delay: u32_at(4),
        root_dispersion: u32_at(8),
        reference_id: [b[12], b[13], b[14], b[15]],
        reference_ts: u64_at(16),
        origin_ts: u64_at(24),
        receive_ts: u64_at(32),
        transmit_ts: u64_at(40),
    })
}

/// One request/response exchange measured by ntp_query.
#[derive(Debug, Clone)]
pub struct NtpSample {
    pub reply: NtpPacket,
    pub raw: Vec<u8>,
    /// Server clock minus local clock ((t2-t1)+(t3-t4))/2, seconds.
    pub offset_s: f64,
    /// Round-trip delay (t4-t1)-(t3-t2), seconds.
    pub delay_s: f64,
}

fn unspecified_for(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// One plain NTP request from a fresh UdpSocket; returns the first reply's bytes.
pub fn ntp_request_raw(server: SocketAddr, timeout: Duration) -> Option<Vec<u8>> {
    ntp_query(server, timeout).map(|s| s.raw)
}

/// One plain NTP exchange from a fresh UdpSocket: a mode-4 reply whose origin matches, or None.
pub fn ntp_query(server: SocketAddr, timeout: Duration) -> Option<NtpSample> {
    let sock = UdpSocket::bind(unspecified_for(server)).ok()?;
    sock.connect(server).ok()?;
    let t1 = ntp_now();
    sock.send(&ntp_client_request(t1)).ok()?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).ok()?;
        let n = sock.recv(&mut buf).ok()?;
        let t4 = ntp_now();
        let Some(reply) = parse_ntp(&buf[..n]) else {
            continue;
        };
        if reply.mode != 4 || reply.origin_ts != t1 {
            continue;
        }
        let (t2, t3) = (reply.receive_ts, reply.transmit_ts);
        let offset_s = (ntp_diff(t2, t1) + ntp_diff(t3, t4)) / 2.0;
        let delay_s = ntp_diff(t4, t1) - ntp_diff(t3, t2);
        return Some(NtpSample {
            reply,
            raw: buf[..n].to_vec(),
            offset_s,
            delay_s,
        });
    }
}

/// Sends a request every 100 ms until a synchronised (stratum 1..15) reply arrives or `timeout`.
pub fn wait_ntp_answers(server: SocketAddr, timeout: Duration) -> Option<NtpSample> {
    let deadline = Instant::now() + timeout;
    loop {
        let next = (Instant::now() + Duration::from_millis(100)).min(deadline);
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        if wait.is_zero() {
            return None;
        }
        match ntp_query(server, wait) {
            Some(s) if (1..16).contains(&s.reply.stratum) => return Some(s),
            _ => thread::sleep(next.saturating_duration_since(Instant::now())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fake NTP server (scripted offset, counts requests)
// ---------------------------------------------------------------------------------------------

/// A minimal in-process NTP server on a thread: answers every mode-3 request as a stratum-2
/// server whose clock is `offset_s` ahead of ours, and counts the requests it received.
pub struct FakeNtpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    datagrams: Arc<AtomicUsize>,
    handle: Option<JoinHandle<()>>,
}

impl FakeNtpServer {
    /// Starts on `ip` with a free port.
    pub fn start(ip: IpAddr, offset_s: f64) -> FakeNtpServer {
        FakeNtpServer::start_on(SocketAddr::new(ip, 0), offset_s)
    }

    /// Starts on exactly `addr` (e.g. 127.0.0.N:123; needs root for ports < 1024).
    pub fn start_on(addr: SocketAddr, offset_s: f64) -> FakeNtpServer {
        let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("fake NTP bind {addr}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set_read_timeout");
        let addr = sock.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let datagrams = Arc::new(AtomicUsize::new(0));
        let (stop2, req2, all2) = (stop.clone(), requests.clone(), datagrams.clone());
        let shift = (offset_s * 4_294_967_296.0) as i64;
        let shifted = move || ntp_now().wrapping_add_signed(shift);
        let handle = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                // Lowest bit clear, as servers other than chronyd may send it: chronyd flags
                // its receive timestamps with it, and only those are asked about in its
                // interleaved mode (time_server_tx), which would add queries to the count.
                let rx = shifted() & !1;
                all2.fetch_add(1, Ordering::Relaxed);
                let Some(req) = parse_ntp(&buf[..n]) else {
                    continue;
                };
                if req.mode != 3 {
                    continue;
                }
                req2.fetch_add(1, Ordering::Relaxed);
                let mut p = [0u8; 48];
                p[0] = (req.version.clamp(1, 4) << 3) | 4; // LI 0, mode 4
                p[1] = 2; // stratum
                p[2] = req.poll as u8;
                p[3] = (-20i8) as u8; // precision ~1 us
                p[8..12].copy_from_slice(&0x0000_0100u32.to_be_bytes()); // root dispersion 3.9 ms
                p[12..16].copy_from_slice(&[127, 127, 1, 1]);
                p[16..24].copy_from_slice(&(rx - (1u64 << 32)).to_be_bytes());
                p[24..32].copy_from_slice(&req.transmit_ts.to_be_bytes());
                p[32..40].copy_from_slice(&rx.to_be_bytes());
                p[40..48].copy_from_slice(&shifted().to_be_bytes());
                let _ = sock.send_to(&p, peer);
            }
        });
        FakeNtpServer {
            addr,
            stop,
            requests,
            datagrams,
            handle: Some(handle),
        }
    }

    /// The address it answers on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of mode-3 requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Number of datagrams of any kind received so far.
    pub fn datagrams(&self) -> usize {
        self.datagrams.load(Ordering::Relaxed)
    }
}

impl Drop for FakeNtpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// chronyd as an upstream NTP server
// ---------------------------------------------------------------------------------------------

/// A real chronyd (`-x`: never touches the clock) serving time as local stratum 2 on a loopback
/// address; killed on Drop.
pub struct Chronyd {
    daemon: Option<Daemon>,
    dir: TempDir,
    conf: PathBuf,
    addr: SocketAddr,
}

impl Chronyd {
    /// Starts chronyd on `ip` with a free high port and waits until it answers NTP requests.
    pub fn start(ip: IpAddr) -> Chronyd {
        Chronyd::start_with(ip, &[])
    }

    /// Like start, appending `extra_conf_lines` to chrony.conf.
    pub fn start_with(ip: IpAddr, extra_conf_lines: &[&str]) -> Chronyd {
        let mut last_err = String::new();
        for _ in 0..3 {
            let addr = SocketAddr::new(ip, free_udp_port(ip));
            match Chronyd::try_start(addr, extra_conf_lines) {
                Ok(c) => return c,
                Err(e) => last_err = e,
            }
        }
        panic!("{last_err}");
    }

    /// Starts chronyd on exactly `addr` (e.g. 127.0.0.N:123 for ntpdate/sntp; needs root).
    pub fn start_on(addr: SocketAddr, extra_conf_lines: &[&str]) -> Chronyd {
        Chronyd::try_start(addr, extra_conf_lines).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start(addr: SocketAddr, extra: &[&str]) -> Result<Chronyd, String> {
        let dir = TempDir::new();
        let conf = dir.join("chrony.conf");
        std::fs::write(&conf, chronyd_server_conf(addr, dir.path(), extra))
            .map_err(|e| format!("write chrony.conf: {e}"))?;
        let mut c = Chronyd {
            daemon: None,
            dir,
            conf,
            addr,
        };
        c.spawn_and_wait()?;
        Ok(c)
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let family = if self.addr.is_ipv4() { "-4" } else { "-6" };
        let mut args: Vec<&OsStr> = vec![
            "-x".as_ref(),
            "-d".as_ref(),
            "-u".as_ref(),
            "root".as_ref(),
            family.as_ref(),
            "-f".as_ref(),
            self.conf.as_os_str(),
        ];
        if !is_root() {
            args.push("-U".as_ref());
        }
        let name = format!("chronyd@{}", self.addr);
        let daemon = Daemon::spawn(&name, tool("chronyd"), &args);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if daemon.count_lines("Could not open") > 0 || daemon.try_exit_status().is_some() {
                return Err(format!(
                    "{name} failed to start (port busy?):\n{}",
                    daemon.tail(30)
                ));
            }
            if wait_ntp_answers(self.addr, Duration::from_millis(200)).is_some() {
                self.daemon = Some(daemon);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{name} did not answer NTP within 10 s:\n{}",
                    daemon.tail(30)
                ));
            }
        }
    }

    /// The address chronyd serves NTP on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The captured chronyd process (None while stopped).
    pub fn daemon(&self) -> Option<&Daemon> {
        self.daemon.as_ref()
    }

    /// The directory holding chrony.conf and the pid file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills chronyd (the address stays reserved for restart).
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// Stops and starts chronyd again on the same address; waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait()
            .unwrap_or_else(|e| panic!("restart: {e}"));
    }
}

/// The chrony.conf used for a local stratum-2 server on `addr` with state under `dir`.
pub fn chronyd_server_conf(addr: SocketAddr, dir: &Path, extra: &[&str]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "port {}", addr.port());
    let _ = writeln!(s, "bindaddress {}", addr.ip());
    s.push_str("allow all\nlocal stratum 2\ncmdport 0\n");
    let _ = writeln!(s, "pidfile {}", dir.join("chronyd.pid").display());
    for l in extra {
        let _ = writeln!(s, "{l}");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Real NTP clients
// ---------------------------------------------------------------------------------------------

/// What a real NTP client measured. offset_s uses the NTP sign convention: server minus local.
#[derive(Debug, Clone)]
pub struct NtpClientResult {
    pub offset_s: f64,
    pub delay_s: Option<f64>,
    /// Complete client output (stdout+stderr; for chronyd also measurements.log).
    pub raw: String,
    /// ntpdig's "+/-" value (synchronisation distance, ~delay/2 + precision); None for chronyd.
    pub sync_distance_s: Option<f64>,
    /// chronyd only: every sample from measurements.log (shows basic vs interleaved mode).
    pub samples: Vec<ChronySample>,
}

/// One line of chronyd's measurements.log.
#[derive(Debug, Clone, PartialEq)]
pub struct ChronySample {
    pub offset_s: f64,
    pub delay_s: f64,
    pub stratum: u8,
    /// Mode column "4I": the sample came from an interleaved exchange (xleave).
    pub interleaved: bool,
    /// All test bits (123 567 ABCD) were 1.
    pub valid: bool,
}

/// `ntpdate -q <ip>` (ntpsec's shim for ntpdig, always port 123); parses offset and "+/-".
pub fn ntpdate_query(server_ip: IpAddr) -> Result<NtpClientResult, String> {
    ntpdate_query_with(server_ip, &[])
}

/// `ntpdate -q <extra> <ip>`; extra may hold -u (a no-op on ntpsec), -d (adds delay), -t N, -4/-6.
pub fn ntpdate_query_with(server_ip: IpAddr, extra: &[&str]) -> Result<NtpClientResult, String> {
    // -b/-B select step/slew even with -q, -s pipes output to syslog: refuse them.
    if let Some(bad) = extra.iter().find(|a| matches!(**a, "-b" | "-B" | "-s")) {
        panic!("ntpdate_query_with: {bad} would set the clock or hide the output");
    }
    let mut cmd = Command::new(tool("ntpdate"));
    cmd.arg("-q").args(extra).arg(server_ip.to_string());
    let out = run_command(cmd, CLIENT_TIMEOUT)?;
    parse_ntpdig_output(&out)
}

/// `sntp -d <ip>` (ntpsec's ntpdig: reports only, sets the clock only with -S/-s/-M); parses
/// offset, "+/-", and the delay computed from the t1..t4 timestamps -d prints.
pub fn sntp_query(server_ip: IpAddr) -> Result<NtpClientResult, String> {
    let mut cmd = Command::new(tool("sntp"));
    cmd.args(["-d", "-t", "2"]).arg(server_ip.to_string());
    let out = run_command(cmd, CLIENT_TIMEOUT)?;
    parse_ntpdig_output(&out)
}

/// Parses ntpdig/ntpdate output: the report line
/// `2026-11-26 05:35:05.810377 (+0000) +0.000034 +/- 0.000123 127.0.0.213 s2 no-leap`
/// and, when present (-d), the `org t1: HEX rec t2: HEX` / `xmt t3: HEX dst t4: HEX` lines.
pub fn parse_ntpdig_output(out: &CommandOutput) -> Result<NtpClientResult, String> {
    let raw = out.combined();
    let fail = |why: &str| Err(format!("{why} ({}):\n{raw}", out.status));
    if !out.status.success() {
        return fail("client failed");
    }
    let report = out.stdout.lines().find_map(|l| {
        let t: Vec<&str> = l.split_whitespace().collect();
        let i = t.iter().position(|w| *w == "+/-")?;
        let offset = t.get(i.checked_sub(1)?)?.parse::<f64>().ok()?;
        Some((offset, t.get(i + 1).and_then(|v| v.parse::<f64>().ok())))
    });
    let Some((offset_s, sync_distance_s)) = report else {
        return fail("no report line with an offset");
    };
    let mut ts = [None::<u64>; 4];
    for l in out.stdout.lines() {
        let t: Vec<&str> = l.split_whitespace().collect();
        for (key, idx) in [("t1:", 0), ("t2:", 1), ("t3:", 2), ("t4:", 3)] {
            let value = t.iter().position(|w| *w == key).and_then(|p| t.get(p + 1));
            if let Some(v) = value.and_then(|v| parse_hex_ntp(v)) {
                ts[idx] = Some(v);
            }
        }
    }
    let delay_s = match ts {
        [Some(t1), Some(t2), Some(t3), Some(t4)] => Some(ntp_diff(t4, t1) - ntp_diff(t3, t2)),
        _ => None,
    };
    Ok(NtpClientResult {
        offset_s,
        delay_s,
        raw,
        sync_distance_s,
        samples: Vec::new(),
    })
}

/// Parses ntpdig's "eeb2438a.26d43000" (seconds.fraction in hex) NTP timestamp.
fn parse_hex_ntp(s: &str) -> Option<u64> {
    let (a, b) = s.split_once('.')?;
    if a.len() != 8 || b.len() != 8 {
        return None;
    }
    Some((u64::from_str_radix(a, 16).ok()? << 32) | u64::from_str_radix(b, 16).ok()?)
}

/// One-shot `chronyd -Q` (measure, never set the clock) against `server` with iburst,
/// maxsamples 4 (+ xleave); offset from "System clock wrong by X seconds (ignored)" (already the
/// NTP convention: positive = server ahead), delay from the last sample in measurements.log.
pub fn chronyd_client_measure(server: SocketAddr, xleave: bool) -> Result<NtpClientResult, String> {
    let dir = TempDir::new();
    let conf = dir.join("client.conf");
    let logdir = dir.join("log");
    std::fs::create_dir(&logdir).map_err(|e| format!("mkdir {}: {e}", logdir.display()))?;
    let mut c = format!(
        "server {} port {} iburst maxsamples 4{}\n",
        server.ip(),
        server.port(),
        if xleave { " xleave" } else { "" }
    );
    c.push_str("port 0\ncmdport 0\n");
    let _ = writeln!(c, "pidfile {}", dir.join("chronyd.pid").display());
    let _ = writeln!(c, "logdir {}", logdir.display());
    c.push_str("log measurements\n");
    std::fs::write(&conf, c).map_err(|e| format!("write {}: {e}", conf.display()))?;

    let mut cmd = Command::new(tool("chronyd"));
    cmd.args(["-Q", "-t", "20", "-u", "root", "-f"]).arg(&conf);
    if !is_root() {
        cmd.arg("-U");
    }
    let out = run_command(cmd, CHRONY_CLIENT_TIMEOUT)?;
    let measurements = std::fs::read_to_string(logdir.join("measurements.log")).unwrap_or_default();
    let raw = format!(
        "{}\n--- measurements.log ---\n{measurements}",
        out.combined()
    );
    let samples = parse_chrony_measurements(&measurements);
    let wrong_by = raw.lines().find_map(|l| {
        let rest = &l[l.find("System clock wrong by ")? + "System clock wrong by ".len()..];
        rest.split_whitespace().next()?.parse::<f64>().ok()
    });
    match wrong_by {
        Some(w) if out.status.success() => Ok(NtpClientResult {
            offset_s: w,
            delay_s: samples.last().map(|s| s.delay_s),
            raw,
            sync_distance_s: None,
            samples,
        }),
        _ => Err(format!(
            "chronyd -Q produced no measurement ({}):\n{raw}",
            out.status
        )),
    }
}

/// Parses chronyd's measurements.log data lines (header and ==== lines are skipped).
pub fn parse_chrony_measurements(log: &str) -> Vec<ChronySample> {
    log.lines()
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            if t.len() < 18 {
                return None;
            }
            let valid = t[5..8].iter().all(|bits| bits.chars().all(|c| c == '1'));
            Some(ChronySample {
                stratum: t[4].parse().ok()?,
                offset_s: t[11].parse().ok()?,
                delay_s: t[12].parse().ok()?,
                interleaved: t[17].ends_with('I'),
                valid,
            })
        })
        .collect()
}
