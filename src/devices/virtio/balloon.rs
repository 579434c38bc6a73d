//! virtio-balloon: the host takes memory back from the guest, and the guest reports its memory
//! statistics (virtio 1.x §5.5, the traditional balloon).
//!
//! The host sets a target (`num_pages`, in 4 KiB pages) in the configuration space and raises
//! a configuration-change interrupt; the driver then allocates that many pages inside the guest
//! and sends their page frame numbers (little-endian u32 PFNs, in 4 KiB units whatever the
//! guest's page size) on the inflate queue (0). For each PFN inside guest memory the device
//! drops the backing host page with `madvise(MADV_DONTNEED)`, consecutive PFNs coalesced into
//! one call: guest RAM is private anonymous memory, so the host frees the page and the guest
//! reads zeros on its next touch. Pages sent on the deflate queue (1) are the guest's again;
//! the host has nothing to do. The driver writes how many pages it holds to `actual`, the only
//! configuration field it may write.
//!
//! The statistics queue (2) exists only when statistics are configured (`stats_interval_s >
//! 0`). It runs the other way round (§5.5.6.3): the driver adds one buffer of (u16 tag, u64
//! value) entries at start; the device reads it and KEEPS it; when the statistics timer fires
//! the device returns (uses) it, and the driver answers with a fresh buffer. The timer is a
//! one-shot timerfd re-armed on each expiry; re-arming (timerfd_settime) also clears its
//! expiration count, so the device never read()s it and cannot block on it.
//!
//! Ordering: all queue and timer work runs on the VMM thread after activation; host-side
//! control (`set_target_mib`, `set_stats_interval`) may come before or after activation and
//! only raises the configuration interrupt once the device is active. PFNs and statistics come
//! from the guest and are untrusted: they are read through virtio-queue's `Reader` (whole
//! entries only, capped per chain), and a PFN is used only after vm-memory has translated it
//! into a slice of a live guest-memory mapping.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::kvm::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, Le16, Le32, Le64, VolatileSlice,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    ActivateError, ActivateEvent, ActiveQueues, Interrupt, VirtioDevice, TOKEN_ACTIVATE,
    TOKEN_BACKEND, TOKEN_QUEUE0, TYPE_BALLOON, VIRTIO_F_VERSION_1,
};
use crate::devices::state::{DeviceSnapshot, StateError};

pub const QUEUE_SIZE: u16 = 256;
pub const INFLATE_QUEUE: usize = 0;
pub const DEFLATE_QUEUE: usize = 1;
pub const STATS_QUEUE: usize = 2;

/// Feature bits (§5.5.3). MUST_TELL_HOST (bit 0) is not offered: the device needs no notice
/// before the guest reuses a deflated page.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;

/// Balloon PFNs are always in 4 KiB units (VIRTIO_BALLOON_PFN_SHIFT).
pub const PFN_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PFN_SHIFT;
pub const PAGES_PER_MIB: u32 = 256;
/// The most PFNs the device takes from one chain (16 MiB of guest memory); Linux sends at most
/// 256. The rest of a longer chain is ignored, so a guest cannot keep the VMM thread busy.
pub const MAX_PFNS_PER_CHAIN: usize = 4096;
/// The most statistics entries read from one buffer (Linux sends about 16).
pub const MAX_STATS_ENTRIES: usize = 64;

/// Configuration space: le32 num_pages, le32 actual (§5.5.4).
const CONFIG_SIZE: u64 = 8;
const ACTUAL_OFFSET: u64 = 4;
/// Statistics entry size: le16 tag + le64 value, packed.
const STATS_ENTRY_SIZE: usize = 10;
/// The statistics timer's event token.
const TOKEN_STATS_TIMER: u32 = TOKEN_BACKEND;

/// Statistics tags (§5.5.6.3).
const TAG_SWAP_IN: u16 = 0;
const TAG_SWAP_OUT: u16 = 1;
const TAG_MAJFLT: u16 = 2;
const TAG_MINFLT: u16 = 3;
const TAG_MEMFREE: u16 = 4;
const TAG_MEMTOT: u16 = 5;
const TAG_AVAIL: u16 = 6;
const TAG_CACHES: u16 = 7;
const TAG_HTLB_PGALLOC: u16 = 8;
const TAG_HTLB_PGFAIL: u16 = 9;

/// Errors of the balloon device.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("cannot create the balloon activation event")]
    EventFd(#[source] io::Error),
    #[error("cannot create the balloon statistics timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// The guest's memory statistics, as last reported; a field the guest did not report is `None`.
/// Sizes are in bytes, the others are event counts (§5.5.6.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonStats {
    /// Memory swapped in (bytes).
    pub swap_in: Option<u64>,
    /// Memory swapped out (bytes).
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    /// Memory not used for any purpose (bytes).
    pub free_memory: Option<u64>,
    /// Memory available to the guest (bytes).
    pub total_memory: Option<u64>,
    /// Memory the guest could use without swapping, estimated (bytes).
    pub available_memory: Option<u64>,
    /// Disk caches the guest could drop (bytes).
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
}

impl BalloonStats {
    /// Records one (tag, value) entry; unknown tags are ignored (the spec adds tags over time).
    fn set(&mut self, tag: u16, value: u64) {
        let field = match tag {
            TAG_SWAP_IN => &mut self.swap_in,
            TAG_SWAP_OUT => &mut self.swap_out,
            TAG_MAJFLT => &mut self.major_faults,
            TAG_MINFLT => &mut self.minor_faults,
            TAG_MEMFREE => &mut self.free_memory,
            TAG_MEMTOT => &mut self.total_memory,
            TAG_AVAIL => &mut self.available_memory,
            TAG_CACHES => &mut self.disk_caches,
            TAG_HTLB_PGALLOC => &mut self.hugetlb_allocations,
            TAG_HTLB_PGFAIL => &mut self.hugetlb_failures,
            _ => return,
        };
        *field = Some(value);
    }
}

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BalloonCounters {
    /// Chains served on the inflate and deflate queues.
    pub inflate_chains: u64,
    pub deflate_chains: u64,
    /// Distinct pages inside guest memory the guest gave up (per chain) / took back.
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// PFNs outside guest memory, skipped.
    pub bad_pfns: u64,
    /// Chains the device could not read (outside memory, overflowing, wrong direction).
    pub bad_chains: u64,
    /// Ranges the host refused to discard (madvise failed).
    pub discard_errors: u64,
    /// Statistics buffers parsed.
    pub stats_updates: u64,
    /// Driver writes to the configuration space outside `actual`, ignored.
    pub config_writes_refused: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<Arc<EventFd>>,
    interrupt: Arc<Interrupt>,
    /// The driver accepted the statistics queue and made it ready.
    stats_on: bool,
}

/// The virtio-balloon device.
pub struct Balloon {
    /// Target balloon size in 4 KiB pages (config `num_pages`).
    num_pages: u32,
    /// Pages the driver says it holds (config `actual`).
    actual: u32,
    avail_features: u64,
    acked: u64,
    /// The statistics queue exists (fixed at creation: the queue count cannot change).
    stats_enabled: bool,
    stats_interval_s: u32,
    stats_timer: TimerFd,
    /// The statistics buffer the device holds until the next timer expiry.
    stats_head: Option<u16>,
    latest_stats: Option<BalloonStats>,
    active: Option<Active>,
    activate_evt: ActivateEvent,
    counters: BalloonCounters,
}

impl Balloon {
    pub fn new(cfg: &crate::config::BalloonConfig) -> Result<Balloon, BalloonError> {
        let stats_enabled = cfg.stats_interval_s > 0;
        let mut avail_features = VIRTIO_F_VERSION_1;
        if cfg.deflate_on_oom {
            avail_features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if stats_enabled {
            avail_features |= VIRTIO_BALLOON_F_STATS_VQ;
        }
        Ok(Balloon {
            num_pages: mib_to_pages(cfg.mib),
            actual: 0,
            avail_features,
            acked: 0,
            stats_enabled,
            stats_interval_s: cfg.stats_interval_s,
            stats_timer: TimerFd::new().map_err(BalloonError::Timer)?,
            stats_head: None,
            latest_stats: None,
            active: None,
            activate_evt: ActivateEvent::new().map_err(BalloonError::EventFd)?,
            counters: BalloonCounters::default(),
        })
    }

    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// Sets the balloon's target size and tells the driver (if it is running).
    pub fn set_target_mib(&mut self, mib: u32) {
        self.num_pages = mib_to_pages(mib);
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
        }
    }

    /// The target balloon size, in MiB.
    pub fn target_mib(&self) -> u32 {
        self.num_pages / PAGES_PER_MIB
    }

    /// The balloon size the driver reports, in MiB (rounded down).
    pub fn actual_mib(&self) -> u32 {
        self.actual / PAGES_PER_MIB
    }

    /// The guest's last statistics report, if statistics are on and one arrived.
    pub fn latest_stats(&self) -> Option<BalloonStats> {
        self.latest_stats
    }

    /// Whether the device has a statistics queue (`stats_interval_s > 0` at creation).
    pub fn stats_enabled(&self) -> bool {
        self.stats_enabled
    }

    /// Seconds between statistics requests (0: paused, or no statistics queue).
    pub fn stats_interval(&self) -> u32 {
        self.stats_interval_s
    }

    /// Changes the statistics interval; 0 pauses the requests. A device created without
    /// statistics has no statistics queue and cannot gain one: the call is then ignored
    /// (check `stats_enabled` first to report that to the user).
    pub fn set_stats_interval(&mut self, s: u32) {
        if !self.stats_enabled {
            log::warn!("virtio-balloon: statistics were not enabled at start; interval ignored");
            return;
        }
        self.stats_interval_s = s;
        if self.active.as_ref().is_some_and(|a| a.stats_on) {
            self.arm_stats_timer();
        }
    }

    /// Arms the one-shot statistics timer for one interval, or disarms it for 0. Either way
    /// its expiration count is cleared, so it is no longer readable.
    fn arm_stats_timer(&mut self) {
        let res = if self.stats_interval_s == 0 {
            self.stats_timer.clear()
        } else {
            let d = Duration::from_secs(u64::from(self.stats_interval_s));
            self.stats_timer.reset(d, None)
        };
        if let Err(e) = res {
            log::warn!("virtio-balloon: cannot set the statistics timer: {e}");
        }
    }

    /// Serves the inflate queue; returns how many chains were used.
    pub fn process_inflate(&mut self) -> usize {
        self.process_pfn_queue(INFLATE_QUEUE)
    }

    /// Serves the deflate queue; returns how many chains were used.
    pub fn process_deflate(&mut self) -> usize {
        self.process_pfn_queue(DEFLATE_QUEUE)
    }

    fn process_pfn_queue(&mut self, idx: usize) -> usize {
        let Some(a) = self.active.as_mut() else {
            return 0;
        };
        let Some(queue) = a.queues.get_mut(idx) else {
            return 0;
        };
        let c = &mut self.counters;
        let mut used = 0;
        while let Some(chain) = queue.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            match read_pfns(&a.mem, chain) {
                Ok(pfns) if idx == INFLATE_QUEUE => {
                    c.inflate_chains += 1;
                    inflate(&a.mem, pfns, c);
                }
                Ok(pfns) => {
                    c.deflate_chains += 1;
                    deflate(&a.mem, &pfns, c);
                }
                Err(e) => {
                    log::debug!("virtio-balloon: bad chain {head} on queue {idx}: {e}");
                    c.bad_chains += 1;
                }
            }
            // The buffers are device-readable: nothing is written back.
            if let Err(e) = queue.add_used(&a.mem, head, 0) {
                log::warn!("virtio-balloon: cannot return chain {head}: {e}");
                break;
            }
            used += 1;
        }
        if used > 0 {
            notify(queue, &a.mem, &a.interrupt);
        }
        used
    }

    /// Takes the driver's statistics buffers: parses each and keeps the newest until the timer
    /// fires (an older one still held is returned at once). Returns how many were used.
    pub fn process_stats(&mut self) -> usize {
        let Some(a) = self.active.as_mut().filter(|a| a.stats_on) else {
            return 0;
        };
        let Some(queue) = a.queues.get_mut(STATS_QUEUE) else {
            return 0;
        };
        let mut used = 0;
        while let Some(chain) = queue.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            match read_stats(&a.mem, chain) {
                Ok(stats) => {
                    self.latest_stats = Some(stats);
                    self.counters.stats_updates += 1;
                }
                Err(e) => {
                    // Still keep the buffer: it is what the next request hands back.
                    log::debug!("virtio-balloon: bad statistics chain {head}: {e}");
                    self.counters.bad_chains += 1;
                }
            }
            if let Some(old) = self.stats_head.replace(head) {
                match queue.add_used(&a.mem, old, 0) {
                    Ok(()) => used += 1,
                    Err(e) => log::warn!("virtio-balloon: cannot return chain {old}: {e}"),
                }
            }
        }
        if used > 0 {
            notify(queue, &a.mem, &a.interrupt);
        }
        used
    }

    /// The statistics timer fired: return the held buffer so the driver sends fresh statistics,
    /// and re-arm. Returns whether a buffer was returned.
    pub fn request_stats(&mut self) -> bool {
        let Some(a) = self.active.as_mut().filter(|a| a.stats_on) else {
            // A late expiry after a reset: only consume it.
            if let Err(e) = self.stats_timer.clear() {
                log::warn!("virtio-balloon: cannot stop the statistics timer: {e}");
            }
            return false;
        };
        let returned = match (a.queues.get_mut(STATS_QUEUE), self.stats_head.take()) {
            (Some(queue), Some(head)) => match queue.add_used(&a.mem, head, 0) {
                Ok(()) => {
                    notify(queue, &a.mem, &a.interrupt);
                    true
                }
                Err(e) => {
                    log::warn!("virtio-balloon: cannot return the statistics buffer: {e}");
                    false
                }
            },
            _ => false,
        };
        self.arm_stats_timer();
        returned
    }
}

fn mib_to_pages(mib: u32) -> u32 {
    mib.saturating_mul(PAGES_PER_MIB)
}

/// Raises the used-buffer interrupt if the queue asks for it.
fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    match queue.needs_notification(mem) {
        Ok(true) => interrupt.signal_used_queue(),
        Ok(false) => {}
        Err(e) => log::warn!("virtio-balloon: {e}"),
    }
}

/// Why a chain could not be read.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("malformed descriptor chain")]
    Chain(#[source] virtio_queue::Error),
    #[error("no device-readable bytes")]
    Empty,
    #[error("cannot read the chain")]
    Read(#[source] io::Error),
}

/// Reads the chain's little-endian u32 PFNs: whole u32s only, at most `MAX_PFNS_PER_CHAIN`.
fn read_pfns(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<u32>, ChainError> {
    let mut r = chain.reader(mem).map_err(ChainError::Chain)?;
    let bytes = r.available_bytes();
    if bytes == 0 {
        return Err(ChainError::Empty);
    }
    if bytes % 4 != 0 {
        log::debug!("virtio-balloon: {} trailing bytes ignored", bytes % 4);
    }
    let n = (bytes / 4).min(MAX_PFNS_PER_CHAIN);
    let mut pfns = Vec::with_capacity(n);
    for _ in 0..n {
        let pfn: Le32 = r.read_obj().map_err(ChainError::Read)?;
        pfns.push(pfn.into());
    }
    Ok(pfns)
}

/// Reads the chain's (le16 tag, le64 value) entries: whole entries only, at most
/// `MAX_STATS_ENTRIES`.
fn read_stats(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<BalloonStats, ChainError> {
    let mut r = chain.reader(mem).map_err(ChainError::Chain)?;
    let n = (r.available_bytes() / STATS_ENTRY_SIZE).min(MAX_STATS_ENTRIES);
    let mut stats = BalloonStats::default();
    for _ in 0..n {
        let tag: Le16 = r.read_obj().map_err(ChainError::Read)?;
        let value: Le64 = r.read_obj().map_err(ChainError::Read)?;
        stats.set(tag.into(), value.into());
    }
    Ok(stats)
}

/// The guest address of a PFN's page, if that page is inside guest memory.
fn page_addr(mem: &GuestMemoryMmap, pfn: u32) -> Option<GuestAddress> {
    let addr = GuestAddress(u64::from(pfn) << PFN_SHIFT);
    mem.get_host_address(addr).ok().map(|_| addr)
}

/// Gives the pages back to the host, consecutive PFNs as one range (sorted and deduplicated
/// first, so a guest repeating or shuffling PFNs costs no more madvise calls than needed).
fn inflate(mem: &GuestMemoryMmap, mut pfns: Vec<u32>, c: &mut BalloonCounters) {
    pfns.sort_unstable();
    pfns.dedup();
    // (first pfn, page count) of the run being collected.
    let mut run: Option<(u64, u64)> = None;
    for pfn in pfns {
        if page_addr(mem, pfn).is_none() {
            c.bad_pfns += 1;
            continue;
        }
        c.inflated_pages += 1;
        let pfn = u64::from(pfn);
        match &mut run {
            Some((first, count)) if first.checked_add(*count) == Some(pfn) => *count += 1,
            _ => {
                if let Some((first, count)) = run.replace((pfn, 1)) {
                    discard_pages(mem, first, count, c);
                }
            }
        }
    }
    if let Some((first, count)) = run {
        discard_pages(mem, first, count, c);
    }
}

/// Deflated pages are the guest's again: the host counts them, nothing more (a discarded page
/// is faulted back in, zeroed, on the guest's next touch).
fn deflate(mem: &GuestMemoryMmap, pfns: &[u32], c: &mut BalloonCounters) {
    for &pfn in pfns {
        if page_addr(mem, pfn).is_some() {
            c.deflated_pages += 1;
        } else {
            c.bad_pfns += 1;
        }
    }
}

/// Discards `count` pages from `first_pfn`, split at guest-memory region boundaries by vm-memory.
fn discard_pages(mem: &GuestMemoryMmap, first_pfn: u64, count: u64, c: &mut BalloonCounters) {
    let range = first_pfn
        .checked_mul(PAGE_SIZE)
        .zip(count.checked_mul(PAGE_SIZE))
        .and_then(|(addr, len)| Some((addr, usize::try_from(len).ok()?)));
    let Some((addr, len)) = range else {
        c.discard_errors += 1;
        return;
    };
    for slice in mem.get_slices(GuestAddress(addr), len) {
        let res = slice
            .map_err(|e: GuestMemoryError| io::Error::other(e))
            .and_then(|s| discard(&s));
        if let Err(e) = res {
            log::warn!("virtio-balloon: cannot discard {len:#x} bytes at {addr:#x}: {e}");
            c.discard_errors += 1;
        }
    }
}

/// Drops the host pages behind `slice`; the memory reads as zero on its next touch.
fn discard<B: vm_memory::bitmap::BitmapSlice>(slice: &VolatileSlice<'_, B>) -> io::Result<()> {
    let guard = slice.ptr_guard_mut();
    // SAFETY: `slice` comes from vm-memory's `get_slices`, which bounds-checks it against one
    // region of guest memory, so [ptr, ptr + len) lies inside a live private anonymous mapping
    // owned by the `GuestMemoryMmap` the caller borrows (it cannot be unmapped meanwhile).
    // MADV_DONTNEED only replaces those pages with zero-fill-on-demand ones: no Rust object
    // lives in guest memory (it is reached only through volatile accesses), so no reference
    // is invalidated. An unaligned pointer makes the call fail with EINVAL, nothing else.
    let ret = unsafe { libc::madvise(guard.as_ptr().cast(), guard.len(), libc::MADV_DONTNEED) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        const SIZES: [u16; 3] = [QUEUE_SIZE; 3];
        if self.stats_enabled {
            &SIZES
        } else {
            &SIZES[..2]
        }
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE as usize];
        let (num_pages, actual) = config.split_at_mut(4);
        num_pages.copy_from_slice(&self.num_pages.to_le_bytes());
        actual.copy_from_slice(&self.actual.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    /// Only `actual` (bytes 4..8) is writable; any write touching other bytes is ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let end = u64::try_from(data.len())
            .ok()
            .and_then(|len| offset.checked_add(len));
        let range = match end {
            Some(end) if offset >= ACTUAL_OFFSET && end <= CONFIG_SIZE && end > offset => {
                usize::try_from(offset - ACTUAL_OFFSET)
                    .ok()
                    .zip(usize::try_from(end - ACTUAL_OFFSET).ok())
            }
            _ => None,
        };
        let mut actual = self.actual.to_le_bytes();
        match range.and_then(|(s, e)| actual.get_mut(s..e)) {
            Some(dst) if dst.len() == data.len() => {
                dst.copy_from_slice(data);
                self.actual = u32::from_le_bytes(actual);
            }
            _ => {
                log::debug!(
                    "virtio-balloon: config write at {offset:#x} ({} bytes) ignored",
                    data.len()
                );
                self.counters.config_writes_refused += 1;
            }
        }
    }

    fn activate(&mut self, q: ActiveQueues) -> Result<(), ActivateError> {
        let want = self.queue_max_sizes().len();
        let got = q.queues.len();
        if got < want || q.queue_evts.len() < want {
            return Err(ActivateError::QueueCount { want, got });
        }
        let stats_on = self.acked & VIRTIO_BALLOON_F_STATS_VQ != 0
            && q.queues.get(STATS_QUEUE).is_some_and(|q| q.ready());
        self.active = Some(Active {
            mem: q.mem,
            queues: q.queues,
            queue_evts: q.queue_evts,
            interrupt: q.interrupt,
            stats_on,
        });
        self.stats_head = None;
        if stats_on {
            self.arm_stats_timer();
        }
        self.activate_evt.signal()
    }

    fn metrics(&self) -> serde_json::Value {
        let mut m = serde_json::to_value(self.counters).unwrap_or_default();
        if let Some(o) = m.as_object_mut() {
            o.insert("target_pages".into(), self.num_pages.into());
            o.insert("actual_pages".into(), self.actual.into());
        }
        m
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.actual = 0;
        self.stats_head = None;
        if let Err(e) = self.stats_timer.clear() {
            log::warn!("virtio-balloon: cannot stop the statistics timer: {e}");
        }
    }

    fn save_state(&self) -> DeviceSnapshot {
        DeviceSnapshot::Balloon {
            num_pages: self.num_pages,
            actual: self.actual,
            stats_enabled: self.stats_enabled,
            stats_interval_s: self.stats_interval_s,
            latest_stats: self.latest_stats,
        }
    }

    /// Target and actual size as saved, so guest and host agree on the balloon; the
    /// statistics interval as last set. The statistics timer restarts at activation.
    fn restore_state(&mut self, s: &DeviceSnapshot) -> Result<(), StateError> {
        let DeviceSnapshot::Balloon {
            num_pages,
            actual,
            stats_enabled,
            stats_interval_s,
            latest_stats,
        } = s
        else {
            return Err(s.wrong_kind("balloon"));
        };
        if *stats_enabled != self.stats_enabled {
            let on = |b: bool| if b { "on" } else { "off" };
            return Err(StateError::Mismatch(format!(
                "balloon statistics are {} in the configuration, {} in the snapshot",
                on(self.stats_enabled),
                on(*stats_enabled)
            )));
        }
        self.num_pages = *num_pages;
        self.actual = *actual;
        self.stats_interval_s = *stats_interval_s;
        self.latest_stats = *latest_stats;
        Ok(())
    }

    /// The statistics buffer the device holds is the last one it took from the statistics
    /// queue: it goes back to the available ring, and the restored device takes it again.
    fn queue_states(&self) -> Vec<QueueState> {
        let Some(a) = &self.active else {
            return Vec::new();
        };
        (0..)
            .zip(&a.queues)
            .map(|(i, q)| {
                if i == STATS_QUEUE && self.stats_head.is_some() {
                    super::rewound_state(q, 1)
                } else {
                    q.state()
                }
            })
            .collect()
    }
}

impl MutEventSubscriber for Balloon {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                if let Some(a) = &self.active {
                    self.activate_evt.on_activate(ops, &a.queue_evts);
                    if self.stats_enabled {
                        let ev =
                            Events::with_data(&self.stats_timer, TOKEN_STATS_TIMER, EventSet::IN);
                        match ops.add(ev) {
                            Ok(()) | Err(event_manager::Error::FdAlreadyRegistered) => {}
                            Err(e) => log::error!(
                                "virtio-balloon: cannot watch the statistics timer: {e}"
                            ),
                        }
                    }
                }
                // Buffers may have been queued before activation was seen.
                self.process_inflate();
                self.process_deflate();
                self.process_stats();
            }
            t if (TOKEN_QUEUE0..TOKEN_QUEUE0 + 3).contains(&t) => {
                let idx = (t - TOKEN_QUEUE0) as usize;
                if let Some(evt) = self.active.as_ref().and_then(|a| a.queue_evts.get(idx)) {
                    let _ = evt.read();
                }
                match idx {
                    INFLATE_QUEUE => self.process_inflate(),
                    DEFLATE_QUEUE => self.process_deflate(),
                    _ => self.process_stats(),
                };
            }
            TOKEN_STATS_TIMER => {
                self.request_stats();
            }
            other => log::debug!("virtio-balloon: unexpected event token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activate_evt.watch(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BalloonConfig;
    use crate::devices::virtio::test_utils::{active, memory, queue_from_mock};
    use crate::devices::virtio::INT_CONFIG_CHANGE;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    const QSIZE: u16 = 16;
    /// Where each queue's rings live, and where test data goes (well above them).
    const QUEUE_BASES: [u64; 3] = [0x0, 0x2000, 0x4000];
    const DATA: u64 = 0x8000;
    /// Guest pages the tests fill with a pattern: PFNs 0x40..0x60.
    const PATTERN_PFNS: std::ops::Range<u32> = 0x40..0x60;
    const MEM_PAGES: u32 = 256;

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn cfg(mib: u32, deflate_on_oom: bool, stats_interval_s: u32) -> BalloonConfig {
        BalloonConfig {
            mib,
            deflate_on_oom,
            stats_interval_s,
        }
    }

    /// An active balloon over `mem`, every offered feature accepted; the driver-side mocks.
    fn rig<'a>(
        mem: &'a GuestMemoryMmap,
        c: &BalloonConfig,
    ) -> (
        Balloon,
        Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
        Arc<Interrupt>,
    ) {
        let mut dev = Balloon::new(c).unwrap();
        dev.set_acked_features(dev.avail_features());
        let n = dev.queue_max_sizes().len();
        let mocks: Vec<_> = QUEUE_BASES
            .iter()
            .take(n)
            .map(|&b| MockSplitQueue::create(mem, GuestAddress(b), QSIZE))
            .collect();
        let queues = mocks.iter().map(|m| queue_from_mock(m, QSIZE)).collect();
        let (act, irq) = active(mem, queues);
        dev.activate(act).unwrap();
        (dev, mocks, irq)
    }

    fn fill_pattern(mem: &GuestMemoryMmap) {
        for pfn in PATTERN_PFNS {
            let page = [pfn as u8 | 0x80; PAGE_SIZE as usize];
            mem.write_slice(&page, GuestAddress(u64::from(pfn) << PFN_SHIFT))
                .unwrap();
        }
    }

    /// Whether the page reads as all zeros (discarded) or still holds its pattern.
    fn page_state(mem: &GuestMemoryMmap, pfn: u32) -> &'static str {
        let mut page = [0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut page, GuestAddress(u64::from(pfn) << PFN_SHIFT))
            .unwrap();
        if page.iter().all(|&b| b == 0) {
            "zero"
        } else if page.iter().all(|&b| b == pfn as u8 | 0x80) {
            "pattern"
        } else {
            "mixed"
        }
    }

    fn write_pfns(mem: &GuestMemoryMmap, addr: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        bytes.len() as u32
    }

    fn used_count(m: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        m.used().idx().load()
    }

    fn used_elem(m: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let e = m.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    #[test]
    fn features_queues_and_config_follow_the_configuration() {
        let plain = Balloon::new(&cfg(64, false, 0)).unwrap();
        assert_eq!(plain.device_type(), TYPE_BALLOON);
        assert_eq!(plain.avail_features(), VIRTIO_F_VERSION_1);
        assert_eq!(plain.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert!(!plain.stats_enabled());
        let full = Balloon::new(&cfg(64, true, 5)).unwrap();
        assert_eq!(
            full.avail_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_DEFLATE_ON_OOM | VIRTIO_BALLOON_F_STATS_VQ
        );
        assert_eq!(full.queue_max_sizes().len(), 3);
        let mut d = [0u8; 8];
        full.read_config(0, &mut d);
        assert_eq!(d, [0, 0x40, 0, 0, 0, 0, 0, 0], "num_pages = 64 MiB * 256");
        assert_eq!(full.target_mib(), 64);
        // A huge target saturates instead of wrapping.
        assert_eq!(
            Balloon::new(&cfg(u32::MAX, false, 0)).unwrap().num_pages,
            u32::MAX
        );
    }

    #[test]
    fn config_writes_reach_actual_only() {
        let mut b = Balloon::new(&cfg(1, false, 0)).unwrap();
        b.write_config(4, &(300u32 * 256).to_le_bytes());
        assert_eq!(b.actual_mib(), 300);
        b.write_config(6, &[0, 0]);
        assert_eq!(
            b.actual,
            (300 * 256) & 0xffff,
            "a 2-byte write to the upper half"
        );
        let before = b.actual;
        // num_pages, straddling writes, past the end, offsets that overflow.
        b.write_config(0, &[9, 9, 9, 9]);
        b.write_config(2, &[9, 9, 9, 9]);
        b.write_config(6, &[9, 9, 9, 9]);
        b.write_config(8, &[9, 9, 9, 9]);
        b.write_config(u64::MAX, &[9]);
        b.write_config(4, &[]);
        assert_eq!(b.actual, before);
        assert_eq!(b.num_pages, 256);
        assert_eq!(b.counters().config_writes_refused, 6);
        let mut d = [0xffu8; 4];
        b.read_config(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), before);
        b.read_config(8, &mut d);
        assert_eq!(d, [0; 4], "past the config space reads zero");
        b.read_config(u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn inflate_drops_the_host_pages() {
        let mem = memory();
        let (mut b, mocks, irq) = rig(&mem, &cfg(1, false, 0));
        fill_pattern(&mem);
        // Unordered, with a repeat; 0x41..=0x43 coalesce into one range.
        let pfns = [0x43, 0x41, 0x42, 0x50, 0x41];
        let len = write_pfns(&mem, DATA, &pfns);
        mocks[0]
            .add_desc_chains(&[desc(DATA, len, 0, 0)], 0)
            .unwrap();
        assert_eq!(b.process_inflate(), 1);
        assert_eq!(used_elem(&mocks[0], 0), (0, 0));
        assert_eq!(irq.status() & 1, 1, "used buffer interrupt");
        for pfn in PATTERN_PFNS {
            let want = if pfns.contains(&pfn) {
                "zero"
            } else {
                "pattern"
            };
            assert_eq!(page_state(&mem, pfn), want, "pfn {pfn:#x}");
        }
        let c = b.counters();
        assert_eq!((c.inflate_chains, c.inflated_pages, c.bad_pfns), (1, 4, 0));
        assert_eq!(c.discard_errors, 0);
    }

    /// The balloon under the real seccomp filters, in a child process (a call outside a list
    /// kills it with SIGSYS): activation and reset on a vCPU thread (a guest's MMIO write),
    /// inflating (madvise), the statistics timer and requests on the VMM thread.
    #[test]
    fn runs_under_the_seccomp_filters() {
        crate::seccomp::under_filter::run_child(
            "devices::virtio::balloon::tests::seccomp_child_balloon",
        );
    }

    #[test]
    #[ignore = "run by runs_under_the_seccomp_filters in a child process"]
    fn seccomp_child_balloon() {
        use crate::seccomp::{under_filter, ThreadKind};
        if !under_filter::is_child("devices::virtio::balloon::tests::seccomp_child_balloon") {
            return;
        }
        let mem = memory();
        let mut b = Balloon::new(&cfg(1, false, 1)).unwrap();
        b.set_acked_features(b.avail_features());
        let mocks: Vec<_> = QUEUE_BASES
            .iter()
            .map(|&base| MockSplitQueue::create(&mem, GuestAddress(base), QSIZE))
            .collect();
        let queues = mocks.iter().map(|m| queue_from_mock(m, QSIZE)).collect();
        let (act, _irq) = active(&mem, queues);
        // The guest's DRIVER_OK: activation arms the statistics timer.
        under_filter::filtered(ThreadKind::Vcpu, || b.activate(act).unwrap());
        assert!(b.stats_timer.is_armed().unwrap());
        fill_pattern(&mem);
        let len = write_pfns(&mem, DATA, &[0x41, 0x42]);
        mocks[0]
            .add_desc_chains(&[desc(DATA, len, 0, 0)], 0)
            .unwrap();
        let stats = stats_entries(&[(4, 100 << 20)]);
        mem.write_slice(&stats, GuestAddress(DATA + 0x100)).unwrap();
        mocks[2]
            .add_desc_chains(&[desc(DATA + 0x100, stats.len() as u32, 0, 0)], 0)
            .unwrap();
        under_filter::filtered(ThreadKind::Vmm, || {
            assert_eq!(b.process_inflate(), 1);
            assert_eq!(b.process_stats(), 0);
            std::thread::sleep(Duration::from_millis(1100));
            assert!(b.request_stats(), "the held buffer goes back on the timer");
            b.set_stats_interval(2);
            b.set_target_mib(0);
        });
        assert_eq!(page_state(&mem, 0x41), "zero");
        assert_eq!(b.counters().discard_errors, 0);
        // The guest resets the device: the timer stops.
        under_filter::filtered(ThreadKind::Vcpu, || VirtioDevice::reset(&mut b));
        assert!(!b.stats_timer.is_armed().unwrap());
    }

    #[test]
    fn pfns_outside_memory_are_skipped_and_counted() {
        let mem = memory();
        let (mut b, mocks, _) = rig(&mem, &cfg(1, false, 0));
        fill_pattern(&mem);
        let pfns = [MEM_PAGES, 0x44, u32::MAX, 0xff_ffff];
        let len = write_pfns(&mem, DATA, &pfns);
        mocks[0]
            .add_desc_chains(&[desc(DATA, len, 0, 0)], 0)
            .unwrap();
        assert_eq!(b.process_inflate(), 1);
        assert_eq!(page_state(&mem, 0x44), "zero");
        assert_eq!(page_state(&mem, 0x45), "pattern");
        let c = b.counters();
        assert_eq!((c.inflated_pages, c.bad_pfns, c.discard_errors), (1, 3, 0));
    }

    #[test]
    fn partial_u32s_are_ignored_and_pfns_may_span_descriptors() {
        let mem = memory();
        let (mut b, mocks, _) = rig(&mem, &cfg(1, false, 0));
        fill_pattern(&mem);
        // 3 PFNs = 12 bytes over two 6-byte descriptors, then a lone trailing 3 bytes in a
        // second chain: the PFN split across descriptors counts, the 3 bytes do not.
        write_pfns(&mem, DATA, &[0x46, 0x47, 0x48]);
        write_pfns(&mem, DATA + 0x100, &[0x49]);
        mocks[0]
            .add_desc_chains(
                &[
                    desc(DATA, 6, VRING_DESC_F_NEXT, 1),
                    desc(DATA + 6, 6, 0, 0),
                    desc(DATA + 0x100, 3, 0, 0),
                ],
                0,
            )
            .unwrap();
        assert_eq!(b.process_inflate(), 2);
        for (pfn, want) in [
            (0x46, "zero"),
            (0x47, "zero"),
            (0x48, "zero"),
            (0x49, "pattern"),
        ] {
            assert_eq!(page_state(&mem, pfn), want, "pfn {pfn:#x}");
        }
        let c = b.counters();
        assert_eq!((c.inflate_chains, c.inflated_pages, c.bad_pfns), (2, 3, 0));
    }

    #[test]
    fn deflate_counts_pages_and_leaves_memory_alone() {
        let mem = memory();
        let (mut b, mocks, irq) = rig(&mem, &cfg(1, false, 0));
        fill_pattern(&mem);
        let len = write_pfns(&mem, DATA, &[0x40, 0x41, MEM_PAGES]);
        mocks[1]
            .add_desc_chains(&[desc(DATA, len, 0, 0)], 0)
            .unwrap();
        assert_eq!(b.process_deflate(), 1);
        assert_eq!(used_elem(&mocks[1], 0), (0, 0));
        assert_eq!(irq.status() & 1, 1);
        assert_eq!(page_state(&mem, 0x40), "pattern");
        let c = b.counters();
        assert_eq!((c.deflate_chains, c.deflated_pages, c.bad_pfns), (1, 2, 1));
        assert_eq!(c.inflated_pages, 0);
    }

    #[test]
    fn long_chains_are_capped() {
        let mem = memory();
        let (mut b, mocks, _) = rig(&mem, &cfg(1, false, 0));
        fill_pattern(&mem);
        // 2 * MAX_PFNS_PER_CHAIN entries: the first half names only 0x50, the second 0x51.
        let mut pfns = vec![0x50u32; MAX_PFNS_PER_CHAIN];
        pfns.extend(vec![0x51u32; MAX_PFNS_PER_CHAIN]);
        let len = write_pfns(&mem, 0x10000, &pfns);
        mocks[0]
            .add_desc_chains(&[desc(0x10000, len, 0, 0)], 0)
            .unwrap();
        assert_eq!(b.process_inflate(), 1);
        assert_eq!(page_state(&mem, 0x50), "zero");
        assert_eq!(page_state(&mem, 0x51), "pattern", "past the cap");
        assert_eq!(b.counters().inflated_pages, 1);
    }

    #[test]
    fn hostile_chains_are_returned_empty_and_touch_nothing() {
        // Outside guest memory, wrapping lengths, write-only (wrong direction), zero length.
        for descs in [
            vec![desc(0xffff_0000, 64, 0, 0)],
            vec![desc(0xf_ffff, 0xffff_ffff, 0, 0)],
            vec![desc(u64::MAX - 8, 64, 0, 0)],
            vec![desc(DATA, 8, VRING_DESC_F_WRITE, 0)],
            vec![desc(DATA, 0, 0, 0)],
            // A valid PFN buffer followed by one outside memory: the whole chain is refused.
            vec![
                desc(DATA, 8, VRING_DESC_F_NEXT, 1),
                desc(0xffff_0000, 8, 0, 0),
            ],
        ] {
            let mem = memory();
            let (mut b, mocks, _) = rig(&mem, &cfg(1, false, 0));
            fill_pattern(&mem);
            write_pfns(&mem, DATA, &[0x40, 0x41]);
            mocks[0].add_desc_chains(&descs, 0).unwrap();
            assert_eq!(b.process_inflate(), 1, "{descs:?}");
            assert_eq!(used_elem(&mocks[0], 0), (0, 0), "{descs:?}");
            for pfn in PATTERN_PFNS {
                assert_eq!(page_state(&mem, pfn), "pattern", "{descs:?}");
            }
            let c = b.counters();
            assert_eq!((c.bad_chains, c.inflated_pages), (1, 0), "{descs:?}");
        }
    }

    #[test]
    fn looping_chains_do_not_hang() {
        let mem = memory();
        let (mut b, mocks, _) = rig(&mem, &cfg(1, false, 0));
        fill_pattern(&mem);
        write_pfns(&mem, DATA, &[0x40, 0x41]);
        // The last descriptor points back at the first: virtio-queue stops after queue-size
        // descriptors and the reader refuses the chain, or reads at most 16 * 8 bytes.
        let m = &mocks[0];
        m.desc_table()
            .store(0, desc(DATA, 8, VRING_DESC_F_NEXT, 1))
            .unwrap();
        m.desc_table()
            .store(1, desc(DATA, 8, VRING_DESC_F_NEXT, 0))
            .unwrap();
        m.avail().ring().ref_at(0).unwrap().store(0);
        m.avail().idx().store(1);
        assert_eq!(b.process_inflate(), 1);
        assert_eq!(used_elem(m, 0), (0, 0));
        for pfn in PATTERN_PFNS.skip(2) {
            assert_eq!(page_state(&mem, pfn), "pattern");
        }
        assert!(b.counters().inflated_pages <= 2);
    }

    #[test]
    fn overlong_chains_are_bounded() {
        // (a) QSIZE direct descriptors, the last pointing past the table: virtio-queue stops
        // at the table's end. (b) An indirect table of QSIZE + 1 entries: virtio-queue bounds
        // it by its own length (at most 65535), not by the queue size, so it is served.
        // Descriptor i names PFN 0x40 + i; only those pages may change.
        let n = usize::from(QSIZE);
        let pfns: Vec<u32> = PATTERN_PFNS.take(n + 1).collect();
        for indirect in [false, true] {
            let mem = memory();
            let (mut b, mocks, _) = rig(&mem, &cfg(1, false, 0));
            fill_pattern(&mem);
            write_pfns(&mem, DATA, &pfns);
            let count = if indirect { n + 1 } else { n };
            let descs: Vec<_> = (0..count)
                .map(|i| desc(DATA + 4 * i as u64, 4, VRING_DESC_F_NEXT, i as u16 + 1))
                .collect();
            if indirect {
                let table = 0x20000u64;
                for (i, d) in descs.iter().enumerate() {
                    mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
                        .unwrap();
                }
                let flag = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;
                let len = 16 * count as u32;
                mocks[0]
                    .add_desc_chains(&[desc(table, len, flag, 0)], 0)
                    .unwrap();
            } else {
                for (i, d) in descs.iter().enumerate() {
                    mocks[0].desc_table().store(i as u16, *d).unwrap();
                }
                mocks[0].avail().ring().ref_at(0).unwrap().store(0);
                mocks[0].avail().idx().store(1);
            }
            assert_eq!(b.process_inflate(), 1);
            assert_eq!(used_elem(&mocks[0], 0), (0, 0));
            for pfn in PATTERN_PFNS {
                let want = if pfns.iter().take(count).any(|&p| p == pfn) {
                    "zero"
                } else {
                    "pattern"
                };
                assert_eq!(
                    page_state(&mem, pfn),
                    want,
                    "indirect {indirect}, pfn {pfn:#x}"
                );
            }
            assert_eq!(b.counters().inflated_pages, count as u64);
        }
    }

    fn stats_entries(entries: &[(u16, u64)]) -> Vec<u8> {
        entries
            .iter()
            .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect()
    }

    #[test]
    fn stats_buffer_is_kept_parsed_and_returned_on_the_timer() {
        let mem = memory();
        let (mut b, mocks, irq) = rig(&mem, &cfg(1, false, 10));
        let sq = &mocks[2];
        // Free, total, an unknown tag, available, then 4 bytes of a partial entry.
        let mut bytes = stats_entries(&[(4, 100 << 20), (5, 256 << 20), (99, 7), (6, 150 << 20)]);
        bytes.extend([1, 2, 3, 4]);
        mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        // Split the buffer mid-entry across two descriptors.
        let len = bytes.len() as u32;
        sq.add_desc_chains(
            &[
                desc(DATA, 13, VRING_DESC_F_NEXT, 1),
                desc(DATA + 13, len - 13, 0, 0),
            ],
            0,
        )
        .unwrap();
        assert_eq!(b.process_stats(), 0, "the first buffer is held, not used");
        assert_eq!(used_count(sq), 0);
        let s = b.latest_stats().unwrap();
        assert_eq!(s.free_memory, Some(100 << 20));
        assert_eq!(s.total_memory, Some(256 << 20));
        assert_eq!(s.available_memory, Some(150 << 20));
        assert_eq!(s.swap_in, None);
        // The timer fires: the buffer goes back to the driver, used length 0.
        assert!(b.request_stats());
        assert_eq!(used_count(sq), 1);
        assert_eq!(used_elem(sq, 0), (0, 0));
        assert_eq!(irq.status() & 1, 1);
        assert!(!b.request_stats(), "nothing held until the driver refills");
        // The driver refills with new numbers.
        mem.write_slice(&stats_entries(&[(4, 1)]), GuestAddress(DATA + 0x100))
            .unwrap();
        sq.add_desc_chains(&[desc(DATA + 0x100, 10, 0, 0)], 2)
            .unwrap();
        assert_eq!(b.process_stats(), 0);
        assert_eq!(b.latest_stats().unwrap().free_memory, Some(1));
        assert_eq!(b.latest_stats().unwrap().total_memory, None);
        assert_eq!(b.counters().stats_updates, 2);
    }

    #[test]
    fn a_second_stats_buffer_returns_the_first_and_bad_ones_are_still_held() {
        let mem = memory();
        let (mut b, mocks, _) = rig(&mem, &cfg(1, false, 10));
        let sq = &mocks[2];
        mem.write_slice(&stats_entries(&[(4, 5)]), GuestAddress(DATA))
            .unwrap();
        sq.add_desc_chains(&[desc(DATA, 10, 0, 0), desc(0xffff_0000, 10, 0, 0)], 0)
            .unwrap();
        assert_eq!(b.process_stats(), 1, "the older buffer is given back");
        assert_eq!(used_elem(sq, 0), (0, 0));
        assert_eq!(b.latest_stats().unwrap().free_memory, Some(5));
        assert_eq!(b.counters().bad_chains, 1);
        assert!(b.request_stats(), "the bad buffer is the one held");
        assert_eq!(used_elem(sq, 1), (1, 0));
    }

    #[test]
    fn stats_need_the_feature_and_the_interval_can_change() {
        let mem = memory();
        let mut b = Balloon::new(&cfg(1, false, 3)).unwrap();
        // The driver did not accept STATS_VQ: the stats queue is left alone.
        b.set_acked_features(VIRTIO_F_VERSION_1);
        let mocks: Vec<_> = QUEUE_BASES
            .iter()
            .map(|&base| MockSplitQueue::create(&mem, GuestAddress(base), QSIZE))
            .collect();
        let (act, _) = active(
            &mem,
            mocks.iter().map(|m| queue_from_mock(m, QSIZE)).collect(),
        );
        b.activate(act).unwrap();
        mocks[2]
            .add_desc_chains(&[desc(DATA, 10, 0, 0)], 0)
            .unwrap();
        assert_eq!(b.process_stats(), 0);
        assert!(b.latest_stats().is_none());
        assert!(!b.stats_timer.is_armed().unwrap());

        let (mut b, _mocks, _) = rig(&mem, &cfg(1, false, 3));
        assert!(b.stats_timer.is_armed().unwrap(), "armed at activation");
        b.set_stats_interval(0);
        assert!(!b.stats_timer.is_armed().unwrap());
        b.set_stats_interval(1);
        assert!(b.stats_timer.is_armed().unwrap());
        b.reset();
        assert!(!b.stats_timer.is_armed().unwrap(), "stopped by reset");
        assert!(!b.request_stats(), "a late expiry after reset");
        assert!(!b.stats_timer.is_armed().unwrap(), "is not re-armed");

        let mut off = Balloon::new(&cfg(1, false, 0)).unwrap();
        off.set_stats_interval(5);
        assert_eq!(off.stats_interval_s, 0, "no stats queue, nothing to time");
    }

    #[test]
    fn timer_expiry_is_consumed_without_reading() {
        let mem = memory();
        let (mut b, _mocks, _) = rig(&mem, &cfg(1, false, 1));
        b.stats_timer.reset(Duration::from_millis(1), None).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // Re-arming clears the expiration count; the fd is not readable any more.
        b.request_stats();
        let ep = vmm_sys_util::epoll::Epoll::new().unwrap();
        let ev = vmm_sys_util::epoll::EpollEvent::new(vmm_sys_util::epoll::EventSet::IN, 0);
        use std::os::fd::AsRawFd;
        ep.ctl(
            vmm_sys_util::epoll::ControlOperation::Add,
            b.stats_timer.as_raw_fd(),
            ev,
        )
        .unwrap();
        let mut out = [vmm_sys_util::epoll::EpollEvent::default(); 1];
        assert_eq!(ep.wait(0, &mut out).unwrap(), 0);
        assert!(b.stats_timer.is_armed().unwrap());
    }

    #[test]
    fn target_changes_raise_a_config_interrupt_once_active() {
        let mut b = Balloon::new(&cfg(0, false, 0)).unwrap();
        b.set_target_mib(32);
        assert_eq!(b.target_mib(), 32);
        let mem = memory();
        let (mut b, _mocks, irq) = rig(&mem, &cfg(0, false, 0));
        assert_eq!(irq.status(), 0);
        b.set_target_mib(48);
        assert_eq!(b.target_mib(), 48);
        assert_eq!(irq.status() & INT_CONFIG_CHANGE, INT_CONFIG_CHANGE);
        assert_eq!(irq.config_generation(), 1);
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 48 * 256);
    }

    #[test]
    fn nothing_happens_before_activation_and_after_reset() {
        let mut b = Balloon::new(&cfg(1, false, 1)).unwrap();
        assert_eq!(
            b.process_inflate() + b.process_deflate() + b.process_stats(),
            0
        );
        assert!(!b.request_stats());
        let mem = memory();
        let (mut b, mocks, _) = rig(&mem, &cfg(1, false, 0));
        b.write_config(4, &[1, 0, 0, 0]);
        b.reset();
        assert_eq!(b.actual, 0, "reset forgets the driver's count");
        assert_eq!(b.target_mib(), 1, "but not the host's target");
        let len = write_pfns(&mem, DATA, &[0x40]);
        mocks[0]
            .add_desc_chains(&[desc(DATA, len, 0, 0)], 0)
            .unwrap();
        assert_eq!(b.process_inflate(), 0);
        let (act, _) = active(&mem, vec![]);
        assert!(matches!(
            b.activate(act),
            Err(ActivateError::QueueCount { want: 2, got: 0 })
        ));
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::config::BalloonConfig;
    use crate::devices::state::TransportSnapshot;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_utils::{
        driver_init, memory, settle, through_json, transport, TestRing,
    };
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;
    use vm_memory::Bytes;

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ;
    const PFN: u32 = 0x50;

    struct Rig {
        t: MmioTransport,
        em: EventManager<Arc<Mutex<Balloon>>>,
        dev: Arc<Mutex<Balloon>>,
    }

    fn rig(mem: &GuestMemoryMmap, mib: u32, deflate_on_oom: bool, stats: u32) -> Rig {
        let dev = Balloon::new(&BalloonConfig {
            mib,
            deflate_on_oom,
            stats_interval_s: stats,
        })
        .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Balloon>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let (t, _, _) = transport(dev.clone(), mem);
        Rig { t, em, dev }
    }

    fn config(t: &mut MmioTransport) -> (u32, u32) {
        let mut c = [0u8; 8];
        t.read(0x100, &mut c);
        let [a, b, c0, d, e, f, g, h] = c;
        (
            u32::from_le_bytes([a, b, c0, d]),
            u32::from_le_bytes([e, f, g, h]),
        )
    }

    fn rings(mem: &GuestMemoryMmap) -> [TestRing; 3] {
        [0x1000, 0x2000, 0x3000].map(|b| TestRing::new(mem, b, 16))
    }

    /// A running balloon: target moved to 32 MiB, the driver holds 1000 pages, gave a
    /// statistics buffer (held by the device); paused, it queued an inflate chain.
    fn saved(mem: &GuestMemoryMmap, r3: &mut [TestRing; 3]) -> TransportSnapshot {
        let mut r = rig(mem, 64, false, 5);
        driver_init(&mut r.t, FEATURES, &r3[..]);
        r.t.write(0x104, &1000u32.to_le_bytes());
        let mut stats = Vec::new();
        stats.extend(TAG_MEMFREE.to_le_bytes());
        stats.extend(123_456u64.to_le_bytes());
        mem.write_slice(&stats, GuestAddress(0x9000)).unwrap();
        r3[STATS_QUEUE].push(mem, &[(0x9000, 10, false)]);
        settle(&mut r.em);
        assert!(r.dev.lock().unwrap().stats_head.is_some());
        r.dev.lock().unwrap().set_target_mib(32);

        mem.write_slice(
            &[0x77; PAGE_SIZE as usize],
            GuestAddress(u64::from(PFN) << PFN_SHIFT),
        )
        .unwrap();
        mem.write_slice(&PFN.to_le_bytes(), GuestAddress(0xa000))
            .unwrap();
        r3[INFLATE_QUEUE].push(mem, &[(0xa000, 4, false)]);
        r.t.save()
    }

    #[test]
    fn round_trip_keeps_sizes_and_statistics_and_serves_the_waiting_chain() {
        let mem = memory();
        let mut r3 = rings(&mem);
        let s = through_json(&saved(&mem, &mut r3));
        assert_eq!(
            s.device,
            DeviceSnapshot::Balloon {
                num_pages: 32 * PAGES_PER_MIB,
                actual: 1000,
                stats_enabled: true,
                stats_interval_s: 5,
                latest_stats: Some(BalloonStats {
                    free_memory: Some(123_456),
                    ..BalloonStats::default()
                }),
            }
        );
        assert_eq!(s.config_generation, 1);
        assert_eq!(
            (
                s.queues[STATS_QUEUE].next_avail,
                s.queues[STATS_QUEUE].next_used
            ),
            (0, 0),
            "the held statistics buffer goes back to the ring"
        );

        // Configured with the old 64 MiB target: the saved sizes win.
        let mut r = rig(&mem, 64, false, 5);
        r.t.restore(&s).unwrap();
        assert_eq!(config(&mut r.t), (32 * PAGES_PER_MIB, 1000));
        let mut g = [0u8; 4];
        r.t.read(0x0fc, &mut g);
        assert_eq!(u32::from_le_bytes(g), 1, "config generation");
        settle(&mut r.em);
        // The inflate chain queued before the snapshot is served, the page dropped.
        assert_eq!(r3[INFLATE_QUEUE].take_used(&mem), vec![(0, 0)]);
        let mut page = [1u8; 16];
        mem.read_slice(&mut page, GuestAddress(u64::from(PFN) << PFN_SHIFT))
            .unwrap();
        assert_eq!(page, [0; 16]);
        // The statistics buffer is held again and goes back when the timer fires.
        let mut d = r.dev.lock().unwrap();
        assert_eq!(d.stats_head, Some(0));
        assert_eq!(d.latest_stats().unwrap().free_memory, Some(123_456));
        assert!(d.request_stats());
        drop(d);
        assert_eq!(r3[STATS_QUEUE].take_used(&mem), vec![(0, 0)]);
        assert_eq!(r3[STATS_QUEUE].used_idx(&mem), 1);
    }

    #[test]
    fn another_statistics_or_feature_setup_or_kind_is_refused() {
        let mem = memory();
        let mut r3 = rings(&mem);
        let s = saved(&mem, &mut r3);

        // No statistics queue now: one queue fewer than saved.
        let mut r = rig(&mem, 64, false, 0);
        assert!(matches!(r.t.restore(&s), Err(StateError::Mismatch(_))));
        assert!(!r.t.is_activated());
        assert_eq!(config(&mut r.t), (64 * PAGES_PER_MIB, 0), "unchanged");
        assert!(matches!(
            r.dev.lock().unwrap().restore_state(&s.device),
            Err(StateError::Mismatch(_))
        ));

        // The guest acked DEFLATE_ON_OOM, which this configuration does not offer.
        let mut s2 = s.clone();
        s2.driver_features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        let mut r = rig(&mem, 64, false, 5);
        assert!(matches!(r.t.restore(&s2), Err(StateError::Mismatch(_))));
        let mut r = rig(&mem, 64, true, 5);
        r.t.restore(&s2).unwrap();

        let b = rig(&mem, 64, false, 5);
        assert!(matches!(
            b.dev
                .lock()
                .unwrap()
                .restore_state(&DeviceSnapshot::Net { mac: [0; 6] }),
            Err(StateError::Kind { .. })
        ));
        assert!(!b.t.is_activated());
    }
}
