//! The `process_*` metrics, as every Prometheus client library exports them, read from
//! /proc/self: resident and virtual memory, CPU time, open and maximum file descriptors, and
//! the start time.

use std::path::Path;

use super::state::ProcessStats;

/// This process now; None when /proc/self/stat cannot be read or parsed (no procfs).
pub fn read() -> Option<ProcessStats> {
    read_from(Path::new("/proc"), ticks_per_second(), page_size())
}

fn ticks_per_second() -> f64 {
    use nix::unistd::{SysconfVar, sysconf};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        // USER_HZ, fixed by the kernel ABI on every architecture we build for.
        _ => 100.0,
    }
}

fn page_size() -> u64 {
    use nix::unistd::{SysconfVar, sysconf};
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) if size > 0 => size as u64,
        _ => 4096,
    }
}

/// The same, from a procfs mounted at `proc` (tests give a directory of their own).
fn read_from(proc: &Path, ticks: f64, page: u64) -> Option<ProcessStats> {
    let stat = std::fs::read_to_string(proc.join("self/stat")).ok()?;
    // The command name is in parentheses and may contain spaces and parentheses itself: the
    // fields proper start after the last ')'. Counted from there, field 3 of proc(5) is [0].
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let utime = field(14)?;
    let stime = field(15)?;
    let start_ticks = field(22)?;
    let virtual_bytes = field(23)?;
    let rss_pages = field(24)?;
    let boot_time = std::fs::read_to_string(proc.join("stat"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("btime "))
                .and_then(|value| value.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let open_fds = std::fs::read_dir(proc.join("self/fd"))
        .map(|dir| dir.count() as u64)
        .unwrap_or(0);
    let max_fds = std::fs::read_to_string(proc.join("self/limits"))
        .ok()
        .and_then(|text| max_open_files(&text));
    Some(ProcessStats {
        resident_memory_bytes: rss_pages.saturating_mul(page),
        virtual_memory_bytes: virtual_bytes,
        cpu_seconds: (utime + stime) as f64 / ticks,
        open_fds,
        max_fds,
        start_time_seconds: boot_time as f64 + start_ticks as f64 / ticks,
    })
}

/// The soft limit of "Max open files" in /proc/self/limits; None when unlimited or absent.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_read_from_proc() {
        let stats = read().expect("/proc/self readable");
        assert!(stats.resident_memory_bytes > 1024 * 1024, "{stats:?}");
        assert!(stats.virtual_memory_bytes >= stats.resident_memory_bytes);
        assert!(stats.open_fds >= 3, "{stats:?}");
        assert!(stats.max_fds.is_some_and(|max| max >= stats.open_fds));
        let now = super::super::state::unix_now() as f64;
        // Started since boot, and not in the future (a second of slack for the tick rounding).
        assert!(
            stats.start_time_seconds > 1e9 && stats.start_time_seconds <= now + 1.0,
            "{stats:?} now {now}"
        );
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_is_skipped() {
        let dir = std::env::temp_dir().join(format!("ntp-dtls-proc-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("self/fd")).expect("dirs");
        // Fields 3..=24 after the name: state, ppid, ..., utime (14) = 250, stime (15) = 50,
        // starttime (22) = 1000, vsize (23) = 8192000, rss (24) = 300 pages.
        let mut rest: Vec<String> = (3..=52).map(|_| "0".to_string()).collect();
        rest[0] = "S".into();
        rest[14 - 3] = "250".into();
        rest[15 - 3] = "50".into();
        rest[22 - 3] = "1000".into();
        rest[23 - 3] = "8192000".into();
        rest[24 - 3] = "300".into();
        let stat = format!("4242 (ntp (dtls) x) {}\n", rest.join(" "));
        std::fs::write(dir.join("self/stat"), stat).expect("stat");
        std::fs::write(dir.join("stat"), "cpu 1 2 3\nbtime 1700000000\n").expect("stat");
        std::fs::write(
            dir.join("self/limits"),
            "Limit                     Soft Limit           Hard Limit           Units\n\
             Max open files            1024                 524288               files\n",
        )
        .expect("limits");
        std::fs::write(dir.join("self/fd/0"), "").expect("fd");
        let stats = read_from(&dir, 100.0, 4096).expect("parsed");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(stats.cpu_seconds, 3.0);
        assert_eq!(stats.resident_memory_bytes, 300 * 4096);
        assert_eq!(stats.virtual_memory_bytes, 8_192_000);
        assert_eq!(stats.start_time_seconds, 1_700_000_010.0);
        assert_eq!(stats.max_fds, Some(1024));
        assert_eq!(stats.open_fds, 1);
    }

    #[test]
    fn unlimited_files_have_no_maximum() {
        assert_eq!(
            max_open_files("Max open files            unlimited            unlimited  files\n"),
            None
        );
    }
}
