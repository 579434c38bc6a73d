//! virtio-blk: a raw disk image file as a guest block device (virtio 1.x §5.2).
//!
//! Why: the guest's root file system and data disks. One request queue; each chain is a
//! device-readable 16-byte header (type, reserved, sector), data buffers (device-readable for
//! OUT, device-writable for IN and GET_ID) and a final device-writable status byte. The device
//! makes no assumption about how these are split into descriptors (§2.6.4): the header may
//! share a descriptor with OUT data, the status byte is the last byte of the last descriptor.
//!
//! I/O is synchronous, on the VMM thread, with positioned reads and writes (`read_at` /
//! `write_at`: no shared seek state), through a bounded bounce buffer. Each request is bounded
//! by its chain, and one wake-up serves at most `MAX_CHAINS_PER_WAKE` chains before yielding
//! to the other devices.
//!
//! Ordering it relies on:
//! - Writes go to the host page cache; VIRTIO_BLK_F_FLUSH is offered, so the guest treats the
//!   disk as a write-back cache and sends FLUSH when it needs durability. FLUSH is answered
//!   only after `sync_data()` returned, so a flush the guest saw complete is on the host disk.
//! - Every descriptor is checked (inside guest memory, non-zero, readable ones before writable
//!   ones) before any byte of the file or guest memory is touched; sector ranges are checked
//!   against the capacity before any I/O. A chain whose status byte cannot be located is
//!   returned with used length 0; any other malformed request gets VIRTIO_BLK_S_IOERR.
//! - With VIRTIO_RING_F_EVENT_IDX the queue is drained with notifications disabled, then
//!   re-enabled and re-checked, so a buffer added in between is never missed.
//! - The capacity is fixed when the device is created (file size / 512; a partial last
//!   sector is not exposed).
//! - Rate limiting (`crate::rate_limiter`): each chain costs one operation and its data bytes
//!   (the descriptors' lengths less the 16-byte header and the status byte), charged before
//!   it is served. A chain the limiter refuses is put back in the available ring (the queue
//!   goes back one position) and the device takes nothing more from the queue until the
//!   limiter's timer fires; queue notifications meanwhile are read and ignored. Nothing is
//!   ever held, so a snapshot or a reset finds no request in flight.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::kvm::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, virtio_blk_outhdr, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    chain_data_bytes, single_queue_event, ActivateError, ActivateEvent, ActiveQueues, Interrupt,
    VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::config::DiskConfig;
use crate::devices::state::{DeviceSnapshot, StateError};
use crate::rate_limiter::{RateLimiter, RateLimiterError};

pub const QUEUE_SIZE: u16 = 256;
/// The sector size of the virtio-blk protocol; also the block size we report.
pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request we tell the driver to stay within: the queue minus header and
/// status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: usize = std::mem::size_of::<virtio_blk_outhdr>();
/// The bytes of a chain that are not data (the header and the status byte): the rate
/// limiter charges the rest.
const NOT_DATA_LEN: u64 = HEADER_LEN as u64 + 1;
/// Length of the GET_ID answer.
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bounce buffer between the file and guest memory.
const BOUNCE_LEN: usize = 64 * 1024;
/// Chains served per wake-up before yielding the VMM thread to the other devices.
pub const MAX_CHAINS_PER_WAKE: usize = 2 * QUEUE_SIZE as usize;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is empty: it needs at least one 512-byte sector")]
    Empty { path: PathBuf },
    #[error("disk id {0:?} is longer than {ID_LEN} bytes")]
    IdTooLong(String),
    #[error("cannot create the activation eventfd")]
    EventFd(#[source] io::Error),
    #[error("disk {id}: invalid rate limiter")]
    RateLimiter {
        id: String,
        #[source]
        source: RateLimiterError,
    },
}

/// The event token of the rate limiter's timer.
const TOKEN_LIMITER: u32 = super::TOKEN_BACKEND;

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockStats {
    /// Chains taken from the queue.
    pub requests: u64,
    /// Successful IN requests.
    pub reads: u64,
    /// Successful OUT requests.
    pub writes: u64,
    /// Successful FLUSH requests.
    pub flushes: u64,
    /// Bytes read from the image into the guest.
    pub bytes_read: u64,
    /// Bytes written from the guest into the image.
    pub bytes_written: u64,
    /// Requests answered IOERR or UNSUPP, and malformed chains returned with length 0.
    pub errors: u64,
    /// Times the rate limiter stopped the queue.
    pub throttled: u64,
}

/// The request status byte (§5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        // The constants are 0, 1 and 2.
        match self {
            Status::Ok => VIRTIO_BLK_S_OK as u8,
            Status::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// One checked piece of guest memory named by a descriptor.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: usize,
}

/// A request chain, every descriptor checked: the readable bytes (header, then OUT data), the
/// writable bytes before the status byte (IN data, GET_ID answer), the status byte.
#[derive(Debug)]
struct Layout {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    status: GuestAddress,
}

/// Why a chain cannot be served.
#[derive(Debug)]
enum ChainError {
    /// No usable status byte: the chain goes back with used length 0.
    NoStatus(&'static str),
    /// The status byte is usable; the request is answered IOERR.
    Bad {
        status: GuestAddress,
        why: &'static str,
    },
}

/// The backing file and what the device knows about it; separate from the queue state so a
/// request can borrow both.
struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// In sectors.
    capacity: u64,
    id: [u8; ID_LEN],
    id_str: String,
    bounce: Vec<u8>,
    stats: BlockStats,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_evt: Arc<EventFd>,
    interrupt: Arc<Interrupt>,
}

/// The virtio-blk device.
pub struct Block {
    disk: Disk,
    config: Vec<u8>,
    acked: u64,
    active: Option<Active>,
    activate_evt: ActivateEvent,
    limiter: RateLimiter,
}

impl Block {
    /// Opens the image `cfg` names (read-only when `cfg.read_only`: the file is then never
    /// written). `index` is the disk's position in the configuration, for the default id.
    pub fn new(cfg: &DiskConfig, index: usize) -> Result<Block, BlockError> {
        let path = cfg.path.clone();
        let id_str = cfg.drive_id(index);
        let mut id = [0u8; ID_LEN];
        match id.get_mut(..id_str.len()) {
            Some(dst) => dst.copy_from_slice(id_str.as_bytes()),
            None => return Err(BlockError::IdTooLong(id_str)),
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        // Seeking to the end also sizes block devices, whose metadata length is 0. I/O itself
        // never uses the file position.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        let capacity = size / SECTOR_SIZE;
        if capacity == 0 {
            return Err(BlockError::Empty { path });
        }
        let limiter =
            RateLimiter::new(&cfg.rate_limiter.unwrap_or_default()).map_err(|source| {
                BlockError::RateLimiter {
                    id: id_str.clone(),
                    source,
                }
            })?;
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not exposed",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Block {
            config: config_space(capacity),
            disk: Disk {
                file,
                path,
                read_only: cfg.read_only,
                capacity,
                id,
                id_str,
                bounce: vec![0; BOUNCE_LEN],
                stats: BlockStats::default(),
            },
            acked: 0,
            active: None,
            activate_evt: ActivateEvent::new().map_err(BlockError::EventFd)?,
            limiter,
        })
    }

    /// The limits in force now (after any live update).
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    pub fn stats(&self) -> BlockStats {
        self.disk.stats
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    pub fn is_read_only(&self) -> bool {
        self.disk.read_only
    }

    pub fn path(&self) -> &std::path::Path {
        &self.disk.path
    }

    /// The drive id the guest reads with GET_ID (the configured one, or "diskN").
    pub fn id(&self) -> &str {
        &self.disk.id_str
    }

    /// Serves the chains the driver made available (at most `MAX_CHAINS_PER_WAKE`; if more
    /// remain, the queue eventfd is signalled again so the event loop comes back); returns how
    /// many went back to the used ring.
    pub fn process_queue(&mut self) -> usize {
        let Some(a) = self.active.as_mut() else {
            return 0;
        };
        let limiter = &mut self.limiter;
        if limiter.is_blocked() {
            // The limiter's timer brings us back.
            return 0;
        }
        let disk = &mut self.disk;
        let (mut popped, mut used) = (0, 0);
        let mut first_pass = true;
        'outer: loop {
            if let Err(e) = a.queue.disable_notification(&a.mem) {
                log::warn!("virtio-blk: {e}");
            }
            let popped_before = popped;
            while let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) {
                if !limiter.consume_request(|| chain_data_bytes(&chain, NOT_DATA_LEN)) {
                    // Back into the available ring, untouched; the timer resumes the queue.
                    a.queue.go_to_previous_position();
                    disk.stats.throttled += 1;
                    break 'outer;
                }
                popped += 1;
                let head = chain.head_index();
                let len = disk.serve(&a.mem, chain);
                match a.queue.add_used(&a.mem, head, len) {
                    Ok(()) => used += 1,
                    // A head index outside the queue: the chain cannot be returned.
                    Err(e) => log::warn!("virtio-blk: cannot return chain {head}: {e}"),
                }
                if popped >= MAX_CHAINS_PER_WAKE {
                    // Notifications stay as they are: we come back on our own.
                    if let Err(e) = a.queue_evt.write(1) {
                        log::warn!("virtio-blk: cannot reschedule the queue: {e}");
                    }
                    break 'outer;
                }
            }
            // Re-enabling notifications tells whether buffers arrived meanwhile; go round again
            // only if that can make progress: an available index the queue refuses (more than
            // a queue ahead) would otherwise spin here forever.
            let progressed = popped > popped_before || first_pass;
            first_pass = false;
            match a.queue.enable_notification(&a.mem) {
                Ok(true) if progressed => continue,
                Ok(true) => {
                    log::warn!("virtio-blk: the driver's available ring index is invalid");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-blk: {e}");
                    break;
                }
            }
        }
        if used > 0 {
            match a.queue.needs_notification(&a.mem) {
                Ok(true) => a.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(e) => log::warn!("virtio-blk: {e}"),
            }
        }
        used
    }
}

/// The configuration space (§5.2.4), little-endian, laid out as `struct virtio_blk_config`.
fn config_space(capacity: u64) -> Vec<u8> {
    use std::mem::offset_of;
    let mut c = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
    let mut put = |off: usize, bytes: &[u8]| {
        if let Some(dst) = c.get_mut(off..off + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, num_queues),
        &1u16.to_le_bytes(),
    );
    c
}

/// Checks every descriptor of a chain and splits it into readable bytes, writable bytes and
/// the status byte. Touches neither guest memory (beyond the descriptor table) nor the file.
fn parse_chain(
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
) -> Result<Layout, ChainError> {
    // virtio-queue stops after queue-size descriptors (loops, overlong chains) or at a `next`
    // outside the table; bounded by the queue or indirect table size.
    let descs: Vec<Descriptor> = chain.collect();
    let Some(last) = descs.last() else {
        return Err(ChainError::NoStatus("empty chain"));
    };
    if last.has_next() {
        return Err(ChainError::NoStatus(
            "chain loops, is longer than the queue or names a descriptor outside it",
        ));
    }
    if !last.is_write_only() {
        return Err(ChainError::NoStatus(
            "last descriptor is not device-writable: no status byte",
        ));
    }
    let status = u64::from(last.len())
        .checked_sub(1)
        .and_then(|off| last.addr().0.checked_add(off))
        .map(GuestAddress)
        .filter(|a| mem.check_range(*a, 1))
        .ok_or(ChainError::NoStatus(
            "status descriptor is empty or outside guest memory",
        ))?;
    let bad = |why| ChainError::Bad { status, why };

    let mut layout = Layout {
        readable: Vec::new(),
        writable: Vec::new(),
        status,
    };
    let mut seen_writable = false;
    let n = descs.len();
    for (i, d) in descs.iter().enumerate() {
        let len = usize::try_from(d.len()).map_err(|_| bad("descriptor too long"))?;
        if len == 0 {
            return Err(bad("zero-length descriptor"));
        }
        if d.addr().0.checked_add(u64::from(d.len())).is_none() || !mem.check_range(d.addr(), len) {
            return Err(bad("descriptor outside guest memory"));
        }
        if d.is_write_only() {
            seen_writable = true;
            // The last descriptor ends with the status byte, which is not data.
            let len = if i + 1 == n { len - 1 } else { len };
            if len > 0 {
                layout.writable.push(Seg {
                    addr: d.addr(),
                    len,
                });
            }
        } else {
            if seen_writable {
                return Err(bad(
                    "device-readable descriptor after a device-writable one",
                ));
            }
            layout.readable.push(Seg {
                addr: d.addr(),
                len,
            });
        }
    }
    Ok(layout)
}

fn total(segs: &[Seg]) -> u64 {
    // At most 2^16 descriptors of at most 2^32 bytes: no overflow in u64.
    segs.iter().map(|s| s.len as u64).sum()
}

/// Walks a list of checked segments in order, handing out pieces.
struct Cursor<'a> {
    segs: &'a [Seg],
    idx: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    fn new(segs: &'a [Seg]) -> Self {
        Cursor {
            segs,
            idx: 0,
            off: 0,
        }
    }

    /// The next piece of at most `max` bytes, or None at the end (or when `max` is 0).
    fn take(&mut self, max: usize) -> Option<Seg> {
        if max == 0 {
            return None;
        }
        loop {
            let s = self.segs.get(self.idx)?;
            let left = s.len.saturating_sub(self.off);
            if left == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let len = left.min(max);
            // `off` < `s.len` and the segment was checked to lie inside guest memory.
            let addr = s.addr.checked_add(self.off as u64)?;
            self.off += len;
            return Some(Seg { addr, len });
        }
    }
}

impl Disk {
    /// Serves one chain; returns the used length (bytes written into the guest).
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: impl Iterator<Item = Descriptor>) -> u32 {
        self.stats.requests += 1;
        let layout = match parse_chain(mem, chain) {
            Ok(l) => l,
            Err(ChainError::NoStatus(why)) => {
                log::debug!("virtio-blk: chain returned unserved: {why}");
                self.stats.errors += 1;
                return 0;
            }
            Err(ChainError::Bad { status, why }) => {
                log::debug!("virtio-blk: bad request: {why}");
                return self.finish(mem, status, Status::IoErr, 0);
            }
        };
        let (status, written) = self.execute(mem, &layout);
        self.finish(mem, layout.status, status, written)
    }

    /// Writes the status byte; returns the used length.
    fn finish(
        &mut self,
        mem: &GuestMemoryMmap,
        at: GuestAddress,
        status: Status,
        data: u64,
    ) -> u32 {
        if status != Status::Ok {
            self.stats.errors += 1;
        }
        if let Err(e) = mem.write_obj(status.byte(), at) {
            // Checked in parse_chain; cannot happen with fixed guest memory.
            log::warn!("virtio-blk: cannot write the status byte: {e}");
            return u32::try_from(data).unwrap_or(u32::MAX);
        }
        u32::try_from(data.saturating_add(1)).unwrap_or(u32::MAX)
    }

    /// Runs a checked request; returns its status and how many data bytes went to the guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, layout: &Layout) -> (Status, u64) {
        let mut readable = Cursor::new(&layout.readable);
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let Some(seg) = readable.take(HEADER_LEN - got) else {
                log::debug!("virtio-blk: request header shorter than {HEADER_LEN} bytes");
                return (Status::IoErr, 0);
            };
            let Some(dst) = header.get_mut(got..got + seg.len) else {
                return (Status::IoErr, 0);
            };
            if mem.read_slice(dst, seg.addr).is_err() {
                return (Status::IoErr, 0);
            }
            got += seg.len;
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        // What remains of each direction after the header and before the status byte.
        let data_in = total(&layout.readable).saturating_sub(HEADER_LEN as u64);
        let data_out = total(&layout.writable);

        match req_type {
            VIRTIO_BLK_T_IN => {
                if data_in != 0 {
                    log::debug!("virtio-blk: read request with device-readable data");
                    return (Status::IoErr, 0);
                }
                let Some(offset) = self.byte_range(sector, data_out) else {
                    return (Status::IoErr, 0);
                };
                let (status, n) = self.read(mem, Cursor::new(&layout.writable), offset);
                if status == Status::Ok {
                    self.stats.reads += 1;
                }
                (status, n)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    log::debug!("virtio-blk: write to read-only disk refused");
                    return (Status::IoErr, 0);
                }
                if data_out != 0 {
                    log::debug!("virtio-blk: write request with device-writable data");
                    return (Status::IoErr, 0);
                }
                let Some(offset) = self.byte_range(sector, data_in) else {
                    return (Status::IoErr, 0);
                };
                let status = self.write(mem, readable, offset);
                if status == Status::Ok {
                    self.stats.writes += 1;
                }
                (status, 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if data_in != 0 || data_out != 0 {
                    log::debug!("virtio-blk: flush request with data");
                    return (Status::IoErr, 0);
                }
                if !self.read_only {
                    if let Err(e) = self.file.sync_data() {
                        log::warn!("virtio-blk: flush of {} failed: {e}", self.path.display());
                        return (Status::IoErr, 0);
                    }
                }
                self.stats.flushes += 1;
                (Status::Ok, 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if data_in != 0 {
                    return (Status::IoErr, 0);
                }
                let mut w = Cursor::new(&layout.writable);
                let mut done = 0;
                while done < ID_LEN {
                    let Some(seg) = w.take(ID_LEN - done) else {
                        break;
                    };
                    let Some(src) = self.id.get(done..done + seg.len) else {
                        return (Status::IoErr, done as u64);
                    };
                    if mem.write_slice(src, seg.addr).is_err() {
                        return (Status::IoErr, done as u64);
                    }
                    done += seg.len;
                }
                (Status::Ok, done as u64)
            }
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                (Status::Unsupp, 0)
            }
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors inside the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            log::debug!("virtio-blk: data length {len} is not a multiple of {SECTOR_SIZE}");
            return None;
        }
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        // capacity * 512 <= the file size, so it fits.
        if end > self.capacity.saturating_mul(SECTOR_SIZE) {
            log::debug!("virtio-blk: request for sector {sector} (+{len} bytes) past the end");
            return None;
        }
        Some(offset)
    }

    /// File → guest; returns the status and the bytes put in guest memory.
    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        mut dst: Cursor<'_>,
        mut offset: u64,
    ) -> (Status, u64) {
        let mut done = 0u64;
        while let Some(seg) = dst.take(self.bounce.len()) {
            let Some(buf) = self.bounce.get_mut(..seg.len) else {
                return (Status::IoErr, done);
            };
            if let Err(e) = self.file.read_exact_at(buf, offset) {
                log::warn!("virtio-blk: read of {} failed: {e}", self.path.display());
                return (Status::IoErr, done);
            }
            if mem.write_slice(buf, seg.addr).is_err() {
                return (Status::IoErr, done);
            }
            let n = seg.len as u64;
            done += n;
            offset += n;
            self.stats.bytes_read += n;
        }
        (Status::Ok, done)
    }

    /// Guest → file.
    fn write(&mut self, mem: &GuestMemoryMmap, mut src: Cursor<'_>, mut offset: u64) -> Status {
        while let Some(seg) = src.take(self.bounce.len()) {
            let Some(buf) = self.bounce.get_mut(..seg.len) else {
                return Status::IoErr;
            };
            if mem.read_slice(buf, seg.addr).is_err() {
                return Status::IoErr;
            }
            if let Err(e) = self.file.write_all_at(buf, offset) {
                log::warn!("virtio-blk: write of {} failed: {e}", self.path.display());
                return Status::IoErr;
            }
            let n = seg.len as u64;
            offset += n;
            self.stats.bytes_written += n;
        }
        Status::Ok
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if self.disk.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
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
        serde_json::to_value(self.disk.stats).unwrap_or_default()
    }

    fn save_state(&self) -> DeviceSnapshot {
        DeviceSnapshot::Block {
            capacity: self.disk.capacity,
            read_only: self.disk.read_only,
        }
    }

    /// The guest read the capacity and the read-only feature before the snapshot; a disk that
    /// changed under it (resized, or opened the other way) is refused.
    fn restore_state(&mut self, s: &DeviceSnapshot) -> Result<(), StateError> {
        let DeviceSnapshot::Block {
            capacity,
            read_only,
        } = s
        else {
            return Err(s.wrong_kind("block"));
        };
        let path = self.disk.path.display();
        if *capacity != self.disk.capacity {
            let bytes = |sectors: u64| sectors.saturating_mul(SECTOR_SIZE);
            return Err(StateError::Mismatch(format!(
                "disk {path} is now {} bytes ({} sectors), the snapshot was taken with {} bytes ({capacity} sectors)",
                bytes(self.disk.capacity),
                self.disk.capacity,
                bytes(*capacity)
            )));
        }
        if *read_only != self.disk.read_only {
            let how = |ro: bool| if ro { "read-only" } else { "read-write" };
            return Err(StateError::Mismatch(format!(
                "disk {path} is {}, the snapshot was taken with it {}",
                how(self.disk.read_only),
                how(*read_only)
            )));
        }
        Ok(())
    }

    fn queue_states(&self) -> Vec<QueueState> {
        // Requests are served synchronously on the VMM thread: none is in flight (a throttled
        // chain went back to the available ring).
        self.active.iter().map(|a| a.queue.state()).collect()
    }

    fn rate_limiter_mut(&mut self, field: &str) -> Option<&mut RateLimiter> {
        (field == "rate_limiter").then_some(&mut self.limiter)
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == TOKEN_LIMITER {
            self.limiter.on_timer();
            self.process_queue();
            return;
        }
        let queue_evt = self.active.as_ref().map(|a| &a.queue_evt);
        if single_queue_event("virtio-blk", &events, ops, &self.activate_evt, queue_evt) {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activate_evt.watch(ops);
        let timer = Events::with_data_raw(self.limiter.timer_fd(), TOKEN_LIMITER, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            log::error!("virtio-blk: cannot watch the rate limiter's timer: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
