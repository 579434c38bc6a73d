//! virtio-net on a host TAP device (virtio 1.x §5.1).
//!
//! Two queues: 0 receive (host → guest), 1 transmit (guest → host); no control queue, one
//! queue pair. Every frame on either side is a 12-byte `virtio_net_hdr_v1` followed by the
//! Ethernet frame, and the TAP (see `tap.rs`) uses the same header, so the device copies
//! header and frame through unchanged and only fills in `num_buffers` on receive.
//!
//! Receive: while the TAP is readable (level-triggered EPOLLIN) the device reads one frame at
//! a time into its own buffer and copies it into the guest's receive chains — with
//! VIRTIO_NET_F_MRG_RXBUF over as many chains as it needs, `num_buffers` telling the guest how
//! many. When the guest has no buffers (or too few for the frame) the device keeps that one
//! frame pending and the chains it already took, stops watching the TAP — further frames wait
//! in the kernel's TAP queue, none is dropped — and resumes when the guest notifies the
//! receive queue. A frame read from the TAP is therefore delivered exactly once.
//!
//! Transmit: each chain (header + frame, all device-readable) is gathered into one buffer and
//! written to the TAP with one write(), which keeps the frame whole. A malformed chain, or one
//! larger than `MAX_PACKET_LEN`, goes back with used length 0 and counts as an error.
//!
//! Offloads: the TAP is told (TUNSETOFFLOAD) which checksum/segmentation offloads the guest
//! acked for receive, so the kernel only hands over what the guest can take; features the
//! kernel refuses are never offered. Transmit offloads need no set-up: the kernel accepts
//! partial checksums and GSO frames from any writer with a vnet header.
//!
//! Rate limiting (`crate::rate_limiter`): separate receive and transmit limiters; each frame
//! costs one operation and its Ethernet bytes (without the vnet header). Transmit: a chain the
//! limiter refuses goes back to the available ring and the transmit queue is left alone until
//! the limiter's timer fires. Receive: a frame read from the TAP and refused is kept pending
//! (charged once it passes), the TAP is unregistered — frames wait in the kernel's queue — and
//! reading resumes on the timer.
//!
//! Ordering: `set_acked_features` (FEATURES_OK, on a vCPU thread) sets the TAP offloads
//! before `activate` (DRIVER_OK); the TAP is registered with the event loop only once the
//! device is active, and unregistered whenever the device cannot take a frame.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::raw::c_uint;
use std::sync::atomic::{fence, Ordering as AtomicOrdering};
use std::sync::Arc;

use crate::kvm::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::{
    chain_data_bytes, ActivateError, ActivateEvent, ActiveQueues, Interrupt, VirtioDevice,
    TOKEN_ACTIVATE, TOKEN_BACKEND, TOKEN_QUEUE0, TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::config::NetConfig;
use crate::devices::state::{DeviceSnapshot, StateError};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};

pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const TOKEN_RX: u32 = TOKEN_QUEUE0;
const TOKEN_TX: u32 = TOKEN_QUEUE0 + 1;
const TOKEN_TAP: u32 = TOKEN_BACKEND;
const TOKEN_RX_LIMITER: u32 = TOKEN_BACKEND + 1;
const TOKEN_TX_LIMITER: u32 = TOKEN_BACKEND + 2;

/// The largest frame: a 64 KiB GSO frame plus an Ethernet header with a VLAN tag.
pub const MAX_FRAME_LEN: usize = 64 * 1024 + 18;
/// The largest header + frame the device reads from the TAP or takes from a TX chain.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Frames received, or chains sent, per event before the device lets the loop serve others.
const RX_FRAMES_PER_EVENT: usize = 256;
const TX_CHAINS_PER_EVENT: usize = 256;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Offered whatever the TAP accepts: transmit offloads need no TAP set-up.
const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6);

/// Pairs of (TAP offload, guest receive feature); all of them need TUN_F_CSUM / GUEST_CSUM.
const RX_OFFLOADS: [(c_uint, u32); 4] = [
    (libc::TUN_F_CSUM, VIRTIO_NET_F_GUEST_CSUM),
    (libc::TUN_F_TSO4, VIRTIO_NET_F_GUEST_TSO4),
    (libc::TUN_F_TSO6, VIRTIO_NET_F_GUEST_TSO6),
    (libc::TUN_F_UFO, VIRTIO_NET_F_GUEST_UFO),
];

/// Errors of the net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the activation eventfd")]
    EventFd(#[source] io::Error),
    /// A descriptor chain the driver offered is malformed (logged, never returned to callers).
    #[error("bad descriptor chain: {0}")]
    BadChain(&'static str),
    #[error("invalid {which} rate limiter")]
    RateLimiter {
        which: &'static str,
        #[source]
        source: RateLimiterError,
    },
}

/// Counters for metrics and tests. Bytes count Ethernet frames, without the vnet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames read from the TAP that the guest never got (reset, or a chain too small).
    pub rx_drops: u64,
    /// Malformed receive chains and failed TAP reads.
    pub rx_errors: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the TAP would not take (queue full, interface down).
    pub tx_drops: u64,
    /// Malformed or oversized transmit chains and failed TAP writes.
    pub tx_errors: u64,
    /// Times the receive / transmit rate limiter stopped the device.
    pub rx_throttled: u64,
    pub tx_throttled: u64,
}

/// Where frames come from and go to.
#[derive(Debug)]
enum Backend {
    Tap(Tap),
    /// Any fd with TAP semantics — one frame per read/write, vnet header in front — that the
    /// caller configured: a socket in tests, or a TAP fd passed in by a parent.
    File(File),
}

impl Backend {
    fn file(&self) -> &File {
        match self {
            Backend::Tap(t) => t.file(),
            Backend::File(f) => f,
        }
    }
}

/// A guest receive chain the device took but has not filled yet: its writable buffers,
/// checked to lie in guest memory when it was popped.
#[derive(Debug)]
struct RxChain {
    head: u16,
    bufs: Vec<(GuestAddress, usize)>,
    cap: usize,
    /// Its position in the available ring (what `next_avail` was when it was taken).
    avail_pos: u16,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// Queue notification eventfds, in queue order (rx, tx).
    queue_evts: [Arc<EventFd>; 2],
    interrupt: Arc<Interrupt>,
    /// Receive used elements published since the last interrupt decision.
    rx_added: Wrapping<u16>,
}

/// A limiter for `cfg` (None: unlimited); `which` names it in the error.
fn limiter(which: &'static str, cfg: Option<RateLimiterConfig>) -> Result<RateLimiter, NetError> {
    RateLimiter::new(&cfg.unwrap_or_default())
        .map_err(|source| NetError::RateLimiter { which, source })
}

/// The virtio-net device.
pub struct Net {
    backend: Backend,
    mac: [u8; 6],
    avail_features: u64,
    acked: u64,
    active: Option<Active>,
    activate_evt: ActivateEvent,
    /// One frame from the TAP; `rx_pending` is its length while the guest has no room for it
    /// (or the receive limiter holds it back).
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    /// The pending frame went through the receive limiter already.
    rx_charged: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// Chains taken from the receive queue for a frame that did not fit yet (MRG_RXBUF).
    rx_held: VecDeque<RxChain>,
    /// The guest has no room: the TAP is not watched until it adds buffers.
    rx_paused: bool,
    /// The backend failed or closed: the TAP is not watched until the next activation.
    rx_dead: bool,
    tap_watched: bool,
    tx_buf: Vec<u8>,
    stats: NetStats,
}

impl Net {
    /// Attaches to (or creates) the TAP `cfg.tap`. `index` is the interface's position in the
    /// config, used for the default MAC address.
    pub fn new(cfg: &NetConfig, index: usize) -> Result<Net, NetError> {
        let tap = Tap::open(&cfg.tap)?;
        let offloads = tap.probe_offloads();
        let mut features = BASE_FEATURES;
        if offloads & libc::TUN_F_CSUM != 0 {
            for (tun, feature) in RX_OFFLOADS {
                if offloads & tun != 0 {
                    features |= bit(feature);
                }
            }
        }
        // A kernel that refuses UFO towards the reader is one that predates accepting UFO
        // frames from writers again (4.15): do not offer it either way.
        if offloads & libc::TUN_F_UFO != 0 {
            features |= bit(VIRTIO_NET_F_HOST_UFO);
        }
        let mac = cfg.mac.map_or_else(|| default_mac(index), |m| m.0);
        log::info!(
            "virtio-net: TAP {} attached, guest MAC {}, TAP offloads {offloads:#x}",
            cfg.tap,
            crate::config::MacAddr(mac)
        );
        Self::build(
            Backend::Tap(tap),
            mac,
            features,
            [cfg.rx_rate_limiter, cfg.tx_rate_limiter],
        )
    }

    /// A device on a caller-provided, non-blocking fd that behaves like a TAP with a 12-byte
    /// vnet header. Every offload is offered; the caller sets up whatever the fd needs.
    pub fn with_backend(file: File, mac: [u8; 6]) -> Result<Net, NetError> {
        let mut features = BASE_FEATURES | bit(VIRTIO_NET_F_HOST_UFO);
        for (_, feature) in RX_OFFLOADS {
            features |= bit(feature);
        }
        Self::build(Backend::File(file), mac, features, [None, None])
    }

    /// `limits` are the receive and transmit limiters' (None: unlimited).
    fn build(
        backend: Backend,
        mac: [u8; 6],
        avail_features: u64,
        limits: [Option<RateLimiterConfig>; 2],
    ) -> Result<Net, NetError> {
        let [rx, tx] = limits;
        Ok(Net {
            rx_charged: false,
            rx_limiter: limiter("receive", rx)?,
            tx_limiter: limiter("transmit", tx)?,
            backend,
            mac,
            avail_features,
            acked: 0,
            active: None,
            activate_evt: ActivateEvent::new().map_err(NetError::EventFd)?,
            rx_buf: vec![0; MAX_PACKET_LEN],
            rx_pending: None,
            rx_held: VecDeque::new(),
            rx_paused: false,
            rx_dead: false,
            tap_watched: false,
            tx_buf: vec![0; MAX_PACKET_LEN],
            stats: NetStats::default(),
        })
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The TAP's name, when the backend is a TAP.
    pub fn tap_name(&self) -> Option<&str> {
        match &self.backend {
            Backend::Tap(t) => Some(t.name()),
            Backend::File(_) => None,
        }
    }

    /// Whether the TAP should be watched now: active, room in the guest, backend alive, the
    /// receive limiter not waiting.
    fn wants_tap(&self) -> bool {
        self.active.is_some() && !self.rx_paused && !self.rx_dead && !self.rx_limiter.is_blocked()
    }

    /// Moves frames from the TAP into the guest until the TAP is empty, the guest has no room,
    /// or the per-event budget is spent. Returns how many chains were used.
    pub fn process_rx(&mut self) -> usize {
        let Some(a) = self.active.as_mut() else {
            return 0;
        };
        if self.rx_limiter.is_blocked() {
            // Its timer brings us back.
            return 0;
        }
        let mrg = self.acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut used = 0;
        let mut frames = 0;
        self.rx_paused = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => {
                    if frames >= RX_FRAMES_PER_EVENT || self.rx_dead {
                        break;
                    }
                    match read_frame(
                        self.backend.file(),
                        &mut self.rx_buf,
                        &mut self.stats,
                        &mut self.rx_dead,
                    ) {
                        Some(len) => len,
                        None => break,
                    }
                }
            };
            self.rx_pending = Some(len);
            if !self.rx_charged {
                let lim = &mut self.rx_limiter;
                if !lim.consume_request(|| (len - VNET_HDR_LEN) as u64) {
                    // Held until the timer; the TAP is unregistered meanwhile.
                    self.stats.rx_throttled += 1;
                    break;
                }
                self.rx_charged = true;
            }
            let Some(buf) = self.rx_buf.get_mut(..len) else {
                // Cannot happen: reads are bounded by the buffer.
                self.rx_pending = None;
                self.rx_charged = false;
                continue;
            };
            match deliver(a, &mut self.rx_held, buf, mrg, &mut self.stats, &mut used) {
                Delivery::Done => {
                    self.rx_pending = None;
                    self.rx_charged = false;
                    frames += 1;
                }
                Delivery::NoRoom => {
                    self.rx_paused = true;
                    break;
                }
            }
        }
        if used > 0 && rx_needs_notification(a) {
            a.interrupt.signal_used_queue();
        }
        used
    }

    /// Sends every chain the driver made available to the TAP (up to the per-event budget;
    /// past it the device re-kicks itself). Returns how many chains were used.
    pub fn process_tx(&mut self) -> usize {
        let Some(a) = self.active.as_mut() else {
            return 0;
        };
        let limiter = &mut self.tx_limiter;
        if limiter.is_blocked() {
            return 0;
        }
        let mut used = 0;
        'outer: loop {
            let mut popped = false;
            while let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) {
                if !limiter.consume_request(|| chain_data_bytes(&chain, VNET_HDR_LEN as u64)) {
                    // Back into the available ring; the timer resumes transmission.
                    a.tx.go_to_previous_position();
                    self.stats.tx_throttled += 1;
                    break 'outer;
                }
                popped = true;
                let head = chain.head_index();
                send(
                    &a.mem,
                    chain,
                    self.backend.file(),
                    &mut self.tx_buf,
                    &mut self.stats,
                );
                // The device writes nothing into transmit buffers: used length 0.
                if let Err(e) = a.tx.add_used(&a.mem, head, 0) {
                    log::warn!("virtio-net: cannot return tx chain {head}: {e}");
                    break 'outer;
                }
                used += 1;
                if used >= TX_CHAINS_PER_EVENT {
                    // Let the event loop serve others; come back through our own eventfd.
                    if let Err(e) = a.queue_evts[TX_QUEUE].write(1) {
                        log::warn!("virtio-net: cannot re-kick the tx queue: {e}");
                    }
                    break 'outer;
                }
            }
            // A hostile avail index makes pop fail while enable_notification sees "more".
            if !popped {
                break;
            }
            match a.tx.enable_notification(&a.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-net: tx queue: {e}");
                    break;
                }
            }
        }
        if used > 0 {
            notify_tx(a);
        }
        used
    }

    /// Brings the TAP's epoll registration in line with `wants_tap`.
    fn sync_tap(&mut self, ops: &mut EventOps) {
        let want = self.wants_tap();
        if want == self.tap_watched {
            return;
        }
        let fd = self.backend.file().as_raw_fd();
        let r = if want {
            ops.add(Events::with_data_raw(fd, TOKEN_TAP, EventSet::IN))
        } else {
            ops.remove(Events::with_data_raw(fd, TOKEN_TAP, EventSet::IN))
        };
        match r {
            Ok(()) => self.tap_watched = want,
            Err(e) => log::error!("virtio-net: cannot change the TAP's registration: {e}"),
        }
    }

    /// TAP offloads matching the receive features the guest acked.
    fn tap_offloads(acked: u64) -> c_uint {
        if acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
            // TSO/UFO without checksum offload is refused by the kernel (and by the spec).
            return 0;
        }
        RX_OFFLOADS
            .iter()
            .filter(|(_, f)| acked & bit(*f) != 0)
            .fold(0, |acc, (t, _)| acc | t)
    }
}

enum Delivery {
    Done,
    NoRoom,
}

/// Reads one frame from the backend; `None` when there is none (or the backend failed).
fn read_frame(
    mut file: &File,
    buf: &mut [u8],
    stats: &mut NetStats,
    dead: &mut bool,
) -> Option<usize> {
    loop {
        match file.read(buf) {
            Ok(0) => {
                log::warn!("virtio-net: backend closed; receive stopped");
                *dead = true;
                return None;
            }
            Ok(n) if n < VNET_HDR_LEN => {
                log::debug!("virtio-net: {n}-byte read from the TAP ignored");
                stats.rx_errors += 1;
            }
            Ok(n) => return Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::error!("virtio-net: TAP read failed, receive stopped: {e}");
                stats.rx_errors += 1;
                *dead = true;
                return None;
            }
        }
    }
}

/// Puts `frame` (vnet header + Ethernet frame) into the guest's receive chains, taking more
/// from the queue as needed, and publishes the chains it used at once. `NoRoom` leaves the
/// chains taken so far in `held`.
fn deliver(
    a: &mut Active,
    held: &mut VecDeque<RxChain>,
    frame: &mut [u8],
    mrg: bool,
    stats: &mut NetStats,
    used: &mut usize,
) -> Delivery {
    let mut batch = Vec::new();
    let r = fill_chains(a, held, frame, mrg, stats, &mut batch);
    *used += publish_rx_used(a, &batch);
    r
}

fn fill_chains(
    a: &mut Active,
    held: &mut VecDeque<RxChain>,
    frame: &mut [u8],
    mrg: bool,
    stats: &mut NetStats,
    batch: &mut Vec<(u16, u32)>,
) -> Delivery {
    let len = frame.len();
    let mut retried = false;
    loop {
        let have = held.iter().fold(0usize, |s, c| s.saturating_add(c.cap));
        let enough = if mrg { have >= len } else { !held.is_empty() };
        if enough {
            break;
        }
        let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) else {
            // Out of buffers: ask for a notification, then look once more for a race.
            match a.rx.enable_notification(&a.mem) {
                Ok(true) if !retried => {
                    retried = true;
                    continue;
                }
                Ok(_) => {}
                Err(e) => log::warn!("virtio-net: rx queue: {e}"),
            }
            return Delivery::NoRoom;
        };
        retried = false;
        let head = chain.head_index();
        let avail_pos = a.rx.next_avail().wrapping_sub(1);
        match parse_chain(&a.mem, chain, true, usize::MAX) {
            Ok((bufs, cap)) if cap >= VNET_HDR_LEN => held.push_back(RxChain {
                head,
                bufs,
                cap,
                avail_pos,
            }),
            r => {
                let why = r
                    .err()
                    .unwrap_or(NetError::BadChain("shorter than the header"));
                log::debug!("virtio-net: rx chain {head}: {why}");
                stats.rx_errors += 1;
                batch.push((head, 0));
            }
        }
    }

    // How many chains the frame takes (1 without MRG_RXBUF).
    let mut count = 0usize;
    let mut rest = len;
    for c in held.iter() {
        count += 1;
        if c.cap >= rest || !mrg {
            break;
        }
        rest -= c.cap;
    }
    if !mrg && held.front().is_some_and(|c| c.cap < len) {
        // Without MRG_RXBUF each buffer must take a whole frame; the guest gave a short one.
        if let Some(c) = held.pop_front() {
            log::debug!(
                "virtio-net: rx chain {} too small for a {len}-byte frame",
                c.head
            );
            stats.rx_drops += 1;
            batch.push((c.head, 0));
        }
        return Delivery::Done;
    }
    // `count` <= queue size, which fits in a u16.
    let num_buffers = u16::try_from(count).unwrap_or(u16::MAX).to_le_bytes();
    if let Some(nb) = frame.get_mut(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2) {
        nb.copy_from_slice(&num_buffers);
    }
    let mut off = 0;
    let mut failed = false;
    for _ in 0..count {
        let Some(c) = held.pop_front() else { break };
        let n = c.cap.min(len - off);
        let ok = !failed && write_chain(&a.mem, &c, frame.get(off..off + n).unwrap_or(&[]));
        failed |= !ok;
        let n = if ok { n } else { 0 };
        // n <= MAX_PACKET_LEN.
        batch.push((c.head, u32::try_from(n).unwrap_or(0)));
        off += n;
    }
    if failed {
        stats.rx_errors += 1;
        stats.rx_drops += 1;
    } else {
        stats.rx_frames += 1;
        stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
    }
    Delivery::Done
}

/// Copies `data` into the chain's buffers, in order.
fn write_chain(mem: &GuestMemoryMmap, c: &RxChain, mut data: &[u8]) -> bool {
    for &(addr, blen) in &c.bufs {
        if data.is_empty() {
            break;
        }
        let n = blen.min(data.len());
        let (now, later) = data.split_at(n);
        if let Err(e) = mem.write_slice(now, addr) {
            log::warn!("virtio-net: rx chain {}: {e}", c.head);
            return false;
        }
        data = later;
    }
    data.is_empty()
}

/// Gathers one transmit chain and writes it to the backend in one write.
fn send(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    mut file: &File,
    buf: &mut [u8],
    stats: &mut NetStats,
) {
    let head = chain.head_index();
    let len = match parse_chain(mem, chain, false, MAX_PACKET_LEN)
        .and_then(|(bufs, len)| gather(mem, &bufs, buf).map(|()| len))
    {
        Ok(len) if len >= VNET_HDR_LEN => len,
        r => {
            let why = r
                .err()
                .unwrap_or(NetError::BadChain("shorter than the header"));
            log::debug!("virtio-net: tx chain {head}: {why}");
            stats.tx_errors += 1;
            return;
        }
    };
    let Some(packet) = buf.get(..len) else {
        stats.tx_errors += 1;
        return;
    };
    match file.write(packet) {
        Ok(n) if n == len => {
            stats.tx_frames += 1;
            stats.tx_bytes += (len - VNET_HDR_LEN) as u64;
        }
        Ok(n) => {
            log::debug!("virtio-net: short TAP write ({n} of {len} bytes)");
            stats.tx_errors += 1;
        }
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock
                || e.raw_os_error() == Some(libc::EIO)
                || e.raw_os_error() == Some(libc::ENOBUFS) =>
        {
            // Queue full or interface down: what a real NIC does, the frame is lost.
            stats.tx_drops += 1;
        }
        Err(e) => {
            // E.g. a vnet header the kernel refuses (bad GSO type or sizes).
            log::debug!("virtio-net: TAP write of chain {head} failed: {e}");
            stats.tx_errors += 1;
        }
    }
}

fn gather(
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, usize)],
    out: &mut [u8],
) -> Result<(), NetError> {
    let mut off = 0usize;
    for &(addr, len) in bufs {
        let end = off.checked_add(len).ok_or(NetError::BadChain("too long"))?;
        let dst = out
            .get_mut(off..end)
            .ok_or(NetError::BadChain("too long"))?;
        mem.read_slice(dst, addr)
            .map_err(|_| NetError::BadChain("buffer outside guest memory"))?;
        off = end;
    }
    Ok(())
}

/// Walks a chain once, checking each descriptor: direction (all device-writable for receive,
/// all device-readable for transmit), non-zero length, inside guest memory, total length
/// without overflow and at most `limit`, and a proper end (not cut short by a loop, a bad
/// `next` or more descriptors than the queue holds). Returns the buffers and total length.
fn parse_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
    limit: usize,
) -> Result<(Vec<(GuestAddress, usize)>, usize), NetError> {
    let mut bufs = Vec::new();
    let mut total = 0usize;
    let mut ended = false;
    for d in chain {
        if d.is_write_only() != writable {
            return Err(NetError::BadChain("buffer in the wrong direction"));
        }
        let len = usize::try_from(d.len()).map_err(|_| NetError::BadChain("too long"))?;
        if len == 0 {
            return Err(NetError::BadChain("zero-length buffer"));
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), len, access) {
            return Err(NetError::BadChain("buffer outside guest memory"));
        }
        total = total
            .checked_add(len)
            .filter(|&t| t <= limit)
            .ok_or(NetError::BadChain("too long"))?;
        bufs.push((d.addr(), len));
        ended = !d.has_next();
    }
    if !ended {
        return Err(NetError::BadChain(
            "no end (a loop, a bad next index or more descriptors than the queue)",
        ));
    }
    Ok((bufs, total))
}

fn notify_tx(a: &mut Active) {
    match a.tx.needs_notification(&a.mem) {
        Ok(true) => a.interrupt.signal_used_queue(),
        Ok(false) => {}
        Err(e) => log::warn!("virtio-net: tx queue: {e}"),
    }
}

/// Writes receive used elements and only then moves the used index past all of them.
///
/// `Queue::add_used` publishes each element as it goes, but a driver reading the ring between
/// two elements of one merged frame would see fewer buffers than `num_buffers` and drop the
/// frame (Linux: "rx error: N buffers out of M missing"). Returns how many were published.
fn publish_rx_used(a: &mut Active, batch: &[(u16, u32)]) -> usize {
    if batch.is_empty() {
        return 0;
    }
    let size = a.rx.size();
    let ring = GuestAddress(a.rx.used_ring());
    let mut idx = Wrapping(a.rx.next_used());
    for &(head, len) in batch {
        if head >= size {
            log::warn!("virtio-net: rx head {head} outside the queue");
            return 0;
        }
        let slot = 4 + 8 * u64::from(idx.0 % size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let written = ring
            .checked_add(slot)
            .is_some_and(|addr| a.mem.write_slice(&elem, addr).is_ok());
        if !written {
            log::warn!("virtio-net: rx used ring outside guest memory");
            return 0;
        }
        idx += Wrapping(1);
    }
    // Release: the elements (and the frame bytes before them) are visible before the index.
    let published = ring.checked_add(2).is_some_and(|addr| {
        a.mem
            .store(idx.0.to_le(), addr, AtomicOrdering::Release)
            .is_ok()
    });
    if !published {
        log::warn!("virtio-net: rx used ring outside guest memory");
        return 0;
    }
    a.rx.set_next_used(idx.0);
    // At most queue-size elements per frame.
    a.rx_added += Wrapping(u16::try_from(batch.len()).unwrap_or(u16::MAX));
    batch.len()
}

/// `Queue::needs_notification` for the receive queue, whose used index this file moves itself
/// (virtio 1.x §2.7.10: with EVENT_IDX, interrupt when the index passes `used_event`).
fn rx_needs_notification(a: &mut Active) -> bool {
    let added = std::mem::replace(&mut a.rx_added, Wrapping(0));
    if !a.rx.event_idx_enabled() {
        return true;
    }
    // The used index store above comes before the used_event load below.
    fence(AtomicOrdering::SeqCst);
    let new = Wrapping(a.rx.next_used());
    let used_event = GuestAddress(a.rx.avail_ring())
        .checked_add(4 + 2 * u64::from(a.rx.size()))
        .and_then(|addr| a.mem.load::<u16>(addr, AtomicOrdering::Relaxed).ok());
    match used_event {
        Some(e) => new - Wrapping(u16::from_le(e)) - Wrapping(1) < added,
        None => true,
    }
}

/// A locally administered unicast MAC derived from the interface's index: 06:00:ac:10:00:<i+2>.
fn default_mac(index: usize) -> [u8; 6] {
    let n = index.wrapping_add(2);
    [0x06, 0x00, 0xac, 0x10, (n >> 8) as u8, n as u8]
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked & self.avail_features;
        if let Backend::Tap(tap) = &self.backend {
            if let Err(e) = tap.set_offload(Self::tap_offloads(self.acked)) {
                // The TAP then hands over plain frames only, which every guest can take.
                log::warn!("virtio-net: {e}");
            }
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status (le16); nothing after without MQ/MTU.
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, q: ActiveQueues) -> Result<(), ActivateError> {
        let got = q.queues.len();
        let mut queues = q.queues.into_iter();
        let mut evts = q.queue_evts.into_iter();
        let (Some(rx), Some(tx), Some(rx_evt), Some(tx_evt)) =
            (queues.next(), queues.next(), evts.next(), evts.next())
        else {
            return Err(ActivateError::QueueCount { want: 2, got });
        };
        self.active = Some(Active {
            mem: q.mem,
            rx,
            tx,
            queue_evts: [rx_evt, tx_evt],
            interrupt: q.interrupt,
            rx_added: Wrapping(0),
        });
        self.rx_paused = false;
        self.rx_dead = false;
        self.activate_evt.signal()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        if self.rx_pending.take().is_some() {
            self.stats.rx_drops += 1;
        }
        self.rx_charged = false;
        self.rx_held.clear();
        self.rx_paused = false;
        if let Backend::Tap(tap) = &self.backend {
            if let Err(e) = tap.set_offload(0) {
                log::warn!("virtio-net: {e}");
            }
        }
        // The TAP registration is dropped at the next event (reset runs on a vCPU thread).
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.stats).unwrap_or_default()
    }

    fn save_state(&self) -> DeviceSnapshot {
        DeviceSnapshot::Net { mac: self.mac }
    }

    /// Keeps the MAC the guest knows (a clone may come up on another TAP, but the guest's
    /// interface keeps its address). The TAP offloads follow from `set_acked_features`, which
    /// the transport calls on restore.
    fn restore_state(&mut self, s: &DeviceSnapshot) -> Result<(), StateError> {
        let DeviceSnapshot::Net { mac } = s else {
            return Err(s.wrong_kind("net"));
        };
        if *mac != self.mac {
            log::info!(
                "virtio-net: guest MAC {} restored (configured: {})",
                crate::config::MacAddr(*mac),
                crate::config::MacAddr(self.mac)
            );
        }
        self.mac = *mac;
        Ok(())
    }

    /// Receive chains held for a frame that did not fit yet go back to the available ring
    /// (they are the last ones taken, unless the guest interleaved malformed chains, which
    /// were returned already: then the held ones are left to the guest's reset). The frame
    /// itself, read from the old TAP, is not saved: it is lost, as on a real network.
    fn queue_states(&self) -> Vec<QueueState> {
        let Some(a) = &self.active else {
            return Vec::new();
        };
        let next = a.rx.next_avail();
        let held = u16::try_from(self.rx_held.len()).unwrap_or(u16::MAX);
        let first = next.wrapping_sub(held);
        let contiguous = (0u16..)
            .zip(&self.rx_held)
            .all(|(i, c)| c.avail_pos == first.wrapping_add(i));
        let rx = if contiguous {
            super::rewound_state(&a.rx, held)
        } else {
            log::warn!(
                "virtio-net: {held} receive chains taken out of order cannot be put back; \
                 the guest loses them"
            );
            a.rx.state()
        };
        vec![rx, a.tx.state()]
    }

    fn rate_limiter_mut(&mut self, field: &str) -> Option<&mut RateLimiter> {
        match field {
            "rx_rate_limiter" => Some(&mut self.rx_limiter),
            "tx_rate_limiter" => Some(&mut self.tx_limiter),
            _ => None,
        }
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                if let Some(a) = &self.active {
                    self.activate_evt.on_activate(ops, &a.queue_evts);
                }
                self.process_tx();
                self.process_rx();
            }
            TOKEN_RX => {
                if let Some(a) = &self.active {
                    let _ = a.queue_evts[RX_QUEUE].read();
                }
                self.process_rx();
            }
            TOKEN_TX => {
                if let Some(a) = &self.active {
                    let _ = a.queue_evts[TX_QUEUE].read();
                }
                self.process_tx();
            }
            TOKEN_TAP => {
                self.process_rx();
            }
            TOKEN_RX_LIMITER => {
                self.rx_limiter.on_timer();
                self.process_rx();
            }
            TOKEN_TX_LIMITER => {
                self.tx_limiter.on_timer();
                self.process_tx();
            }
            other => log::debug!("virtio-net: unexpected event token {other}"),
        }
        self.sync_tap(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activate_evt.watch(ops);
        for (l, token) in [
            (&self.rx_limiter, TOKEN_RX_LIMITER),
            (&self.tx_limiter, TOKEN_TX_LIMITER),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(l.timer_fd(), token, EventSet::IN)) {
                log::error!("virtio-net: cannot watch a rate limiter's timer: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{active, memory, queue_from_mock};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 0x42];
    const TX_BASE: u64 = 0x4000;
    /// Where each queue's used ring is, from the queue's base (after a 256-entry desc table
    /// and avail ring).
    const USED_OFFSET: u64 = 0x2000;
    const W: bool = true;
    const R: bool = false;

    type Mock<'a> = MockSplitQueue<'a, GuestMemoryMmap>;

    /// A device on one end of a datagram socket pair (message boundaries kept, like a TAP),
    /// activated on two mock queues of `size` entries; the other end plays the host network.
    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        rx: Mock<'a>,
        tx: Mock<'a>,
        size: u16,
        net: Net,
        peer: UnixDatagram,
        irq: Arc<Interrupt>,
        next_desc: [u16; 2],
    }

    fn socket_net() -> (Net, UnixDatagram) {
        let (dev, peer) = UnixDatagram::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let net = Net::with_backend(File::from(OwnedFd::from(dev)), MAC).unwrap();
        (net, peer)
    }

    fn rig(mem: &GuestMemoryMmap, size: u16, acked: u64, event_idx: bool) -> Rig<'_> {
        let (net, peer) = socket_net();
        rig_with(mem, size, acked, event_idx, net, peer)
    }

    fn rig_with(
        mem: &GuestMemoryMmap,
        size: u16,
        acked: u64,
        event_idx: bool,
        mut net: Net,
        peer: UnixDatagram,
    ) -> Rig<'_> {
        let rx = MockSplitQueue::create(mem, GuestAddress(0), size);
        let tx = MockSplitQueue::create(mem, GuestAddress(TX_BASE), size);
        let mut qs = vec![queue_from_mock(&rx, size), queue_from_mock(&tx, size)];
        for (q, base) in qs.iter_mut().zip([0, TX_BASE]) {
            // MockSplitQueue (virtio-queue 0.18) places its used ring over the second half of
            // its avail ring (`end()` counts entries as bytes); use a used ring of our own.
            let used = base + USED_OFFSET;
            q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
            q.set_event_idx(event_idx);
        }
        net.set_acked_features(VIRTIO_F_VERSION_1 | acked);
        let (act, irq) = active(mem, qs);
        net.activate(act).unwrap();
        Rig {
            mem,
            rx,
            tx,
            size,
            net,
            peer,
            irq,
            next_desc: [0, 0],
        }
    }

    impl Rig<'_> {
        /// Makes one chain of (address, length, device-writable) buffers available.
        fn push(&mut self, queue: usize, bufs: &[(u64, u32, bool)]) {
            let descs: Vec<RawDescriptor> = bufs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, w))| {
                    let last = i + 1 == bufs.len();
                    let flags = if w { VRING_DESC_F_WRITE } else { 0 }
                        | if last { 0 } else { VRING_DESC_F_NEXT };
                    let next = (self.next_desc[queue] + i as u16 + 1) % self.size;
                    desc(addr, len, flags, next)
                })
                .collect();
            self.push_raw(queue, &descs);
        }

        /// Stores descriptors as given (links untouched) and makes the first one available.
        fn push_raw(&mut self, queue: usize, descs: &[RawDescriptor]) {
            let mock = if queue == RX_QUEUE {
                &self.rx
            } else {
                &self.tx
            };
            let first = self.next_desc[queue];
            for (i, d) in descs.iter().enumerate() {
                let idx = (first + i as u16) % self.size;
                mock.desc_table().store(idx, *d).unwrap();
            }
            self.next_desc[queue] = (first + descs.len() as u16) % self.size;
            let avail = mock.avail().idx().load();
            mock.avail()
                .ring()
                .ref_at(usize::from(avail % self.size))
                .unwrap()
                .store(first);
            mock.avail().idx().store(avail.wrapping_add(1));
        }

        /// The used ring of a queue: (head, len) pairs.
        fn used(&self, queue: usize) -> Vec<(u32, u32)> {
            let ring = if queue == RX_QUEUE { 0 } else { TX_BASE } + USED_OFFSET;
            let n: u16 = self.mem.read_obj(GuestAddress(ring + 2)).unwrap();
            (0..n)
                .map(|i| {
                    let at = ring + 4 + 8 * u64::from(i % self.size);
                    let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                    let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                    (id, len)
                })
                .collect()
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        fn host_recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; MAX_PACKET_LEN + 100];
            match self.peer.recv(&mut buf) {
                Ok(n) => Some(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// A vnet header (no offloads, num_buffers 0 as the TAP leaves it) and a frame of `len`
    /// bytes with a recognisable pattern.
    fn packet(len: usize, seed: u8) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR_LEN];
        p.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        p
    }

    fn with_num_buffers(p: &[u8], n: u16) -> Vec<u8> {
        let mut p = p.to_vec();
        p[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
        p
    }

    #[test]
    fn tx_chain_becomes_one_write() {
        let mem = memory();
        let mut r = rig(&mem, 16, 0, false);
        let p = packet(1000, 1);
        mem.write_slice(&p[..12], GuestAddress(0x10000)).unwrap();
        mem.write_slice(&p[12..500], GuestAddress(0x11000)).unwrap();
        mem.write_slice(&p[500..], GuestAddress(0x12000)).unwrap();
        r.push(
            TX_QUEUE,
            &[(0x10000, 12, R), (0x11000, 488, R), (0x12000, 512, R)],
        );
        assert_eq!(r.net.process_tx(), 1);
        assert_eq!(r.host_recv().as_deref(), Some(&p[..]));
        assert_eq!(r.host_recv(), None, "exactly one frame");
        assert_eq!(r.used(TX_QUEUE), vec![(0, 0)]);
        assert_eq!(r.irq.status() & 1, 1);
        let s = r.net.stats();
        assert_eq!((s.tx_frames, s.tx_bytes, s.tx_errors), (1, 1000, 0));
    }

    fn wait_readable(fd: std::os::fd::RawFd) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1, "the limiter's timer fires");
    }

    /// One frame per 150 ms each way: the second frame waits for the limiter's timer — a
    /// transmit chain back in the ring, a received frame pending with the TAP unwatched.
    #[test]
    fn limiters_hold_frames_back_until_their_timer() {
        use crate::rate_limiter::TokenBucketConfig;
        let mem = memory();
        let (mut net, peer) = socket_net();
        let one_per_150ms = Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig::new(1, 150)),
        });
        net.rx_limiter = limiter("receive", one_per_150ms).unwrap();
        net.tx_limiter = limiter("transmit", one_per_150ms).unwrap();
        let mut r = rig_with(&mem, 16, 0, false, net, peer);

        let (p1, p2) = (packet(100, 1), packet(100, 2));
        mem.write_slice(&p1, GuestAddress(0x10000)).unwrap();
        mem.write_slice(&p2, GuestAddress(0x11000)).unwrap();
        r.push(TX_QUEUE, &[(0x10000, 112, R)]);
        r.push(TX_QUEUE, &[(0x11000, 112, R)]);
        assert_eq!(r.net.process_tx(), 1);
        assert_eq!(r.host_recv().as_deref(), Some(&p1[..]));
        assert_eq!(r.host_recv(), None, "the second frame waits");
        assert!(r.net.tx_limiter.is_blocked());
        let a = r.net.active.as_ref().unwrap();
        assert_eq!(
            a.tx.next_avail(),
            1,
            "the refused chain is back in the ring"
        );
        assert_eq!(
            r.net.process_tx(),
            0,
            "a notification meanwhile changes nothing"
        );
        wait_readable(r.net.tx_limiter.timer_fd());
        r.net.tx_limiter.on_timer();
        assert_eq!(r.net.process_tx(), 1);
        assert_eq!(r.host_recv().as_deref(), Some(&p2[..]));
        assert_eq!(r.used(TX_QUEUE), vec![(0, 0), (1, 0)]);

        r.push(RX_QUEUE, &[(0x20000, 2000, W)]);
        r.push(RX_QUEUE, &[(0x22000, 2000, W)]);
        let (f1, f2) = (packet(300, 3), packet(300, 4));
        r.peer.send(&f1).unwrap();
        r.peer.send(&f2).unwrap();
        assert_eq!(r.net.process_rx(), 1);
        assert_eq!(r.net.rx_pending, Some(312), "read from the TAP, held back");
        assert!(
            !r.net.wants_tap(),
            "the TAP is not watched while the limiter waits"
        );
        wait_readable(r.net.rx_limiter.timer_fd());
        r.net.rx_limiter.on_timer();
        assert!(r.net.wants_tap());
        assert_eq!(r.net.process_rx(), 1);
        assert_eq!(r.used(RX_QUEUE), vec![(0, 312), (1, 312)]);
        assert_eq!(r.read(0x22000, 312), with_num_buffers(&f2, 1));
        let s = r.net.stats();
        assert_eq!((s.tx_frames, s.tx_throttled), (2, 1));
        assert_eq!((s.rx_frames, s.rx_throttled, s.rx_drops), (2, 1, 0));
    }

    #[test]
    fn rx_frame_fills_one_chain_without_mrg() {
        let mem = memory();
        let mut r = rig(&mem, 16, 0, false);
        r.push(RX_QUEUE, &[(0x20000, 1000, W), (0x21000, 1000, W)]);
        let p = packet(1500, 2);
        r.peer.send(&p).unwrap();
        assert_eq!(r.net.process_rx(), 1);
        assert_eq!(r.used(RX_QUEUE), vec![(0, 1512)]);
        let mut got = r.read(0x20000, 1000);
        got.extend(r.read(0x21000, 512));
        assert_eq!(got, with_num_buffers(&p, 1));
        assert_eq!(
            r.read(0x21000 + 512, 16),
            vec![0; 16],
            "nothing past the frame"
        );
        assert_eq!(r.irq.status() & 1, 1);
        let s = r.net.stats();
        assert_eq!((s.rx_frames, s.rx_bytes, s.rx_drops), (1, 1500, 0));
        // TAP empty now: the device keeps watching it.
        assert!(r.net.wants_tap());
    }

    #[test]
    fn round_trip_both_ways() {
        let mem = memory();
        let mut r = rig(&mem, 16, bit(VIRTIO_NET_F_MRG_RXBUF), true);
        for i in 0..4u64 {
            r.push(RX_QUEUE, &[(0x20000 + i * 0x1000, 2048, W)]);
        }
        let out = packet(60, 3);
        mem.write_slice(&out, GuestAddress(0x30000)).unwrap();
        r.push(TX_QUEUE, &[(0x30000, out.len() as u32, R)]);
        r.net.process_tx();
        let sent = r.host_recv().unwrap();
        assert_eq!(sent, out);
        // The "host" answers with the same frame.
        r.peer.send(&sent).unwrap();
        r.net.process_rx();
        assert_eq!(r.used(RX_QUEUE), vec![(0, 72)]);
        assert_eq!(r.read(0x20000, 72), with_num_buffers(&out, 1));
    }

    #[test]
    fn mrg_rxbuf_spreads_a_64k_frame_over_chains() {
        let mem = memory();
        let mut r = rig(&mem, 32, bit(VIRTIO_NET_F_MRG_RXBUF), false);
        for i in 0..20u64 {
            r.push(RX_QUEUE, &[(0x20000 + i * 0x1000, 4096, W)]);
        }
        let p = packet(MAX_FRAME_LEN, 4);
        let len = p.len();
        r.peer.send(&p).unwrap();
        r.peer.send(&packet(100, 5)).unwrap();
        r.net.process_rx();
        let used = r.used(RX_QUEUE);
        let chains = len.div_ceil(4096);
        assert_eq!(used.len(), chains + 1);
        let mut got = Vec::new();
        for (i, &(head, n)) in used[..chains].iter().enumerate() {
            assert_eq!(head, i as u32);
            let want = if i + 1 == chains {
                len - 4096 * i
            } else {
                4096
            };
            assert_eq!(n as usize, want);
            got.extend(r.read(0x20000 + i as u64 * 0x1000, want));
        }
        assert_eq!(got, with_num_buffers(&p, chains as u16));
        // The next frame starts in the next chain, on its own.
        assert_eq!(used[chains], (chains as u32, 112));
        let next = r.read(0x20000 + chains as u64 * 0x1000, 112);
        assert_eq!(next, with_num_buffers(&packet(100, 5), 1));
        assert_eq!(r.net.stats().rx_frames, 2);
    }

    #[test]
    fn rx_without_buffers_pauses_then_delivers_each_frame_once() {
        let mem = memory();
        let mut r = rig(&mem, 16, bit(VIRTIO_NET_F_MRG_RXBUF), false);
        let (a, b) = (packet(100, 6), packet(200, 7));
        r.peer.send(&a).unwrap();
        r.peer.send(&b).unwrap();
        assert_eq!(r.net.process_rx(), 0);
        assert!(!r.net.wants_tap(), "no buffers: stop watching the TAP");
        assert_eq!(r.net.rx_pending, Some(112), "one frame held in the device");
        // Another TAP event while paused (e.g. already queued) changes nothing.
        assert_eq!(r.net.process_rx(), 0);
        r.push(RX_QUEUE, &[(0x20000, 2048, W)]);
        r.push(RX_QUEUE, &[(0x21000, 2048, W)]);
        r.push(RX_QUEUE, &[(0x22000, 2048, W)]);
        // The guest's notify.
        assert_eq!(r.net.process_rx(), 2);
        assert!(r.net.wants_tap());
        assert_eq!(r.used(RX_QUEUE), vec![(0, 112), (1, 212)]);
        assert_eq!(r.read(0x20000, 112), with_num_buffers(&a, 1));
        assert_eq!(r.read(0x21000, 212), with_num_buffers(&b, 1));
        assert_eq!(r.net.process_rx(), 0, "nothing delivered twice");
        let s = r.net.stats();
        assert_eq!((s.rx_frames, s.rx_drops), (2, 0));
    }

    #[test]
    fn mrg_frame_waits_for_enough_buffers_and_asks_to_be_notified() {
        let mem = memory();
        let mut r = rig(&mem, 16, bit(VIRTIO_NET_F_MRG_RXBUF), true);
        r.push(RX_QUEUE, &[(0x20000, 4096, W)]);
        let p = packet(6000, 8);
        r.peer.send(&p).unwrap();
        assert_eq!(r.net.process_rx(), 0);
        assert!(!r.net.wants_tap());
        // The chain taken is held, and avail_event asks for a kick on the very next buffer.
        let avail_event_addr = USED_OFFSET + 4 + 8 * 16;
        let avail_event: u16 = mem.read_obj(GuestAddress(avail_event_addr)).unwrap();
        assert_eq!(avail_event, 1);
        assert_eq!(r.used(RX_QUEUE), vec![]);
        r.push(RX_QUEUE, &[(0x21000, 4096, W)]);
        assert_eq!(r.net.process_rx(), 2);
        assert_eq!(r.used(RX_QUEUE), vec![(0, 4096), (1, 6012 - 4096)]);
        let mut got = r.read(0x20000, 4096);
        got.extend(r.read(0x21000, 6012 - 4096));
        assert_eq!(got, with_num_buffers(&p, 2));
    }

    #[test]
    fn rx_interrupts_follow_used_event() {
        let mem = memory();
        let mut r = rig(&mem, 16, bit(VIRTIO_NET_F_MRG_RXBUF), true);
        let used_event = GuestAddress(r.rx.avail_addr().0 + 4 + 2 * 16);
        // The driver wants an interrupt only after the 6th used buffer.
        mem.write_obj(5u16, used_event).unwrap();
        r.push(RX_QUEUE, &[(0x20000, 2048, W)]);
        r.peer.send(&packet(100, 1)).unwrap();
        assert_eq!(r.net.process_rx(), 1);
        assert_eq!(r.irq.status(), 0, "suppressed by used_event");
        // Now it wants one as soon as the 2nd is used.
        mem.write_obj(1u16, used_event).unwrap();
        r.push(RX_QUEUE, &[(0x21000, 2048, W)]);
        r.peer.send(&packet(100, 2)).unwrap();
        assert_eq!(r.net.process_rx(), 1);
        assert_eq!(r.irq.status() & 1, 1);
        assert_eq!(r.used(RX_QUEUE).len(), 2);
    }

    #[test]
    fn short_chain_without_mrg_drops_the_frame() {
        let mem = memory();
        let mut r = rig(&mem, 16, 0, false);
        r.push(RX_QUEUE, &[(0x20000, 100, W)]);
        r.push(RX_QUEUE, &[(0x21000, 2048, W)]);
        r.peer.send(&packet(500, 9)).unwrap();
        r.peer.send(&packet(50, 10)).unwrap();
        r.net.process_rx();
        assert_eq!(r.used(RX_QUEUE), vec![(0, 0), (1, 62)]);
        assert_eq!(r.read(0x20000, 100), vec![0; 100]);
        let s = r.net.stats();
        assert_eq!((s.rx_frames, s.rx_drops), (1, 1));
    }

    #[test]
    fn hostile_rx_chains_are_returned_empty() {
        let mem = memory();
        let cases: Vec<Vec<RawDescriptor>> = vec![
            // Outside guest memory; straddling its end; a wrapping address.
            vec![desc(0xffff_0000, 2048, VRING_DESC_F_WRITE, 0)],
            vec![desc(0xf_f000, 0x2000, VRING_DESC_F_WRITE, 0)],
            vec![desc(u64::MAX - 8, 64, VRING_DESC_F_WRITE, 0)],
            // Device-readable (wrong direction), zero length, shorter than the header.
            vec![desc(0x40000, 2048, 0, 0)],
            vec![desc(0x40000, 0, VRING_DESC_F_WRITE, 0)],
            vec![desc(0x40000, 8, VRING_DESC_F_WRITE, 0)],
            // Readable after writable.
            vec![
                desc(0x40000, 1024, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(0x41000, 1024, VRING_DESC_F_NEXT, 2),
            ],
            // A loop, and a next index past the queue.
            vec![
                desc(0x40000, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(0x41000, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
            ],
            vec![desc(
                0x40000,
                64,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                200,
            )],
            // Lengths summing past u32 (each fine on its own).
            vec![
                desc(
                    0x40000,
                    0x8000_0000,
                    VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                    1,
                ),
                desc(0x40000, 0x8000_0000, VRING_DESC_F_WRITE, 0),
            ],
        ];
        for (i, descs) in cases.iter().enumerate() {
            mem.write_slice(&[0xaa; 0x2000], GuestAddress(0x40000))
                .unwrap();
            let mut r = rig(&mem, 16, bit(VIRTIO_NET_F_MRG_RXBUF), false);
            let n = descs.len() as u16;
            r.push_raw(RX_QUEUE, descs);
            r.push(RX_QUEUE, &[(0x20000, 2048, W)]);
            let p = packet(100, 11);
            r.peer.send(&p).unwrap();
            r.net.process_rx();
            assert_eq!(
                r.used(RX_QUEUE),
                vec![(0, 0), (u32::from(n), 112)],
                "case {i}"
            );
            assert_eq!(r.read(0x20000, 112), with_num_buffers(&p, 1), "case {i}");
            assert_eq!(r.read(0x40000, 0x2000), vec![0xaa; 0x2000], "case {i}");
            let s = r.net.stats();
            assert_eq!((s.rx_errors, s.rx_frames), (1, 1), "case {i}");
        }
    }

    #[test]
    fn hostile_tx_chains_are_returned_empty_and_not_sent() {
        let mem = memory();
        let big = (MAX_PACKET_LEN / 2 + 1) as u32;
        let cases: Vec<Vec<RawDescriptor>> = vec![
            vec![desc(0xffff_0000, 100, 0, 0)],
            vec![desc(0xf_fff0, 0x100, 0, 0)],
            vec![desc(u64::MAX - 8, 64, 0, 0)],
            // Device-writable buffers, zero length, shorter than the header.
            vec![desc(0x40000, 100, VRING_DESC_F_WRITE, 0)],
            vec![
                desc(0x40000, 100, VRING_DESC_F_NEXT, 1),
                desc(0x41000, 100, VRING_DESC_F_WRITE, 0),
            ],
            vec![desc(0x40000, 0, 0, 0)],
            vec![desc(0x40000, 11, 0, 0)],
            // Larger than a 64 KiB frame plus header, in one or two buffers.
            vec![desc(0x40000, MAX_PACKET_LEN as u32 + 1, 0, 0)],
            vec![
                desc(0x40000, big, VRING_DESC_F_NEXT, 1),
                desc(0x40000, big, 0, 0),
            ],
            vec![
                desc(0x40000, 0xffff_ffff, VRING_DESC_F_NEXT, 1),
                desc(0x40000, 0xffff_ffff, 0, 0),
            ],
            // A loop, and a next index past the queue.
            vec![
                desc(0x40000, 64, VRING_DESC_F_NEXT, 1),
                desc(0x41000, 64, VRING_DESC_F_NEXT, 0),
            ],
            vec![desc(0x40000, 64, VRING_DESC_F_NEXT, 200)],
        ];
        for (i, descs) in cases.iter().enumerate() {
            let mut r = rig(&mem, 16, 0, false);
            r.push_raw(TX_QUEUE, descs);
            assert_eq!(r.net.process_tx(), 1, "case {i}");
            assert_eq!(r.used(TX_QUEUE), vec![(0, 0)], "case {i}");
            assert_eq!(r.host_recv(), None, "case {i}");
            let s = r.net.stats();
            assert_eq!((s.tx_errors, s.tx_frames), (1, 0), "case {i}");
        }
    }

    #[test]
    fn hostile_avail_index_does_not_hang() {
        let mem = memory();
        let mut r = rig(&mem, 16, bit(VIRTIO_NET_F_MRG_RXBUF), true);
        // The driver claims 100 new chains in a 16-entry queue.
        r.rx.avail().idx().store(100);
        r.tx.avail().idx().store(100);
        r.peer.send(&packet(10, 1)).unwrap();
        assert_eq!(r.net.process_rx(), 0);
        assert_eq!(r.net.process_tx(), 0);
    }

    #[test]
    fn tx_budget_rekicks_instead_of_looping_forever() {
        let mem = memory();
        let mut r = rig(&mem, 256, 0, false);
        let p = packet(20, 1);
        mem.write_slice(&p, GuestAddress(0x30000)).unwrap();
        for _ in 0..256 {
            r.push(TX_QUEUE, &[(0x30000, p.len() as u32, R)]);
        }
        assert_eq!(r.net.process_tx(), TX_CHAINS_PER_EVENT);
        let a = r.net.active.as_ref().unwrap();
        assert_eq!(a.queue_evts[TX_QUEUE].read().unwrap(), 1, "self-kick");
    }

    #[test]
    fn reset_drops_the_pending_frame_and_stops() {
        let mem = memory();
        let mut r = rig(&mem, 16, 0, false);
        r.peer.send(&packet(100, 1)).unwrap();
        r.net.process_rx();
        assert!(r.net.rx_pending.is_some());
        r.net.reset();
        assert!(!r.net.wants_tap());
        assert_eq!(r.net.stats().rx_drops, 1);
        assert_eq!(r.net.process_rx(), 0);
        assert_eq!(r.net.process_tx(), 0);
        let (act, _) = active(&mem, vec![]);
        assert!(matches!(
            r.net.activate(act),
            Err(ActivateError::QueueCount { want: 2, got: 0 })
        ));
    }

    #[test]
    fn failing_backend_stops_receive_without_spinning() {
        let mem = memory();
        // A directory: every read fails (EISDIR), as a TAP does once its interface is deleted.
        let net = Net::with_backend(File::open("/").unwrap(), MAC).unwrap();
        let (_unused, peer) = UnixDatagram::pair().unwrap();
        let mut r = rig_with(&mem, 16, 0, false, net, peer);
        r.push(RX_QUEUE, &[(0x20000, 2048, W)]);
        assert_eq!(r.net.process_rx(), 0);
        assert!(!r.net.wants_tap(), "a failed backend is no longer watched");
        assert_eq!(r.net.stats().rx_errors, 1);
        assert_eq!(r.net.process_rx(), 0);
        assert_eq!(r.net.stats().rx_errors, 1, "and not read again");
    }

    #[test]
    fn config_space_and_features() {
        let (net, _peer) = socket_net();
        let mut cfg = [0u8; 10];
        net.read_config(0, &mut cfg);
        assert_eq!(cfg, [0x06, 0, 0, 0, 0, 0x42, 1, 0, 0, 0]);
        let f = net.avail_features();
        for b in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
        ] {
            assert_ne!(f & bit(b), 0, "feature bit {b}");
        }
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
        assert_eq!(net.device_type(), TYPE_NET);
        assert_eq!(net.metrics()["rx_frames"], 0);
        assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert_eq!(default_mac(0), [0x06, 0, 0xac, 0x10, 0, 2]);
        assert_eq!(default_mac(5)[5], 7);
        assert_eq!(
            default_mac(0)[0] & 0b11,
            0b10,
            "locally administered unicast"
        );
    }

    #[test]
    fn tap_offloads_follow_acked_features() {
        let all = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(
            Net::tap_offloads(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
        assert_eq!(
            Net::tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)),
            libc::TUN_F_CSUM
        );
        // TSO without checksum offload is refused by the kernel: set nothing.
        assert_eq!(Net::tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(Net::tap_offloads(0), 0);
    }

    /// Creates a real TAP (needs CAP_NET_ADMIN; skipped otherwise), checks that `Net::new`
    /// attaches to it, that the offloads it offers are accepted, that a second attach is
    /// refused as busy, and that a frame to a down TAP counts as a drop.
    #[test]
    fn attaches_to_a_real_tap() {
        struct Cleanup(String);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["tuntap", "del", "dev", &self.0, "mode", "tap"])
                    .status();
            }
        }
        let name = format!("ledgt{}", std::process::id() % 1_000_000);
        let made = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .output();
        match made {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                println!(
                    "SKIPPED attaches_to_a_real_tap: cannot create a TAP (root/CAP_NET_ADMIN \
                     needed): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return;
            }
            Err(e) => {
                println!("SKIPPED attaches_to_a_real_tap: no `ip` command: {e}");
                return;
            }
        }
        let _cleanup = Cleanup(name.clone());
        let cfg = NetConfig {
            tap: name.clone(),
            mac: None,
            id: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        let net = Net::new(&cfg, 3).unwrap();
        assert_eq!(net.tap_name(), Some(name.as_str()));
        assert_eq!(net.mac(), [0x06, 0, 0xac, 0x10, 0, 5]);
        let f = net.avail_features();
        // Every kernel since 2.6.27 takes checksum and TSO offloads.
        for b in [
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
        ] {
            assert_ne!(f & bit(b), 0, "feature bit {b}");
        }
        let Backend::Tap(tap) = &net.backend else {
            panic!("not a TAP backend")
        };
        tap.set_offload(Net::tap_offloads(f)).unwrap();
        println!(
            "TAP {name}: offered guest UFO: {}",
            f & bit(VIRTIO_NET_F_GUEST_UFO) != 0
        );
        match Net::new(&cfg, 0) {
            Err(NetError::Tap(TapError::Busy(n))) => assert_eq!(n, name),
            Err(e) => panic!("second attach: {e}"),
            Ok(_) => panic!("second attach to a single-queue TAP succeeded"),
        }
        // The TAP is down: a transmitted frame is dropped by the kernel, and counted.
        let mem = memory();
        let (_unused, peer) = UnixDatagram::pair().unwrap();
        let mut r = rig_with(&mem, 16, 0, false, net, peer);
        let p = packet(60, 1);
        mem.write_slice(&p, GuestAddress(0x30000)).unwrap();
        r.push(TX_QUEUE, &[(0x30000, p.len() as u32, R)]);
        r.net.process_tx();
        let s = r.net.stats();
        assert_eq!(s.tx_drops + s.tx_frames, 1, "{s:?}");
        // Nothing to read on a down TAP; the device keeps watching it.
        assert_eq!(r.net.process_rx(), 0);
        assert!(r.net.wants_tap());
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::devices::state::TransportSnapshot;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_utils::{
        driver_init, memory, settle, through_json, transport, TestRing,
    };
    use event_manager::{EventManager, SubscriberOps};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Mutex;

    const MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 0x42];
    const OTHER_MAC: [u8; 6] = [0x06, 0, 0, 0, 0, 0x99];
    const FEATURES: u64 = VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF);

    struct Rig {
        t: MmioTransport,
        em: EventManager<Arc<Mutex<Net>>>,
        dev: Arc<Mutex<Net>>,
        peer: UnixDatagram,
    }

    /// A device on a datagram socket pair (the "TAP"), behind a transport, under an event loop.
    fn rig(mem: &GuestMemoryMmap, mac: [u8; 6]) -> Rig {
        let (dev, peer) = UnixDatagram::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let net = Net::with_backend(File::from(OwnedFd::from(dev)), mac).unwrap();
        let dev = Arc::new(Mutex::new(net));
        let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let (t, _, _) = transport(dev.clone(), mem);
        Rig { t, em, dev, peer }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR_LEN];
        p.extend((0..len).map(|i| (i as u8).wrapping_mul(3).wrapping_add(seed)));
        p
    }

    fn recv(peer: &UnixDatagram) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        peer.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn mac_of(t: &mut MmioTransport) -> [u8; 6] {
        let mut m = [0u8; 6];
        t.read(0x100, &mut m);
        m
    }

    /// A running device that sent one frame and received one; then, paused, the guest queued
    /// a frame to send and a receive buffer.
    fn saved(mem: &GuestMemoryMmap, rx: &mut TestRing, tx: &mut TestRing) -> TransportSnapshot {
        let mut r = rig(mem, MAC);
        driver_init(&mut r.t, FEATURES, &[*rx, *tx]);
        rx.push(mem, &[(0x20000, 2048, true)]);
        let f1 = frame(60, 1);
        mem.write_slice(&f1, GuestAddress(0x30000)).unwrap();
        tx.push(mem, &[(0x30000, f1.len() as u32, false)]);
        settle(&mut r.em);
        assert_eq!(recv(&r.peer), Some(f1));
        r.peer.send(&frame(100, 2)).unwrap();
        settle(&mut r.em);
        assert_eq!(rx.take_used(mem), vec![(0, 112)]);
        assert_eq!(tx.take_used(mem), vec![(0, 0)]);

        let f3 = frame(80, 3);
        mem.write_slice(&f3, GuestAddress(0x31000)).unwrap();
        tx.push(mem, &[(0x31000, f3.len() as u32, false)]);
        rx.push(mem, &[(0x21000, 2048, true)]);
        r.t.save()
    }

    #[test]
    fn round_trip_on_a_new_tap_keeps_the_mac_and_the_rings() {
        let mem = memory();
        let mut rx = TestRing::new(&mem, 0x1000, 16);
        let mut tx = TestRing::new(&mem, 0x2000, 16);
        let s = through_json(&saved(&mem, &mut rx, &mut tx));
        assert_eq!(s.device, DeviceSnapshot::Net { mac: MAC });

        // The clone comes up on another TAP, configured with another MAC.
        let mut r = rig(&mem, OTHER_MAC);
        r.t.restore(&s).unwrap();
        assert_eq!(mac_of(&mut r.t), MAC, "the MAC the guest knows");
        assert_eq!(r.dev.lock().unwrap().acked, FEATURES);
        settle(&mut r.em);
        // The frame queued before the snapshot leaves through the new TAP.
        assert_eq!(recv(&r.peer), Some(frame(80, 3)));
        assert_eq!(tx.take_used(&mem), vec![(1, 0)]);
        assert_eq!(tx.used_idx(&mem), 2);
        // The receive buffer given before the snapshot takes the next frame.
        r.peer.send(&frame(200, 4)).unwrap();
        settle(&mut r.em);
        assert_eq!(rx.take_used(&mem), vec![(1, 212)]);
        assert_eq!(rx.used_idx(&mem), 2);
        let mut want = frame(200, 4);
        want[NUM_BUFFERS_OFFSET] = 1;
        assert_eq!(read(&mem, 0x21000, 212), want);
    }

    #[test]
    fn receive_chains_held_for_a_big_frame_go_back_to_the_ring() {
        let mem = memory();
        let mut rx = TestRing::new(&mem, 0x1000, 16);
        let tx = TestRing::new(&mem, 0x2000, 16);
        let mut r = rig(&mem, MAC);
        driver_init(&mut r.t, FEATURES, &[rx, tx]);
        rx.push(&mem, &[(0x20000, 1024, true)]);
        rx.push(&mem, &[(0x21000, 1024, true)]);
        r.peer.send(&frame(3000, 5)).unwrap();
        settle(&mut r.em);
        assert_eq!(rx.used_idx(&mem), 0, "two chains are not enough");
        assert_eq!(r.dev.lock().unwrap().rx_held.len(), 2);
        let s = through_json(&r.t.save());
        assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (0, 0));

        let mut r2 = rig(&mem, MAC);
        r2.t.restore(&s).unwrap();
        settle(&mut r2.em);
        rx.push(&mem, &[(0x22000, 1024, true)]);
        rx.push(&mem, &[(0x23000, 1024, true)]);
        assert_eq!(
            r2.t.save().queues[0].next_avail,
            0,
            "nothing taken without a frame"
        );
        // The new TAP's first frame (the old one was lost with the old TAP) uses the
        // same chains, from the first.
        r2.peer.send(&frame(3000, 6)).unwrap();
        settle(&mut r2.em);
        let used = rx.take_used(&mem);
        assert_eq!(used, vec![(0, 1024), (1, 1024), (2, 964)]);
        let mut got = read(&mem, 0x20000, 1024);
        got.extend(read(&mem, 0x21000, 1024));
        got.extend(read(&mem, 0x22000, 964));
        let mut want = frame(3000, 6);
        want[NUM_BUFFERS_OFFSET] = 3;
        assert_eq!(got, want);
        assert_eq!(r2.t.save().queues[0].next_avail, 3);
    }

    #[test]
    fn features_the_new_tap_lacks_or_another_kind_are_refused() {
        let mem = memory();
        let rx = TestRing::new(&mem, 0x1000, 16);
        let tx = TestRing::new(&mem, 0x2000, 16);
        let mut r = rig(&mem, MAC);
        driver_init(
            &mut r.t,
            FEATURES | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4),
            &[rx, tx],
        );
        let s = through_json(&r.t.save());

        // A TAP on a kernel without TSO: the guest's offloads cannot be honoured.
        let r2 = rig(&mem, MAC);
        r2.dev.lock().unwrap().avail_features &= !bit(VIRTIO_NET_F_GUEST_TSO4);
        let mut t2 = r2.t;
        assert!(matches!(t2.restore(&s), Err(StateError::Mismatch(_))));
        assert!(!t2.is_activated());
        assert_eq!(r2.dev.lock().unwrap().acked, 0);
        assert_eq!(mac_of(&mut t2), MAC);

        let mut net = r2.dev.lock().unwrap();
        assert!(matches!(
            net.restore_state(&DeviceSnapshot::Vsock {
                cid: 3,
                active: true
            }),
            Err(StateError::Kind { .. })
        ));
    }
}
