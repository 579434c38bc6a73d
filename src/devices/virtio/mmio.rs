//! The virtio-mmio transport (virtio 1.x "modern", register layout version 2).
//!
//! The guest reaches it on vCPU threads through the MMIO bus. It enforces the driver's
//! initialisation order — ACKNOWLEDGE → DRIVER → features → FEATURES_OK → queues → DRIVER_OK —
//! and refuses out-of-order writes (logged, ignored) rather than trusting the guest. Features the
//! device did not offer, or a driver without VIRTIO_F_VERSION_1, leave FEATURES_OK unset so the
//! driver sees the refusal. At DRIVER_OK every queue the driver made ready must be valid in
//! guest memory, else the device is marked DEVICE_NEEDS_RESET instead of activated.

use std::sync::{Arc, Mutex};

use crate::kvm::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueues, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
pub const MMIO_VERSION: u32 = 2;
/// "LEDG".
pub const VENDOR_ID: u32 = 0x4745_444c;
/// Offset of QueueNotify, where the builder places each queue's ioeventfd.
pub const NOTIFY_OFFSET: u64 = 0x50;
/// Device configuration space starts here.
pub const CONFIG_OFFSET: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// A shared virtio device, as the transport and the event loop both hold it.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

/// One virtio-mmio window.
pub struct MmioTransport {
    device: SharedDevice,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<Arc<EventFd>>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

fn lock(d: &SharedDevice) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl MmioTransport {
    /// Wraps `device`; `queue_evts` must hold one eventfd per queue (the ioeventfds).
    pub fn new(
        device: SharedDevice,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<Arc<EventFd>>,
    ) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            // A max size that is 0 or not a power of two is a device bug; Queue::new refuses it.
            .filter_map(|&max| Queue::new(max).ok())
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            activated: false,
        }
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK.
    fn queue_writable(&self) -> bool {
        self.has(STATUS_FEATURES_OK) && !self.has(STATUS_DRIVER_OK) && !self.has(STATUS_FAILED)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_writable() {
            log::debug!(
                "virtio-mmio: queue register write in status {:#x} ignored",
                self.status
            );
            return;
        }
        match self.selected_queue() {
            Some(q) => f(q),
            None => log::debug!("virtio-mmio: write to missing queue {}", self.queue_sel),
        }
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let v = match offset {
            0x000 => MMIO_MAGIC,
            0x004 => MMIO_VERSION,
            0x008 => lock(&self.device).device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.interrupt.config_generation(),
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        match data.len() {
            4 => data.copy_from_slice(&v.to_le_bytes()),
            _ => {
                log::debug!(
                    "virtio-mmio: {}-byte register read at {offset:#x}",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if self.has(STATUS_DRIVER) && !self.has(STATUS_FAILED) {
                lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte register write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.has(STATUS_DRIVER) && !self.has(STATUS_FEATURES_OK) {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => log::debug!(
                            "virtio-mmio: driver features page {} ignored",
                            self.driver_features_sel
                        ),
                    }
                } else {
                    log::debug!(
                        "virtio-mmio: driver features written in status {:#x}",
                        self.status
                    );
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => self.with_queue(|q| q.set_size(v.try_into().unwrap_or(0))),
            0x044 => self.with_queue(|q| q.set_ready(v == 1)),
            0x050 => {
                log::debug!("virtio-mmio: notify for queue {v} with no ioeventfd (no such queue?)")
            }
            0x064 => self.interrupt.ack(v),
            0x070 => self.set_status(v),
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => log::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (FAILED aside); anything else is out of order.
        if v & self.status != self.status && v & STATUS_FAILED == 0 {
            log::debug!(
                "virtio-mmio: status {v:#x} drops bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let avail = lock(&self.device).avail_features();
            let ok = self.has(STATUS_DRIVER)
                && self.driver_features & !avail == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                log::warn!(
                    "virtio: driver features {:#x} refused (offered {avail:#x}, VERSION_1 required)",
                    self.driver_features
                );
                // Leave FEATURES_OK unset: the driver reads it back and gives up.
                self.status |= v & !STATUS_FEATURES_OK & !STATUS_DRIVER_OK;
                return;
            }
            lock(&self.device).set_acked_features(self.driver_features);
        }
        if new & STATUS_DRIVER_OK != 0 {
            if !self.has(STATUS_FEATURES_OK) && v & STATUS_FEATURES_OK == 0 {
                log::warn!("virtio: DRIVER_OK before FEATURES_OK; device not activated");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
            self.status = v;
            self.activate();
            return;
        }
        self.status = v;
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                log::warn!("virtio: queue {i} is not valid in guest memory; device needs reset");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
            q.set_event_idx(event_idx);
        }
        let queue_evts = self.queue_evts.clone();
        // The device gets its own copy of each queue; the transport keeps the registers.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let queues = match queues {
            Ok(q) => q,
            Err(e) => {
                log::warn!("virtio: queue state refused: {e}; device needs reset");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
        };
        let active = ActiveQueues {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
        };
        match lock(&self.device).activate(active) {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::warn!("virtio: device activation failed: {e}");
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, TYPE_RNG};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Dummy {
        acked: u64,
        activated: Option<usize>,
        resets: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            TYPE_RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn set_acked_features(&mut self, acked: u64) {
            self.acked = acked;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[0xaa, 0xbb], offset, data);
        }
        fn activate(&mut self, q: ActiveQueues) -> Result<(), ActivateError> {
            self.activated = Some(q.queues.len());
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let evts = vec![
            Arc::new(EventFd::new(0).unwrap()),
            Arc::new(EventFd::new(0).unwrap()),
        ];
        let shared: SharedDevice = dev.clone();
        (MmioTransport::new(shared, mem, irq, evts), dev)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, base: u64) {
        w(t, 0x030, sel);
        w(t, 0x038, 8);
        w(t, 0x080, base as u32);
        w(t, 0x090, (base + 0x1000) as u32);
        w(t, 0x0a0, (base + 0x2000) as u32);
        w(t, 0x044, 1);
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, 0x070, STATUS_ACKNOWLEDGE);
        w(t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x024, 0);
        w(t, 0x020, features as u32);
        w(t, 0x024, 1);
        w(t, 0x020, (features >> 32) as u32);
        w(
            t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, 0x000), MMIO_MAGIC);
        assert_eq!(r(&mut t, 0x004), 2);
        assert_eq!(r(&mut t, 0x008), TYPE_RNG);
        w(&mut t, 0x014, 1);
        assert_eq!(r(&mut t, 0x010), 1, "VERSION_1 is bit 32");
        w(&mut t, 0x030, 0);
        assert_eq!(r(&mut t, 0x034), 16);
        w(&mut t, 0x030, 7);
        assert_eq!(r(&mut t, 0x034), 0, "missing queue reads 0");
        let mut b = [0u8; 2];
        t.read(0x100, &mut b);
        assert_eq!(b, [0xaa, 0xbb]);
        let mut one = [0u8; 1];
        t.read(0x000, &mut one);
        assert_eq!(one, [0], "sub-word register reads are refused");
    }

    #[test]
    fn full_initialisation_activates_with_valid_queues() {
        let (mut t, dev) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1);
        assert!(t.has(STATUS_FEATURES_OK));
        assert_eq!(dev.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 1);
        setup_queue(&mut t, 0, 0x10000);
        setup_queue(&mut t, 1, 0x20000);
        w(&mut t, 0x070, 0xf);
        assert!(t.is_activated());
        assert_eq!(dev.lock().unwrap().activated, Some(2));
        // Queue registers are frozen once running.
        w(&mut t, 0x030, 0);
        w(&mut t, 0x038, 2);
        assert_eq!(t.queues[0].size(), 8);
        // Reset goes back to the start and resets the device.
        w(&mut t, 0x070, 0);
        assert_eq!(r(&mut t, 0x070), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(!t.is_activated());
    }

    #[test]
    fn unoffered_features_or_no_version_1_are_refused() {
        for bad in [1u64 << 5 | VIRTIO_F_VERSION_1, 1] {
            let (mut t, dev) = transport();
            negotiate(&mut t, bad);
            assert!(!t.has(STATUS_FEATURES_OK), "{bad:#x}");
            assert_eq!(dev.lock().unwrap().acked, 0);
            w(&mut t, 0x070, 0xf);
            assert!(!t.is_activated());
        }
    }

    #[test]
    fn out_of_order_writes_are_ignored() {
        let (mut t, dev) = transport();
        // Features before DRIVER, queues before FEATURES_OK, DRIVER_OK first.
        w(&mut t, 0x020, 1);
        w(&mut t, 0x030, 0);
        w(&mut t, 0x038, 4);
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, 0x070, STATUS_DRIVER_OK);
        assert!(!t.is_activated());
        assert!(dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let (mut t, dev) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0xfff0_0000);
        w(&mut t, 0x070, 0xf);
        assert!(!t.is_activated());
        assert!(t.has(STATUS_NEEDS_RESET));
        assert!(dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn interrupt_ack_clears_bits() {
        let (mut t, _) = transport();
        t.interrupt.signal_used_queue();
        assert_eq!(r(&mut t, 0x060), 1);
        w(&mut t, 0x064, 1);
        assert_eq!(r(&mut t, 0x060), 0);
    }
}
