//! The probe's virtio driver core: virtio-mmio "modern" transport (register layout version 2)
//! and polled split virtqueues, all in ring 3 with no interrupts.
//!
//! Spec (virtio 1.2): §4.2.2 MMIO registers, §3.1.1 driver initialisation (reset →
//! ACKNOWLEDGE → DRIVER → features → FEATURES_OK, read back → queues → DRIVER_OK), §2.7 split
//! virtqueues, §2.7.13 supplying buffers, §2.7.14 used buffers.
//!
//! Memory: everything the device reads or writes (descriptor tables, rings, buffers) comes from
//! an `Arena` of guest RAM past the probe image; the identity map makes virtual = physical.
//! The driver never reads back what the device must not write (the descriptor table is ours),
//! and nothing is ever freed except by resetting the device first.
//!
//! Ordering (x86 is TSO, so only the compiler and one store→load pair need fences):
//! descriptors and the avail ring slot are written before avail.idx (a Release fence keeps
//! the compiler from sinking them past it); avail.idx is written before used.flags is read to
//! decide whether to notify (a SeqCst fence: mfence, the §2.7.13.4 barrier); used.idx is read
//! before the used ring entry and the buffer it names (an Acquire fence). All ring fields the
//! device writes are read with volatile loads so polling loops really poll.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::rdtsc;

// --- registers (§4.2.2) ------------------------------------------------------------------

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

pub const MAGIC: u32 = 0x7472_6976; // "virt"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

pub const F_VERSION_1: u64 = 1 << 32;

pub const ID_NET: u32 = 1;
pub const ID_BLOCK: u32 = 2;
pub const ID_RNG: u32 = 4;

/// Virtqueue descriptor flags (§2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// avail.flags: the driver does not want interrupts (it polls).
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// used.flags: the device does not need notifications right now.
const USED_F_NO_NOTIFY: u16 = 1;

/// The largest queue the probe sets up (its bookkeeping arrays are this long).
pub const MAX_QUEUE: u16 = 256;

/// How long one polled wait may take before the probe calls it a hang: 2·10¹⁰ TSC cycles
/// (about 10 s at 2 GHz).
pub const WAIT_CYCLES: u64 = 20_000_000_000;

// --- raw access --------------------------------------------------------------------------

/// 32-bit MMIO register read.
pub fn read32(addr: u64) -> u32 {
    // SAFETY: callers pass a 4-aligned address inside a virtio-mmio window below 4 GiB,
    // which the identity map covers with user pages.
    unsafe { read_volatile(addr as *const u32) }
}

fn write32(addr: u64, value: u32) {
    // SAFETY: as read32.
    unsafe { write_volatile(addr as *mut u32, value) }
}

fn read8(addr: u64) -> u8 {
    // SAFETY: as read32 (byte access to the configuration space).
    unsafe { read_volatile(addr as *const u8) }
}

/// Guest RAM the probe owns (from the Arena): plain volatile loads and stores.
fn mem16(addr: u64) -> u16 {
    // SAFETY: addr lies in an Arena allocation, 2-aligned.
    unsafe { read_volatile(addr as *const u16) }
}

fn set_mem16(addr: u64, v: u16) {
    // SAFETY: as mem16.
    unsafe { write_volatile(addr as *mut u16, v) }
}

fn mem32(addr: u64) -> u32 {
    // SAFETY: addr lies in an Arena allocation, 4-aligned.
    unsafe { read_volatile(addr as *const u32) }
}

fn set_mem32(addr: u64, v: u32) {
    // SAFETY: as mem32.
    unsafe { write_volatile(addr as *mut u32, v) }
}

fn set_mem64(addr: u64, v: u64) {
    // SAFETY: addr lies in an Arena allocation, 8-aligned.
    unsafe { write_volatile(addr as *mut u64, v) }
}

/// A byte slice over Arena memory (for filling and checking buffers).
pub fn bytes_mut(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: addr..addr+len is an Arena allocation the caller owns; the device is not
    // writing it now (the caller only touches buffers that are not in a queue).
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

/// A u64 slice over Arena memory; `addr` must be 8-aligned.
pub fn words_mut(addr: u64, words: usize) -> &'static mut [u64] {
    // SAFETY: as bytes_mut; Arena allocations used for data are page-aligned.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, words) }
}

// --- guest RAM for the devices -----------------------------------------------------------

/// A bump allocator over RAM the probe owns (past its image, inside one RAM entry).
#[derive(Clone, Copy)]
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    pub fn new(start: u64, end: u64) -> Arena {
        Arena { next: start, end }
    }

    /// `size` zeroed bytes aligned to `align` (a power of two), or None if RAM ran out.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let start = self.take(size, align)?;
        bytes_mut(start, size as usize).fill(0);
        Some(start)
    }

    /// Like `alloc`, but the memory is left as it is (for buffers the caller fills anyway).
    pub fn take(&mut self, size: u64, align: u64) -> Option<u64> {
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }

    /// What is left: `[next, end)`.
    pub fn free(&self) -> (u64, u64) {
        (self.next, self.end.max(self.next))
    }
}

// --- the transport -----------------------------------------------------------------------

/// Why a device could not be brought up; `name` is what the report prints.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum InitError {
    BadMagic,
    BadVersion,
    NoVersion1,
    FeaturesRefused,
    NoQueue,
    QueueBusy,
    NoMemory,
    NeedsReset,
}

impl InitError {
    pub fn name(self) -> &'static str {
        match self {
            InitError::BadMagic => "bad-magic",
            InitError::BadVersion => "not-version-2",
            InitError::NoVersion1 => "no-version-1",
            InitError::FeaturesRefused => "features-refused",
            InitError::NoQueue => "no-queue",
            InitError::QueueBusy => "queue-busy",
            InitError::NoMemory => "no-memory",
            InitError::NeedsReset => "needs-reset",
        }
    }
}

/// One virtio-mmio window.
#[derive(Clone, Copy)]
pub struct Mmio {
    pub base: u64,
}

impl Mmio {
    fn reg(&self, off: u64) -> u32 {
        read32(self.base + off)
    }

    fn set(&self, off: u64, v: u32) {
        write32(self.base + off, v)
    }

    /// The 64 feature bits the device offers (pages 0 and 1).
    pub fn device_features(&self) -> u64 {
        self.set(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.reg(REG_DEVICE_FEATURES);
        self.set(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.reg(REG_DEVICE_FEATURES);
        u64::from(low) | u64::from(high) << 32
    }

    /// `len` bytes of configuration space from `off`, read bytewise until the configuration
    /// generation is stable (§4.2.2.2: a multi-byte field may change under the driver).
    pub fn config(&self, off: u64, out: &mut [u8]) {
        loop {
            let gen = self.reg(REG_CONFIG_GENERATION);
            for (i, b) in out.iter_mut().enumerate() {
                *b = read8(self.base + REG_CONFIG + off + i as u64);
            }
            if self.reg(REG_CONFIG_GENERATION) == gen {
                return;
            }
        }
    }

    /// A little-endian 32-bit configuration field (one aligned 32-bit read).
    pub fn config32(&self, off: u64) -> u32 {
        self.reg(REG_CONFIG + off)
    }

    /// A little-endian 64-bit configuration field, as two 32-bit reads under one generation.
    pub fn config64(&self, off: u64) -> u64 {
        loop {
            let gen = self.reg(REG_CONFIG_GENERATION);
            let low = self.reg(REG_CONFIG + off);
            let high = self.reg(REG_CONFIG + off + 4);
            if self.reg(REG_CONFIG_GENERATION) == gen {
                return u64::from(low) | u64::from(high) << 32;
            }
        }
    }

    /// Status 0: the device forgets its queues and stops touching guest memory.
    pub fn reset(&self) {
        self.set(REG_STATUS, 0);
        // §4.2.3.1: wait until the device reads back 0 (bounded; ours reset at once).
        let start = rdtsc();
        while self.reg(REG_STATUS) != 0 && rdtsc().wrapping_sub(start) < WAIT_CYCLES {
            core::hint::spin_loop();
        }
    }
}

/// What this driver negotiates for a device type: the offered bits of this mask.
pub fn wanted_features(device_id: u32) -> u64 {
    match device_id {
        ID_BLOCK => crate::blk::WANTED_FEATURES,
        ID_NET => crate::net::WANTED_FEATURES,
        _ => F_VERSION_1,
    }
}

/// A device in the middle of initialisation: features accepted, queues being set up.
pub struct Device {
    pub mmio: Mmio,
    pub features: u64,
}

impl Device {
    /// Reset, ACKNOWLEDGE, DRIVER, negotiate `offered & wanted` (VERSION_1 required),
    /// FEATURES_OK and check that the device kept it.
    pub fn init(base: u64, wanted: u64) -> Result<Device, InitError> {
        let mmio = Mmio { base };
        if mmio.reg(REG_MAGIC) != MAGIC {
            return Err(InitError::BadMagic);
        }
        if mmio.reg(REG_VERSION) != 2 {
            return Err(InitError::BadVersion);
        }
        mmio.reset();
        mmio.set(REG_STATUS, STATUS_ACKNOWLEDGE);
        mmio.set(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let features = mmio.device_features() & wanted;
        if features & F_VERSION_1 == 0 {
            mmio.set(REG_STATUS, STATUS_FAILED);
            return Err(InitError::NoVersion1);
        }
        mmio.set(REG_DRIVER_FEATURES_SEL, 0);
        mmio.set(REG_DRIVER_FEATURES, features as u32);
        mmio.set(REG_DRIVER_FEATURES_SEL, 1);
        mmio.set(REG_DRIVER_FEATURES, (features >> 32) as u32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        mmio.set(REG_STATUS, s);
        if mmio.reg(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            mmio.set(REG_STATUS, STATUS_FAILED);
            return Err(InitError::FeaturesRefused);
        }
        Ok(Device { mmio, features })
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// Sets up queue `index` with at most `want` entries (the largest power of two the
    /// device allows), its rings allocated from `arena`.
    pub fn queue(&self, index: u32, want: u16, arena: &mut Arena) -> Result<Virtq, InitError> {
        let m = self.mmio;
        m.set(REG_QUEUE_SEL, index);
        if m.reg(REG_QUEUE_READY) != 0 {
            return Err(InitError::QueueBusy);
        }
        let max = m.reg(REG_QUEUE_NUM_MAX).min(u32::from(want.min(MAX_QUEUE)));
        if max == 0 {
            return Err(InitError::NoQueue);
        }
        let size = 1u32 << (31 - max.leading_zeros()); // largest power of two <= max
        let n = u64::from(size);
        // Descriptor table (16-aligned), avail ring (2-aligned) right after it, used ring
        // (4-aligned) on the next page: all in one zeroed allocation.
        let used_off = (16 * n + 6 + 2 * n + 4095) & !4095;
        let used_len = 6 + 8 * n;
        let base = arena.alloc(used_off + used_len, 4096).ok_or(InitError::NoMemory)?;
        let q = Virtq {
            notify: m.base + REG_QUEUE_NOTIFY,
            index,
            size: size as u16,
            desc: base,
            avail: base + 16 * n,
            used: base + used_off,
            free_head: 0,
            num_free: size as u16,
            avail_idx: 0,
            last_used: 0,
        };
        // Free list through the descriptors' next fields.
        for i in 0..size as u16 {
            set_mem16(q.desc_addr(i) + 14, i.wrapping_add(1));
        }
        set_mem16(q.avail, AVAIL_F_NO_INTERRUPT);
        m.set(REG_QUEUE_NUM, size);
        m.set(REG_QUEUE_DESC_LOW, q.desc as u32);
        m.set(REG_QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
        m.set(REG_QUEUE_DRIVER_LOW, q.avail as u32);
        m.set(REG_QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
        m.set(REG_QUEUE_DEVICE_LOW, q.used as u32);
        m.set(REG_QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
        m.set(REG_QUEUE_READY, 1);
        Ok(q)
    }

    /// DRIVER_OK; the device is live. Fails if the device asks for a reset instead.
    pub fn driver_ok(&self) -> Result<(), InitError> {
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.mmio.set(REG_STATUS, s);
        if self.mmio.reg(REG_STATUS) & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 {
            return Err(InitError::NeedsReset);
        }
        Ok(())
    }
}

// --- split virtqueue ---------------------------------------------------------------------

/// One buffer of a chain: guest-physical address, length, and whether the device writes it.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    pub fn ro(addr: u64, len: u32) -> Buf {
        Buf { addr, len, write: false }
    }
    pub fn wo(addr: u64, len: u32) -> Buf {
        Buf { addr, len, write: true }
    }
}

/// A polled split virtqueue whose rings live in probe-owned RAM.
pub struct Virtq {
    notify: u64,
    index: u32,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free_head: u16,
    num_free: u16,
    /// The driver's copy of avail.idx (only the driver writes it).
    avail_idx: u16,
    /// The next used ring entry to look at.
    last_used: u16,
}

impl Virtq {
    fn desc_addr(&self, i: u16) -> u64 {
        self.desc + 16 * u64::from(i)
    }

    /// Chains given to the device and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Puts `bufs` in the descriptor table as one chain and makes it available (without
    /// notifying). Returns the head index, which `pop_used` gives back; None if the queue
    /// has too few free descriptors.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > usize::from(self.num_free) {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in bufs.iter().enumerate() {
            let d = self.desc_addr(i);
            let next = mem16(d + 14);
            let mut flags = if b.write { DESC_F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            set_mem64(d, b.addr);
            set_mem32(d + 8, b.len);
            set_mem16(d + 12, flags);
            if k + 1 < bufs.len() {
                i = next; // keep next: it already links to the following free descriptor
            } else {
                self.free_head = next;
            }
        }
        self.num_free -= bufs.len() as u16;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        set_mem16(slot, head);
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        set_mem16(self.avail + 2, self.avail_idx);
        Some(head)
    }

    /// Tells the device about new chains unless it said it does not need to know.
    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        if mem16(self.used) & USED_F_NO_NOTIFY == 0 {
            write32(self.notify, self.index);
        }
    }

    /// The next chain the device returned: (head, bytes the device wrote). Its descriptors
    /// go back on the free list.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if mem16(self.used + 2) == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id = mem32(e);
        let len = mem32(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        // A device returning a head we never gave out is a device bug: stop rather than
        // corrupt the free list.
        let head = id as u16;
        if id >= u32::from(self.size) {
            crate::uart::puts("probe: virtio used ring returned a bad id\n");
            crate::stop();
        }
        // Walk our own chain (the device never writes the table) back onto the free list.
        let mut i = head;
        let mut n = 1u16;
        while mem16(self.desc_addr(i) + 12) & DESC_F_NEXT != 0 && n < self.size {
            i = mem16(self.desc_addr(i) + 14);
            n += 1;
        }
        set_mem16(self.desc_addr(i) + 14, self.free_head);
        self.free_head = head;
        self.num_free += n;
        Some((head, len))
    }

    /// Polls for the next used chain, at most WAIT_CYCLES; None on timeout.
    pub fn wait_used(&mut self) -> Option<(u16, u32)> {
        let start = rdtsc();
        loop {
            if let Some(u) = self.pop_used() {
                return Some(u);
            }
            if rdtsc().wrapping_sub(start) > WAIT_CYCLES {
                return None;
            }
            core::hint::spin_loop();
        }
    }
}
