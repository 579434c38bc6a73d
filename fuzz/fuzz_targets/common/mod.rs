//! Shared by the virtio targets: a small guest memory, split queues whose descriptors,
//! available ring and indexes come from the fuzz input (written through virtio-queue's
//! `MockSplitQueue`), and the activation input a device gets at DRIVER_OK.
//!
//! Guest memory is 1 MiB at 0: queue `i`'s rings at `i * 0x1000` (descriptor table and
//! available ring from `MockSplitQueue::create`, used ring at +0x800), a data area at 0x10000
//! that the input fills (request headers, frames, PFN lists, indirect tables), the rest zero.
//! Descriptors address the data area, the rings, or any raw 64-bit address (outside memory,
//! wrapping), with any length, direction and `next` index, so chains may loop, be empty, go
//! the wrong way or be huge.

#![allow(dead_code)]

use std::sync::Arc;

use arbitrary::Arbitrary;
use ledge::devices::virtio::{ActiveQueues, Interrupt};
use ledge::kvm::memory::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const MEM_SIZE: usize = 1 << 20;
pub const RING_STRIDE: u64 = 0x1000;
pub const USED_OFFSET: u64 = 0x800;
pub const DATA_BASE: u64 = 0x10000;
pub const DATA_SIZE: u64 = 0x10000;
/// Largest queue the targets build (the mock's rings must fit in `RING_STRIDE`).
pub const MAX_QUEUE_LOG2: u8 = 5;

/// Where a descriptor points.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// Into the data area the input filled.
    Data(u16),
    /// Into the queue rings themselves (the device must not trust them).
    Ring(u16),
    /// Anywhere at all, e.g. past the end of memory or about to wrap.
    Raw(u64),
}

/// A descriptor length.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u8),
    Mid(u16),
    Raw(u32),
}

/// How a descriptor continues.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Next {
    End,
    /// The next slot of the table (a well-formed chain).
    Following,
    /// Any index: loops, out of range.
    To(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Desc {
    pub addr: Addr,
    pub len: Len,
    pub write: bool,
    pub next: Next,
    pub indirect: bool,
}

impl Desc {
    fn raw(&self, index: u16, size: u16) -> RawDescriptor {
        let addr = match self.addr {
            Addr::Data(o) => DATA_BASE + u64::from(o),
            Addr::Ring(o) => u64::from(o),
            Addr::Raw(a) => a,
        };
        let len = match self.len {
            Len::Small(l) => u32::from(l),
            Len::Mid(l) => u32::from(l),
            Len::Raw(l) => l,
        };
        let mut flags = 0u32;
        if self.write {
            flags |= VRING_DESC_F_WRITE;
        }
        if self.indirect {
            flags |= VRING_DESC_F_INDIRECT;
        }
        let next = match self.next {
            Next::End => 0,
            Next::Following => {
                flags |= VRING_DESC_F_NEXT;
                (index + 1) % size
            }
            Next::To(n) => {
                flags |= VRING_DESC_F_NEXT;
                n
            }
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }
}

/// One queue as the driver left it.
#[derive(Arbitrary, Debug, Clone)]
pub struct QueueInput {
    /// Queue size is `1 << (size_log2 % (MAX_QUEUE_LOG2 + 1))`.
    pub size_log2: u8,
    pub event_idx: bool,
    pub descs: Vec<Desc>,
    /// Heads offered in the available ring.
    pub avail: Vec<u16>,
    /// A hostile available index instead of the number of heads offered.
    pub avail_idx: Option<u16>,
    pub used_event: u16,
    /// A hostile used index the device starts from.
    pub used_idx: Option<u16>,
}

impl QueueInput {
    pub fn size(&self) -> u16 {
        1 << (self.size_log2 % (MAX_QUEUE_LOG2 + 1))
    }
}

/// A fresh guest memory with `data` copied into the data area.
pub fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let n = data.len().min(DATA_SIZE as usize);
    mem.write_slice(&data[..n], GuestAddress(DATA_BASE))
        .expect("data area");
    mem
}

/// Writes queue `index` from `q` into `mem` and returns the device side of it, ready, with
/// at most `max_size` entries (a queue larger than the device allows is shrunk, as the
/// transport would refuse it).
pub fn build_queue(mem: &GuestMemoryMmap, index: usize, q: &QueueInput, max_size: u16) -> Queue {
    let base = index as u64 * RING_STRIDE;
    let size = q.size().min(max_size);
    let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
    for (i, d) in (0..size).zip(q.descs.iter()) {
        mock.desc_table()
            .store(i, d.raw(i, size))
            .expect("descriptor slot");
    }
    let ring = mock.avail().ring();
    let mut offered = 0u16;
    for (i, head) in q.avail.iter().take(usize::from(size)).enumerate() {
        ring.ref_at(i).expect("avail slot").store(*head);
        offered += 1;
    }
    mock.avail().idx().store(q.avail_idx.unwrap_or(offered));
    let avail = mock.avail_addr().0;
    mem.write_obj(q.used_event, GuestAddress(avail + 4 + 2 * u64::from(size)))
        .expect("used_event");
    // MockSplitQueue::create lays its used ring over the available ring's tail: use our own.
    let used = base + USED_OFFSET;
    mem.write_obj(0u16, GuestAddress(used)).expect("used flags");
    mem.write_obj(q.used_idx.unwrap_or(0), GuestAddress(used + 2))
        .expect("used idx");

    let mut queue = Queue::new(max_size.max(1)).expect("queue");
    queue.set_size(size);
    let desc = mock.desc_table_addr().0;
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_event_idx(q.event_idx);
    if let Some(u) = q.used_idx {
        queue.set_next_used(u);
    }
    queue.set_ready(true);
    queue
}

/// Activation input for a device: its queues, one eventfd each, and an interrupt.
pub fn active(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> (ActiveQueues, Arc<Interrupt>) {
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let queue_evts = queues
        .iter()
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")))
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

/// The device side of `n` queues built from `qs` (`build_queue` for each; a queue the input
/// does not describe is an empty one of 16 entries).
pub fn build_queues(
    mem: &GuestMemoryMmap,
    qs: &[QueueInput],
    n: usize,
    max_size: u16,
) -> Vec<Queue> {
    let empty = QueueInput {
        size_log2: 4,
        event_idx: false,
        descs: Vec::new(),
        avail: Vec::new(),
        avail_idx: None,
        used_event: 0,
        used_idx: None,
    };
    (0..n)
        .map(|i| build_queue(mem, i, qs.get(i).unwrap_or(&empty), max_size))
        .collect()
}

/// A scratch directory for this process: under `$LEDGE_FUZZ_SCRATCH` (tools/fuzz.sh sets it
/// and removes it), else under /dev/shm when there is one (a tmpfs, so fsync is free).
pub fn scratch_dir() -> std::path::PathBuf {
    let base = if let Some(d) = std::env::var_os("LEDGE_FUZZ_SCRATCH") {
        std::path::PathBuf::from(d)
    } else if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("ledge-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}
