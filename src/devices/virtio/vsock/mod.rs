//! virtio-vsock: stream sockets between the guest and host processes (virtio 1.x §5.10),
//! carried on the host by Unix sockets ("hybrid vsock", the convention Firecracker made common).
//!
//! Three queues: RX (0) holds buffers the guest gives us for packets to it, TX (1) the packets
//! it sends, the event queue (2) buffers for events (only VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
//! due after a snapshot restore, see `restore_state`, or after `reset_connections`; sent once
//! the driver is active and has an event buffer). The configuration space is the
//! guest's CID (u64, little endian). Every descriptor of a chain is checked first (`chain_ok`:
//! inside guest memory, not empty, the queue's direction), then virtio-vsock's `VsockPacket`
//! parses it; a bad chain goes back with used length 0. `packet.rs` has the wire constants,
//! `conn.rs` one connection's state machine and credit accounting, `unix.rs` the host sockets
//! and the muxer that routes between them and the guest (and the one `unsafe` function: a
//! non-blocking connect, so a host listener with a full backlog cannot stall the VMM thread).
//!
//! Ordering it relies on: every event ends with `run` — TX first (the guest's packets may
//! free credit or open connections), then RX — and then the muxer's `sync`, which updates the
//! event-loop registrations the packets changed. Host data is read only into an RX buffer in
//! hand, so without RX buffers the device stops reading host sockets instead of buffering; and
//! TX waits while too many resets wait for RX buffers, so a guest that gives none cannot make
//! the device queue without bound.

mod conn;
mod packet;
#[cfg(test)]
mod tests;
mod unix;

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use crate::kvm::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use self::packet::{EVENT_TRANSPORT_RESET, MAX_PKT_DATA};
use self::unix::Muxer;
use super::{
    ActivateError, ActivateEvent, ActiveQueues, Interrupt, VirtioDevice, TOKEN_ACTIVATE,
    TOKEN_BACKEND, TOKEN_QUEUE0, TYPE_VSOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::state::{DeviceSnapshot, StateError};

pub use self::conn::{Timeouts, BUF_ALLOC};
pub use self::packet::HOST_CID;
pub use self::unix::{FIRST_HOST_PORT, MAX_CONNECTIONS, MAX_CONNECT_LINE};

pub const QUEUE_SIZE: u16 = 256;
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;
const NUM_QUEUES: usize = 3;
/// Rounds of TX then RX in one event, while TX waits for resets to drain.
const MAX_ROUNDS: usize = 16;
/// Chains one pass over a queue may take before it yields to the rest of the event loop (and
/// kicks itself to come back), so a busy guest cannot starve the other devices.
const QUEUE_BUDGET: usize = 256;

/// Why a TX pass stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxPass {
    /// The queue is empty (and notifications are on).
    Done,
    /// Too many resets wait for RX buffers.
    Throttled,
    /// The budget ran out with chains left.
    Yielded,
}

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest cid {0} is reserved (use 3 or more)")]
    Cid(u32),
    #[error("{} exists and is not a socket; remove it or choose another vsock uds path", .0.display())]
    NotASocket(PathBuf),
    #[error("{} is in use: something listens on it; choose another vsock uds path", .0.display())]
    InUse(PathBuf),
    #[error("cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create an event fd")]
    EventFd(#[source] io::Error),
}

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockStats {
    pub conns_opened: u64,
    pub conns_closed: u64,
    /// Payload bytes host → guest and guest → host.
    pub bytes_to_guest: u64,
    pub bytes_to_host: u64,
    /// Packets given to the guest (RX) and taken from it (TX).
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Descriptor chains returned unused: outside memory, wrong direction, too short...
    pub bad_chains: u64,
    /// Well-formed chains with bad contents: wrong CID, type or op, protocol violations.
    pub bad_packets: u64,
    /// Connections refused: host clients with a bad CONNECT line, guest connects to a port
    /// nobody listens on, the connection limit.
    pub connect_errors: u64,
    pub timeouts: u64,
    pub rst_sent: u64,
    pub events_sent: u64,
    /// Host-side failures (event-loop registration).
    pub errors: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    evq: Queue,
    interrupt: Arc<Interrupt>,
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    acked: u64,
    active: Option<Active>,
    /// The queue eventfds from the first activation. They are duplicates of the transport's,
    /// so they stay valid (and registered) across driver resets.
    queue_evts: Vec<Arc<EventFd>>,
    activate_evt: ActivateEvent,
    muxer: Muxer,
    reset_event_due: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("active", &self.active.is_some())
            .field("muxer", &self.muxer)
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// Binds the host socket `cfg.uds` (a stale socket file there is replaced) for guest
    /// `cfg.cid`.
    pub fn new(cfg: &crate::config::VsockConfig) -> Result<Vsock, VsockError> {
        if cfg.cid <= 2 {
            return Err(VsockError::Cid(cfg.cid));
        }
        let cid = u64::from(cfg.cid);
        Ok(Vsock {
            cid,
            acked: 0,
            active: None,
            queue_evts: Vec::new(),
            activate_evt: ActivateEvent::new().map_err(VsockError::EventFd)?,
            muxer: Muxer::new(&cfg.uds, cid)?,
            reset_event_due: false,
        })
    }

    pub fn stats(&self) -> VsockStats {
        self.muxer.stats
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Changes how long half-open connections may last (the defaults suit most uses).
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.muxer.timeouts = timeouts;
    }

    /// After a snapshot restore: the host sockets of the old connections are gone, so close
    /// every connection and tell the guest with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (sent now
    /// if the driver gave an event buffer, else as soon as it does).
    pub fn reset_connections(&mut self) {
        self.muxer.reset_all();
        self.reset_event_due = true;
        self.process_event_queue();
    }

    /// Takes the guest's packets from the TX queue.
    fn process_tx(&mut self) -> TxPass {
        let Vsock { active, muxer, .. } = self;
        let Some(a) = active.as_mut() else {
            return TxPass::Done;
        };
        let mut used = 0;
        let mut stalled = false;
        let pass = loop {
            let mut popped = false;
            while !muxer.tx_throttled() && used < QUEUE_BUDGET {
                let Some(mut chain) = a.txq.pop_descriptor_chain(&a.mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let parsed = if chain_ok(&chain, &a.mem, false) {
                    VsockPacket::from_tx_virtq_chain(&a.mem, &mut chain, MAX_PKT_DATA)
                        .map_err(|e| e.to_string())
                } else {
                    Err("descriptor outside guest memory, empty or device-writable".into())
                };
                match parsed {
                    Ok(pkt) => {
                        muxer.stats.tx_packets += 1;
                        muxer.recv_pkt(&pkt);
                    }
                    Err(e) => {
                        log::debug!("vsock: bad TX chain {head}: {e}");
                        muxer.stats.bad_chains += 1;
                    }
                }
                // The device writes nothing into TX buffers.
                if let Err(e) = a.txq.add_used(&a.mem, head, 0) {
                    log::warn!("vsock: cannot return TX chain {head}: {e}");
                    break;
                }
                used += 1;
            }
            if muxer.tx_throttled() {
                break TxPass::Throttled;
            }
            if used >= QUEUE_BUDGET {
                break TxPass::Yielded;
            }
            // With EVENT_IDX this also asks for the next notification; look again in case
            // the driver added chains meanwhile (twice without progress means a bogus ring).
            match a.txq.enable_notification(&a.mem) {
                Ok(true) if popped || !stalled => stalled = !popped,
                Ok(_) => break TxPass::Done,
                Err(e) => {
                    log::warn!("vsock: TX queue: {e}");
                    break TxPass::Done;
                }
            }
        };
        if used > 0 {
            notify(&mut a.txq, &a.mem, &a.interrupt);
        }
        pass
    }

    /// Gives the guest what the muxer has for it, one packet per RX chain. Returns how many
    /// chains were used, and whether the pass yielded with work left.
    fn process_rx(&mut self) -> (usize, bool) {
        let Vsock { active, muxer, .. } = self;
        let Some(a) = active.as_mut() else {
            return (0, false);
        };
        let mut used = 0;
        let mut stalled = false;
        let mut nothing_left = false;
        loop {
            let mut popped = false;
            while muxer.has_rx() && used < QUEUE_BUDGET {
                let Some(mut chain) = a.rxq.pop_descriptor_chain(&a.mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let parsed = if chain_ok(&chain, &a.mem, true) {
                    VsockPacket::from_rx_virtq_chain(&a.mem, &mut chain, MAX_PKT_DATA)
                        .map_err(|e| e.to_string())
                } else {
                    Err("descriptor outside guest memory, empty or device-readable".into())
                };
                let len = match parsed {
                    // A buffer with no room for data could never carry the data we may have.
                    Ok(pkt) if pkt.data_slice().is_none() => {
                        log::debug!("vsock: RX chain {head} has no data buffer");
                        muxer.stats.bad_chains += 1;
                        0
                    }
                    Ok(mut pkt) => match muxer.fill_rx(&mut pkt) {
                        Some(len) => {
                            muxer.stats.rx_packets += 1;
                            len
                        }
                        None => {
                            // Nothing to send after all: the chain stays the driver's, and
                            // this pass ends (the muxer has nothing more either).
                            a.rxq.go_to_previous_position();
                            nothing_left = true;
                            break;
                        }
                    },
                    Err(e) => {
                        log::debug!("vsock: bad RX chain {head}: {e}");
                        muxer.stats.bad_chains += 1;
                        0
                    }
                };
                if let Err(e) = a.rxq.add_used(&a.mem, head, len) {
                    log::warn!("vsock: cannot return RX chain {head}: {e}");
                    break;
                }
                used += 1;
            }
            if nothing_left || !muxer.has_rx() || used >= QUEUE_BUDGET {
                break;
            }
            // Out of RX buffers: ask to hear when the driver adds some, and look once more.
            match a.rxq.enable_notification(&a.mem) {
                Ok(true) if popped || !stalled => stalled = !popped,
                Ok(_) => break,
                Err(e) => {
                    log::warn!("vsock: RX queue: {e}");
                    break;
                }
            }
        }
        if used > 0 {
            notify(&mut a.rxq, &a.mem, &a.interrupt);
        }
        (used, used >= QUEUE_BUDGET && muxer.has_rx())
    }

    /// Sends the transport-reset event if one is due and the driver gave a buffer for it.
    fn process_event_queue(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while self.reset_event_due {
            let Some(chain) = a.evq.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let event = EVENT_TRANSPORT_RESET.to_le_bytes();
            let ok = match chain.writer(&a.mem) {
                Ok(mut w) if w.available_bytes() >= event.len() => w.write_all(&event).is_ok(),
                _ => false,
            };
            if ok {
                self.reset_event_due = false;
                self.muxer.stats.events_sent += 1;
            } else {
                log::debug!("vsock: bad event chain {head}");
                self.muxer.stats.bad_chains += 1;
            }
            let len = if ok { event.len() as u32 } else { 0 };
            if let Err(e) = a.evq.add_used(&a.mem, head, len) {
                log::warn!("vsock: cannot return event chain {head}: {e}");
                break;
            }
            used = true;
        }
        if used {
            notify(&mut a.evq, &a.mem, &a.interrupt);
        }
    }

    /// TX, then RX; again while TX waits for resets to drain and RX makes progress. A queue
    /// left with work (budget spent) kicks its own eventfd to be served again after the other
    /// events.
    fn run(&mut self) {
        let mut tx_left = false;
        for _ in 0..MAX_ROUNDS {
            let tx = self.process_tx();
            let (rx_used, rx_left) = self.process_rx();
            if rx_left {
                self.kick_self(RXQ);
            }
            // Throttled without RX progress: the next RX notification resumes TX.
            tx_left = tx == TxPass::Yielded || (tx == TxPass::Throttled && rx_used > 0);
            if tx != TxPass::Throttled || rx_used == 0 {
                break;
            }
        }
        if tx_left {
            self.kick_self(TXQ);
        }
    }

    fn kick_self(&self, queue: usize) {
        if let Some(evt) = self.queue_evts.get(queue) {
            if let Err(e) = evt.write(1) {
                log::warn!("vsock: cannot requeue work on queue {queue}: {e}");
            }
        }
    }
}

/// Checks every descriptor of `chain` before the packet parser sees it: inside guest memory
/// (checked arithmetic), not empty, and in the queue's direction — device-writable for RX,
/// device-readable for TX. The parser itself only looks at the descriptors a packet needs.
/// The chain iterator stops after queue-size descriptors, so a looping chain ends too.
fn chain_ok(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    writable: bool,
) -> bool {
    chain.clone().all(|d| {
        d.len() > 0
            && d.is_write_only() == writable
            && usize::try_from(d.len()).is_ok_and(|len| {
                let access = if writable {
                    Permissions::Write
                } else {
                    Permissions::Read
                };
                mem.check_range(d.addr(), len, access)
            })
    })
}

/// Raises the interrupt if the driver wants to hear about the chains just used on `q`.
fn notify(q: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    match q.needs_notification(mem) {
        Ok(true) => interrupt.signal_used_queue(),
        Ok(false) => {}
        Err(e) => log::warn!("vsock: {e}"),
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, q: ActiveQueues) -> Result<(), ActivateError> {
        let got = q.queues.len();
        if got != NUM_QUEUES || q.queue_evts.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                want: NUM_QUEUES,
                got,
            });
        }
        let mut queues = q.queues.into_iter();
        let (Some(rxq), Some(txq), Some(evq)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount {
                want: NUM_QUEUES,
                got,
            });
        };
        // The transport shares the same eventfds across resets, so they stay registered.
        self.queue_evts = q.queue_evts;
        self.active = Some(Active {
            mem: q.mem,
            rxq,
            txq,
            evq,
            interrupt: q.interrupt,
        });
        self.activate_evt.signal()
    }

    fn reset(&mut self) {
        self.muxer.reset_all();
        self.active = None;
        self.acked = 0;
        self.reset_event_due = false;
    }

    fn save_state(&self) -> DeviceSnapshot {
        DeviceSnapshot::Vsock {
            cid: self.cid,
            active: self.active.is_some(),
        }
    }

    /// The host sockets of the saved connections belong to the old process: the device starts
    /// with none, and a driver that was running is sent VIRTIO_VSOCK_EVENT_TRANSPORT_RESET as
    /// soon as it is active again and has an event buffer, so it drops its sockets too and
    /// re-reads the CID. The CID must be the configured one (the guest knows it).
    fn restore_state(&mut self, s: &DeviceSnapshot) -> Result<(), StateError> {
        let DeviceSnapshot::Vsock { cid, active } = s else {
            return Err(s.wrong_kind("vsock"));
        };
        if *cid != self.cid {
            return Err(StateError::Mismatch(format!(
                "vsock guest cid is {} in the configuration, {cid} in the snapshot",
                self.cid
            )));
        }
        if self.muxer.connection_count() > 0 {
            self.muxer.reset_all();
        }
        self.reset_event_due = *active;
        Ok(())
    }

    fn queue_states(&self) -> Vec<QueueState> {
        // RX chains the muxer had nothing for go back at once (`go_to_previous_position`),
        // event chains are taken only to be used: none is ever held.
        self.active
            .iter()
            .flat_map(|a| [a.rxq.state(), a.txq.state(), a.evq.state()])
            .collect()
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        match token {
            TOKEN_ACTIVATE => {
                if self.active.is_some() {
                    self.activate_evt.on_activate(ops, &self.queue_evts);
                    self.muxer.start(ops);
                } else {
                    // Reset before we saw the activation: just clear the event.
                    self.activate_evt.on_activate(ops, &[]);
                }
                self.process_event_queue();
            }
            t if t >= TOKEN_QUEUE0 && t < TOKEN_QUEUE0 + NUM_QUEUES as u32 => {
                let i = (t - TOKEN_QUEUE0) as usize;
                if let Some(evt) = self.queue_evts.get(i) {
                    let _ = evt.read();
                }
                if i == EVQ {
                    self.process_event_queue();
                }
            }
            t if t >= TOKEN_BACKEND => {
                let active = self.active.is_some();
                self.muxer.handle_event(t, events.event_set(), ops, active);
            }
            other => log::debug!("vsock: unexpected event token {other}"),
        }
        self.run();
        self.muxer.sync(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activate_evt.watch(ops);
        self.muxer.init(ops);
    }
}
