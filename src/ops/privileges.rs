//! Dropping root: a daemon started as root (to bind port 123 without systemd) switches to an
//! unprivileged user once its sockets are bound.
//!
//! Under systemd this is not needed: the units run as their own user with only
//! CAP_NET_BIND_SERVICE (see dist/systemd/).
//!
//! The switch is process-wide: glibc's setuid/setgid/setgroups apply to every thread, so the
//! tokio runtime's threads (if any) change with the calling one.

use nix::unistd::{self, Gid, Group, Uid, User};

/// Why the switch to an unprivileged user failed. Every variant names the user.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("user {user:?}: no such user")]
    UnknownUser { user: String },
    #[error("user {user:?}: cannot look up the user database: {source}")]
    Lookup { user: String, source: nix::Error },
    #[error("user {user:?}: is root (uid 0); name an unprivileged user to switch to")]
    TargetIsRoot { user: String },
    #[error("cannot switch to user {user:?}: running as uid {uid}, not root")]
    NotRoot { user: String, uid: u32 },
    #[error("cannot switch to user {user:?}: {step} failed: {source}")]
    Switch {
        user: String,
        step: &'static str,
        source: nix::Error,
    },
    #[error("switched to user {user:?} but {what}: refusing to run")]
    NotDropped { user: String, what: String },
}

/// The identity a process takes on: the user, its primary group and its supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Every group the user is in, the primary group included (as getgrouplist returns them).
    pub groups: Vec<u32>,
}

/// Looks up `user` in the user database (by name, or by number if it is all digits and no user
/// has that name).
pub fn lookup(user: &str) -> Result<Account, PrivilegeError> {
    let lookup_error = |source| PrivilegeError::Lookup {
        user: user.to_string(),
        source,
    };
    let mut entry = User::from_name(user).map_err(lookup_error)?;
    if entry.is_none() {
        if let Ok(uid) = user.parse::<u32>() {
            entry = User::from_uid(Uid::from_raw(uid)).map_err(lookup_error)?;
        }
    }
    let entry = entry.ok_or_else(|| PrivilegeError::UnknownUser {
        user: user.to_string(),
    })?;
    let groups = supplementary_groups(&entry)
        .map_err(lookup_error)?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    Ok(Account {
        name: entry.name,
        uid: entry.uid.as_raw(),
        gid: entry.gid.as_raw(),
        groups,
    })
}

fn supplementary_groups(user: &User) -> nix::Result<Vec<Gid>> {
    let name = std::ffi::CString::new(user.name.as_bytes()).map_err(|_| nix::Error::EINVAL)?;
    let mut groups = unistd::getgrouplist(&name, user.gid)?;
    if !groups.contains(&user.gid) {
        groups.insert(0, user.gid);
    }
    Ok(groups)
}

/// Switches this root process to `user`: supplementary groups (the user's, from the group
/// database), then the primary group, then the user id, real, effective and saved. Then checks
/// that it stuck: the ids are the user's and `setuid(0)` fails.
///
/// Call it once every privileged socket is bound and every key file read (after the switch the
/// process may no longer read root-only files; reloads then need the files readable by `user`).
pub fn drop_to(user: &str) -> Result<(), PrivilegeError> {
    let account = lookup(user)?;
    if account.uid == 0 {
        return Err(PrivilegeError::TargetIsRoot {
            user: user.to_string(),
        });
    }
    let current = unistd::geteuid();
    if !current.is_root() {
        return Err(PrivilegeError::NotRoot {
            user: user.to_string(),
            uid: current.as_raw(),
        });
    }
    let switch = |step: &'static str| {
        move |source| PrivilegeError::Switch {
            user: user.to_string(),
            step,
            source,
        }
    };
    let groups: Vec<Gid> = account.groups.iter().copied().map(Gid::from_raw).collect();
    unistd::setgroups(&groups).map_err(switch("setgroups"))?;
    let gid = Gid::from_raw(account.gid);
    unistd::setresgid(gid, gid, gid).map_err(switch("setresgid"))?;
    let uid = Uid::from_raw(account.uid);
    unistd::setresuid(uid, uid, uid).map_err(switch("setresuid"))?;
    verify(user, &account)
}

/// The checks after the switch: no way back to root, and the ids are the ones asked for.
fn verify(user: &str, account: &Account) -> Result<(), PrivilegeError> {
    let not_dropped = |what: String| PrivilegeError::NotDropped {
        user: user.to_string(),
        what,
    };
    if unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(not_dropped("setuid(0) still succeeds".into()));
    }
    if unistd::setgid(Gid::from_raw(0)).is_ok() && account.gid != 0 {
        return Err(not_dropped("setgid(0) still succeeds".into()));
    }
    let ids = (
        unistd::getuid().as_raw(),
        unistd::geteuid().as_raw(),
        unistd::getgid().as_raw(),
        unistd::getegid().as_raw(),
    );
    if ids != (account.uid, account.uid, account.gid, account.gid) {
        return Err(not_dropped(format!(
            "uid/euid/gid/egid are {}/{}/{}/{}, not {}/{}/{}/{}",
            ids.0, ids.1, ids.2, ids.3, account.uid, account.uid, account.gid, account.gid
        )));
    }
    Ok(())
}

/// A file `account` could not read: the path component that stops it, its owner and mode,
/// and the usual fix. One line, for a log line or `--check`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{path}: user {user} cannot read it ({blocked} is {owner}:{group}, mode {mode:04o}) and the \
     daemon reads it again at every SIGHUP: chgrp {user_group} {blocked} && chmod {fix_mode} {blocked}"
)]
pub struct Unreadable {
    pub path: String,
    pub user: String,
    /// The file itself, or the directory on its way that `user` may not enter.
    pub blocked: String,
    pub owner: String,
    pub group: String,
    pub mode: u32,
    /// The user's primary group, to give the file to.
    pub user_group: String,
    /// 0640 for a file, 0750 for a directory.
    pub fix_mode: String,
}

/// Whether `account` may read `path`, by the owner, group and mode of the file and of every
/// directory on its way (POSIX permission bits; ACLs are not consulted). Root reads anything.
pub fn readable_by(account: &Account, path: &std::path::Path) -> Result<(), Box<Unreadable>> {
    use std::os::unix::fs::MetadataExt;
    if account.uid == 0 {
        return Ok(());
    }
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut components: Vec<&std::path::Path> = absolute.ancestors().collect();
    components.reverse();
    for component in components {
        // What cannot be looked at is not this check's business: loading the file reports it.
        let Ok(meta) = std::fs::metadata(component) else {
            return Ok(());
        };
        let is_dir = meta.is_dir() && component != absolute.as_path();
        let needed = if is_dir { 0o1 } else { 0o4 };
        let mode = meta.mode() & 0o7777;
        let bits = if meta.uid() == account.uid {
            mode >> 6
        } else if account.groups.contains(&meta.gid()) || meta.gid() == account.gid {
            mode >> 3
        } else {
            mode
        };
        if bits & needed == 0 {
            let owner = User::from_uid(Uid::from_raw(meta.uid()))
                .ok()
                .flatten()
                .map_or_else(|| meta.uid().to_string(), |u| u.name);
            return Err(Box::new(Unreadable {
                path: path.display().to_string(),
                user: account.name.clone(),
                blocked: component.display().to_string(),
                owner,
                group: group_name(meta.gid()),
                mode,
                user_group: group_name(account.gid),
                fix_mode: if is_dir { "0750" } else { "0640" }.into(),
            }));
        }
    }
    Ok(())
}

/// The name of the group `gid`, for logs ("nogroup"), or its number.
pub fn group_name(gid: u32) -> String {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(group)) => group.name,
        _ => gid.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_SUCH_USER: &str = "ntp-dtls-no-such-user";

    #[test]
    fn root_is_found_by_name_and_number() {
        let root = lookup("root").expect("root exists");
        assert_eq!((root.name.as_str(), root.uid, root.gid), ("root", 0, 0));
        assert!(root.groups.contains(&0), "{root:?}");
        assert_eq!(lookup("0").expect("uid 0").name, "root");
        assert_eq!(group_name(0), "root");
    }

    #[test]
    fn nobody_is_an_unprivileged_user() {
        // Debian's base-passwd has nobody (65534) in nogroup (65534).
        let nobody = lookup("nobody").expect("nobody exists");
        assert_ne!(nobody.uid, 0);
        assert!(nobody.groups.contains(&nobody.gid), "{nobody:?}");
    }

    #[test]
    fn an_unknown_user_is_an_error_naming_it() {
        let err = lookup(NO_SUCH_USER).expect_err("unknown user");
        assert!(matches!(err, PrivilegeError::UnknownUser { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("user {NO_SUCH_USER:?}: no such user")
        );
        // drop_to looks the user up before it changes anything.
        let err = drop_to(NO_SUCH_USER).expect_err("unknown user");
        assert!(err.to_string().contains(NO_SUCH_USER), "{err}");
        let err = lookup("4294967000").expect_err("unknown uid");
        assert!(err.to_string().contains("4294967000"), "{err}");
    }

    #[test]
    fn switching_to_root_is_refused_before_anything_changes() {
        let err = drop_to("root").expect_err("root is not a target");
        assert!(
            matches!(err, PrivilegeError::TargetIsRoot { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"root\""), "{err}");
    }

    /// The real switch, in a child process (this test binary again, running only the ignored
    /// `child_drops_to_nobody`), so this process keeps its privileges.
    #[test]
    fn a_root_process_drops_to_nobody_for_good() {
        if !unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI must run as root");
            let err = drop_to("nobody").expect_err("not root");
            assert!(matches!(err, PrivilegeError::NotRoot { .. }), "{err:?}");
            eprintln!("a_root_process_drops_to_nobody_for_good: not root, checked NotRoot only");
            return;
        }
        let exe = std::env::current_exe().expect("test binary");
        // The test's path inside the crate, wherever the module lives.
        let module = module_path!().split_once("::").map_or("", |(_, path)| path);
        let child = format!("{module}::child_drops_to_nobody");
        let output = std::process::Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                child.as_str(),
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The child really ran (one test, not zero filtered in) and got to its end.
        assert!(
            output.status.success()
                && stdout.contains("test result: ok. 1 passed")
                && stdout.contains("dropped to nobody"),
            "child failed:\n{stdout}\n{stderr}"
        );
    }

    #[test]
    fn readability_follows_owner_group_and_mode_along_the_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ntp-dtls-perm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("keys")).expect("dirs");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let key = dir.join("keys/server.key.pem");
        std::fs::write(&key, "k").expect("write");
        let me = lookup(&unistd::geteuid().as_raw().to_string()).expect("me");
        // Somebody else: nobody, in none of the file's groups unless the file is world-readable.
        let nobody = lookup("nobody").expect("nobody");
        let set = |path: &std::path::Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        set(&dir.join("keys"), 0o755);
        set(&key, 0o600);
        assert_eq!(readable_by(&lookup("root").expect("root"), &key), Ok(()));
        if me.uid != 0 {
            assert_eq!(readable_by(&me, &key), Ok(()));
        }
        let err = readable_by(&nobody, &key).expect_err("0600 is the owner's");
        assert_eq!(err.blocked, key.display().to_string());
        assert_eq!(err.fix_mode, "0640");
        let line = err.to_string();
        assert!(
            line.contains("user nobody cannot read it")
                && line.contains("mode 0600")
                && line.contains(&format!("chgrp {} ", group_name(nobody.gid)))
                && line.contains("chmod 0640"),
            "{line}"
        );
        set(&key, 0o644);
        assert_eq!(readable_by(&nobody, &key), Ok(()));
        // A directory on the way that nobody may not enter.
        set(&dir.join("keys"), 0o750);
        let err = readable_by(&nobody, &key).expect_err("0750 directory");
        assert_eq!(err.blocked, dir.join("keys").display().to_string());
        assert_eq!(err.fix_mode, "0750");
        let _ = std::fs::remove_dir_all(&dir);
    }

    const CHILD_ENV: &str = "NTP_DTLS_PRIVILEGES_CHILD";

    /// The child of `a_root_process_drops_to_nobody_for_good`, which runs it with `--ignored
    /// --exact`. Ignored otherwise: run as root in the test process itself, it would drop every
    /// other test in that process to nobody for good.
    #[test]
    #[ignore = "drops the test process to nobody: run by a_root_process_drops_to_nobody_for_good"]
    fn child_drops_to_nobody() {
        assert!(
            std::env::var_os(CHILD_ENV).is_some(),
            "run only as the child of a_root_process_drops_to_nobody_for_good ({CHILD_ENV}=1)"
        );
        let nobody = lookup("nobody").expect("nobody");
        drop_to("nobody").expect("drop to nobody");
        assert_eq!(unistd::geteuid().as_raw(), nobody.uid);
        assert_eq!(unistd::getegid().as_raw(), nobody.gid);
        assert!(unistd::setuid(Uid::from_raw(0)).is_err());
        let groups: Vec<u32> = unistd::getgroups()
            .expect("getgroups")
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        assert!(!groups.contains(&0), "still in group root: {groups:?}");
        // A second drop cannot work: we are no longer root.
        assert!(matches!(
            drop_to("nobody"),
            Err(PrivilegeError::NotRoot { .. })
        ));
        println!("dropped to nobody");
    }
}
