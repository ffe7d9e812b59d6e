#!/usr/bin/env bash
# Installs the system tools the integration tests drive (chronyd, ntpdate, sntp, socat, stunnel,
# openssl, systemd-analyze from the systemd package to verify the units, and man from man-db,
# which systemd-analyze verify uses to check the units' Documentation= pages). Idempotent: does
# nothing when they are all present. Never leaves a chronyd service that the install started
# holding port 123.
set -euo pipefail

packages=(chrony ntpsec-ntpdate sntp socat stunnel4 openssl systemd man-db)

# chronyd and ntpdate live in /usr/sbin, which is not in a non-root PATH on Debian.
have() {
    command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 || -x /sbin/$1 ]]
}

missing=()
for cmd in chronyd ntpdate sntp socat openssl systemd-analyze man; do
    have "$cmd" || missing+=("$cmd")
done
have stunnel4 || have stunnel || missing+=(stunnel4)

if ((${#missing[@]} == 0)); then
    echo "install-deps: all present (chronyd ntpdate sntp socat stunnel openssl systemd-analyze man); nothing to do"
    exit 0
fi

sudo=()
if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "install-deps: missing ${missing[*]}; not root and no sudo" >&2
        exit 1
    }
    sudo=(sudo)
fi

# Daemonized chronyd processes (parent pid 1), i.e. services, not a test's `chronyd -d`.
chronyd_pids() {
    local p comm ppid
    for p in /proc/[0-9]*; do
        read -r _ comm _ ppid _ 2>/dev/null <"$p/stat" || continue
        [[ $comm == "(chronyd)" && $ppid == 1 ]] && echo "${p#/proc/}"
    done
    return 0
}

before=" $(chronyd_pids | tr '\n' ' ')"
"${sudo[@]}" apt-get update -qq >/dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

# The chrony package may have started its service: stop only what the install started.
stopped=""
if [[ " ${missing[*]} " == *" chronyd "* && -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    "${sudo[@]}" systemctl disable --now chrony.service >/dev/null 2>&1 || true
fi
for pid in $(chronyd_pids); do
    if [[ $before != *" $pid "* ]]; then
        "${sudo[@]}" kill "$pid" 2>/dev/null || true
        stopped+=" $pid"
    fi
done

echo "install-deps: missing ${missing[*]}; installed ${packages[*]}${stopped:+; stopped chronyd started by the package (pid$stopped)}"
