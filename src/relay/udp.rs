//! Datagram I/O for the relays' hot path: a UDP socket registered for reading only, drained in
//! batches, and a queue of datagrams sent in batches.
//!
//! On a loopback chain most of a relay's cost per datagram is the kernel's, not DTLS's (see
//! docs/BENCHMARKS.md): every system call and every wake-up counts. Three things tokio's
//! `UdpSocket` does cost one each per datagram, and this module avoids them:
//! - `recv_from` takes one datagram per call, then needs one more call that fails with EAGAIN
//!   before the task sleeps. Here a ready socket is drained with `recvmmsg`, up to [`BATCH`]
//!   datagrams per call, and a batch that comes back short means the queue was empty: the
//!   readiness is cleared without that extra call. Registration is edge-triggered, so a
//!   datagram that arrives afterwards raises readiness again.
//! - a tokio `UdpSocket` is registered for writability too, and the kernel signals a UDP
//!   socket writable again each time a sent datagram is freed: one more epoll_wait return per
//!   datagram sent. A [`DatagramSocket`] is registered for reading only, and sends without
//!   waiting: a datagram the kernel cannot take at once is dropped and counted, never delayed
//!   (a delayed NTP packet skews time; DTLS retransmits its handshake on its own).
//! - replies queued while a batch was handled go out together with `sendmmsg`.
//!
//! Buffers are allocated once per socket; nothing here allocates per datagram. nix's message
//! headers hold raw pointers and so are not `Send`; they live in thread-local scratch space,
//! which keeps the types here `Send` and lets a relay's loop run as a plain tokio task.

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Datagrams per system call. Enough to amortise a call under load, small enough that the first
/// datagram of a batch does not wait long for the rest to be handled.
pub const BATCH: usize = 16;
/// Large enough for any datagram we accept (NTP is at most ntp::MAX_PACKET_LEN; DTLS adds 37,
/// a handshake flight record stays under the 1 200-byte MTU rtc-dtls uses).
pub const MAX_DATAGRAM: usize = 2048;

/// Receive buffer asked for on every relay socket.
pub const RECV_BUFFER: usize = 4 << 20;

/// A non-blocking UDP socket, registered with the runtime for reading only.
pub struct DatagramSocket {
    io: AsyncFd<std::net::UdpSocket>,
    /// Which scratch headers its receives use (see [`RECV_HEADERS_V4`]).
    ipv6: bool,
}

impl DatagramSocket {
    /// Takes over a bound socket (made non-blocking here). Must run inside the runtime.
    pub fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let ipv6 = socket.local_addr()?.is_ipv6();
        // Room for bursts: 256 clients answered at once overflowed the kernel's default
        // (208 KiB) between the relays. The kernel caps it at net.core.rmem_max.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(RECV_BUFFER);
        // tokio 1.54 deprecates the safe constructor in favour of an `unsafe` one because an
        // arbitrary `T` might close its descriptor while registered. A `std::net::UdpSocket`
        // owned by the `AsyncFd` cannot: it is closed only when the AsyncFd, having
        // deregistered it, drops it. So the safe call is sound here, and we write no `unsafe`.
        #[allow(deprecated)]
        let io = AsyncFd::with_interest(socket, Interest::READABLE)?;
        Ok(DatagramSocket { io, ipv6 })
    }

    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::from_std(std::net::UdpSocket::bind(addr)?)
    }

    /// Fixes the peer: `send` goes there and only its datagrams are received.
    pub fn connect(&self, peer: SocketAddr) -> io::Result<()> {
        self.io.get_ref().connect(peer)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    /// Waits for datagrams and takes up to [`BATCH`] of them into `batch`; returns how many.
    /// Cancel-safe: nothing is taken from the socket before the future completes.
    ///
    /// An error is the socket's pending error (ICMP port unreachable on a connected socket
    /// comes back as ECONNREFUSED); datagrams queued behind it are taken by the next call.
    pub async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        loop {
            // ERROR too: an ICMP error raises only EPOLLERR, not EPOLLIN, and must not wait for
            // the next datagram to be seen.
            let mut guard = self.io.ready(Interest::READABLE | Interest::ERROR).await?;
            match guard.try_io(|socket| batch.fill(socket.get_ref(), self.ipv6)) {
                Ok(Ok(count)) => {
                    if count < BATCH {
                        // The queue is empty: clear readiness here rather than by a call that
                        // would fail with EAGAIN.
                        guard.clear_ready();
                    }
                    return Ok(count);
                }
                Ok(Err(e)) => return Err(e),
                // Readiness was stale; try_io has cleared it.
                Err(_) => continue,
            }
        }
    }

    /// Sends now or not at all: `WouldBlock` when the send buffer is full.
    pub fn send_to(&self, datagram: &[u8], peer: SocketAddr) -> io::Result<usize> {
        self.io.get_ref().send_to(datagram, peer)
    }

    /// Sends to the connected peer, now or not at all.
    pub fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        self.io.get_ref().send(datagram)
    }
}

/// Up to [`BATCH`] received datagrams and their senders.
pub struct RecvBatch {
    buffers: Box<[[u8; MAX_DATAGRAM]; BATCH]>,
    lengths: [usize; BATCH],
    /// None for a sender that is not an IP address (never on our sockets).
    senders: [Option<SocketAddr>; BATCH],
    count: usize,
}

thread_local! {
    /// Scratch headers for recvmmsg on IPv4 sockets, one set per thread. One set per address
    /// family, because the kernel writes each message's address length back into its header
    /// and nix's recvmmsg does not reset it: after an IPv4 receive (16 bytes), an IPv6 one
    /// through the same headers would get its sender truncated to 16 of its 28 bytes.
    static RECV_HEADERS_V4: RefCell<MultiHeaders<SockaddrStorage>> =
        RefCell::new(MultiHeaders::preallocate(BATCH, None));
    static RECV_HEADERS_V6: RefCell<MultiHeaders<SockaddrStorage>> =
        RefCell::new(MultiHeaders::preallocate(BATCH, None));
    /// Scratch headers for sendmmsg (nix sets every field it reads before each call).
    static SEND_HEADERS: RefCell<MultiHeaders<SockaddrStorage>> =
        RefCell::new(MultiHeaders::preallocate(BATCH, None));
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            buffers: Box::new([[0; MAX_DATAGRAM]; BATCH]),
            lengths: [0; BATCH],
            senders: [None; BATCH],
            count: 0,
        }
    }
}

impl RecvBatch {
    /// One recvmmsg on a non-blocking socket: what is queued, up to [`BATCH`] datagrams.
    fn fill(&mut self, socket: &std::net::UdpSocket, ipv6: bool) -> io::Result<usize> {
        self.count = 0;
        let fd = socket.as_raw_fd();
        let RecvBatch {
            buffers,
            lengths,
            senders,
            ..
        } = self;
        let headers = if ipv6 {
            &RECV_HEADERS_V6
        } else {
            &RECV_HEADERS_V4
        };
        let count = headers.with_borrow_mut(|headers| {
            let mut slices = buffers.each_mut().map(|buffer| [IoSliceMut::new(buffer)]);
            let messages = recvmmsg(fd, headers, slices.iter_mut(), MsgFlags::empty(), None)
                .map_err(io::Error::from)?;
            let mut count = 0;
            for (message, (length, sender)) in
                messages.zip(lengths.iter_mut().zip(senders.iter_mut()))
            {
                *length = message.bytes;
                *sender = message.address.as_ref().and_then(socket_addr);
                count += 1;
            }
            Ok::<_, io::Error>(count)
        })?;
        self.count = count;
        Ok(count)
    }

    /// The datagrams of the last receive, in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = (Option<SocketAddr>, &[u8])> {
        self.buffers
            .iter()
            .zip(self.lengths.iter().zip(self.senders.iter()))
            .take(self.count)
            .map(|(buffer, (length, sender))| (*sender, &buffer[..(*length).min(MAX_DATAGRAM)]))
    }

    /// One datagram of the last receive.
    pub fn get(&self, index: usize) -> Option<(Option<SocketAddr>, &[u8])> {
        self.iter().nth(index)
    }
}

fn socket_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    storage
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// Datagrams waiting to go out on one socket, sent together by [`SendQueue::flush`].
pub struct SendQueue {
    /// Destination (None on a connected socket) and datagram.
    queued: Vec<(Option<SocketAddr>, bytes::BytesMut)>,
    /// Which of them are tagged (NTP datagrams, as opposed to handshake and keepalive
    /// records), so that what was really sent can be counted by kind.
    tagged: Vec<bool>,
}

impl Default for SendQueue {
    fn default() -> Self {
        SendQueue {
            queued: Vec::with_capacity(BATCH),
            tagged: Vec::with_capacity(BATCH),
        }
    }
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    /// Of those sent, how many were tagged.
    pub tagged: usize,
    /// Refused by the kernel (the error is the one of the last failure).
    pub failed: usize,
    /// A send reported the socket's pending ICMP error (ECONNREFUSED, possibly forged) for
    /// an earlier datagram; the one it held back was sent again.
    pub unreachable: bool,
}

impl SendQueue {
    pub fn push(&mut self, destination: Option<SocketAddr>, datagram: bytes::BytesMut) {
        self.push_tagged(destination, datagram, false);
    }

    /// Queues a datagram, `tagged` for counting (see [`Flushed::tagged`]).
    pub fn push_tagged(
        &mut self,
        destination: Option<SocketAddr>,
        datagram: bytes::BytesMut,
        tagged: bool,
    ) {
        self.queued.push((destination, datagram));
        self.tagged.push(tagged);
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Sends everything queued, [`BATCH`] per system call, without waiting: a datagram the
    /// kernel refuses (a full send buffer, an unreachable destination) is dropped and counted,
    /// and the rest still go. Returns the counts, and an error exactly when something failed
    /// (the last one).
    pub fn flush(&mut self, socket: &DatagramSocket) -> (Flushed, Option<io::Error>) {
        let mut flushed = Flushed::default();
        let mut last_error = None;
        let mut start = 0;
        // (position, retries) of the datagram a pending ICMP error held back.
        let mut retried = (usize::MAX, 0u8);
        while start < self.queued.len() {
            let end = (start + BATCH).min(self.queued.len());
            match send_chunk(socket, &self.queued[start..end]) {
                Ok(sent) if sent > 0 => {
                    flushed.sent += sent;
                    flushed.tagged += self.tagged[start..start + sent]
                        .iter()
                        .filter(|t| **t)
                        .count();
                    start += sent;
                }
                Ok(_) => {
                    // The kernel took none of the chunk without saying why: drop its first.
                    flushed.failed += 1;
                    start += 1;
                    last_error = Some(io::Error::other("sendmmsg sent nothing"));
                }
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        && (retried.0 != start || retried.1 < MAX_ICMP_RETRIES) =>
                {
                    // Not this datagram's fault: a connected socket reports (and clears) its
                    // pending error, an ICMP port unreachable for an earlier datagram, on the
                    // next call. Send it again (a few times: errors may keep coming, forged at
                    // a high rate); the caller hears of the ICMP error.
                    retried = if retried.0 == start {
                        (start, retried.1 + 1)
                    } else {
                        (start, 1)
                    };
                    flushed.unreachable = true;
                }
                Err(e) => {
                    // The first datagram of the chunk was refused: drop it, go on with the rest.
                    flushed.failed += 1;
                    start += 1;
                    last_error = Some(e);
                }
            }
        }
        self.queued.clear();
        self.tagged.clear();
        (flushed, last_error)
    }
}

/// Times one datagram is sent again after sends that only reported a pending ICMP error.
const MAX_ICMP_RETRIES: u8 = 4;

fn send_chunk(
    socket: &DatagramSocket,
    chunk: &[(Option<SocketAddr>, bytes::BytesMut)],
) -> io::Result<usize> {
    let fd = socket.io.get_ref().as_raw_fd();
    if let [(destination, datagram)] = chunk {
        // One datagram: the plain call is cheaper than building a batch header.
        return match destination {
            Some(destination) => socket.send_to(datagram, *destination),
            None => socket.send(datagram),
        }
        .map(|_| 1);
    }
    let slices: [[IoSlice; 1]; BATCH] = std::array::from_fn(|index| {
        [IoSlice::new(
            chunk.get(index).map_or(&[][..], |(_, datagram)| datagram),
        )]
    });
    let addresses: [Option<SockaddrStorage>; BATCH] = std::array::from_fn(|index| {
        chunk
            .get(index)
            .and_then(|(destination, _)| *destination)
            .map(SockaddrStorage::from)
    });
    SEND_HEADERS.with_borrow_mut(|headers| {
        let sent = sendmmsg(
            fd,
            headers,
            slices.iter().take(chunk.len()),
            &addresses[..chunk.len()],
            [],
            MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        Ok(sent.count())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> DatagramSocket {
        DatagramSocket::bind("127.0.0.1:0".parse().expect("addr")).expect("bind")
    }

    fn addr(socket: &DatagramSocket) -> SocketAddr {
        socket.local_addr().expect("addr")
    }

    async fn recv(socket: &DatagramSocket, batch: &mut RecvBatch) -> usize {
        tokio::time::timeout(std::time::Duration::from_secs(5), socket.recv_batch(batch))
            .await
            .expect("a datagram within 5 s")
            .expect("recv")
    }

    #[tokio::test]
    async fn a_batch_takes_every_queued_datagram_with_its_sender() {
        let (rx, tx) = (socket(), socket());
        for i in 0..5u8 {
            tx.send_to(&[i; 48], addr(&rx)).expect("send");
        }
        let mut batch = RecvBatch::default();
        // Loopback delivers synchronously: all five are queued by now.
        assert_eq!(recv(&rx, &mut batch).await, 5);
        for (i, (from, datagram)) in batch.iter().enumerate() {
            assert_eq!(from, Some(addr(&tx)));
            assert_eq!(datagram, &[i as u8; 48][..]);
        }
        // Short batch: readiness cleared, so nothing is ready until the next datagram.
        let idle = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            rx.recv_batch(&mut batch),
        );
        assert!(idle.await.is_err(), "no datagram is queued");
        tx.send_to(b"two", addr(&rx)).expect("send");
        assert_eq!(recv(&rx, &mut batch).await, 1);
        assert_eq!(batch.get(0).map(|(_, d)| d), Some(&b"two"[..]));
    }

    #[tokio::test]
    async fn the_receive_buffer_is_as_large_as_the_kernel_allows() {
        let rx = socket();
        let sysctl = |name: &str| -> usize {
            let path = format!("/proc/sys/net/core/{name}");
            std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{path}: {e}"))
                .trim()
                .parse()
                .expect("a number")
        };
        let (rmem_max, rmem_default) = (sysctl("rmem_max"), sysctl("rmem_default"));
        let size_of = |socket: &std::net::UdpSocket| {
            socket2::SockRef::from(socket)
                .recv_buffer_size()
                .expect("SO_RCVBUF")
        };
        let size = size_of(rx.io.get_ref());
        // What a socket nobody enlarged gets: the comparison that shows ours was enlarged.
        let fresh = size_of(&std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"));
        // Linux caps the request at rmem_max and reports twice what it set (bookkeeping).
        let expected = 2 * RECV_BUFFER.min(rmem_max);
        assert_eq!(
            size, expected,
            "asked for {RECV_BUFFER}, rmem_max {rmem_max}: expected {expected}, got {size}"
        );
        if expected > fresh {
            assert!(size > fresh, "{size} <= a fresh socket's {fresh}");
        } else {
            // Nothing to grow into: rmem_max is below half of rmem_default. Said, not hidden.
            eprintln!(
                "the_receive_buffer_is_as_large_as_the_kernel_allows: rmem_max {rmem_max} \
                 allows no growth over a fresh socket's {fresh} (rmem_default {rmem_default}); \
                 checked only that the buffer is 2 x rmem_max = {size}"
            );
        }
    }

    #[tokio::test]
    async fn ipv4_and_ipv6_sockets_on_one_thread_each_get_whole_sender_addresses() {
        // The kernel writes each message's address length back into the shared headers; an
        // IPv6 receive after an IPv4 one must still get all 28 bytes of its sender.
        let (rx4, tx4) = (socket(), socket());
        let bind6 = |_| DatagramSocket::bind("[::1]:0".parse().expect("addr")).expect("bind ::1");
        let (rx6, tx6) = (bind6(()), bind6(()));
        let mut batch = RecvBatch::default();
        for round in 0..3 {
            tx4.send_to(b"v4", addr(&rx4)).expect("send");
            assert_eq!(recv(&rx4, &mut batch).await, 1);
            assert_eq!(
                batch.get(0).and_then(|(from, _)| from),
                Some(addr(&tx4)),
                "round {round}"
            );
            tx6.send_to(b"v6", addr(&rx6)).expect("send");
            assert_eq!(recv(&rx6, &mut batch).await, 1);
            assert_eq!(
                batch.get(0).and_then(|(from, _)| from),
                Some(addr(&tx6)),
                "round {round}"
            );
        }
    }

    #[tokio::test]
    async fn more_than_a_batch_is_taken_in_several_calls() {
        let (rx, tx) = (socket(), socket());
        let total = BATCH * 2 + 3;
        for i in 0..total {
            tx.send_to(&(i as u32).to_be_bytes(), addr(&rx))
                .expect("send");
        }
        let mut batch = RecvBatch::default();
        let mut seen = Vec::new();
        while seen.len() < total {
            recv(&rx, &mut batch).await;
            seen.extend(batch.iter().map(|(_, d)| d.to_vec()));
        }
        let expected: Vec<Vec<u8>> = (0..total)
            .map(|i| (i as u32).to_be_bytes().to_vec())
            .collect();
        assert_eq!(seen, expected);
    }

    #[tokio::test]
    async fn a_connected_socket_reports_an_unreachable_peer() {
        let (rx, tx) = (socket(), socket());
        let gone = addr(&rx);
        drop(rx);
        tx.connect(gone).expect("connect");
        tx.send(b"anyone?").expect("send");
        let mut batch = RecvBatch::default();
        let result =
            tokio::time::timeout(std::time::Duration::from_secs(5), tx.recv_batch(&mut batch))
                .await
                .expect("the ICMP error within 5 s");
        let error = result.expect_err("port unreachable");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_queue_goes_out_to_each_destination() {
        let (a, b, tx) = (socket(), socket(), socket());
        let mut queue = SendQueue::default();
        let total = BATCH + 4;
        for i in 0..total {
            let to = if i % 2 == 0 { &a } else { &b };
            queue.push(Some(addr(to)), bytes::BytesMut::from(&[i as u8][..]));
        }
        let (flushed, error) = queue.flush(&tx);
        assert_eq!(
            flushed,
            Flushed {
                sent: total,
                tagged: 0,
                failed: 0,
                unreachable: false,
            }
        );
        assert!(error.is_none());
        assert!(queue.is_empty());
        let mut batch = RecvBatch::default();
        for (socket, first) in [(&a, 0u8), (&b, 1u8)] {
            recv(socket, &mut batch).await;
            let got: Vec<u8> = batch.iter().map(|(_, d)| d[0]).collect();
            let want: Vec<u8> = (0..total as u8).filter(|i| i % 2 == first).collect();
            assert_eq!(got, want);
        }
    }

    #[tokio::test]
    async fn a_refused_datagram_is_counted_and_the_rest_still_go() {
        let (rx, tx) = (socket(), socket());
        let mut queue = SendQueue::default();
        // An IPv6 destination on an IPv4 socket: the kernel refuses that one datagram.
        queue.push(
            Some("[::1]:9".parse().expect("addr")),
            bytes::BytesMut::from(&b"x"[..]),
        );
        queue.push(Some(addr(&rx)), bytes::BytesMut::from(&b"y"[..]));
        queue.push(Some(addr(&rx)), bytes::BytesMut::from(&b"z"[..]));
        let (flushed, error) = queue.flush(&tx);
        assert_eq!(
            flushed,
            Flushed {
                sent: 2,
                tagged: 0,
                failed: 1,
                unreachable: false,
            }
        );
        assert!(error.is_some());
        let mut batch = RecvBatch::default();
        assert_eq!(recv(&rx, &mut batch).await, 2);
    }

    #[tokio::test]
    async fn a_pending_icmp_error_costs_the_next_datagram_nothing() {
        let (rx, tx) = (socket(), socket());
        let gone = addr(&rx);
        drop(rx);
        tx.connect(gone).expect("connect");
        tx.send(b"anyone?").expect("send");
        // The port unreachable makes the socket ready (EPOLLERR) with its error pending.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tx.io.ready(tokio::io::Interest::ERROR),
        )
        .await
        .expect("the ICMP error within 5 s")
        .expect("readiness")
        .retain_ready();
        let mut queue = SendQueue::default();
        queue.push_tagged(None, bytes::BytesMut::from(&b"request"[..]), true);
        let (flushed, error) = queue.flush(&tx);
        // Without the retry the request was dropped: sent 0, failed 1.
        assert_eq!(
            flushed,
            Flushed {
                sent: 1,
                tagged: 1,
                failed: 0,
                unreachable: true,
            }
        );
        assert!(error.is_none(), "{error:?}");
    }
}
