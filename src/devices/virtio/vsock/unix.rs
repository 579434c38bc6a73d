//! The host side of vsock over Unix sockets, with Firecracker's "hybrid vsock" conventions:
//! host processes connect to one listening socket (`uds`) and name the guest port in a first
//! line, `CONNECT <port>\n` (answered `OK <host port>\n` once the guest accepts); a guest
//! connecting to host port P reaches the Unix socket `<uds>_P`.
//!
//! The muxer owns every connection (keyed by (host port, guest port)), routes the guest's
//! packets to them, and hands out the packets they have for the guest one RX buffer at a time:
//! first connectionless resets, then connections in round-robin order. Host sockets are
//! non-blocking and registered with the event loop under their own token (from
//! `FIRST_CONN_TOKEN`); readiness they report is only noted, and reading happens when an RX
//! buffer is there to read into (`conn.rs`), so nothing is buffered on the host → guest path.
//!
//! Ordering it relies on: `sync` runs at the end of every event the device handles; it
//! deregisters closed sockets before dropping them (so a reused fd number is never confused
//! with an old registration) and brings each touched socket's registration in line with what
//! its connection wants.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{used_len, Connection, End, Timeouts};
use super::packet::{write_header, OutHdr, HDR_LEN, HOST_CID, OP_REQUEST, OP_RST, TYPE_STREAM};
use super::{VsockError, VsockStats};
use crate::devices::virtio::TOKEN_BACKEND;

pub const TOKEN_LISTENER: u32 = TOKEN_BACKEND;
pub const TOKEN_TIMER: u32 = TOKEN_BACKEND + 1;
pub const TOKEN_KICK: u32 = TOKEN_BACKEND + 2;
pub const FIRST_CONN_TOKEN: u32 = TOKEN_BACKEND + 3;

/// Connections (and host clients still sending their CONNECT line) at once; each holds one fd
/// and up to `conn::BUF_ALLOC` of guest data.
pub const MAX_CONNECTIONS: usize = 512;
/// The longest CONNECT line, newline excluded.
pub const MAX_CONNECT_LINE: usize = 32;
/// Host-initiated connections get host ports from here up.
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// Connectionless resets waiting for RX buffers; past this the TX queue waits.
const MAX_RST_QUEUE: usize = 256;
/// Connections accepted per listener event, so one busy listener cannot starve the loop.
const ACCEPTS_PER_EVENT: usize = 64;
/// How long the listener rests after an accept error such as EMFILE.
const LISTENER_PAUSE: Duration = Duration::from_millis(100);

pub type ConnKey = (u32, u32);

/// A host client that has not yet sent its whole CONNECT line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum LineState {
    Wait,
    Port(u32),
    Bad,
}

pub struct Muxer {
    uds: PathBuf,
    listener: UnixListener,
    listener_watched: bool,
    listener_paused_until: Option<Instant>,
    timer: TimerFd,
    timer_armed: bool,
    kick: EventFd,
    guest_cid: u64,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u32, ConnKey>,
    pending: HashMap<u32, PendingHost>,
    ready: VecDeque<ConnKey>,
    rst_queue: VecDeque<OutHdr>,
    /// Closed sockets and whether they are still registered; `sync` drops them.
    defunct: Vec<(UnixStream, bool)>,
    /// Connections whose registration may need an update.
    dirty: Vec<ConnKey>,
    next_port: u32,
    next_token: u32,
    pub timeouts: Timeouts,
    pub stats: VsockStats,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("uds", &self.uds)
            .field("connections", &self.conns.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Muxer {
    /// Binds the listening socket at `uds`, replacing a stale socket file left there (one
    /// nobody listens on; a live one is refused rather than stolen).
    pub fn new(uds: &Path, guest_cid: u64) -> Result<Self, VsockError> {
        match std::fs::symlink_metadata(uds) {
            Ok(m) if m.file_type().is_socket() => {
                match connect_nonblocking(uds) {
                    Err(e) if e.kind() != ErrorKind::WouldBlock => {}
                    _ => return Err(VsockError::InUse(uds.to_path_buf())),
                }
                std::fs::remove_file(uds).map_err(|source| VsockError::Bind {
                    path: uds.to_path_buf(),
                    source,
                })?;
            }
            Ok(_) => return Err(VsockError::NotASocket(uds.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VsockError::Bind {
                    path: uds.to_path_buf(),
                    source,
                })
            }
        }
        let bind_err = |source| VsockError::Bind {
            path: uds.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Muxer {
            uds: uds.to_path_buf(),
            listener,
            listener_watched: false,
            listener_paused_until: None,
            timer: TimerFd::new().map_err(|e| VsockError::EventFd(e.into()))?,
            timer_armed: false,
            kick: EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            guest_cid,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            ready: VecDeque::new(),
            rst_queue: VecDeque::new(),
            defunct: Vec::new(),
            dirty: Vec::new(),
            next_port: FIRST_HOST_PORT,
            next_token: FIRST_CONN_TOKEN,
            timeouts: Timeouts::default(),
            stats: VsockStats::default(),
        })
    }

    /// Registers the timer and the kick event (from the subscriber's `init`).
    pub fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [
            (self.timer.as_raw_fd(), TOKEN_TIMER),
            (self.kick.as_raw_fd(), TOKEN_KICK),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                log::error!("vsock: cannot watch an internal event: {e}");
            }
        }
    }

    /// The device is active: accept host connections.
    pub fn start(&mut self, ops: &mut EventOps) {
        if !self.listener_watched {
            match ops.add(Events::with_data(
                &self.listener,
                TOKEN_LISTENER,
                EventSet::IN,
            )) {
                Ok(()) | Err(event_manager::Error::FdAlreadyRegistered) => {
                    self.listener_watched = true;
                }
                Err(e) => log::error!("vsock: cannot watch {}: {e}", self.uds.display()),
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the muxer may have a packet for the guest.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.ready.is_empty()
    }

    /// Too many resets wait for RX buffers: stop taking TX packets until they drain.
    pub fn tx_throttled(&self) -> bool {
        self.rst_queue.len() >= MAX_RST_QUEUE
    }

    /// An event on one of our tokens. `active`: the device has queues to serve it with.
    pub fn handle_event(&mut self, token: u32, ev: EventSet, ops: &mut EventOps, active: bool) {
        let now = Instant::now();
        match token {
            TOKEN_LISTENER if active => self.accept(ops, now),
            TOKEN_LISTENER => {
                // Not active (reset): leave clients in the backlog until the driver is back.
                self.unwatch_listener(ops);
            }
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                self.sweep(ops, now, active);
            }
            TOKEN_KICK => {
                let _ = self.kick.read();
            }
            t if self.pending.contains_key(&t) => self.read_connect_line(t, ops, now),
            t => {
                let Some(&key) = self.tokens.get(&t) else {
                    return;
                };
                if let Some(c) = self.conns.get_mut(&key) {
                    let n = c.on_host_event(ev, now, &self.timeouts);
                    self.stats.bytes_to_host += n as u64;
                }
                self.touch(key);
            }
        }
    }

    fn unwatch_listener(&mut self, ops: &mut EventOps) {
        if self.listener_watched {
            let _ = ops.remove(Events::empty(&self.listener));
            self.listener_watched = false;
        }
    }

    fn accept(&mut self, ops: &mut EventOps, now: Instant) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // EMFILE and friends: the listener stays readable, so rest a while.
                    log::warn!("vsock: accepting on {}: {e}", self.uds.display());
                    self.stats.connect_errors += 1;
                    self.unwatch_listener(ops);
                    self.listener_paused_until = Some(now + LISTENER_PAUSE);
                    self.arm_timer();
                    return;
                }
            };
            if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
                log::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing a host client");
                self.stats.connect_errors += 1;
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                self.stats.connect_errors += 1;
                continue;
            }
            let Some(token) = self.alloc_token() else {
                continue;
            };
            if let Err(e) = ops.add(Events::with_data(&stream, token, EventSet::IN)) {
                log::warn!("vsock: cannot watch a host client: {e}");
                self.stats.connect_errors += 1;
                continue;
            }
            self.pending.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline: now + self.timeouts.connect_line,
                },
            );
            self.arm_timer();
        }
    }

    /// Reads the CONNECT line one byte at a time, so bytes after it stay in the socket as
    /// data for the guest.
    fn read_connect_line(&mut self, token: u32, ops: &mut EventOps, now: Instant) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let state = loop {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => break LineState::Bad,
                Ok(_) if b[0] == b'\n' => break parse_connect_line(&p.line),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break LineState::Bad,
                Ok(_) => p.line.push(b[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break LineState::Wait,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break LineState::Bad,
            }
        };
        match state {
            LineState::Wait => {}
            LineState::Bad => {
                log::debug!("vsock: bad CONNECT line from a host client; closing it");
                self.stats.connect_errors += 1;
                self.drop_pending(token, ops);
            }
            LineState::Port(peer_port) => {
                let Some(p) = self.pending.remove(&token) else {
                    return;
                };
                let Some(local_port) = self.alloc_port() else {
                    self.stats.connect_errors += 1;
                    self.defunct.push((p.stream, true));
                    return;
                };
                let key = (local_port, peer_port);
                let mut c = Connection::new_local(
                    p.stream,
                    token,
                    local_port,
                    peer_port,
                    now + self.timeouts.request,
                );
                c.registered = Some(EventSet::IN);
                self.conns.insert(key, c);
                self.tokens.insert(token, key);
                self.stats.conns_opened += 1;
                self.touch(key);
            }
        }
    }

    fn drop_pending(&mut self, token: u32, ops: &mut EventOps) {
        if let Some(p) = self.pending.remove(&token) {
            let _ = ops.remove(Events::empty(&p.stream));
        }
    }

    /// A packet from the guest's TX queue.
    pub fn recv_pkt<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        if pkt.src_cid() != self.guest_cid || pkt.dst_cid() != HOST_CID {
            // Not from this guest or not for the host: there is no one to answer.
            log::debug!(
                "vsock: dropping a packet from cid {} to cid {}",
                pkt.src_cid(),
                pkt.dst_cid()
            );
            self.stats.bad_packets += 1;
            return;
        }
        let key = (pkt.dst_port(), pkt.src_port());
        let op = pkt.op();
        if pkt.type_() != TYPE_STREAM {
            self.stats.bad_packets += 1;
            if op != OP_RST {
                self.queue_rst(key);
            }
            return;
        }
        let now = Instant::now();
        if let Some(c) = self.conns.get_mut(&key) {
            match c.recv(pkt, now, &self.timeouts) {
                Ok(n) => self.stats.bytes_to_host += n as u64,
                Err(e) => {
                    log::debug!("vsock: connection {key:?}: {e}");
                    self.stats.bad_packets += 1;
                }
            }
            self.touch(key);
        } else if op == OP_REQUEST {
            self.connect_to_host(key, pkt.buf_alloc(), pkt.fwd_cnt());
        } else if op != OP_RST {
            // Late or bogus traffic for a connection we do not have.
            self.queue_rst(key);
        }
    }

    /// The guest asks for host port `key.0`: connect to `<uds>_<port>`.
    fn connect_to_host(&mut self, key: ConnKey, buf_alloc: u32, fwd_cnt: u32) {
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing the guest");
            self.stats.connect_errors += 1;
            self.queue_rst(key);
            return;
        }
        let mut path = OsString::from(self.uds.as_os_str());
        path.push(format!("_{}", key.0));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!(
                    "vsock: guest connect to {}: {e}",
                    Path::new(&path).display()
                );
                self.stats.connect_errors += 1;
                self.queue_rst(key);
                return;
            }
        };
        let Some(token) = self.alloc_token() else {
            self.queue_rst(key);
            return;
        };
        let c = Connection::new_peer(stream, token, key.0, key.1, buf_alloc, fwd_cnt);
        self.conns.insert(key, c);
        self.tokens.insert(token, key);
        self.stats.conns_opened += 1;
        self.touch(key);
    }

    fn queue_rst(&mut self, key: ConnKey) {
        self.rst_queue.push_back(OutHdr::new(OP_RST, key.0, key.1));
    }

    /// After anything happened to connection `key`: remove it if it ended, queue it if it
    /// has something for the guest, note that its registration may change.
    fn touch(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(end) = c.end {
            self.remove(key, end);
            return;
        }
        if !c.queued && c.has_rx() {
            c.queued = true;
            self.ready.push_back(key);
        }
        let has_deadline = c.deadline.is_some();
        self.dirty.push(key);
        if has_deadline {
            self.arm_timer();
        }
    }

    fn remove(&mut self, key: ConnKey, end: End) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        self.tokens.remove(&c.token);
        // Shut the socket now so the host sees it at once, even before `sync` drops it.
        let _ = c.stream.shutdown(Shutdown::Both);
        self.defunct.push((c.stream, c.registered.is_some()));
        if end == End::Rst {
            self.queue_rst(key);
        }
        self.stats.conns_closed += 1;
    }

    /// Writes the next packet for the guest into `pkt`; returns its used length, or `None`
    /// when there was nothing to send.
    pub fn fill_rx<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<u32> {
        if let Some(hdr) = self.rst_queue.pop_front() {
            write_header(pkt, self.guest_cid, &hdr);
            self.stats.rst_sent += 1;
            return Some(HDR_LEN);
        }
        // Each connection queued now gets one turn; one that queues itself again waits.
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            let out = c.fill_rx(pkt.data_slice().cloned());
            self.touch(key);
            if let Some(out) = out {
                write_header(pkt, self.guest_cid, &out.hdr);
                self.stats.bytes_to_guest += u64::from(out.data);
                return Some(used_len(&out));
            }
            // A connection that ended while filling queued its reset: send that.
            if let Some(hdr) = self.rst_queue.pop_front() {
                write_header(pkt, self.guest_cid, &hdr);
                self.stats.rst_sent += 1;
                return Some(HDR_LEN);
            }
        }
        None
    }

    /// Ends connections and host clients whose time is up; wakes a resting listener.
    fn sweep(&mut self, ops: &mut EventOps, now: Instant, active: bool) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            log::debug!("vsock: connection {key:?} timed out");
            self.stats.timeouts += 1;
            if let Some(c) = self.conns.get_mut(&key) {
                c.expire();
            }
            self.touch(key);
        }
        let late: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            self.stats.timeouts += 1;
            self.drop_pending(token, ops);
        }
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.listener_paused_until = None;
            if active {
                self.start(ops);
            }
        }
        let waiting = self.listener_paused_until.is_some()
            || !self.pending.is_empty()
            || self.conns.values().any(|c| c.deadline.is_some());
        if !waiting && self.timer_armed {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    /// A periodic tick while anything has a deadline; `sweep` stops it.
    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let t = &self.timeouts;
        let tick = (t.request.min(t.shutdown).min(t.connect_line) / 4)
            .clamp(Duration::from_millis(5), Duration::from_millis(250));
        match self.timer.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => log::warn!("vsock: cannot arm the timeout timer: {e}"),
        }
    }

    /// Brings the event loop in line: drops closed sockets (deregistered first), updates the
    /// registration of every connection touched since the last call.
    pub fn sync(&mut self, ops: &mut EventOps) {
        for (stream, registered) in self.defunct.drain(..) {
            if registered {
                let _ = ops.remove(Events::empty(&stream));
            }
        }
        for key in std::mem::take(&mut self.dirty) {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let want = c.interest();
            let result = match (c.registered, want) {
                (None, Some(set)) => ops.add(Events::with_data(&c.stream, c.token, set)),
                (Some(old), Some(set)) if old != set => {
                    ops.modify(Events::with_data(&c.stream, c.token, set))
                }
                (Some(_), None) => ops.remove(Events::empty(&c.stream)),
                _ => Ok(()),
            };
            match result {
                Ok(()) => c.registered = want,
                Err(e) => {
                    log::warn!("vsock: cannot watch the host socket of {key:?}: {e}");
                    self.stats.errors += 1;
                }
            }
        }
    }

    /// Closes every connection and host client without telling the guest (the caller sends
    /// a transport reset instead, or the driver is gone). Sockets are shut now and dropped
    /// at the next `sync`, which the kick event brings about.
    pub fn reset_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key, End::Quiet);
        }
        for (_, p) in self.pending.drain() {
            let _ = p.stream.shutdown(Shutdown::Both);
            self.defunct.push((p.stream, true));
        }
        self.rst_queue.clear();
        self.ready.clear();
        self.dirty.clear();
        if let Err(e) = self.kick.write(1) {
            log::warn!("vsock: cannot wake the event loop: {e}");
        }
    }

    fn alloc_token(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let t = self.next_token;
            self.next_token = t.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
            if !self.tokens.contains_key(&t) && !self.pending.contains_key(&t) {
                return Some(t);
            }
        }
        None
    }

    /// The next ephemeral host port no connection uses.
    fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port = p.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|(local, _)| *local == p) {
                return Some(p);
            }
        }
        None
    }

    #[cfg(test)]
    pub fn conn(&self, key: ConnKey) -> Option<&Connection> {
        self.conns.get(&key)
    }

    #[cfg(test)]
    pub fn tokens(&self) -> Vec<u32> {
        self.tokens.keys().copied().collect()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// `CONNECT <port>` (an optional trailing `\r` allowed), port in decimal digits.
fn parse_connect_line(line: &[u8]) -> LineState {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(port) = line.strip_prefix(b"CONNECT ") else {
        return LineState::Bad;
    };
    if port.is_empty() || !port.iter().all(u8::is_ascii_digit) {
        return LineState::Bad;
    }
    std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .map_or(LineState::Bad, LineState::Port)
}

/// Connects to the Unix socket at `path` without blocking. `UnixStream::connect` would block
/// the VMM thread while the listener's backlog is full; this fails with EAGAIN instead.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long for a Unix socket",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain system call with integer arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The family, the path and its terminating NUL; the length check above keeps it in `addr`.
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let len = libc::socklen_t::try_from(len)
        .map_err(|_| io::Error::new(ErrorKind::InvalidInput, "socket path too long"))?;
    // SAFETY: `addr` is a valid sockaddr_un that lives across the call and `len` is within it.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        let port = |l: &[u8]| match parse_connect_line(l) {
            LineState::Port(p) => Some(p),
            _ => None,
        };
        assert_eq!(port(b"CONNECT 52"), Some(52));
        assert_eq!(port(b"CONNECT 4294967295\r"), Some(u32::MAX));
        assert_eq!(port(b"CONNECT 4294967296"), None);
        assert_eq!(port(b"CONNECT +5"), None);
        assert_eq!(port(b"CONNECT "), None);
        assert_eq!(port(b"connect 5"), None);
        assert_eq!(port(b"CONNECT 5 6"), None);
        assert_eq!(port(b"\xffCONNECT 5"), None);
    }

    #[test]
    fn nonblocking_connect_reports_missing_and_overlong_paths() {
        let e = connect_nonblocking(Path::new("/nonexistent/ledge-vsock_1")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let long = "x".repeat(200);
        let e = connect_nonblocking(Path::new(&long)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
}
