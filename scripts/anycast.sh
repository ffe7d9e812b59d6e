#!/usr/bin/env bash
# Anycast server relays in network namespaces: three server relays (each with its own chronyd -x)
# announce one address; a router namespace spreads clients over them by a hash of the 5-tuple
# (a resilient multipath nexthop group, net.ipv4.fib_multipath_hash_policy=1); a client namespace
# holds a few hundred client associations (several `ntp-dtls client` processes, one tunnel and
# so one source port each) polled once a second by a small NTP poller. Then one relay is killed
# and its route withdrawn, as a health-checking routing daemon would, and the script measures
# how long its clients take to re-handshake to the survivors and whether any other client missed
# a reply.
#
#   sudo scripts/anycast.sh            # NTP_DTLS_BIN=path, TUNNELS=300, PROCS=3, AFTER=25,
#                                      # HANDSHAKE_RATE=N (per-source limit, see below)
#
# Needs root, ip (iproute2), chronyd, python3. Bounded: the poller runs WARM+AFTER seconds; every
# namespace and process it made is removed on exit (trap).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${NTP_DTLS_BIN:-}
if [[ -z $bin ]]; then
    if [[ -x $here/target/release/ntp-dtls ]]; then bin=$here/target/release/ntp-dtls; else bin=$here/target/debug/ntp-dtls; fi
fi
tunnels=${TUNNELS:-300}
procs=${PROCS:-3}
warm=${WARM:-10}
after=${AFTER:-25}
((tunnels >= procs && tunnels <= 3000)) || { echo "TUNNELS must be $procs..3000" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "anycast.sh: needs root (network namespaces)" >&2; exit 2; }
for t in ip chronyd python3; do command -v "$t" >/dev/null || [[ -x /usr/sbin/$t ]] || { echo "anycast.sh: $t missing" >&2; exit 2; }; done
[[ -x $bin ]] || { echo "anycast.sh: no binary at $bin (cargo build --release)" >&2; exit 2; }
PATH=$PATH:/usr/sbin:/sbin

tag=ac$$
work=$(mktemp -d /tmp/anycast.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in r c s1 s2 s3; do ip netns del "$tag-$ns" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

anycast=10.99.0.1
# In the foreground only: a background job must be `ip netns exec` itself, which execs the
# program, so that $! is the program's pid (a function would run in a subshell around it).
nsx() { local ns=$1; shift; ip netns exec "$tag-$ns" "$@"; }
for ns in r c s1 s2 s3; do
    ip netns add "$tag-$ns"
    ip -n "$tag-$ns" link set lo up
done
# client <-> router
ip -n "$tag-r" link add rc type veth peer name c0 netns "$tag-c"
ip -n "$tag-r" addr add 10.90.0.1/24 dev rc && ip -n "$tag-r" link set rc up
ip -n "$tag-c" addr add 10.90.0.2/24 dev c0 && ip -n "$tag-c" link set c0 up
ip -n "$tag-c" route add default via 10.90.0.1
nsx r sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1
# router <-> each server relay; the anycast address on each server's loopback
for i in 1 2 3; do
    ip -n "$tag-r" link add "r$i" type veth peer name s0 netns "$tag-s$i"
    ip -n "$tag-r" addr add "10.91.$i.1/24" dev "r$i" && ip -n "$tag-r" link set "r$i" up
    ip -n "$tag-s$i" addr add "10.91.$i.2/24" dev s0 && ip -n "$tag-s$i" link set s0 up
    ip -n "$tag-s$i" addr add "$anycast/32" dev lo
    ip -n "$tag-s$i" route add default via "10.91.$i.1"
    ip -n "$tag-r" nexthop add id "$i" via "10.91.$i.2" dev "r$i"
done
# A resilient group: withdrawing one nexthop moves only its buckets, every other flow stays
# where it is (hash-threshold groups would reshuffle survivors' flows too).
ip -n "$tag-r" nexthop add id 100 group 1/2/3 type resilient buckets 240
ip -n "$tag-r" route add "$anycast/32" nhid 100

# All client associations come from one address here (as from behind a NAT), so each relay's
# per-source handshake limit (default 5/s, burst 20) paces their reconnection. HANDSHAKE_RATE=N
# raises it (rate N/s, burst N) to show the relays' own speed.
server_conf=()
if [[ -n ${HANDSHAKE_RATE:-} ]]; then
    printf '[limits]\nhandshake_rate = %s\nhandshake_burst = %s\n' "$HANDSHAKE_RATE" "$HANDSHAKE_RATE" >"$work/server.toml"
    server_conf=(--config "$work/server.toml")
fi
"$bin" certs --out "$work/pki" --server-name "$anycast" >/dev/null
for i in 1 2 3; do
    mkdir -p "$work/s$i"
    cat >"$work/s$i/chrony.conf" <<EOF
port 123
bindaddress 127.0.0.1
allow all
local stratum 2
cmdport 0
pidfile $work/s$i/chronyd.pid
EOF
    ip netns exec "$tag-s$i" chronyd -x -d -4 -f "$work/s$i/chrony.conf" >"$work/s$i/chronyd.log" 2>&1 &
    pids+=($!)
    ip netns exec "$tag-s$i" "$bin" server "${server_conf[@]}" --listen "$anycast:1123" --upstream 127.0.0.1:123 --workers 1 \
        --metrics 127.0.0.1:9100 --cert "$work/pki/server.pem" --key "$work/pki/server.key.pem" \
        >"$work/s$i/relay.log" 2>&1 &
    pids+=($!)
    eval "relay_pid_$i=$!"
    disown $!  # its SIGKILL below is expected: no "Killed" line from bash
done
for i in 1 2 3; do
    for _ in $(seq 100); do grep -q " ready " "$work/s$i/relay.log" && break; sleep 0.1; done
    grep -q " ready " "$work/s$i/relay.log" || { echo "relay s$i not ready:"; cat "$work/s$i/relay.log"; exit 1; }
done

per=$(((tunnels + procs - 1) / procs))
for p in $(seq 0 $((procs - 1))); do
    conf=$work/client$p.toml
    echo "ca = \"$work/pki/ca.pem\"" >"$conf"
    for k in $(seq 0 $((per - 1))); do
        n=$((p * per + k))
        ((n < tunnels)) || break
        printf '[[tunnel]]\nlisten = "127.0.0.1:%d"\nserver = "%s:1123"\n' $((20000 + n)) "$anycast" >>"$conf"
    done
    ip netns exec "$tag-c" "$bin" client --config "$conf" >"$work/client$p.log" 2>&1 &
    pids+=($!)
done
for p in $(seq 0 $((procs - 1))); do
    for _ in $(seq 300); do grep -q " ready " "$work/client$p.log" && break; sleep 0.1; done
done

cat >"$work/poll.py" <<'EOF'
# Polls every tunnel once a second: one NTP client request each, replies collected until the
# next round. Writes "round tunnel sent_unix answered(0/1)" lines. Bounded by rounds.
import os, select, socket, struct, sys, time
tunnels, rounds, out = int(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3], "w")
socks = []
for n in range(tunnels):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0)); s.connect(("127.0.0.1", 20000 + n)); s.setblocking(False)
    socks.append(s)
index = {s.fileno(): n for n, s in enumerate(socks)}
start = time.time()
for r in range(rounds):
    t0 = start + r
    time.sleep(max(0, t0 - time.time()))
    token = {}
    for n, s in enumerate(socks):
        tx = struct.pack("!Q", (int(time.time() * 2**32) + n) & (2**64 - 1))
        pkt = bytes([0x23]) + bytes(39) + tx
        token[n] = tx
        try: s.send(pkt)
        except OSError: pass
    got = set()
    while time.time() < t0 + 0.95 and len(got) < tunnels:
        ready, _, _ = select.select(socks, [], [], max(0, t0 + 0.95 - time.time()))
        for s in ready:
            try: data = s.recv(2048)
            except OSError: continue
            n = index[s.fileno()]
            if len(data) >= 48 and data[24:32] == token[n]: got.add(n)
    for n in range(tunnels):
        out.write(f"{r} {n} {t0:.3f} {1 if n in got else 0}\n")
    out.flush()
EOF
metric() { nsx "s$1" python3 -c '
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=2).read().decode()
for line in text.splitlines():
    if line.startswith(sys.argv[1]): print(line.split()[-1]); break
else: print(0)' "$2"; }

rounds=$((warm + after))
ip netns exec "$tag-c" python3 "$work/poll.py" "$tunnels" "$rounds" "$work/poll.log" &
poller=$!
pids+=($poller)
sleep "$warm"
echo "anycast: $(date -u +%FT%TZ), $(nproc) vCPU, kernel $(uname -r), $tunnels client associations in $procs client relays, 3 server relays on $anycast, per-source handshake rate ${HANDSHAKE_RATE:-5 (default, burst 20)}"
echo "spread (each relay's ntp_dtls_associations{state=\"established\"}):"
for i in 1 2 3; do echo "  relay s$i: $(metric $i 'ntp_dtls_associations{state="established"}')"; done
victim=2
held=$(metric $victim 'ntp_dtls_associations{state="established"}')
pid_var=relay_pid_$victim
kill -9 "${!pid_var}"
killed=$(date +%s.%N)
for _ in $(seq 50); do kill -0 "${!pid_var}" 2>/dev/null || break; sleep 0.02; done
if kill -0 "${!pid_var}" 2>/dev/null; then echo "relay s$victim survived SIGKILL" >&2; exit 1; fi
# A health check notices within its interval (1 s here) and withdraws the route.
sleep 1
ip -n "$tag-r" nexthop replace id 100 group 1/3 type resilient buckets 240
withdrawn=$(date +%s.%N)
echo "relay s$victim (holding $held) killed at +0.000 s; its route withdrawn at +$(python3 -c "print(f'{$withdrawn-$killed:.3f}')") s"
wait "$poller" || true
echo "after the kill, per relay:"
for i in 1 3; do echo "  relay s$i: established $(metric $i 'ntp_dtls_associations{state="established"}')"; done

python3 - "$work/poll.log" "$killed" "$tunnels" <<'EOF'
import sys, collections
log, killed, tunnels = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rows = collections.defaultdict(list)
for line in open(log):
    r, n, t, ok = line.split(); rows[int(n)].append((float(t), ok == "1"))
before = [n for n in rows if all(ok for t, ok in rows[n] if killed - 5 <= t < killed)]
print(f"before the kill: {len(before)} of {tunnels} tunnels answered each of the last 5 rounds")
affected, recovery, others_missed = [], [], 0
for n, seq in rows.items():
    after = [(t, ok) for t, ok in seq if t >= killed]
    missed = [t for t, ok in after if not ok]
    if not missed: continue
    affected.append(n)
    back = [t for t, ok in after if ok and t > missed[0]]
    recovery.append(back[0] - killed if back else None)
unrecovered = sum(1 for r in recovery if r is None)
rec = sorted(r for r in recovery if r is not None)
q = lambda p: rec[min(len(rec) - 1, int(p * len(rec)))] if rec else float("nan")
print(f"tunnels that missed any reply after the kill: {len(affected)}; the other {tunnels - len(affected)} missed none")
per_round = collections.defaultdict(int)
for seq in rows.values():
    for t, ok in seq: per_round[t] += ok
print("answered per round (kill at round " + str(sum(1 for t in per_round if t < killed)) + "): " + " ".join(str(per_round[t]) for t in sorted(per_round)))
hist = collections.Counter(int(r) for r in recovery if r is not None)
print("affected tunnels by seconds until their first reply again: " + ", ".join(f"{s}-{s+1} s: {hist[s]}" for s in sorted(hist)))
if rec:
    print(f"first reply again after the kill (poll granularity 1 s): p50 {q(0.5):.1f} s, p90 {q(0.9):.1f} s, max {rec[-1]:.1f} s; never back: {unrecovered}")
EOF
for i in 1 3; do echo "  relay s$i associations established over the run: $(grep -c 'association established' "$work/s$i/relay.log")"; done
