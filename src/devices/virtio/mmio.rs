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

use super::{
    ActivateError, ActiveQueues, Interrupt, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_RING,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::state::{device_type_name, QueueSnapshot, StateError, TransportSnapshot};
use virtio_queue::QueueState;

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

/// Why the transport could not activate its device.
#[derive(Debug)]
enum ActivationFailure {
    BadQueue(usize),
    QueueState(usize, String),
    Device(ActivateError),
}

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

    /// The transport's registers, queues and interrupt state, and the device's own state.
    /// Called only while the VM is paused. The ring positions of an active device are the
    /// device's (see `VirtioDevice::queue_states`); the other queue registers are the
    /// transport's, which are frozen while the device runs.
    pub fn save(&self) -> TransportSnapshot {
        let dev = lock(&self.device);
        let live = if self.activated {
            dev.queue_states()
        } else {
            Vec::new()
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut s = q.state();
                if let Some(d) = live.get(i) {
                    s.next_avail = d.next_avail;
                    s.next_used = d.next_used;
                    s.event_idx_enabled = d.event_idx_enabled;
                }
                QueueSnapshot::from(s)
            })
            .collect();
        TransportSnapshot {
            device_type: dev.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queues,
            device: dev.save_state(),
        }
    }

    /// Puts saved state back into a freshly built transport (same device type, same queue
    /// count) before any vCPU runs; an activated device is activated again on the same queues.
    ///
    /// Everything is checked before anything changes: a refusal leaves a fresh transport and
    /// its device as they were (one that was running is reset first). Only a failure of the
    /// device's own activation, after every check passed, leaves the restored registers in
    /// place with the device not running. Call it after the interrupt controller's state is
    /// back: an InterruptStatus with bits set signals the irqfd once.
    pub fn restore(&mut self, state: &TransportSnapshot) -> Result<(), StateError> {
        let queues = self.check_state(state)?;
        if self.activated {
            // Not fresh: start from a reset device, as the guest would see after a reset.
            self.reset();
        }
        lock(&self.device).restore_state(&state.device)?;
        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        if self.has(STATUS_FEATURES_OK) {
            lock(&self.device).set_acked_features(self.driver_features);
        }
        if state.activated {
            self.try_activate().map_err(|e| match e {
                ActivationFailure::BadQueue(index) => StateError::Queue {
                    index,
                    why: "not valid in guest memory".into(),
                },
                ActivationFailure::QueueState(index, why) => StateError::Queue { index, why },
                ActivationFailure::Device(e) => StateError::Activate(e),
            })?;
        }
        self.interrupt
            .restore(state.interrupt_status, state.config_generation);
        Ok(())
    }

    /// Checks saved state against this window and its device; returns the queues to install.
    fn check_state(&self, state: &TransportSnapshot) -> Result<Vec<Queue>, StateError> {
        let dev = lock(&self.device);
        let here = dev.device_type();
        if state.device_type != here {
            return Err(StateError::Kind {
                saved: device_type_name(state.device_type),
                here: device_type_name(here),
            });
        }
        let max_sizes = dev.queue_max_sizes().to_vec();
        if state.queues.len() != max_sizes.len() {
            return Err(StateError::Mismatch(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                max_sizes.len()
            )));
        }
        let avail = dev.avail_features();
        drop(dev);
        if state.driver_features & !avail != 0 {
            return Err(StateError::Mismatch(format!(
                "driver features {:#x} include {:#x}, which the device does not offer (it offers {avail:#x})",
                state.driver_features,
                state.driver_features & !avail
            )));
        }
        let known = STATUS_ACKNOWLEDGE
            | STATUS_DRIVER
            | STATUS_DRIVER_OK
            | STATUS_FEATURES_OK
            | STATUS_NEEDS_RESET
            | STATUS_FAILED;
        if state.status & !known != 0 {
            return Err(StateError::Mismatch(format!(
                "unknown device status bits {:#x}",
                state.status & !known
            )));
        }
        if state.status & STATUS_FEATURES_OK != 0 && state.driver_features & VIRTIO_F_VERSION_1 == 0
        {
            return Err(StateError::Mismatch(
                "FEATURES_OK without VIRTIO_F_VERSION_1".into(),
            ));
        }
        let running = STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if state.activated && state.status & running != running {
            return Err(StateError::Mismatch(format!(
                "activated in device status {:#x} (DRIVER_OK and FEATURES_OK needed)",
                state.status
            )));
        }
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG_CHANGE) != 0 {
            return Err(StateError::Mismatch(format!(
                "unknown interrupt status bits {:#x}",
                state.interrupt_status
            )));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, (s, &max)) in state.queues.iter().zip(&max_sizes).enumerate() {
            let bad = |why: String| StateError::Queue { index, why };
            if s.max_size != max {
                return Err(bad(format!(
                    "maximum size {} saved, the device's is {max}",
                    s.max_size
                )));
            }
            if s.size == 0 || s.size > max || !s.size.is_power_of_two() {
                return Err(bad(format!(
                    "size {} is not a power of two of at most {max}",
                    s.size
                )));
            }
            let q = Queue::try_from(QueueState::from(s)).map_err(|e| bad(e.to_string()))?;
            if state.activated && q.ready() && !q.is_valid(&self.mem) {
                return Err(bad(format!(
                    "rings at {:#x}/{:#x}/{:#x} (size {}) are not valid in guest memory",
                    s.desc_table, s.avail_ring, s.used_ring, s.size
                )));
            }
            queues.push(q);
        }
        Ok(queues)
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
        if let Err(e) = self.try_activate() {
            match e {
                ActivationFailure::BadQueue(i) => {
                    log::warn!("virtio: queue {i} is not valid in guest memory; device needs reset")
                }
                ActivationFailure::QueueState(i, e) => {
                    log::warn!("virtio: queue {i} state refused: {e}; device needs reset")
                }
                ActivationFailure::Device(e) => {
                    log::warn!("virtio: device activation failed: {e}")
                }
            }
            self.status |= STATUS_NEEDS_RESET;
        }
    }

    /// Hands the device its queues (copies of the transport's, ring positions included).
    fn try_activate(&mut self) -> Result<(), ActivationFailure> {
        if self.activated {
            return Ok(());
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(ActivationFailure::BadQueue(i));
            }
            q.set_event_idx(event_idx);
        }
        let queue_evts = self.queue_evts.clone();
        // The device gets its own copy of each queue; the transport keeps the registers.
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Queue::try_from(q.state())
                    .map_err(|e| ActivationFailure::QueueState(i, e.to_string()))
            })
            .collect::<Result<Vec<Queue>, _>>()?;
        let active = ActiveQueues {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
        };
        lock(&self.device)
            .activate(active)
            .map_err(ActivationFailure::Device)?;
        self.activated = true;
        Ok(())
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
    use crate::devices::state::DeviceSnapshot;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::{
        driver_init, memory, settle, through_json, transport as rig, TestRing,
    };
    use crate::devices::virtio::{TYPE_BLOCK, TYPE_RNG};
    use event_manager::{EventManager, SubscriberOps};
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
        fn save_state(&self) -> DeviceSnapshot {
            DeviceSnapshot::Rng {}
        }
        fn restore_state(&mut self, s: &DeviceSnapshot) -> Result<(), StateError> {
            match s {
                DeviceSnapshot::Rng {} => Ok(()),
                other => Err(other.wrong_kind("rng")),
            }
        }
        fn queue_states(&self) -> Vec<QueueState> {
            Vec::new()
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

    // --- snapshot ---

    /// An rng behind a transport, driven to DRIVER_OK on one ring, under an event loop.
    struct RngRig {
        t: MmioTransport,
        irq: Arc<Interrupt>,
        em: EventManager<Arc<Mutex<Rng>>>,
    }

    fn rng_rig(mem: &GuestMemoryMmap) -> RngRig {
        let dev = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut em = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let (t, irq, _) = rig(dev, mem);
        RngRig { t, irq, em }
    }

    /// An active rng with one chain served and a second one waiting in the avail ring.
    fn saved_rng(mem: &GuestMemoryMmap, ring: &mut TestRing) -> TransportSnapshot {
        let mut r = rng_rig(mem);
        driver_init(&mut r.t, VIRTIO_F_VERSION_1, &[*ring]);
        ring.push(mem, &[(0x8000, 16, true)]);
        settle(&mut r.em);
        assert_eq!(ring.take_used(mem), vec![(0, 16)]);
        // Paused: the VMM thread serves no events, so this one stays in the avail ring.
        ring.push(mem, &[(0x9000, 32, true)]);
        r.t.save()
    }

    #[test]
    fn snapshot_round_trip_resumes_the_rings() {
        let mem = memory();
        let mut ring = TestRing::new(&mem, 0x1000, 16);
        let saved = through_json(&saved_rng(&mem, &mut ring));
        assert!(saved.activated);
        assert_eq!(
            saved.queues[0].next_avail, 1,
            "the device's position, not 0"
        );
        assert_eq!(saved.queues[0].next_used, 1);
        assert_eq!(saved.device, DeviceSnapshot::Rng {});

        let mut r = rng_rig(&mem);
        r.t.restore(&saved).unwrap();
        assert!(r.t.is_activated());
        assert_eq!(r.t.status(), saved.status);
        assert_eq!(r.t.save(), saved, "what was restored saves the same");
        // The event loop starts: the waiting chain is served, and the used ring continues.
        settle(&mut r.em);
        assert_eq!(ring.take_used(&mem), vec![(1, 32)]);
        assert_eq!(ring.used_idx(&mem), 2);
        assert_eq!(r.t.save().queues[0].next_used, 2);
        ring.push(&mem, &[(0xa000, 8, true)]);
        r.t.queue_evts[0].write(1).unwrap();
        settle(&mut r.em);
        assert_eq!(ring.take_used(&mem), vec![(2, 8)]);
        assert_eq!(r.irq.status() & INT_USED_RING, INT_USED_RING);
    }

    #[test]
    fn interrupt_status_and_generation_are_restored_and_raised_once() {
        let mem = memory();
        let mut ring = TestRing::new(&mem, 0x1000, 16);
        let mut saved = saved_rng(&mem, &mut ring);
        saved.interrupt_status = INT_USED_RING | INT_CONFIG_CHANGE;
        saved.config_generation = 7;
        let mut g = rng_rig(&mem);
        g.t.restore(&saved).unwrap();
        assert_eq!(r(&mut g.t, 0x060), 3);
        assert_eq!(r(&mut g.t, 0x0fc), 7);
        assert_eq!(g.irq.irqfd().read().unwrap(), 1, "raised once");

        // Nothing pending: no interrupt.
        saved.interrupt_status = 0;
        let mut r = rng_rig(&mem);
        r.t.restore(&saved).unwrap();
        assert!(r.irq.irqfd().read().is_err());
    }

    #[test]
    fn a_window_saved_mid_initialisation_finishes_it_after_restore() {
        let (mut t, dev) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | 1);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, 0x030, 1);
        let saved = through_json(&t.save());
        assert!(!saved.activated);
        assert_eq!(saved.queues[0].size, 8);
        assert!(saved.queues[0].ready);

        let (mut t2, dev2) = transport();
        t2.restore(&saved).unwrap();
        assert_eq!(dev2.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 1);
        assert!(dev2.lock().unwrap().activated.is_none());
        assert_eq!(r(&mut t2, 0x044), 0, "queue_sel 1 kept: queue 1 not ready");
        setup_queue(&mut t2, 1, 0x20000);
        w(&mut t2, 0x070, 0xf);
        assert!(t2.is_activated());
        assert_eq!(dev2.lock().unwrap().activated, Some(2));
        drop(dev);
    }

    #[test]
    fn bad_state_is_refused_and_changes_nothing() {
        let mem = memory();
        let mut ring = TestRing::new(&mem, 0x1000, 16);
        let good = saved_rng(&mem, &mut ring);
        type Edit = fn(&mut TransportSnapshot);
        let cases: [(&str, Edit); 12] = [
            ("device type", |s| s.device_type = TYPE_BLOCK),
            ("device kind", |s| {
                s.device = DeviceSnapshot::Net { mac: [0; 6] }
            }),
            ("queue count", |s| s.queues.push(s.queues[0].clone())),
            ("no queues", |s| s.queues.clear()),
            ("max size", |s| s.queues[0].max_size = 128),
            ("size not a power of two", |s| s.queues[0].size = 12),
            ("size above max", |s| s.queues[0].size = 512),
            ("size zero", |s| s.queues[0].size = 0),
            ("features not offered", |s| s.driver_features |= 1 << 5),
            ("rings outside memory", |s| {
                s.queues[0].desc_table = 0xfff0_0000
            }),
            ("misaligned ring", |s| s.queues[0].used_ring += 2),
            ("activated without DRIVER_OK", |s| {
                s.status &= !STATUS_DRIVER_OK
            }),
        ];
        for (what, edit) in cases {
            let mut bad = good.clone();
            edit(&mut bad);
            let bad = through_json(&bad);
            let mut r = rng_rig(&mem);
            let err = r.t.restore(&bad).expect_err(what);
            let ok = match what {
                "device type" | "device kind" => matches!(err, StateError::Kind { .. }),
                "queue count" | "no queues" | "features not offered" => {
                    matches!(err, StateError::Mismatch(_))
                }
                "activated without DRIVER_OK" => matches!(err, StateError::Mismatch(_)),
                _ => matches!(err, StateError::Queue { index: 0, .. }),
            };
            assert!(ok, "{what}: {err}");
            assert!(!r.t.is_activated(), "{what}");
            assert_eq!(r.t.status(), 0, "{what}");
            assert_eq!(r.t.save().queues[0].size, 256, "{what}: queues untouched");
            assert_eq!(r.t.save().driver_features, 0, "{what}");
        }
        // Unknown status or interrupt bits.
        for edit in [
            (|s: &mut TransportSnapshot| s.status |= 0x100) as Edit,
            |s| s.interrupt_status = 4,
            |s| s.driver_features &= !VIRTIO_F_VERSION_1,
        ] {
            let mut bad = good.clone();
            edit(&mut bad);
            let mut r = rng_rig(&mem);
            assert!(matches!(r.t.restore(&bad), Err(StateError::Mismatch(_))));
        }
    }
}
