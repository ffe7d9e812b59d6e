#!/usr/bin/env bash
# Installs the system tools the integration tests drive (chronyd, ntpdate, sntp, socat, stunnel,
# openssl, systemd-analyze from the systemd package to verify the units, man from man-db, which
# systemd-analyze verify uses to check the units' Documentation= pages, and promtool from the
# prometheus package to lint the metrics, and ip from iproute2 for the network-namespace tests).
# Idempotent: does nothing when they are all present.
# Never leaves a chronyd or prometheus service that the install started running.
set -euo pipefail

packages=(chrony ntpsec-ntpdate sntp socat stunnel4 openssl systemd man-db prometheus iproute2)

# chronyd and ntpdate live in /usr/sbin, which is not in a non-root PATH on Debian.
have() {
    command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 || -x /sbin/$1 ]]
}

missing=()
for cmd in chronyd ntpdate sntp socat openssl systemd-analyze man promtool ip; do
    have "$cmd" || missing+=("$cmd")
done
have stunnel4 || have stunnel || missing+=(stunnel4)

if ((${#missing[@]} == 0)); then
    echo "install-deps: all present (chronyd ntpdate sntp socat stunnel openssl systemd-analyze man promtool ip); nothing to do"
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

# Daemonized chronyd and prometheus processes (parent pid 1), i.e. services, not a test's
# `chronyd -d`.
service_pids() {
    local p comm ppid
    for p in /proc/[0-9]*; do
        read -r _ comm _ ppid _ 2>/dev/null <"$p/stat" || continue
        [[ ($comm == "(chronyd)" || $comm == "(prometheus)") && $ppid == 1 ]] && echo "${p#/proc/}"
    done
    return 0
}

before=" $(service_pids | tr '\n' ' ')"
"${sudo[@]}" apt-get update -qq >/dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

# The chrony and prometheus packages may have started their services: stop only what the
# install started (only promtool is wanted of prometheus).
stopped=""
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    if [[ " ${missing[*]} " == *" chronyd "* ]]; then
        "${sudo[@]}" systemctl disable --now chrony.service >/dev/null 2>&1 || true
    fi
    if [[ " ${missing[*]} " == *" promtool "* ]]; then
        "${sudo[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
fi
for pid in $(service_pids); do
    if [[ $before != *" $pid "* ]]; then
        "${sudo[@]}" kill "$pid" 2>/dev/null || true
        stopped+=" $pid"
    fi
done

echo "install-deps: missing ${missing[*]}; installed ${packages[*]}${stopped:+; stopped services the packages started (pid$stopped)}"
