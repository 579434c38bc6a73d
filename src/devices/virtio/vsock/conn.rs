//! One vsock stream connection between a guest port and a host Unix socket: its state machine
//! and credit accounting (virtio 1.x §5.10.6.3 "flow control", §5.10.6.6 "stream sockets").
//!
//! A connection never buffers host → guest data: bytes are read from the host socket straight
//! into a guest RX buffer, and only as many as the guest's credit allows, so a slow guest leaves
//! them in the host socket (whose peer then blocks). Guest → host data is written to the socket
//! at once; what the socket does not take waits in `tx_buf`, which the guest's credit
//! (`BUF_ALLOC`) bounds — a guest that sends past it is reset.
//!
//! Ordering it relies on: within one connection the packets it gives the guest come out in the
//! order REQUEST/RESPONSE → data → SHUTDOWN, because `fill_rx` checks them in that order and
//! the muxer asks one connection for one packet at a time.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::packet::{
    OutHdr, HDR_LEN, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// The guest → host buffer each connection offers the guest (its `buf_alloc`).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about freed space once its view of our free space falls below this.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

/// How long half-open states may last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A host client connected but has not sent its `CONNECT <port>` line.
    pub connect_line: Duration,
    /// We sent the guest OP_REQUEST and wait for OP_RESPONSE.
    pub request: Duration,
    /// Shutting down: we wait for the guest's OP_RST, or for buffered data to reach the host.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_line: Duration::from_secs(10),
            request: Duration::from_secs(2),
            shutdown: Duration::from_secs(2),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: OP_REQUEST queued or sent, waiting for the guest's OP_RESPONSE.
    LocalInit,
    /// Data flows (in the directions not shut down).
    Established,
    /// The host socket is gone; we told the guest (OP_SHUTDOWN both) and wait for its OP_RST.
    Closing,
}

/// How a finished connection ends towards the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Send the guest OP_RST.
    Rst,
    /// The guest already reset it: just forget it.
    Quiet,
}

/// What one `fill_rx` produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxOut {
    pub hdr: OutHdr,
    /// Payload bytes (host → guest) in the packet.
    pub data: u32,
}

/// One connection, keyed in the muxer by (host port, guest port).
#[derive(Debug)]
pub struct Connection {
    pub stream: UnixStream,
    pub token: u32,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: State,
    /// Set once the connection is finished; the muxer removes it.
    pub end: Option<End>,
    /// When the current half-open state gives up.
    pub deadline: Option<Instant>,
    /// In the muxer's ready list.
    pub queued: bool,
    /// What the event loop watches now (`None`: not registered).
    pub registered: Option<EventSet>,

    // Guest → host.
    tx_buf: VecDeque<u8>,
    /// Bytes at the front of `tx_buf` that are ours (the `OK` line), not the guest's.
    tx_uncounted: usize,
    /// Guest bytes received, and forwarded to the host socket.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_told: Wrapping<u32>,
    credit_update_asked: bool,
    host_write_shut: bool,

    // Host → guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// We asked the guest for credit and have not had any since.
    credit_requested: bool,
    /// The host socket may have data (it was readable and we have not yet seen WouldBlock).
    host_readable: bool,
    /// The host socket reached end of file.
    local_eof: bool,

    // Handshake and shutdown.
    request_due: bool,
    response_due: bool,
    /// OP_SHUTDOWN flags due to the guest, and those already sent.
    shutdown_due: u32,
    shutdown_sent: u32,
    /// OP_SHUTDOWN flags the guest sent us.
    peer_shut: u32,
}

impl Connection {
    fn new(stream: UnixStream, token: u32, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            token,
            local_port,
            peer_port,
            state,
            end: None,
            deadline: None,
            queued: false,
            registered: None,
            tx_buf: VecDeque::new(),
            tx_uncounted: 0,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            credit_update_asked: false,
            host_write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            credit_requested: false,
            host_readable: false,
            local_eof: false,
            request_due: false,
            response_due: false,
            shutdown_due: 0,
            shutdown_sent: 0,
            peer_shut: 0,
        }
    }

    /// A host client asked (`CONNECT <peer_port>`) for the guest's `peer_port`: we will send
    /// the guest OP_REQUEST from `local_port` and wait for its answer until `now + timeout`.
    pub fn new_local(
        stream: UnixStream,
        token: u32,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut c = Connection::new(stream, token, local_port, peer_port, State::LocalInit);
        c.request_due = true;
        c.deadline = Some(deadline);
        c
    }

    /// The guest asked for host port `local_port` and we reached its Unix socket: established,
    /// with OP_RESPONSE due.
    pub fn new_peer(
        stream: UnixStream,
        token: u32,
        local_port: u32,
        peer_port: u32,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        let mut c = Connection::new(stream, token, local_port, peer_port, State::Established);
        c.response_due = true;
        c.peer_buf_alloc = peer_buf_alloc;
        c.peer_fwd_cnt = Wrapping(peer_fwd_cnt);
        c
    }

    fn kill(&mut self, end: End) {
        if self.end.is_none() {
            self.end = Some(end);
        }
    }

    /// Bytes the guest may still send us before our buffer is full.
    fn buffered(&self) -> usize {
        self.tx_buf.len().saturating_sub(self.tx_uncounted)
    }

    /// How much more the guest can take (its `buf_alloc` minus what is in flight).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest's idea of our free space is low while we have freed more.
    fn credit_update_due(&self) -> bool {
        if self.credit_update_asked {
            return true;
        }
        if self.fwd_cnt == self.fwd_cnt_told {
            return false;
        }
        let guest_thinks_used = (self.rx_cnt - self.fwd_cnt_told).0;
        BUF_ALLOC.saturating_sub(guest_thinks_used) < CREDIT_UPDATE_THRESHOLD
    }

    /// Whether host → guest data may flow at all.
    fn reading_allowed(&self) -> bool {
        self.state == State::Established
            && !self.local_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.end.is_none()
    }

    fn data_ready(&self) -> bool {
        self.reading_allowed() && self.host_readable && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_rx(&self) -> bool {
        if self.end.is_some() {
            return false;
        }
        self.request_due
            || self.response_due
            || self.data_ready()
            || (self.reading_allowed() && self.host_readable && !self.credit_requested)
            || self.shutdown_due & !self.shutdown_sent != 0
            || (self.state != State::LocalInit && self.credit_update_due())
    }

    fn hdr(&mut self, op: u16) -> OutHdr {
        self.fwd_cnt_told = self.fwd_cnt;
        self.credit_update_asked = false;
        OutHdr {
            src_port: self.local_port,
            dst_port: self.peer_port,
            op,
            flags: 0,
            len: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest; host data goes straight into `data` (the RX buffer's
    /// payload area). `None` if there was nothing to send after all. A host socket error ends
    /// the connection (`end`).
    pub fn fill_rx<B: BitmapSlice>(&mut self, data: Option<VolatileSlice<'_, B>>) -> Option<RxOut> {
        if self.end.is_some() {
            return None;
        }
        if self.request_due {
            self.request_due = false;
            return Some(RxOut {
                hdr: self.hdr(OP_REQUEST),
                data: 0,
            });
        }
        if self.response_due {
            self.response_due = false;
            return Some(RxOut {
                hdr: self.hdr(OP_RESPONSE),
                data: 0,
            });
        }
        if self.reading_allowed() && self.host_readable {
            let credit = self.peer_credit();
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Some(RxOut {
                        hdr: self.hdr(OP_CREDIT_REQUEST),
                        data: 0,
                    });
                }
            } else if let Some(out) = self.read_host(data, credit) {
                return Some(out);
            }
            if self.end.is_some() {
                return None;
            }
        }
        let shut = self.shutdown_due & !self.shutdown_sent;
        if shut != 0 {
            self.shutdown_sent |= shut;
            let mut hdr = self.hdr(OP_SHUTDOWN);
            hdr.flags = shut;
            // Both directions may be done now; an OP_RST would follow this packet.
            self.check_done();
            return Some(RxOut { hdr, data: 0 });
        }
        if self.state != State::LocalInit && self.credit_update_due() {
            return Some(RxOut {
                hdr: self.hdr(OP_CREDIT_UPDATE),
                data: 0,
            });
        }
        None
    }

    /// Reads host data into the RX data buffer, at most `credit` bytes. `None` when nothing was
    /// read (would block, end of file noted, or an error that ended the connection).
    fn read_host<B: BitmapSlice>(
        &mut self,
        buf: Option<VolatileSlice<'_, B>>,
        credit: u32,
    ) -> Option<RxOut> {
        let buf = buf?;
        let max = credit.min(MAX_PKT_DATA);
        let want = buf.len().min(usize::try_from(max).unwrap_or(usize::MAX));
        let mut dst = buf.subslice(0, want).ok()?;
        match self.stream.read_volatile(&mut dst) {
            Ok(0) => {
                self.host_readable = false;
                self.local_eof = true;
                // We will send no more; the guest may still send (half-close).
                self.shutdown_due |= SHUTDOWN_SEND;
                self.check_done();
                None
            }
            Ok(n) => {
                // n <= want <= MAX_PKT_DATA.
                let n = u32::try_from(n).unwrap_or(0);
                self.tx_cnt += n;
                let mut hdr = self.hdr(OP_RW);
                hdr.len = n;
                Some(RxOut { hdr, data: n })
            }
            Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                self.host_readable = false;
                None
            }
            Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => None,
            Err(e) => {
                log::debug!(
                    "vsock: reading host socket of port {}: {e}",
                    self.local_port
                );
                self.kill(End::Rst);
                None
            }
        }
    }

    /// A packet from the guest for this connection. Returns the payload bytes forwarded to
    /// the host socket now; an error is a protocol violation (the connection then ends).
    pub fn recv<B: BitmapSlice>(
        &mut self,
        pkt: &VsockPacket<'_, B>,
        now: Instant,
        timeouts: &Timeouts,
    ) -> io::Result<usize> {
        let (op, flags, data) = (pkt.op(), pkt.flags(), pkt.data_slice());
        self.peer_buf_alloc = pkt.buf_alloc();
        self.peer_fwd_cnt = Wrapping(pkt.fwd_cnt());
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        let mut forwarded = 0;
        match (self.state, op) {
            (_, OP_RST) => self.kill(End::Quiet),
            (State::LocalInit, OP_RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.tx_buf.extend(line.as_bytes());
                self.tx_uncounted = self.tx_buf.len();
                self.flush_tx();
            }
            (State::Established, OP_RW) => {
                let len = data.map_or(0, |d| d.len());
                if self.peer_shut & SHUTDOWN_SEND != 0
                    || self.buffered().saturating_add(len)
                        > usize::try_from(BUF_ALLOC).unwrap_or(usize::MAX)
                {
                    // Data after the guest said it would send none, or past our credit.
                    self.kill(End::Rst);
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        "guest broke the stream protocol",
                    ));
                }
                if let Some(d) = data {
                    forwarded = self.push_tx(d);
                }
            }
            (State::Established, OP_SHUTDOWN) => {
                self.peer_shut |= flags & SHUTDOWN_BOTH;
                if self.peer_shut == SHUTDOWN_BOTH && !self.tx_buf.is_empty() {
                    self.deadline.get_or_insert(now + timeouts.shutdown);
                }
            }
            (State::Established, OP_CREDIT_UPDATE) => {}
            (State::Established, OP_CREDIT_REQUEST) => self.credit_update_asked = true,
            (State::Closing, OP_SHUTDOWN) => {
                self.peer_shut |= flags & SHUTDOWN_BOTH;
                if self.peer_shut == SHUTDOWN_BOTH {
                    self.kill(End::Rst);
                }
            }
            // Waiting for the guest's reset; anything else is late and harmless.
            (State::Closing, _) => {}
            _ => {
                self.kill(End::Rst);
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("unexpected op {op}"),
                ));
            }
        }
        self.check_done();
        Ok(forwarded)
    }

    /// Takes guest data: straight to the socket if nothing is waiting, else behind what is.
    /// Returns the guest bytes written to the socket now.
    fn push_tx<B: BitmapSlice>(&mut self, data: &VolatileSlice<'_, B>) -> usize {
        let len = data.len();
        // len <= MAX_PKT_DATA.
        self.rx_cnt += u32::try_from(len).unwrap_or(0);
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(VolatileMemoryError::IOError(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => {
                    log::debug!(
                        "vsock: writing host socket of port {}: {e}",
                        self.local_port
                    );
                    self.kill(End::Rst);
                    return 0;
                }
            }
            self.fwd_cnt += u32::try_from(written).unwrap_or(0);
        }
        if written < len {
            if let Ok(rest) = data.offset(written) {
                let mut v = vec![0u8; rest.len()];
                let n = rest.copy_to(&mut v[..]);
                self.tx_buf.extend(&v[..n]);
            }
        }
        written
    }

    /// Writes what `tx_buf` holds to the host socket; returns the guest bytes forwarded.
    pub fn flush_tx(&mut self) -> usize {
        let mut guest_bytes = 0;
        while !self.tx_buf.is_empty() && self.end.is_none() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let ours = n.min(self.tx_uncounted);
                    self.tx_uncounted -= ours;
                    let theirs = n - ours;
                    guest_bytes += theirs;
                    self.fwd_cnt += u32::try_from(theirs).unwrap_or(0);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!(
                        "vsock: writing host socket of port {}: {e}",
                        self.local_port
                    );
                    self.kill(End::Rst);
                }
            }
        }
        self.check_done();
        guest_bytes
    }

    /// The host socket's readiness, as the event loop reported it.
    pub fn on_host_event(&mut self, ev: EventSet, now: Instant, timeouts: &Timeouts) -> usize {
        if ev.contains(EventSet::ERROR) {
            self.kill(End::Rst);
            return 0;
        }
        let mut forwarded = 0;
        if ev.contains(EventSet::OUT) {
            forwarded = self.flush_tx();
        }
        if ev.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
            if self.reading_allowed() {
                // Read until end of file first; a hang-up is handled once that is seen.
                self.host_readable = true;
            } else if ev.contains(EventSet::HANG_UP) {
                self.host_gone(now, timeouts);
            }
        }
        self.check_done();
        forwarded
    }

    /// The host closed its socket for good.
    fn host_gone(&mut self, now: Instant, timeouts: &Timeouts) {
        match self.state {
            State::LocalInit => self.kill(End::Rst),
            State::Established => {
                self.state = State::Closing;
                self.tx_buf.clear();
                self.tx_uncounted = 0;
                self.host_readable = false;
                self.shutdown_due = SHUTDOWN_BOTH;
                self.deadline = Some(now + timeouts.shutdown);
            }
            State::Closing => {}
        }
    }

    /// The deadline passed.
    pub fn expire(&mut self) {
        self.kill(End::Rst);
    }

    /// Ends the connection when both directions are done.
    fn check_done(&mut self) {
        if self.end.is_some() || self.state != State::Established {
            return;
        }
        if self.tx_buf.is_empty() && self.peer_shut & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        let guest_done = self.peer_shut == SHUTDOWN_BOTH;
        let both_ways_done = self.peer_shut & SHUTDOWN_SEND != 0
            && (self.local_eof || self.peer_shut & SHUTDOWN_RCV != 0)
            && self.shutdown_due & !self.shutdown_sent == 0;
        if self.tx_buf.is_empty() && (guest_done || both_ways_done) {
            self.kill(End::Rst);
        }
    }

    /// What the event loop should watch: readable when we may read and do not already know it
    /// is, writable while data waits. `None` (unregistered) while we hold off reading a socket
    /// known to be readable, so its hang-up cannot wake the loop again and again.
    pub fn interest(&self) -> Option<EventSet> {
        if self.end.is_some() || self.state == State::Closing {
            return None;
        }
        let mut set = EventSet::empty();
        if self.reading_allowed() && !self.host_readable {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        if set.is_empty() && self.host_readable && self.reading_allowed() {
            return None;
        }
        Some(set)
    }
}

/// The used length of an RX packet with `data` payload bytes.
pub fn used_len(out: &RxOut) -> u32 {
    HDR_LEN.saturating_add(out.data)
}
