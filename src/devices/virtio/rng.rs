//! virtio-rng: entropy for the guest from the host's random pool (virtio 1.x §5.4).
//!
//! This is the reference device: every other device file has the same sections in the same
//! order — constants and config → struct → `VirtioDevice` → queue handling → event subscriber
//! → tests on the mock queue. One queue; each chain is a run of device-writable buffers that
//! the device fills. The pool is /dev/urandom (the same pool as getrandom(2)), opened when the
//! device is created so a later jail or seccomp filter needs no open().

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::kvm::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    single_queue_event, ActivateError, ActivateEvent, ActiveQueues, Interrupt, VirtioDevice,
    TYPE_RNG, VIRTIO_F_VERSION_1,
};
use crate::devices::state::{DeviceSnapshot, StateError};

pub const QUEUE_SIZE: u16 = 256;
/// The most one request may take: a guest cannot make the VMM thread read megabytes at once.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Errors of the rng device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot open the host entropy source /dev/urandom")]
    Open(#[source] io::Error),
}

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RngStats {
    pub requests: u64,
    pub bytes: u64,
    pub bad_chains: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_evt: Arc<EventFd>,
    interrupt: Arc<Interrupt>,
}

/// The virtio-rng device.
pub struct Rng {
    source: File,
    acked: u64,
    active: Option<Active>,
    activate_evt: ActivateEvent,
    stats: RngStats,
}

impl Rng {
    pub fn new() -> Result<Self, RngError> {
        Ok(Rng {
            source: File::open("/dev/urandom").map_err(RngError::Open)?,
            acked: 0,
            active: None,
            activate_evt: ActivateEvent::new().map_err(RngError::Open)?,
            stats: RngStats::default(),
        })
    }

    pub fn stats(&self) -> RngStats {
        self.stats
    }

    /// Serves every chain the driver made available; returns how many were used.
    pub fn process_queue(&mut self) -> usize {
        let Some(a) = self.active.as_mut() else {
            return 0;
        };
        let mut used = 0;
        while let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let len = match chain.writer(&a.mem) {
                Ok(mut w) => {
                    let want = w.available_bytes().min(MAX_BYTES_PER_REQUEST);
                    fill(&mut self.source, &mut w, want).unwrap_or_else(|e| {
                        log::warn!("virtio-rng: {e}");
                        0
                    })
                }
                Err(e) => {
                    // A malformed chain is the guest's problem: return it empty.
                    log::debug!("virtio-rng: bad chain {head}: {e}");
                    self.stats.bad_chains += 1;
                    0
                }
            };
            if let Err(e) = a.queue.add_used(&a.mem, head, len) {
                log::warn!("virtio-rng: cannot return chain {head}: {e}");
                break;
            }
            self.stats.requests += 1;
            self.stats.bytes += u64::from(len);
            used += 1;
        }
        if used > 0 {
            match a.queue.needs_notification(&a.mem) {
                Ok(true) => a.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(e) => log::warn!("virtio-rng: {e}"),
            }
        }
        used
    }
}

/// Copies `want` random bytes into the chain; returns how many were written.
fn fill(source: &mut File, w: &mut impl Write, want: usize) -> io::Result<u32> {
    let mut buf = [0u8; 4096];
    let mut done = 0;
    while done < want {
        let n = (want - done).min(buf.len());
        source.read_exact(&mut buf[..n])?;
        w.write_all(&buf[..n])?;
        done += n;
    }
    // `want` is at most MAX_BYTES_PER_REQUEST.
    Ok(u32::try_from(done).unwrap_or(u32::MAX))
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        super::read_config_bytes(&[], offset, data);
    }

    fn activate(&mut self, q: ActiveQueues) -> Result<(), ActivateError> {
        let (mem, queue, queue_evt, interrupt) = q.into_single()?;
        self.active = Some(Active {
            mem,
            queue,
            queue_evt,
            interrupt,
        });
        self.activate_evt.signal()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(self.stats).unwrap_or_default()
    }

    fn save_state(&self) -> DeviceSnapshot {
        DeviceSnapshot::Rng {}
    }

    /// Nothing to restore: the device keeps no state beyond its queue.
    fn restore_state(&mut self, s: &DeviceSnapshot) -> Result<(), StateError> {
        match s {
            DeviceSnapshot::Rng {} => Ok(()),
            other => Err(other.wrong_kind("rng")),
        }
    }

    fn queue_states(&self) -> Vec<QueueState> {
        // Chains are served whole within one event: none is ever held.
        self.active.iter().map(|a| a.queue.state()).collect()
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let queue_evt = self.active.as_ref().map(|a| &a.queue_evt);
        if single_queue_event("virtio-rng", &events, ops, &self.activate_evt, queue_evt) {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activate_evt.watch(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{active, memory, queue_from_mock};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// Runs one device over the descriptors given, as one chain; returns (used len, stats).
    fn serve(descs: &[RawDescriptor]) -> (Option<u32>, RngStats, GuestMemoryMmap) {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.build_desc_chain(descs).unwrap();
        let q = queue_from_mock(&mock, 16);
        let mut rng = Rng::new().unwrap();
        let (act, irq) = active(&mem, vec![q]);
        rng.activate(act).unwrap();
        let n = rng.process_queue();
        let used = (n > 0).then(|| mock.used().ring().ref_at(0).unwrap().load().len());
        if n > 0 {
            assert!(irq.status() & 1 == 1, "used buffers raise the interrupt");
        }
        (used, rng.stats(), mem)
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let (used, stats, mem) = serve(&[
            desc(0x8000, 100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(0x9000, 28, VRING_DESC_F_WRITE, 0),
        ]);
        assert_eq!(used, Some(128));
        assert_eq!(stats.bytes, 128);
        let mut a = [0u8; 100];
        mem.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        assert!(a.iter().any(|&b| b != 0), "random bytes were written");
    }

    #[test]
    fn large_requests_are_capped() {
        let (used, _, _) = serve(&[desc(0x10000, 512 * 1024, VRING_DESC_F_WRITE, 0)]);
        assert_eq!(used, Some(MAX_BYTES_PER_REQUEST as u32));
    }

    #[test]
    fn hostile_chains_are_returned_empty() {
        // Outside guest memory, wrapping lengths, a read-only buffer, a zero-length buffer.
        for descs in [
            vec![desc(0xffff_0000, 64, VRING_DESC_F_WRITE, 0)],
            vec![desc(0xf_ffff, 0xffff_ffff, VRING_DESC_F_WRITE, 0)],
            vec![desc(u64::MAX - 8, 64, VRING_DESC_F_WRITE, 0)],
            vec![desc(0x8000, 64, 0, 0)],
            vec![desc(0x8000, 0, VRING_DESC_F_WRITE, 0)],
        ] {
            let (used, _, _) = serve(&descs);
            assert_eq!(used, Some(0), "{descs:?}");
        }
    }

    #[test]
    fn looping_and_overlong_chains_do_not_hang() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        // A chain whose last descriptor points back at the first.
        let descs = [
            desc(0x8000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(0x9000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            mock.desc_table().store(i as u16, *d).unwrap();
        }
        mock.avail().ring().ref_at(0).unwrap().store(0);
        mock.avail().idx().store(1);
        let mut rng = Rng::new().unwrap();
        let (act, _) = active(&mem, vec![queue_from_mock(&mock, 16)]);
        rng.activate(act).unwrap();
        assert_eq!(rng.process_queue(), 1);
        // virtio-queue stops following a chain after queue-size descriptors, so the loop ends;
        // what was written stayed inside the two 8-byte buffers the chain names.
        let used = mock.used().ring().ref_at(0).unwrap().load();
        assert!(used.len() <= 16 * 8, "{}", used.len());
        let mut around = [0u8; 8];
        mem.read_slice(&mut around, GuestAddress(0x8008)).unwrap();
        assert_eq!(around, [0; 8], "nothing written past the buffer");
    }

    #[test]
    fn nothing_happens_before_activation_and_after_reset() {
        let mut rng = Rng::new().unwrap();
        assert_eq!(rng.process_queue(), 0);
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let (act, _) = active(&mem, vec![queue_from_mock(&mock, 16)]);
        rng.activate(act).unwrap();
        rng.reset();
        assert_eq!(rng.process_queue(), 0);
        let (act, _) = active(&mem, vec![]);
        assert!(matches!(
            rng.activate(act),
            Err(ActivateError::QueueCount { want: 1, got: 0 })
        ));
    }
}
