#!/usr/bin/env bash
# The "under attack" section of `make bench` (issue 10): a legitimate NTP client polls through
# the chain (client relay -> DTLS -> server relay -> chronyd -x) every 20 ms while each attack
# runs at the issue's rate, against the same with no attack. Columns: legitimate replies/s, p50
# and max delay, p50 offset, the relays' CPU over the phase, and what the attack sent.
#
#   chains   ClientHello fragment chains (2 500 one-byte fragments of a claimed 60 000-byte
#            ClientHello) from 127.0.0.2-5, 4 chains/s              (finding 1)
#   epoch0   forged epoch-0 fragment chains and zero-length fragments from the device's
#            address, 1 flight of 977 datagrams/s (finding 2; raw socket, root)
#   icmp     forged port unreachables at the device's upstream socket, 1 000/s
#            (finding 3's sweep, aimed at the right port; raw ICMP, root)
#   amplify  one ClientHello, then 26-byte ClientHello fragments, 200/s; bytes out vs in
#            (finding 4)
#   ignored  49-byte requests chronyd ignores, 2/s through the client relay (finding 5)
#
# BENCH_ATTACK_SECONDS (default 10; BENCH_QUICK=1: 4) per phase. Every process started here is
# stopped on exit; every attack is bounded by its duration.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs=${BENCH_ATTACK_SECONDS:-10}
[[ ${BENCH_QUICK:-0} == 1 ]] && secs=${BENCH_ATTACK_SECONDS:-4}

note() { printf -- '-- %s\n' "$*" >&2; }
die() {
    printf 'bench-attack: %s\n' "$*" >&2
    exit 1
}

chronyd=$(command -v chronyd || echo /usr/sbin/chronyd)
[[ -x $chronyd ]] || die "chronyd missing (scripts/install-deps.sh)"
note "building (cargo build --release: ntp-dtls, examples ntp_probe and attack)"
cargo build --release --quiet --bin ntp-dtls --example ntp_probe --example attack
bin=$PWD/target/release/ntp-dtls
probe=$PWD/target/release/examples/ntp_probe
attack=$PWD/target/release/examples/attack

work=$(mktemp -d /tmp/ntp-dtls-bench-attack.XXXXXX)
mkdir -p "$work/log"
pids=()
start_daemon() { # name command...
    local name=$1
    shift
    setsid "$@" >"$work/log/$name.log" 2>&1 </dev/null &
    last_pid=$!
    pids+=("$last_pid")
}
cleanup() {
    trap - EXIT INT TERM
    local p
    for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then note "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_log() { # log needle: the first matching line, within 15 s
    local line
    for _ in $(seq 150); do
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | grep -m1 -- "$2" || true)
        [[ -n $line ]] && {
            echo "$line"
            return 0
        }
        sleep 0.1
    done
    cat "$1" >&2
    die "timed out waiting for '$2' in $1"
}
field() { # line key
    local v
    v=$(sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1")
    echo "${v:--}"
}
cpu_ns() { # pid: CPU time of every thread, from schedstat
    local total=0 t v
    for t in /proc/"$1"/task/*/schedstat; do
        read -r v _ <"$t" 2>/dev/null && total=$((total + v))
    done
    echo "$total"
}

# chronyd -x on a free high loopback port
used=$(ss -Htuan 2>/dev/null | awk '{print $5}' | sed 's/.*://')
for _ in $(seq 200); do
    ch_port=$((20000 + RANDOM % 12000))
    grep -qx "$ch_port" <<<"$used" || break
done
cat >"$work/chrony.conf" <<CONF
port $ch_port
bindaddress 127.0.0.1
allow all
local stratum 2
cmdport 0
pidfile $work/chronyd.pid
CONF
start_daemon chronyd "$chronyd" -x -d -u root -f "$work/chrony.conf"
wait_log "$work/log/chronyd.log" "chronyd version" >/dev/null

"$bin" certs --out "$work/pki" --server-name localhost >/dev/null
start_daemon server "$bin" server --listen 127.0.0.1:0 --upstream "127.0.0.1:$ch_port" \
    --cert "$work/pki/server.pem" --key "$work/pki/server.key.pem"
server_pid=$last_pid
server_addr=$(wait_log "$work/log/server.log" " ready " | sed -n 's/.* listen=\([^ ]*\).*/\1/p')
start_daemon client "$bin" client --listen 127.0.0.1:0 --server "$server_addr" \
    --ca "$work/pki/ca.pem" --server-name localhost
client_pid=$last_pid
client_addr=$(wait_log "$work/log/client.log" " ready " | sed -n 's/.* listen=\([^ ]*\).*/\1/p')
device=$(wait_log "$work/log/server.log" "association established" |
    sed -n 's/.* peer=\([^ ]*\).*/\1/p')
for _ in $(seq 50); do
    line=$("$probe" run "$client_addr" --count 1 --timeout 0.5 --give-up 1 --max-seconds 2)
    [[ $(field "$line" valid) == 1 ]] && break
    sleep 0.1
done
note "chain up: client relay $client_addr -> server relay $server_addr (device $device) -> chronyd 127.0.0.1:$ch_port"

root=0
[[ $(id -u) == 0 ]] && root=1
rows=()
phase() { # name attack-args...
    local name=$1
    shift
    if [[ $name == epoch0 || $name == icmp ]] && ((!root)); then
        rows+=("| $name | skipped: needs root (raw sockets) | | | | | | |")
        return
    fi
    local s0 c0 s1 c1 out="" line max
    s0=$(cpu_ns "$server_pid") c0=$(cpu_ns "$client_pid")
    if (($#)); then
        timeout -k 2 $((secs + 10)) "$attack" "$@" --duration "$secs" >"$work/$name.attack" 2>&1 &
        local apid=$!
    fi
    line=$("$probe" run "$client_addr" --interval 0.02 --duration "$secs" --timeout 1 \
        --give-up 0 --max-seconds $((secs + 10)) --samples "$work/$name.samples")
    if (($#)); then
        wait "$apid" || true
        out=$(tr '\n' ' ' <"$work/$name.attack" | sed 's/attack=[^ ]* //')
    fi
    s1=$(cpu_ns "$server_pid") c1=$(cpu_ns "$client_pid")
    max=$(awk '!/^#/ && NF == 2 && $1 > m {m = $1} END {printf "%.2f", m / 1e6}' "$work/$name.samples")
    rows+=("$(printf '| %s | %s/%s | %s | %.2f | %s | %.3f | %.3f | %.3f | %s |' \
        "$name" "$(field "$line" valid)" "$(field "$line" sent)" "$(field "$line" rate)" \
        "$(awk -v d="$(field "$line" delay_p50_us)" 'BEGIN {print d / 1e3}')" "$max" \
        "$(awk -v o="$(field "$line" offset_p50_us)" 'BEGIN {print o / 1e3}')" \
        "$(awk -v a="$s0" -v b="$s1" 'BEGIN {print (b - a) / 1e9}')" \
        "$(awk -v a="$c0" -v b="$c1" 'BEGIN {print (b - a) / 1e9}')" "${out:--}")")
    note "$name: $line ${out}"
}

note "each phase: ${secs} s, a legitimate client polling every 20 ms"
phase none
phase chains chains --target "$server_addr" --rate 4
phase epoch0 epoch0 --from "$device" --target "$server_addr" --rate 1
phase icmp icmp --device "$device" --server "$server_addr" --rate 1000
phase amplify amplify --target "$server_addr" --ca "$work/pki/ca.pem" --rate 200
phase ignored ignored --target "$client_addr"

closed=$(cat "$work/log/client.log" "$work/log/server.log" | grep -c "association closed" || true)
made=$(grep -c "association established" "$work/log/client.log" || true)

echo
echo "## Under attack (issue 10)"
echo
echo "A legitimate client (examples/ntp_probe, one query every 20 ms) through client relay ->"
echo "server relay -> chronyd -x, ${secs} s per row, each attack at the rate of the issue's"
echo "finding. CPU: the relay's CPU-seconds over the row (all threads)."
echo
echo "| attack | replies/sent | replies/s | delay p50 ms | delay max ms | offset p50 ms | server CPU s | client CPU s | attack sent |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
echo
echo "Associations torn down over the run: $closed; client associations made: $made (1 = none replaced)."
