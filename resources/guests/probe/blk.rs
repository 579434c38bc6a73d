//! `probe=blk`: a polling virtio-blk driver that writes a known pattern over a disk, flushes,
//! reads it back and checks it, and checks the errors a device owes the driver (virtio 1.2
//! §5.2: request header, data, status byte; IN/OUT/FLUSH/GET_ID).
//!
//! Pattern (the host tests recompute it): 64-bit little-endian word i (0..64) of sector s is
//! `((s << 6) | i) ^ seed * 0x9e3779b97f4a7c15` (wrapping), seed from `blk_seed=` (default 1).
//! `sum=` covers every sector read back, in any order: the wrapping sum over sectors of
//! FNV-1a-64 over the sector's words (`h = (h ^ w) * 0x100000001b3`) started at
//! `0xcbf29ce484222325 ^ s`, each folded as `h ^ (h >> 32)` before it is added.
//!
//! Up to `MAX_SLOTS` requests are in flight at once; each request is one chain: a 16-byte
//! header (device-readable), the data in segments no larger than the device's size_max and
//! no more of them than its seg_max, and a status byte (device-writable).

use crate::uart::{put_bytes, put_dec, put_hex, puts};
use crate::virtio::{words_mut, Arena, Buf, Device, Virtq, F_VERSION_1};
use crate::{rdtsc, stop};

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
pub const WANTED_FEATURES: u64 = F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Written into the status byte before submitting: a device that never writes it shows.
const S_UNTOUCHED: u8 = 0xff;

const SECTOR: u64 = 512;
const WORDS_PER_SECTOR: usize = 64;
/// Data bytes per request when the device sets no smaller limit.
const REQ_BYTES: u64 = 256 * 1024;
const MAX_SLOTS: usize = 8;
/// Largest chain: header + data segments + status.
const MAX_CHAIN: usize = 66;
/// Without `blk_mib=`, at most this much of a disk is written and read.
const DEFAULT_CAP_MIB: u64 = 1024;
const QUEUE_WANT: u16 = 256;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub struct Params {
    pub seed: u64,
    /// `blk_mib=`: MiB of each disk to cover (None: all of it, up to DEFAULT_CAP_MIB).
    pub mib: Option<u64>,
}

fn pattern_word(sector: u64, i: usize, seed: u64) -> u64 {
    ((sector << 6) | i as u64) ^ seed.wrapping_mul(GOLDEN)
}

fn fill_pattern(addr: u64, first: u64, sectors: u64, seed: u64) {
    let words = words_mut(addr, sectors as usize * WORDS_PER_SECTOR);
    for (k, sec) in words.chunks_exact_mut(WORDS_PER_SECTOR).enumerate() {
        let s = first + k as u64;
        for (i, w) in sec.iter_mut().enumerate() {
            *w = pattern_word(s, i, seed);
        }
    }
}

/// Sum contribution of the sectors at `addr`; also the first sector that does not match
/// the pattern, if `check`.
fn sum_and_check(addr: u64, first: u64, sectors: u64, seed: u64, check: bool) -> (u64, Option<u64>) {
    let words = words_mut(addr, sectors as usize * WORDS_PER_SECTOR);
    let mut sum = 0u64;
    let mut bad = None;
    for (k, sec) in words.chunks_exact(WORDS_PER_SECTOR).enumerate() {
        let s = first + k as u64;
        let mut h = FNV_BASIS ^ s;
        let mut ok = true;
        for (i, &w) in sec.iter().enumerate() {
            h = (h ^ w).wrapping_mul(FNV_PRIME);
            ok &= w == pattern_word(s, i, seed);
        }
        sum = sum.wrapping_add(h ^ (h >> 32));
        if check && !ok && bad.is_none() {
            bad = Some(s);
        }
    }
    (sum, bad)
}

/// Request memory: per slot a 16-byte header, a status byte and `req_bytes` of data.
struct Slot {
    hdr: u64,
    data: u64,
    /// Head descriptor while in flight.
    head: Option<u16>,
    sector: u64,
    sectors: u64,
}

/// An initialised disk, DRIVER_OK set, its memory allocated.
pub struct Disk {
    /// Position among the virtio-blk devices of the command line.
    index: usize,
    capacity: u64,
    ro: bool,
    dev: Device,
    q: Virtq,
    slots: [Slot; MAX_SLOTS],
    nslots: usize,
    /// Data bytes per segment and segments per request.
    seg_bytes: u64,
    req_sectors: u64,
}

/// The outcome of one request as the report spells it.
fn status_name(s: u8) -> &'static str {
    match s {
        S_OK => "ok",
        S_IOERR => "ioerr",
        S_UNSUPP => "unsupp",
        S_UNTOUCHED => "untouched",
        _ => "bad-status",
    }
}

fn timeout(dev: usize) -> ! {
    puts("blk: dev=");
    put_dec(dev as u64);
    puts(" error=timeout\n");
    stop()
}

impl Disk {
    fn status_addr(&self, slot: usize) -> u64 {
        self.slots[slot].hdr + 16
    }

    /// Submits request `t` at `sector` with `len` data bytes from slot `slot`'s buffer.
    fn submit(&mut self, slot: usize, t: u32, sector: u64, len: u64, data_write: bool) {
        let s = &self.slots[slot];
        let words = words_mut(s.hdr, 3);
        words[0] = u64::from(t); // type, reserved = 0
        words[1] = sector;
        words[2] = u64::from(S_UNTOUCHED);
        let mut chain = [Buf::ro(0, 0); MAX_CHAIN];
        chain[0] = Buf::ro(s.hdr, 16);
        let mut n = 1;
        let mut off = 0;
        while off < len {
            let l = (len - off).min(self.seg_bytes);
            chain[n] = Buf { addr: s.data + off, len: l as u32, write: data_write };
            n += 1;
            off += l;
        }
        chain[n] = Buf::wo(s.hdr + 16, 1);
        n += 1;
        let head = self.q.add(&chain[..n]);
        if head.is_none() {
            puts("probe: blk queue full\n");
            stop();
        }
        self.slots[slot].head = head;
        self.slots[slot].sector = sector;
        self.slots[slot].sectors = len / SECTOR;
    }

    /// Waits for any request; returns its slot and status byte.
    fn complete(&mut self, dev: usize) -> (usize, u8) {
        let Some((head, _len)) = self.q.wait_used() else { timeout(dev) };
        for i in 0..self.nslots {
            if self.slots[i].head == Some(head) {
                self.slots[i].head = None;
                // The status byte is ours again once the chain is used.
                let st = words_mut(self.status_addr(i), 1)[0] as u8;
                return (i, st);
            }
        }
        puts("probe: blk completion for an unknown request\n");
        stop()
    }

    /// One request at a time, for the single-shot checks.
    fn one(&mut self, dev: usize, t: u32, sector: u64, len: u64, data_write: bool) -> u8 {
        self.submit(0, t, sector, len, data_write);
        self.q.kick();
        self.complete(dev).1
    }

    fn free_slot(&self) -> Option<usize> {
        (0..self.nslots).find(|&i| self.slots[i].head.is_none())
    }
}

fn init_failed(dev: usize, what: &str) {
    puts("blk: dev=");
    put_dec(dev as u64);
    puts(" error=");
    puts(what);
    puts("\n");
}

/// Brings up the device at `base`, the `dev`-th virtio-blk of the command line; on failure
/// prints `blk: dev=N error=...` and leaves the device reset.
pub fn open(dev: usize, base: u64, arena: &mut Arena) -> Option<Disk> {
    let d = match Device::init(base, WANTED_FEATURES) {
        Ok(d) => d,
        Err(e) => {
            init_failed(dev, e.name());
            return None;
        }
    };
    let m = d.mmio;
    let capacity = m.config64(0);
    let size_max = if d.has(F_SIZE_MAX) { u64::from(m.config32(8)) } else { 0 };
    let seg_max = if d.has(F_SEG_MAX) { u64::from(m.config32(12)) } else { 0 };
    let ro = d.has(F_RO);
    let q = match d.queue(0, QUEUE_WANT, arena) {
        Ok(q) => q,
        Err(e) => {
            init_failed(dev, e.name());
            m.reset();
            return None;
        }
    };
    if let Err(e) = d.driver_ok() {
        init_failed(dev, e.name());
        m.reset();
        return None;
    }

    // Request geometry: segments of at most size_max (whole sectors), at most seg_max of
    // them, and a chain that fits the queue with room for MAX_SLOTS requests if possible.
    let mut seg_bytes = REQ_BYTES;
    if size_max >= SECTOR {
        seg_bytes = seg_bytes.min(size_max / SECTOR * SECTOR);
    }
    let mut segs = REQ_BYTES / seg_bytes;
    let max_segs = (MAX_CHAIN as u64 - 2)
        .min(u64::from(q.size).saturating_sub(2).max(1))
        .min(if seg_max > 0 { seg_max } else { u64::MAX });
    segs = segs.clamp(1, max_segs);
    let req_bytes = seg_bytes * segs;
    let nslots = (usize::from(q.size) / (segs as usize + 2)).clamp(1, MAX_SLOTS);
    puts("probe: blk dev=");
    put_dec(dev as u64);
    puts(" features=");
    put_hex(d.features);
    puts(" queue=");
    put_dec(u64::from(q.size));
    puts(" size_max=");
    put_dec(size_max);
    puts(" seg_max=");
    put_dec(seg_max);
    puts(" req_bytes=");
    put_dec(req_bytes);
    puts(" slots=");
    put_dec(nslots as u64);
    puts("\n");

    const NO_SLOT: Slot = Slot { hdr: 0, data: 0, head: None, sector: 0, sectors: 0 };
    let mut disk = Disk {
        index: dev,
        capacity,
        ro,
        dev: d,
        q,
        slots: [NO_SLOT; MAX_SLOTS],
        nslots,
        seg_bytes,
        req_sectors: req_bytes / SECTOR,
    };
    for i in 0..nslots {
        let (Some(hdr), Some(data)) = (arena.alloc(64, 64), arena.alloc(req_bytes, 4096)) else {
            init_failed(dev, "no-memory");
            m.reset();
            return None;
        };
        disk.slots[i].hdr = hdr;
        disk.slots[i].data = data;
    }
    Some(disk)
}

impl Disk {
    /// Status 0: the device lets go of the queue and the buffers.
    pub fn reset(&self) {
        self.dev.mmio.reset();
    }
}

/// The scenario on one open disk: GET_ID, the pattern written, FLUSH, read back and
/// checked, the past-the-end reads; then its `blk:` line.
pub fn exercise(disk: &mut Disk, p: &Params) {
    let (dev, capacity, ro) = (disk.index, disk.capacity, disk.ro);

    // GET_ID: up to 20 bytes, NUL-terminated if shorter.
    let id_buf = disk.slots[0].data;
    crate::virtio::bytes_mut(id_buf, 20).fill(0);
    let id_st = {
        let s = &disk.slots[0];
        let words = words_mut(s.hdr, 3);
        words[0] = u64::from(T_GET_ID);
        words[1] = 0;
        words[2] = u64::from(S_UNTOUCHED);
        let head = disk.q.add(&[Buf::ro(s.hdr, 16), Buf::wo(id_buf, 20), Buf::wo(s.hdr + 16, 1)]);
        disk.slots[0].head = head;
        disk.q.kick();
        disk.complete(dev).1
    };
    let mut id = [0u8; 20];
    id.copy_from_slice(crate::virtio::bytes_mut(id_buf, 20));

    let limit_sectors = match p.mib {
        Some(mib) => mib.saturating_mul(1 << 20) / SECTOR,
        None => (DEFAULT_CAP_MIB << 20) / SECTOR,
    };
    let total = capacity.min(limit_sectors);
    let t0 = rdtsc();
    let mut bytes = 0u64;

    // Write phase: the pattern over [0, total), or one write that must fail on a RO disk.
    let mut write = "ok";
    if ro {
        fill_pattern(disk.slots[0].data, 0, 1, p.seed);
        let st = disk.one(dev, T_OUT, 0, SECTOR, false);
        write = status_name(st);
    } else {
        let mut next = 0u64;
        while next < total || disk.q.in_flight() > 0 {
            let mut added = false;
            while next < total {
                let Some(slot) = disk.free_slot() else { break };
                let n = (total - next).min(disk.req_sectors);
                fill_pattern(disk.slots[slot].data, next, n, p.seed);
                disk.submit(slot, T_OUT, next, n * SECTOR, false);
                next += n;
                added = true;
            }
            if added {
                disk.q.kick();
            }
            let (slot, st) = disk.complete(dev);
            if st != S_OK && write == "ok" {
                write = status_name(st);
                puts("probe: blk write failed sector=");
                put_dec(disk.slots[slot].sector);
                puts(" status=");
                put_dec(u64::from(st));
                puts("\n");
            }
            bytes += disk.slots[slot].sectors * SECTOR;
        }
    }

    let flush = if disk.dev.has(F_FLUSH) { status_name(disk.one(dev, T_FLUSH, 0, 0, false)) } else { "none" };

    // Read phase: read back [0, total); check it against the pattern unless the disk is RO.
    let mut read = "ok";
    let mut sum = 0u64;
    let mut next = 0u64;
    while next < total || disk.q.in_flight() > 0 {
        let mut added = false;
        while next < total {
            let Some(slot) = disk.free_slot() else { break };
            let n = (total - next).min(disk.req_sectors);
            disk.submit(slot, T_IN, next, n * SECTOR, true);
            next += n;
            added = true;
        }
        if added {
            disk.q.kick();
        }
        let (slot, st) = disk.complete(dev);
        let s = &disk.slots[slot];
        if st != S_OK {
            if read == "ok" {
                read = status_name(st);
            }
            continue;
        }
        let (h, bad) = sum_and_check(s.data, s.sector, s.sectors, p.seed, !ro);
        sum = sum.wrapping_add(h);
        if let Some(b) = bad {
            if read == "ok" {
                read = "mismatch";
                puts("probe: blk mismatch at sector=");
                put_dec(b);
                puts("\n");
            }
        }
        bytes += s.sectors * SECTOR;
    }
    let cycles = rdtsc().wrapping_sub(t0);

    // Past the end: a read starting at capacity, and one straddling it, must both fail.
    let a = disk.one(dev, T_IN, capacity, SECTOR, true);
    let b = if capacity > 0 { disk.one(dev, T_IN, capacity - 1, 2 * SECTOR, true) } else { S_IOERR };
    let past_end = if a != S_IOERR { status_name(a) } else { status_name(b) };

    puts("blk: dev=");
    put_dec(dev as u64);
    puts(" capacity=");
    put_dec(capacity);
    puts(" ro=");
    put_dec(u64::from(ro));
    puts(" id=");
    if id_st == S_OK {
        let len = id.iter().position(|&c| c == 0).unwrap_or(20);
        let mut shown = [b'-'; 20];
        for (o, &c) in shown.iter_mut().zip(&id[..len]) {
            *o = if c.is_ascii_graphic() { c } else { b'_' };
        }
        put_bytes(&shown[..len.max(1)]);
    } else {
        puts("-");
    }
    puts(" write=");
    puts(write);
    puts(" flush=");
    puts(flush);
    puts(" read=");
    puts(read);
    puts(" past_end=");
    puts(past_end);
    puts(" bytes=");
    put_dec(bytes);
    puts(" cycles=");
    put_dec(cycles);
    puts(" sectors=");
    put_dec(total);
    puts(" sum=");
    put_hex(sum);
    puts("\n");
}

// --- the count log (`probe.log=blk`) ------------------------------------------------------

/// "LEDGELOG" read as a little-endian u64: bytes 0..8 of every log record.
pub const LOG_MAGIC: u64 = u64::from_le_bytes(*b"LEDGELOG");
/// Record words (64-bit little-endian): 0 magic, 1 seq, 2 run id, 3 sector, 4 TSC at write,
/// 5..63 filler `seq ^ run ^ (i * GOLDEN)`, 63 checksum (FNV-1a-64 over words 0..63).
const LOG_CHECKSUM_WORD: usize = WORDS_PER_SECTOR - 1;

/// A disk taking one durable record per count.
pub struct Log {
    disk: Disk,
    pub run: u64,
}

fn log_fail(what: &str, status: Option<u8>) -> ! {
    puts("log: error=");
    puts(what);
    if let Some(s) = status {
        puts("-");
        puts(status_name(s));
    }
    puts("\n");
    stop()
}

impl Log {
    /// Brings up the virtio-blk device at `base` for the log and prints `log: dev=0 ...
    /// ready`; a device that cannot be opened, is read-only, is empty or offers no FLUSH
    /// stops the VM after a `log: error=` line.
    pub fn open(base: u64, arena: &mut Arena, run: u64) -> Log {
        let Some(disk) = open(0, base, arena) else { log_fail("init", None) };
        if disk.ro {
            log_fail("read-only", None);
        }
        if disk.capacity == 0 {
            log_fail("empty", None);
        }
        if !disk.dev.has(F_FLUSH) {
            log_fail("no-flush", None);
        }
        puts("log: dev=0 capacity=");
        put_dec(disk.capacity);
        puts(" run=");
        put_hex(run);
        puts(" ready\n");
        Log { disk, run }
    }

    /// Writes record `seq` into sector `seq % capacity`, then FLUSH; returns once the
    /// device reported both done (the record is on the host's disk).
    pub fn record(&mut self, seq: u64) {
        let sector = seq % self.disk.capacity;
        let w = words_mut(self.disk.slots[0].data, WORDS_PER_SECTOR);
        w[0] = LOG_MAGIC;
        w[1] = seq;
        w[2] = self.run;
        w[3] = sector;
        w[4] = rdtsc();
        for (i, x) in w.iter_mut().enumerate().take(LOG_CHECKSUM_WORD).skip(5) {
            *x = seq ^ self.run ^ (i as u64).wrapping_mul(GOLDEN);
        }
        let mut h = FNV_BASIS;
        for &x in &w[..LOG_CHECKSUM_WORD] {
            h = (h ^ x).wrapping_mul(FNV_PRIME);
        }
        w[LOG_CHECKSUM_WORD] = h;
        let st = self.disk.one(0, T_OUT, sector, SECTOR, false);
        if st != S_OK {
            log_fail("write", Some(st));
        }
        let st = self.disk.one(0, T_FLUSH, 0, 0, false);
        if st != S_OK {
            log_fail("flush", Some(st));
        }
    }
}
