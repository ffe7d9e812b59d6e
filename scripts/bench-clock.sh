#!/usr/bin/env bash
# Clock: real chronyd clients through each path, side by side in one run (issue 16, "Show it").
#
# One chronyd -x time server on a high loopback port; chronyd clients (`chronyd -x -d`: they
# measure, never touch the clock) polling it every second (minpoll 0 maxpoll 0), each basic
# and xleave, all at once:
#   direct       chronyd client -> time server
#   corrected    chronyd client -> ntp-dtls client -> DTLS -> ntp-dtls server -> time server
#                (residence-time correction on: the default once it is built; both devices,
#                basic and xleave, behind one server relay)
#   uncorrected  the same with --no-timestamp-correction on both relays (their own server relay)
#   seed         chronyd client (basic) -> socat udp4-recvfrom,fork -> TCP -> stunnel client ->
#                TLS -> stunnel server -> socat tcp4-listen,fork -> time server (the seed article)
# The table comes from chronyd's own `log measurements` over the window: offset p50, abs(offset)
# p90, delay p50 and the share of interleaved samples. Every process reads one clock, so the
# truth is 0. Then, with the chronyd clients stopped: the paced probe (examples/ntp_probe, 150
# queries one every 20 ms, the paced column of scripts/bench.sh and the idle row of
# scripts/paced-asymmetry.sh) through each basic path, and ntpdate and sntp (5 runs each)
# direct and through both chains (they only query port 123: each gets a client relay, or a
# second time server, on its own 127.77.x.y:123; rows say n/a when port 123 cannot be bound).
#
# If `ntp-dtls client --help` has no --no-timestamp-correction, the relays cannot correct yet:
# the corrected rows say "n/a (correction not built)" and are not run.
#
# DURATION=120 (seconds of the measurement window; default 120), QUICK=1 (or BENCH_QUICK=1 from
# make bench): 30 s. CLOCK_BIN=path runs that ntp-dtls binary instead of building one (to compare
# two builds in alternating runs). CLOCK_KEEP=1 keeps the work directory. Writes target/bench/clock-offset.svg
# (offset over time per basic path) and prints a markdown report on stdout, progress on stderr.
# Every process started here is stopped on exit; every wait is bounded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t_start=$(date +%s)

if [[ ${QUICK:-${BENCH_QUICK:-0}} == 1 ]]; then
    duration=${DURATION:-30}
else
    duration=${DURATION:-120}
fi
[[ $duration =~ ^[0-9]+$ ]] && ((duration >= 5 && duration <= 3600)) ||
    { echo "bench-clock: DURATION must be 5..3600 seconds" >&2; exit 2; }
ntp_runs=5 paced_count=150

note() { printf -- '-- clock: %s\n' "$*" >&2; }
die() {
    printf 'bench-clock: %s\n' "$*" >&2
    exit 1
}

for tool in chronyd ntpdate sntp socat openssl python3 ss setsid timeout; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || {
        note "$tool missing: running scripts/install-deps.sh"
        bash scripts/install-deps.sh >&2
        break
    }
done
chronyd=$(command -v chronyd || echo /usr/sbin/chronyd)
ntpdate=$(command -v ntpdate || echo /usr/sbin/ntpdate)
stunnel=$(command -v stunnel4 || command -v stunnel || true)
[[ -x $chronyd ]] || die "chronyd missing (make deps)"

if [[ -n ${CLOCK_BIN:-} ]]; then
    # A given binary (an A/B comparison of two builds): nothing is built but the probe.
    [[ -x $CLOCK_BIN ]] || die "CLOCK_BIN=$CLOCK_BIN is not an executable"
    bin=$CLOCK_BIN
    cargo build --release --quiet --example ntp_probe
else
    note "building (cargo build --release: ntp-dtls, example ntp_probe)"
    cargo build --release --quiet --bin ntp-dtls --example ntp_probe
    bin=$PWD/target/release/ntp-dtls
fi
probe=$PWD/target/release/examples/ntp_probe
report=$PWD/scripts/clock-report.py
mkdir -p target/bench
svg_out=$PWD/target/bench/clock-offset.svg

corr=0
if "$bin" client --help | grep -q -- --no-timestamp-correction &&
    "$bin" server --help | grep -q -- --no-timestamp-correction; then
    corr=1
fi

work=$(mktemp -d /tmp/ntp-dtls-clock.XXXXXX)
mkdir -p "$work/log"

# Each daemon in its own session and process group, so stopping it stops what it forked.
pgids=()
last_pid=
start_daemon() { # name command...
    local name=$1
    shift
    setsid "$@" >"$work/log/$name.out" 2>&1 </dev/null &
    last_pid=$!
    pgids+=("$last_pid")
}
stop_groups() {
    local g alive
    for g in "$@"; do kill -TERM -- "-$g" 2>/dev/null || true; done
    for _ in $(seq 30); do
        alive=0
        for g in "$@"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for g in "$@"; do kill -KILL -- "-$g" 2>/dev/null || true; done
    for g in "$@"; do wait "$g" 2>/dev/null || true; done
}
sleep_pid=
cleanup() {
    trap - EXIT INT TERM
    [[ -n $sleep_pid ]] && kill "$sleep_pid" 2>/dev/null
    ((${#pgids[@]})) && stop_groups "${pgids[@]}"
    if [[ ${CLOCK_KEEP:-0} == 1 ]]; then note "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port (UDP and TCP), from the kernel; a small race, as in any such script.
free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", p)); print(p)'
}

# Waits (at most $3 s, default 15) for a line containing $2 in $1; prints it.
wait_log() {
    local log=$1 needle=$2 limit=${3:-15} line
    for _ in $(seq $((limit * 10))); do
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$log" 2>/dev/null | grep -m1 -- "$needle" || true)
        [[ -n $line ]] && { echo "$line"; return 0; }
        sleep 0.1
    done
    echo "bench-clock: timed out waiting for '$needle' in $log:" >&2
    tail -20 "$log" >&2 || true
    return 1
}
wait_listen() { # -u|-t port
    for _ in $(seq 100); do
        ss -Hln "$1" "sport = :$2" 2>/dev/null | grep -q . && return 0
        sleep 0.1
    done
    die "nothing listens on port $2 ($1)"
}
listen_of() { sed -n 's/.* listen=\([^ ]*\).*/\1/p' <<<"$1"; }

load() { uptime | sed 's/.*load average/load average/'; }

# ---------------------------------------------------------------------------------------------
note "load before: $(load)"
load_before=$(load)
"$bin" certs --out "$work/pki" --server-name localhost --server-name 127.0.0.1 >/dev/null

ts_port=$(free_port)
cat >"$work/server.conf" <<EOF
port $ts_port
bindaddress 127.0.0.1
allow all
local stratum 2
cmdport 0
pidfile $work/server.pid
EOF
start_daemon timeserver "$chronyd" -x -d -u root -f "$work/server.conf"
wait_log "$work/log/timeserver.out" "chronyd version" >/dev/null || die "time server did not start"
ok=0
for _ in $(seq 50); do
    line=$("$probe" run "127.0.0.1:$ts_port" --count 1 --timeout 0.2 --give-up 1 --max-seconds 2)
    [[ $line == *" valid=1 "* || $line == *" valid=1" ]] && ok=1 && break
    sleep 0.1
done
((ok)) || die "the time server does not answer on 127.0.0.1:$ts_port"
note "time server: chronyd -x on 127.0.0.1:$ts_port"

# The relays set $relay_addr (the address of their ready line). Not called in $(...): a
# daemon started in a subshell would be missing from $pgids and outlive the script.
relay_addr=
server_relay() { # name extra-flags...
    local name=$1 line
    shift
    start_daemon "$name" "$bin" server --listen 127.0.0.1:0 --upstream "127.0.0.1:$ts_port" \
        --cert "$work/pki/server.pem" --key "$work/pki/server.key.pem" "$@"
    line=$(wait_log "$work/log/$name.out" " ready ") || return 1
    relay_addr=$(listen_of "$line")
}
client_relay() { # name listen server extra-flags...
    local name=$1 listen=$2 server=$3 line
    shift 3
    start_daemon "$name" "$bin" client --listen "$listen" --server "$server" \
        --ca "$work/pki/ca.pem" --server-name localhost "$@"
    line=$(wait_log "$work/log/$name.out" " ready ") || return 1
    relay_addr=$(listen_of "$line")
}

nocorr=()
((corr)) && nocorr=(--no-timestamp-correction)
declare -A addr=()
addr[direct]=127.0.0.1:$ts_port
if ((corr)); then
    server_relay server-corrected || die "server relay (corrected) not ready"
    srv_c=$relay_addr
    client_relay client-corrected 127.0.0.1:0 "$srv_c" || die "client relay not ready"
    addr[corrected]=$relay_addr
    client_relay client-corrected-xleave 127.0.0.1:0 "$srv_c" || die "client relay not ready"
    addr[corrected-xleave]=$relay_addr
fi
server_relay server-uncorrected "${nocorr[@]}" || die "server relay (uncorrected) not ready"
srv_u=$relay_addr
client_relay client-uncorrected 127.0.0.1:0 "$srv_u" "${nocorr[@]}" || die "client relay not ready"
addr[uncorrected]=$relay_addr
client_relay client-uncorrected-xleave 127.0.0.1:0 "$srv_u" "${nocorr[@]}" ||
    die "client relay not ready"
addr[uncorrected-xleave]=$relay_addr

seed=0
if [[ -n $stunnel ]] && command -v socat >/dev/null; then
    a=$(free_port) b=$(free_port) c=$(free_port) d=$(free_port)
    openssl req -new -x509 -days 30 -nodes -subj "/CN=localhost" \
        -out "$work/pki/stunnel.pem" -keyout "$work/pki/stunnel.key" 2>/dev/null
    printf 'foreground = yes\npid =\ndebug = 3\n[ntp-server]\naccept = 127.0.0.1:%s\nconnect = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
        "$c" "$d" "$work/pki/stunnel.pem" "$work/pki/stunnel.key" >"$work/stunnel-server.conf"
    printf 'foreground = yes\npid =\ndebug = 3\n[ntp-client]\nclient = yes\naccept = 127.0.0.1:%s\nconnect = 127.0.0.1:%s\n' \
        "$b" "$c" >"$work/stunnel-client.conf"
    # -T 2: socat's children exit after 2 s idle (bounded process count), as in scripts/bench.sh.
    start_daemon seed-socat-udp2tcp socat -T 2 "udp4-recvfrom:$a,bind=127.0.0.1,fork" "tcp4:127.0.0.1:$b"
    start_daemon seed-stunnel-client "$stunnel" "$work/stunnel-client.conf"
    start_daemon seed-stunnel-server "$stunnel" "$work/stunnel-server.conf"
    start_daemon seed-socat-tcp2udp socat -T 2 "tcp4-listen:$d,bind=127.0.0.1,reuseaddr,fork" \
        "udp4:127.0.0.1:$ts_port"
    wait_listen -u "$a"
    for p in "$b" "$c" "$d"; do wait_listen -t "$p"; done
    addr[seed]=127.0.0.1:$a
    seed=1
else
    note "stunnel or socat missing: no seed row (scripts/install-deps.sh installs stunnel4 and socat)"
fi

# ---------------------------------------------------------------------------------------------
# The chronyd clients.
paths=(direct direct-xleave corrected corrected-xleave uncorrected uncorrected-xleave seed)
declare -A run=() why=()
client_pgids=()
for p in "${paths[@]}"; do
    target=${addr[$p]:-${addr[${p%-xleave}]:-}}
    [[ $p == direct-xleave ]] && target=${addr[direct]}
    if [[ $p == corrected* ]] && ((!corr)); then
        why[$p]="n/a (correction not built)"
        continue
    fi
    if [[ $p == seed ]] && ((!seed)); then
        why[$p]="n/a (stunnel/socat missing)"
        continue
    fi
    xl=""
    [[ $p == *-xleave ]] && xl=" xleave"
    dir=$work/c-$p
    mkdir -p "$dir/log"
    cat >"$dir/chrony.conf" <<EOF
server ${target%:*} port ${target##*:} minpoll 0 maxpoll 0$xl
port 0
cmdport 0
pidfile $dir/chronyd.pid
logdir $dir/log
log measurements
EOF
    start_daemon "chronyd-$p" "$chronyd" -x -d -u root -f "$dir/chrony.conf"
    client_pgids+=("$last_pid")
    run[$p]=1
done
note "chronyd clients: ${!run[*]}; waiting for each one's first measurement"
for p in "${!run[@]}"; do
    wait_log "$work/c-$p/log/measurements.log" "127.0.0.1" 30 >/dev/null ||
        die "chronyd client $p logged no measurement in 30 s ($(tail -5 "$work/log/chronyd-$p.out"))"
done
# A few samples to settle (the first xleave exchange is basic by design), then the window.
sleep 3
declare -A first=()
for p in "${!run[@]}"; do first[$p]=$(($(wc -l <"$work/c-$p/log/measurements.log") + 1)); done
window_start=$(date -u '+%Y-%m-%d %H:%M')
note "window: ${duration} s from $(date -u +%H:%M:%S) UTC ($(load))"
# In the background and waited for, so that INT/TERM stop the run at once (bash runs a trap
# only after its foreground command ends).
sleep "$duration" &
sleep_pid=$!
wait "$sleep_pid"
sleep_pid=
declare -A last=()
for p in "${!run[@]}"; do last[$p]=$(wc -l <"$work/c-$p/log/measurements.log"); done
load_during=$(load)
note "window done ($load_during); stopping the chronyd clients"
stop_groups "${client_pgids[@]}"

label() {
    case $1 in
    direct) echo "chronyd direct" ;;
    direct-xleave) echo "chronyd direct, xleave" ;;
    corrected) echo "through ntp-dtls, corrected" ;;
    corrected-xleave) echo "through ntp-dtls, corrected, xleave" ;;
    uncorrected) echo "through ntp-dtls, uncorrected" ;;
    uncorrected-xleave) echo "through ntp-dtls, uncorrected, xleave" ;;
    seed) echo "through the seed's chain (socat+stunnel)" ;;
    esac
}
: >"$work/manifest"
for p in "${paths[@]}"; do
    plot=0
    [[ $p != *-xleave ]] && plot=1
    if [[ -n ${run[$p]:-} ]]; then
        printf '%s\t%s\t%s\t%s\t\t%s\n' "$(label "$p")" "$work/c-$p/log/measurements.log" \
            "${first[$p]}" "${last[$p]}" "$plot" >>"$work/manifest"
    else
        printf '%s\t-\t-\t-\t%s\t0\n' "$(label "$p")" "${why[$p]}" >>"$work/manifest"
    fi
done

# ---------------------------------------------------------------------------------------------
note "paced probe: $paced_count queries, one every 20 ms, per basic path"
declare -A paced=()
for p in direct corrected uncorrected seed; do
    [[ -n ${run[$p]:-} ]] || continue
    paced[$p]=$(timeout -k 2 40 "$probe" run "${addr[$p]}" --count "$paced_count" --interval 0.02 \
        --timeout 0.5 --max-seconds 30 2>/dev/null || echo "status=error")
done

note "ntpdate and sntp, $ntp_runs runs each (port 123 on 127.77.x.y)"
net=$((RANDOM % 200 + 20))
ip123() { echo "127.77.$net.$1"; }
can_bind_123() {
    python3 -c 'import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.bind((sys.argv[1], 123))
except OSError:
    sys.exit(1)' "$1"
}
declare -A ntp_addr=()
if can_bind_123 "$(ip123 1)"; then
    cat >"$work/server123.conf" <<EOF
port 123
bindaddress $(ip123 1)
allow all
local stratum 2
cmdport 0
pidfile $work/server123.pid
EOF
    start_daemon timeserver123 "$chronyd" -x -d -u root -f "$work/server123.conf"
    if wait_log "$work/log/timeserver123.out" "chronyd version" >/dev/null; then
        wait_listen -u 123
        ntp_addr[direct]=$(ip123 1)
    fi
    if ((corr)); then
        client_relay client123-corrected "$(ip123 2):123" "$srv_c" &&
            ntp_addr[corrected]=${relay_addr%:*}
    fi
    client_relay client123-uncorrected "$(ip123 3):123" "$srv_u" "${nocorr[@]}" &&
        ntp_addr[uncorrected]=${relay_addr%:*}
else
    note "cannot bind port 123 (not root, or taken): no ntpdate/sntp rows"
fi
ntp_files=()
for p in direct corrected uncorrected; do
    [[ -n ${ntp_addr[$p]:-} ]] || continue
    for tool in ntpdate sntp; do
        f=$work/$tool\ $p.txt
        : >"$f"
        # One warm-up query each (the relays' first datagram of a tunnel), not counted.
        timeout 5 "$ntpdate" -q "${ntp_addr[$p]}" >/dev/null 2>&1 || true
        for ((i = 0; i < ntp_runs; i++)); do
            echo "=== run $i" >>"$f"
            if [[ $tool == ntpdate ]]; then
                timeout -k 1 8 "$ntpdate" -q -d -t 2 "${ntp_addr[$p]}" >>"$f" 2>&1 || true
            else
                timeout -k 1 8 sntp -d -t 2 "${ntp_addr[$p]}" >>"$f" 2>&1 || true
            fi
            sleep 1 # as a client polls: the relays idle in between
        done
        ntp_files+=("$f")
    done
done

# ---------------------------------------------------------------------------------------------
python3 "$report" svg "$work/manifest" "$svg_out" \
    "chronyd clients polling every second, offset per sample ($window_start UTC, ${duration} s)"

echo
echo "### Clock: real chronyd clients (window from $window_start UTC, ${duration} s)"
echo
echo "Machine: $(nproc) CPUs, $(uname -r), $("$chronyd" -v | head -1 | cut -d' ' -f1-4)."
echo "Load: before $load_before; at the end of the window $load_during."
((corr)) || echo "The relays of this build have no --no-timestamp-correction: no corrected rows."
echo
python3 "$report" table "$work/manifest" 2>"$work/stats"
echo
echo "Paced probe (examples/ntp_probe, $paced_count queries one every 20 ms, after the window):"
echo
echo "| path | valid | delay p50 | offset p50 |"
echo "|---|---:|---:|---:|"
fieldof() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"; }
for p in direct corrected uncorrected seed; do
    if [[ -z ${paced[$p]:-} ]]; then
        echo "| $(label "$p") | ${why[$p]:-n/a} | | |"
        continue
    fi
    l=${paced[$p]}
    echo "| $(label "$p") | $(fieldof "$l" valid) | $(fieldof "$l" delay_p50_us) us | $(fieldof "$l" offset_p50_us) us |"
done
echo
echo "ntpdate -q -d and sntp -d (ntpsec's ntpdig), $ntp_runs runs each, one a second; median (min .. max):"
echo
echo "| tool, path | runs | offset | delay (t1..t4) |"
echo "|---|---:|---:|---:|"
if ((${#ntp_files[@]})); then
    python3 "$report" ntpdig "${ntp_files[@]}"
else
    echo "| n/a (port 123 not available) | | | |"
fi
((corr)) || echo "| ntpdate/sntp, corrected | n/a (correction not built) | | |"

# ---------------------------------------------------------------------------------------------
stat_of() { # path key
    local l
    l=$(grep "^STATS label=$(label "$1" | tr ' ' _) " "$work/stats" || true)
    fieldof "$l" "$2"
}
verdict() { if [[ $1 == 1 ]]; then echo PASS; else echo MISS; fi; }
echo
echo "Targets of issue 16 (through the corrected chain; the issue asks for an idle machine):"
echo
if ((corr)); then
    for x in "" -xleave; do
        o=$(stat_of "corrected$x" off50) a=$(stat_of "corrected$x" abs90) d=$(stat_of "corrected$x" del50)
        il=$(stat_of "corrected$x" ileave) dil=$(stat_of "direct$x" ileave)
        m=${x:+, xleave}
        ok=$(awk -v v="$o" 'BEGIN { print (v != "-" && v != "" && (v < 0 ? -v : v) <= 3e-6) ? 1 : 0 }')
        echo "- $(verdict "$ok") abs(offset p50) <= 3 us$m: $(awk -v v="$o" 'BEGIN { printf "%+.1f us", v * 1e6 }')"
        ok=$(awk -v v="$a" 'BEGIN { print (v != "-" && v != "" && v <= 10e-6) ? 1 : 0 }')
        echo "- $(verdict "$ok") abs(offset) p90 <= 10 us$m: $(awk -v v="$a" 'BEGIN { printf "%.1f us", v * 1e6 }')"
        ok=$(awk -v v="$d" 'BEGIN { print (v != "-" && v != "" && v <= 40e-6) ? 1 : 0 }')
        echo "- $(verdict "$ok") delay p50 <= 40 us$m: $(awk -v v="$d" 'BEGIN { printf "%.1f us", v * 1e6 }')"
        [[ -n $x ]] || continue # the interleaved share only means something for xleave
        ok=$(awk -v a="$il" -v b="$dil" 'BEGIN { if (a == "-" || b == "-" || a == "" || b == "") { print 0; exit } d = a - b; print ((d < 0 ? -d : d) <= 2) ? 1 : 0 }')
        echo "- $(verdict "$ok") interleaved share within 2 points of direct's$m: $(awk -v a="$il" -v b="$dil" 'BEGIN { printf "%.1f%% vs %.1f%%", a, b }')"
    done
else
    echo "- n/a: correction not built in this tree (no --no-timestamp-correction)"
fi
echo
echo "Plot: $svg_out (offset over time, the basic paths)."
echo "bench-clock: done in $(($(date +%s) - t_start)) s"
