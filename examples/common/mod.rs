//! Helpers shared by the benchmark examples (`ntp_probe`, `dtls_load`). Not part of the product.
#![allow(dead_code)] // each example uses a different part

use std::fmt::Write as _;
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use nix::sys::time::TimeSpec;
use ntp_dtls::proto::ntp::NtpTimestamp;

/// Nearest-rank percentile of an ascending slice; NaN when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts in place (NaNs last) and returns (p50, p99).
pub fn p50_p99(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    (percentile(values, 0.50), percentile(values, 0.99))
}

/// Formats a number for key=value output: "-" when not a number.
pub fn num(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "-".into()
    }
}

/// Appends " key=value" to a line.
pub fn kv(line: &mut String, key: &str, value: impl std::fmt::Display) {
    let _ = write!(line, " {key}={value}");
}

pub fn ntp_now() -> NtpTimestamp {
    NtpTimestamp::from_system_time(SystemTime::now())
}

fn ntp_from_timespec(ts: &TimeSpec) -> NtpTimestamp {
    let t = UNIX_EPOCH + Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32);
    NtpTimestamp::from_system_time(t)
}

/// Asks the kernel to stamp every datagram received on `socket` (SO_TIMESTAMPNS, CLOCK_REALTIME),
/// as chronyd does for its receive timestamps.
pub fn enable_rx_timestamps(socket: &impl AsFd) -> io::Result<()> {
    setsockopt(socket, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)
}

/// One datagram and when it arrived: the kernel's timestamp if it gave one, else the clock read
/// right after the system call (`kernel` says which).
pub struct Received {
    pub len: usize,
    pub at: NtpTimestamp,
    pub kernel: bool,
}

/// Non-blocking recvmsg with the receive timestamp; Err(WouldBlock) when nothing is queued.
pub fn recv_stamped(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = nix::cmsg_space!(TimeSpec);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)
        .map_err(io::Error::from)?;
    let kernel = msg.cmsgs().ok().and_then(|mut cmsgs| {
        cmsgs.find_map(|c| match c {
            ControlMessageOwned::ScmTimestampns(ts) => Some(ntp_from_timespec(&ts)),
            _ => None,
        })
    });
    let len = msg.bytes;
    Ok(match kernel {
        Some(at) => Received {
            len,
            at,
            kernel: true,
        },
        None => Received {
            len,
            at: ntp_now(),
            kernel: false,
        },
    })
}

/// Raises the soft limit on open files to at least `want` (up to the hard limit); returns the
/// new soft limit.
pub fn raise_nofile(want: u64) -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft >= want {
        return Ok(soft);
    }
    let new = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, new, hard).map_err(io::Error::from)?;
    Ok(new)
}

/// Resident set size of a process in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU time a process has used, all threads, in nanoseconds (/proc/PID/task/*/schedstat).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}
