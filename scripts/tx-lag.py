#!/usr/bin/env python3
"""What kernel transmit timestamps would buy the residence correction (issue 16).

A relay stamps a datagram's send time with a clock read right before sendmmsg; the next hop
stamps its arrival with the kernel's receive timestamp (SO_TIMESTAMPNS). The part of the
crossing that no timestamp covers is "clock read -> receiver's kernel RX stamp". SO_TIMESTAMPING
software TX timestamps (from the error queue) would move the sender's stamp to the point the
datagram reaches the (loopback) device. This measures, on loopback, paced so that every send
meets an idle socket as a relay's does:

  read->tx   clock read before sendto -> kernel software TX timestamp (what TX stamps remove)
  tx->rx     kernel TX timestamp -> receiver's kernel RX timestamp (what would remain)
  read->rx   clock read -> receiver's RX timestamp (what the relays leave uncovered today)

Python adds its own few hundred nanoseconds between the clock read and the system call, so
read->tx is an upper bound of what compiled code would see. Loopback only, bounded in count.

  python3 scripts/tx-lag.py            # 2000 datagrams, one every 2 ms
  TXLAG_N=500 python3 scripts/tx-lag.py
"""

import os
import select
import socket
import struct
import time

SO_TIMESTAMPNS = 35
SO_TIMESTAMPING = 37
SCM_TIMESTAMPING = SO_TIMESTAMPING
SOF_TIMESTAMPING_TX_SOFTWARE = 1 << 1
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
SOF_TIMESTAMPING_OPT_ID = 1 << 7
SOF_TIMESTAMPING_OPT_TSONLY = 1 << 11
MSG_ERRQUEUE = 0x2000


def ns(sec, nsec):
    return sec * 1_000_000_000 + nsec


def stamp(sock, flags, kind):
    """The first timestamp of control message `kind` on the next message, or None if none
    is waiting."""
    try:
        _, anc, _, _ = sock.recvmsg(64, 512, flags | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    for level, got, data in anc:
        if level == socket.SOL_SOCKET and got == kind:
            sec, nsec = struct.unpack_from("qq", data, 0)
            return ns(sec, nsec)
    return None


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def main():
    n = int(os.environ.get("TXLAG_N", "2000"))
    pace = float(os.environ.get("TXLAG_PACE", "0.002"))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(
        socket.SOL_SOCKET,
        SO_TIMESTAMPING,
        SOF_TIMESTAMPING_TX_SOFTWARE
        | SOF_TIMESTAMPING_SOFTWARE
        | SOF_TIMESTAMPING_OPT_ID
        | SOF_TIMESTAMPING_OPT_TSONLY,
    )
    tx.connect(rx.getsockname())
    payload = bytes(48)
    read_tx, tx_rx, read_rx = [], [], []
    deadline = time.monotonic() + 60 + n * pace * 2
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        time.sleep(pace)
        t_read = time.clock_gettime_ns(time.CLOCK_REALTIME)
        tx.send(payload)
        t_tx = t_rx = None
        # The TX timestamp comes back on the sender's error queue, the datagram on the
        # receiver; both are read without blocking, a bounded number of times.
        for _ in range(20000):
            if t_tx is None:
                t_tx = stamp(tx, MSG_ERRQUEUE, SCM_TIMESTAMPING)
            if t_rx is None:
                t_rx = stamp(rx, 0, SO_TIMESTAMPNS)
            if t_tx is not None and t_rx is not None:
                break
            select.select([rx], [], [], 0.0001)
        if t_tx is None or t_rx is None:
            continue
        read_tx.append((t_tx - t_read) / 1000)
        tx_rx.append((t_rx - t_tx) / 1000)
        read_rx.append((t_rx - t_read) / 1000)
    print(
        f"tx-lag: {len(read_tx)} of {n} datagrams, one every {pace * 1000:.0f} ms, loopback, "
        f"{os.cpu_count()} CPUs, {os.uname().release}, load {os.getloadavg()[0]:.2f}"
    )
    print("| interval | p10 | p50 | p90 | p99 |")
    print("|---|---:|---:|---:|---:|")
    for name, values in (
        ("clock read -> kernel TX timestamp (what TX timestamps remove)", read_tx),
        ("kernel TX -> receiver's kernel RX timestamp (what would remain)", tx_rx),
        ("clock read -> receiver's kernel RX timestamp (uncovered today)", read_rx),
    ):
        if values:
            cells = " | ".join(f"{percentile(values, p):.2f} us" for p in (10, 50, 90, 99))
            print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
