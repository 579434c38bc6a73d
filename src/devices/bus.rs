//! Address → device maps for port I/O and MMIO.
//!
//! Built before any vCPU runs and never changed afterwards, so vCPU threads share it read-only
//! (`Arc<Bus>`) and only take the lock of the one device they reach. An access that no device
//! claims returns `false`; the vCPU then reads all-ones / drops the write, as hardware would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::legacy::{SerialDevice, I8042};
use super::virtio::mmio::MmioTransport;

/// Errors when placing a device on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps one already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

/// A device reachable from a bus.
#[derive(Clone, Debug)]
pub enum BusDevice {
    Serial(Arc<Mutex<SerialDevice>>),
    I8042(Arc<Mutex<I8042>>),
    Virtio(Arc<Mutex<MmioTransport>>),
}

impl BusDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self {
            BusDevice::Serial(d) => lock(d).read(offset, data),
            BusDevice::I8042(d) => lock(d).read(offset, data),
            BusDevice::Virtio(d) => lock(d).read(offset, data),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match self {
            BusDevice::Serial(d) => lock(d).write(offset, data),
            BusDevice::I8042(d) => lock(d).write(offset, data),
            BusDevice::Virtio(d) => lock(d).write(offset, data),
        }
    }
}

/// A poisoned lock means a device panicked on another thread; its state is still the best we
/// have, so keep serving it rather than taking the whole VMM down.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Entry {
    len: u64,
    device: BusDevice,
}

/// One address space (PIO or MMIO).
#[derive(Debug, Default)]
pub struct Bus {
    entries: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: BusDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let before = self.entries.range(..end).next_back();
        if let Some((b, e)) = before {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.entries.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &BusDevice)> {
        let (base, e) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= e.len).then_some((offset, &e.device))
    }

    /// Reads from the device at `addr`; `false` when no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, d)) => {
                d.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; `false` when no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, d)) => {
                d.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitSignal;

    fn i8042() -> BusDevice {
        BusDevice::I8042(Arc::new(Mutex::new(I8042::new(
            Arc::new(ExitSignal::new().unwrap()),
            vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        ))))
    }

    #[test]
    fn overlap_and_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x60, 5, i8042()).unwrap();
        assert_eq!(
            bus.insert(0x64, 1, i8042()),
            Err(BusError::Overlap { base: 0x64, len: 1 })
        );
        assert_eq!(
            bus.insert(0x5c, 8, i8042()),
            Err(BusError::Overlap { base: 0x5c, len: 8 })
        );
        assert!(bus.insert(0x5b, 5, i8042()).is_ok());
        assert!(bus.insert(0x65, 1, i8042()).is_ok());
        assert!(matches!(
            bus.insert(u64::MAX, 2, i8042()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(0x1000, 0, i8042()),
            Err(BusError::BadRange { .. })
        ));
    }

    #[test]
    fn unclaimed_and_straddling_accesses_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x60, 5, i8042()).unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x70, &mut b));
        assert!(!bus.read(0x63, &mut b), "access runs past the device");
        assert!(!bus.read(u64::MAX, &mut b[..2]));
        assert!(bus.read(0x64, &mut b[..1]));
        assert!(!bus.write(0x10, &[1]));
    }
}
