//! Virtio devices over virtio-mmio.
//!
//! The split: `mmio::MmioTransport` is the register file the guest talks to (on vCPU threads,
//! through the MMIO bus); it wraps a `VirtioDevice`, which never knows the transport. When the
//! driver sets DRIVER_OK, the transport hands the device its queues, their notification
//! eventfds (KVM ioeventfds on QueueNotify, so a notify causes no exit to userspace) and an
//! `Interrupt` (a KVM irqfd plus the InterruptStatus bits). The device then signals its
//! `activate` eventfd; every device is also an event-manager subscriber, so on the VMM thread it
//! sees that event and starts watching its queue eventfds and backend fds (TAP, sockets). All
//! device I/O therefore runs on the one VMM thread.
//!
//! Every device file has the same shape — constants and config space, the struct, the
//! `VirtioDevice` impl, queue handling, the event subscriber, tests on virtio-queue's mock —
//! and `rng.rs` is the one to copy. Guest memory is reached only through vm-memory and
//! virtio-queue's checked accessors: a malformed chain gets an error status or length 0,
//! never a panic or an access outside guest memory.
//!
//! Snapshots (`crate::devices::state`): the transport saves its registers and the queues, with
//! the ring positions the device reports (`VirtioDevice::queue_states`: chains a device holds
//! go back to the available ring); each device saves and checks its own state
//! (`save_state`/`restore_state`). On restore the transport re-activates an active device
//! through the same path as DRIVER_OK, so when the event loop starts the device registers its
//! fds and serves whatever already waits in its rings.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod tap;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::devices::state::{DeviceSnapshot, StateError};
use crate::kvm::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events};
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Feature bits every Ledge device deals with (virtio 1.x).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device type ids (virtio 1.x §5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Event tokens every device uses the same way: 0 is activation, 1..=N the queues in order;
/// devices number their own backend fds from `TOKEN_BACKEND`.
pub const TOKEN_ACTIVATE: u32 = 0;
pub const TOKEN_QUEUE0: u32 = 1;
pub const TOKEN_BACKEND: u32 = 64;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {want} queues, driver set up {got}")]
    QueueCount { want: usize, got: usize },
    #[error("queue {0} is not ready or not valid in guest memory")]
    BadQueue(usize),
    #[error("cannot signal device activation")]
    Signal(#[source] std::io::Error),
    #[error("device backend failed to start")]
    Backend(#[source] std::io::Error),
}

/// A device's interrupt line: the irqfd KVM injects from, and the InterruptStatus bits the
/// driver reads and acknowledges through the transport.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irqfd,
        }
    }

    /// The irqfd, to register with KVM on the device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("cannot inject a virtio interrupt: {e}");
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// The device changed its configuration space.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG_CHANGE);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Puts back saved InterruptStatus bits and config generation (snapshot restore). With
    /// bits set the irqfd is signalled once: the driver may not have seen the interrupt before
    /// the snapshot, and a spurious virtio interrupt is harmless where a lost one hangs it.
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
        if status != 0 {
            if let Err(e) = self.irqfd.write(1) {
                log::warn!("cannot inject a virtio interrupt: {e}");
            }
        }
    }
}

/// What a device receives at DRIVER_OK.
#[derive(Debug)]
pub struct ActiveQueues {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    /// One per queue: readable when the driver notified that queue. Shared with the transport,
    /// so a reset never closes an fd that is still registered with the event loop, and the
    /// next activation finds the very same fds registered.
    pub queue_evts: Vec<std::sync::Arc<EventFd>>,
    pub interrupt: std::sync::Arc<Interrupt>,
}

/// What a single-queue device keeps from `ActiveQueues`.
pub type SingleQueue = (
    GuestMemoryMmap,
    Queue,
    std::sync::Arc<EventFd>,
    std::sync::Arc<Interrupt>,
);

impl ActiveQueues {
    /// Splits out the first queue of a single-queue device (rng, block); none is an error.
    pub fn into_single(self) -> Result<SingleQueue, ActivateError> {
        let got = self.queues.len();
        match (
            self.queues.into_iter().next(),
            self.queue_evts.into_iter().next(),
        ) {
            (Some(queue), Some(evt)) => Ok((self.mem, queue, evt, self.interrupt)),
            _ => Err(ActivateError::QueueCount { want: 1, got }),
        }
    }
}

/// The device side of virtio: what the transport needs to know and do.
pub trait VirtioDevice: Send {
    /// The virtio device type (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// One entry per queue: its maximum size.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver, `VIRTIO_F_VERSION_1` included.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`, checked by the transport).
    fn set_acked_features(&mut self, acked: u64);
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; most devices ignore this.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio device type {}: config write at {offset:#x} ({} bytes) ignored",
            self.device_type(),
            data.len()
        );
    }
    /// The driver set DRIVER_OK: take the queues and start (through the activate event).
    fn activate(&mut self, queues: ActiveQueues) -> Result<(), ActivateError>;
    /// The driver reset the device: drop the queues, go back to the initial state.
    fn reset(&mut self);
    /// The device's counters for the metrics file (requests, bytes, errors ...).
    fn metrics(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The device's own state for a snapshot (called while the VM is paused).
    fn save_state(&self) -> DeviceSnapshot;
    /// Puts saved state back into a freshly built, not yet activated device (before the
    /// transport re-activates it). Refuses state of another kind (`StateError::Kind`) or that
    /// does not fit this device as configured now, and then changes nothing.
    fn restore_state(&mut self, s: &DeviceSnapshot) -> Result<(), StateError>;
    /// While active: the device's queues as they stand (its copies advance, the transport's
    /// do not), with every chain the device took from an available ring but has not returned
    /// put back (`next_avail` rewound), so that a device restored from them takes those chains
    /// again. Empty when not active.
    fn queue_states(&self) -> Vec<QueueState>;
    /// The device's rate limiter called `field` (the API's name: `rate_limiter`,
    /// `rx_rate_limiter`, `tx_rate_limiter`), for live updates; None if it has none so named.
    fn rate_limiter_mut(&mut self, _field: &str) -> Option<&mut crate::rate_limiter::RateLimiter> {
        None
    }
}

/// `queue.state()` with `next_avail` moved back by `held` chains (taken, not yet returned).
pub fn rewound_state(queue: &Queue, held: u16) -> QueueState {
    let mut s = queue.state();
    s.next_avail = queue.next_avail().wrapping_sub(held);
    s
}

/// What a chain costs a bandwidth bucket: the lengths of its descriptors, less `overhead`
/// (the bytes of the device's own headers and status, which are not data). Looks at the
/// descriptors only; the walk is bounded by virtio-queue (at most the queue size, loops cut).
pub fn chain_data_bytes(chain: &DescriptorChain<&GuestMemoryMmap>, overhead: u64) -> u64 {
    chain
        .clone()
        .fold(0u64, |n, d| n.saturating_add(u64::from(d.len())))
        .saturating_sub(overhead)
}

/// Converts a little-endian config space into a read at `offset`, zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// The activation eventfd every device owns: the transport's `activate` (on a vCPU thread)
/// signals it, the device's subscriber (on the VMM thread) sees it and registers its fds.
#[derive(Debug)]
pub struct ActivateEvent(EventFd);

impl ActivateEvent {
    pub fn new() -> std::io::Result<Self> {
        Ok(ActivateEvent(EventFd::new(EFD_NONBLOCK)?))
    }

    pub fn signal(&self) -> Result<(), ActivateError> {
        self.0.write(1).map_err(ActivateError::Signal)
    }

    /// Registers the activation event itself (from the subscriber's `init`).
    pub fn watch(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.0, TOKEN_ACTIVATE, EventSet::IN)) {
            log::error!("cannot watch a virtio activation event: {e}");
        }
    }

    /// Clears the event and registers every queue eventfd as `TOKEN_QUEUE0 + i`.
    /// Re-activation after a reset finds them registered already; that is fine.
    pub fn on_activate(&self, ops: &mut EventOps, queue_evts: &[std::sync::Arc<EventFd>]) {
        let _ = self.0.read();
        for (i, evt) in (0u32..).zip(queue_evts) {
            match ops.add(Events::with_data(
                evt.as_ref(),
                TOKEN_QUEUE0 + i,
                EventSet::IN,
            )) {
                Ok(()) => {}
                Err(event_manager::Error::FdAlreadyRegistered) => {}
                Err(e) => log::error!("cannot watch virtio queue {i}: {e}"),
            }
        }
    }
}

/// The event handling every single-queue device shares (rng, block): on activation, register
/// the queue's eventfd; on a queue notification, clear it. Returns true when the queue should
/// be served now — also right after activation, since buffers may already be waiting.
pub fn single_queue_event(
    device: &str,
    events: &Events,
    ops: &mut EventOps,
    activate: &ActivateEvent,
    queue_evt: Option<&std::sync::Arc<EventFd>>,
) -> bool {
    match events.data() {
        TOKEN_ACTIVATE => {
            if let Some(e) = queue_evt {
                activate.on_activate(ops, std::slice::from_ref(e));
            }
            true
        }
        TOKEN_QUEUE0 => {
            if let Some(e) = queue_evt {
                let _ = e.read();
            }
            true
        }
        other => {
            log::debug!("{device}: unexpected event token {other}");
            false
        }
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Shared set-up for device tests on virtio-queue's mock queue, with no KVM.

    use std::sync::Arc;

    use crate::devices::state::TransportSnapshot;
    use crate::kvm::memory::GuestMemoryMmap;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::mmio::{MmioTransport, SharedDevice};
    use super::{ActiveQueues, Interrupt};

    /// 1 MiB of guest memory at 0.
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// A driver-side queue, ready, with its rings in `mem` at `base`.
    pub fn queue_from_mock(mock: &MockSplitQueue<'_, GuestMemoryMmap>, size: u16) -> Queue {
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(
            Some(mock.desc_table_addr().0 as u32),
            Some((mock.desc_table_addr().0 >> 32) as u32),
        );
        q.set_avail_ring_address(
            Some(mock.avail_addr().0 as u32),
            Some((mock.avail_addr().0 >> 32) as u32),
        );
        q.set_used_ring_address(
            Some(mock.used_addr().0 as u32),
            Some((mock.used_addr().0 >> 32) as u32),
        );
        q.set_ready(true);
        q
    }

    /// The driver side of one split queue in guest memory, written the way a driver does:
    /// descriptors, then the available ring entry, then the available index. Laid out by hand
    /// (descriptor table at `base`, available ring after it, used ring at `base + 0x800`)
    /// because `MockSplitQueue::create` puts its used ring over the second half of the
    /// available ring; `MockSplitQueue` itself works on the same memory through its
    /// `desc_table()`/`avail()` accessors, which tests may use alongside.
    #[derive(Clone, Copy, Debug)]
    pub struct TestRing {
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        next_desc: u16,
        avail_idx: u16,
        used_seen: u16,
    }

    impl TestRing {
        /// A ring of `size` (at most 64) entries at `base`; its indexes are zeroed.
        pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> TestRing {
            assert!(size <= 64 && size.is_power_of_two());
            let r = TestRing {
                size,
                desc: base,
                avail: base + 16 * u64::from(size),
                used: base + 0x800,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            };
            for a in [r.avail, r.avail + 2, r.used, r.used + 2] {
                mem.write_obj(0u16, GuestAddress(a)).unwrap();
            }
            r
        }

        /// Offers one chain of (address, length, device-writable) buffers; returns its head.
        pub fn push(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, w)) in bufs.iter().enumerate() {
                let idx = (head + i as u16) % self.size;
                let mut flags = if w { VRING_DESC_F_WRITE } else { 0 } as u16;
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let d = RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags,
                    (idx + 1) % self.size,
                ));
                mem.write_obj(d, GuestAddress(self.desc + 16 * u64::from(idx)))
                    .unwrap();
            }
            self.next_desc = (head + bufs.len() as u16) % self.size;
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
            head
        }

        /// The device's used index.
        pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
            mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// Used elements (head, length) since the last call.
        pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
            let idx = self.used_idx(mem);
            let mut out = Vec::new();
            while self.used_seen != idx {
                let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
                let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
                out.push((id, len));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }
    }

    /// A virtio-mmio window around `dev` (one queue eventfd per queue); its interrupt and
    /// queue eventfds.
    pub fn transport(
        dev: SharedDevice,
        mem: &GuestMemoryMmap,
    ) -> (MmioTransport, Arc<Interrupt>, Vec<Arc<EventFd>>) {
        let n = dev.lock().unwrap().queue_max_sizes().len();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let evts: Vec<_> = (0..n)
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
            .collect();
        let t = MmioTransport::new(dev, mem.clone(), irq.clone(), evts.clone());
        (t, irq, evts)
    }

    pub fn mmio_write(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    pub fn mmio_read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// What a driver does from reset to DRIVER_OK: status bits in order, `features`, then one
    /// queue per ring (queues past `rings` are left unready).
    pub fn driver_init(t: &mut MmioTransport, features: u64, rings: &[TestRing]) {
        use super::mmio::{
            STATUS_ACKNOWLEDGE as A, STATUS_DRIVER as D, STATUS_DRIVER_OK as OK,
            STATUS_FEATURES_OK as F,
        };
        mmio_write(t, 0x070, A);
        mmio_write(t, 0x070, A | D);
        for (sel, half) in [(0, features as u32), (1, (features >> 32) as u32)] {
            mmio_write(t, 0x024, sel);
            mmio_write(t, 0x020, half);
        }
        mmio_write(t, 0x070, A | D | F);
        assert_eq!(
            mmio_read(t, 0x070) & F,
            F,
            "features {features:#x} accepted"
        );
        for (i, r) in rings.iter().enumerate() {
            mmio_write(t, 0x030, i as u32);
            mmio_write(t, 0x038, u32::from(r.size));
            for (off, addr) in [(0x080, r.desc), (0x090, r.avail), (0x0a0, r.used)] {
                mmio_write(t, off, addr as u32);
                mmio_write(t, off + 4, (addr >> 32) as u32);
            }
            mmio_write(t, 0x044, 1);
        }
        mmio_write(t, 0x070, A | D | F | OK);
        assert!(t.is_activated(), "device activated");
    }

    /// A snapshot as it comes back from a file: serialised to JSON and parsed again.
    pub fn through_json(s: &TransportSnapshot) -> TransportSnapshot {
        let text = serde_json::to_string(s).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Runs an event loop until it has nothing more to do.
    pub fn settle<T: event_manager::MutEventSubscriber>(
        em: &mut event_manager::EventManager<Arc<std::sync::Mutex<T>>>,
    ) {
        for _ in 0..100 {
            if em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop does not settle");
    }

    /// Activation input for a device with the given queues.
    pub fn active(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> (ActiveQueues, Arc<Interrupt>) {
        let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let queue_evts = queues
            .iter()
            .map(|_| Arc::new(EventFd::new(0).unwrap()))
            .collect();
        (
            ActiveQueues {
                mem: mem.clone(),
                queues,
                queue_evts,
                interrupt: interrupt.clone(),
            },
            interrupt,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded_and_zero_filled() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn chain_data_bytes_sums_the_descriptors_less_the_overhead() {
        use test_utils::{memory, queue_from_mock};
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use virtio_queue::QueueOwnedT;

        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let (n, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        mock.build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(0x8000, 16, n, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x9000, 4096, n | w, 2)),
            RawDescriptor::from(SplitDescriptor::new(0x10000, 0x10000, n | w, 3)),
            RawDescriptor::from(SplitDescriptor::new(0x20000, 1, w, 0)),
        ])
        .unwrap();
        let mut q = queue_from_mock(&mock, 16);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let total = 16 + 4096 + 0x10000 + 1;
        assert_eq!(chain_data_bytes(&chain, 0), total);
        assert_eq!(chain_data_bytes(&chain, 17), total - 17);
        assert_eq!(chain_data_bytes(&chain, u64::MAX), 0, "never below 0");
        // The chain itself is not consumed: the device serves it afterwards.
        assert_eq!(chain.count(), 4);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let i = Interrupt::new(EventFd::new(0).unwrap());
        i.signal_used_queue();
        i.signal_config_change();
        assert_eq!(i.status(), INT_USED_RING | INT_CONFIG_CHANGE);
        assert_eq!(i.config_generation(), 1);
        i.ack(INT_USED_RING);
        assert_eq!(i.status(), INT_CONFIG_CHANGE);
        assert_eq!(i.irqfd().read().unwrap(), 2);
    }
}
