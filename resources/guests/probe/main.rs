//! Ledge probe guest: a tiny PVH unikernel that reports what the VMM gave it on COM1.
//!
//! boot.s does the ring-0 minimum and enters `probe_main` in ring 3 (IOPL=3, IF=0), where
//! everything else runs at native speed even when ring 0 is emulated (kvm-pvm). The report
//! format is in README.md; tests parse it, so change both together.
//!
//! Ordering in `probe_main`: build the IDT first (nothing may trap before), copy the boot
//! data out of low memory, parse the MP table, and only then write the AP trampoline.

#![no_std]
#![no_main]

mod blk;
mod dirty;
mod net;
mod rng;
mod smp;
mod uart;
mod virtio;

use core::arch::{asm, global_asm};
use uart::{put_bytes, put_dec, put_hex, puts};

global_asm!(include_str!("boot.s"), options(att_syntax));

extern "C" {
    static mut idt: [u64; 512];
    static isr_stubs: u8;
    static int_halt: u8;
    static int_triple: u8;
    static int_serial_write: u8;
    static int_outb: u8;
    static int_inb: u8;
    /// End of the image, tables and stacks included (probe.ld).
    static __probe_end: u8;
}

const START_INFO_MAGIC: u32 = 0x336e_c578;
const CMDLINE_MAX: usize = 4096;
const MEMMAP_MAX: usize = 128;
const VIRTIO_MAX: usize = 32;
const VIRTIO_MAGIC: u32 = 0x7472_6976; // "virt"
/// End of the identity map built by boot.s.
const MAPPED_END: u64 = 0x1_0000_0000;
/// Delay between two `count:` lines: at most ~100 lines/s up to a 3 GHz TSC.
const COUNT_DELAY: u64 = 30_000_000;
/// Device memory (virtqueues, buffers) starts at the first MiB boundary past the image.
const ARENA_ALIGN: u64 = 1 << 20;
/// Without a memory map, assume this much RAM past the image.
const ARENA_DEFAULT: u64 = 16 << 20;
/// `probe=dirty` without `probe.dirty-mib=`.
const DIRTY_DEFAULT_MIB: u64 = 16;
/// `probe=blk` drives at most this many disks.
const MAX_DISKS: usize = 8;

// --- physical memory (identity-mapped, user-accessible) --------------------------------

pub fn peek8(addr: u64) -> u8 {
    // SAFETY: 0-4 GiB is identity-mapped; callers only pass addresses they got from the
    // VMM's boot data or the MP search ranges. Unaligned reads are fine on x86.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub fn peek16(addr: u64) -> u16 {
    u16::from_le_bytes([peek8(addr), peek8(addr + 1)])
}

pub fn peek32(addr: u64) -> u32 {
    u32::from(peek16(addr)) | u32::from(peek16(addr + 2)) << 16
}

pub fn peek64(addr: u64) -> u64 {
    u64::from(peek32(addr)) | u64::from(peek32(addr + 4)) << 32
}

fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller checked that addr is 4-aligned and below MAPPED_END.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects; CR4.TSD is clear so ring 3 may use it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

// --- the few libc symbols rustc may call -----------------------------------------------

/// # Safety
/// Standard memcpy contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid; rep movsb runs in ring 3.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard memmove contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst is below src or the ranges are disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    let mut i = n;
    while i > 0 {
        i -= 1;
        // SAFETY: i < n; volatile keeps this loop from becoming a memmove call.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
    dst
}

/// # Safety
/// Standard memset contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard memcmp contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n; volatile keeps this loop from becoming a memcmp call.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// Standard bcmp contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced from the unwind tables of the prebuilt `core` (built with panic=unwind);
/// never called, since the probe aborts on panic and discards .eh_frame.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

// --- traps -----------------------------------------------------------------------------

/// Interrupt gate: 64-bit code selector 0x08, present, `dpl`.
fn set_gate(vector: usize, handler: u64, dpl: u64) {
    let low = (handler & 0xffff)
        | (0x08 << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    // SAFETY: idt is the 4 KiB table loaded by boot.s; ring 3 may write it through the
    // user mapping, and no trap can arrive while it is half-written except a bug.
    unsafe {
        let table = core::ptr::addr_of_mut!(idt);
        core::ptr::write_volatile(&mut (*table)[vector * 2], low);
        core::ptr::write_volatile(&mut (*table)[vector * 2 + 1], handler >> 32);
    }
}

fn build_idt() {
    for v in 0..256 {
        // SAFETY: see set_gate; zero = not present.
        unsafe {
            let table = core::ptr::addr_of_mut!(idt);
            core::ptr::write_volatile(&mut (*table)[v * 2], 0);
            core::ptr::write_volatile(&mut (*table)[v * 2 + 1], 0);
        }
    }
    // SAFETY: only the addresses of symbols defined in boot.s are taken.
    let addr = |sym: &u8| sym as *const u8 as u64;
    // SAFETY: as above.
    let stubs = unsafe { addr(&isr_stubs) };
    for v in 0..32 {
        set_gate(v, stubs + 16 * v as u64, 0);
    }
    // SAFETY: as above.
    unsafe {
        set_gate(0x80, addr(&int_halt), 3);
        set_gate(0x81, addr(&int_triple), 3);
        set_gate(0x82, addr(&int_serial_write), 3);
        set_gate(0x83, addr(&int_outb), 3);
        set_gate(0x84, addr(&int_inb), 3);
    }
}

/// Watches the i8042 keyboard for Ctrl-Alt-Del (set-1 scancodes, as an i8042 translates
/// them): the way a VMM's SendCtrlAltDel reaches a guest with no interrupts enabled.
#[derive(Default)]
struct CtrlAltDel {
    ctrl: bool,
    alt: bool,
    extended: bool,
}

impl CtrlAltDel {
    /// Reads what the keyboard has queued (bounded); true once Ctrl-Alt-Del was pressed.
    fn poll(&mut self) -> bool {
        for _ in 0..16 {
            let status = uart::inb(0x64);
            // No controller (the port floats to all-ones) or nothing waiting.
            if status == 0xff || status & 1 == 0 {
                return false;
            }
            let code = uart::inb(0x60);
            let extended = core::mem::take(&mut self.extended);
            match code {
                0xe0 => self.extended = true,
                0x1d => self.ctrl = true,
                0x9d => self.ctrl = false,
                0x38 => self.alt = true,
                0xb8 => self.alt = false,
                0x53 if extended && self.ctrl && self.alt => return true,
                _ => {}
            }
        }
        false
    }
}

/// Stop the VM: i8042 reset line (Ledge, Firecracker), isa-debug-exit (QEMU), then halt
/// this vCPU in ring 0 for good.
pub fn stop() -> ! {
    uart::outb(0x64, 0xfe);
    uart::outb(0xf4, 0);
    loop {
        // SAFETY: int 0x80 is a DPL-3 gate to a cli/hlt loop; it does not return.
        unsafe { asm!("int 0x80", options(nomem, nostack)) };
    }
}

/// Called by boot.s's isr_common in ring 3 with the saved frame:
/// vector, error code, rip, cs, rflags, rsp, ss.
#[no_mangle]
pub extern "C" fn probe_fault(frame: *const u64) -> ! {
    // SAFETY: frame points to the 7 words isr_common left on the ring-0 stack.
    let f = |i: usize| unsafe { core::ptr::read_volatile(frame.add(i)) };
    puts("probe: exception vector=");
    put_dec(f(0));
    puts(" error=");
    put_hex(f(1));
    puts(" rip=");
    put_hex(f(2));
    puts(" cs=");
    put_hex(f(3));
    puts(" rsp=");
    put_hex(f(5));
    puts("\n");
    stop()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    puts("probe: panic");
    if let Some(loc) = info.location() {
        puts(" at ");
        puts(loc.file());
        puts(":");
        put_dec(u64::from(loc.line()));
    }
    puts("\n");
    stop()
}

// --- boot data ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct MemEntry {
    base: u64,
    size: u64,
    kind: u32,
}

struct BootInfo {
    start_info: u64,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    cmdline_paddr: u64,
    memmap: [MemEntry; MEMMAP_MAX],
    memmap_entries: usize,
    memmap_paddr: u64,
    nr_modules: u64,
    modlist_paddr: u64,
    rsdp_paddr: u64,
}

impl BootInfo {
    fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }
}

fn read_start_info(si: u64) -> BootInfo {
    let mut b = BootInfo {
        start_info: si,
        cmdline: [0; CMDLINE_MAX],
        cmdline_len: 0,
        cmdline_paddr: 0,
        memmap: [MemEntry { base: 0, size: 0, kind: 0 }; MEMMAP_MAX],
        memmap_entries: 0,
        memmap_paddr: 0,
        nr_modules: 0,
        modlist_paddr: 0,
        rsdp_paddr: 0,
    };
    if si == 0 || si >= MAPPED_END || peek32(si) != START_INFO_MAGIC {
        puts("probe: bad start_info at ");
        put_hex(si);
        puts("\n");
        return b;
    }
    let version = peek32(si + 4);
    b.nr_modules = u64::from(peek32(si + 0x0c));
    b.modlist_paddr = peek64(si + 0x10);
    b.cmdline_paddr = peek64(si + 0x18);
    b.rsdp_paddr = peek64(si + 0x20);
    if b.cmdline_paddr != 0 && b.cmdline_paddr < MAPPED_END {
        while b.cmdline_len < CMDLINE_MAX - 1 {
            let c = peek8(b.cmdline_paddr + b.cmdline_len as u64);
            if c == 0 {
                break;
            }
            b.cmdline[b.cmdline_len] = c;
            b.cmdline_len += 1;
        }
    }
    if version >= 1 {
        b.memmap_paddr = peek64(si + 0x28);
        let n = peek32(si + 0x30) as usize;
        if n > MEMMAP_MAX {
            puts("probe: memmap truncated\n");
        }
        if b.memmap_paddr != 0 && b.memmap_paddr < MAPPED_END {
            b.memmap_entries = n.min(MEMMAP_MAX);
            for i in 0..b.memmap_entries {
                let e = b.memmap_paddr + 24 * i as u64;
                b.memmap[i] = MemEntry { base: peek64(e), size: peek64(e + 8), kind: peek32(e + 16) };
            }
        }
    }
    puts("probe: start_info=");
    put_hex(si);
    puts(" version=");
    put_dec(u64::from(version));
    puts(" flags=");
    put_hex(u64::from(peek32(si + 8)));
    puts(" nr_modules=");
    put_dec(b.nr_modules);
    puts(" rsdp=");
    put_hex(b.rsdp_paddr);
    puts("\n");
    for i in 0..b.nr_modules.min(16) {
        let m = b.modlist_paddr + 32 * i;
        if b.modlist_paddr == 0 || m >= MAPPED_END {
            break;
        }
        puts("probe: module paddr=");
        put_hex(peek64(m));
        puts(" size=");
        put_hex(peek64(m + 8));
        puts("\n");
    }
    b
}

/// A free 4 KiB page of RAM below the EBDA for the AP trampoline, avoiding every piece
/// of boot data the VMM placed there.
fn pick_trampoline_page(b: &BootInfo, mp: &smp::MpTable) -> Option<u64> {
    let busy = [
        (b.start_info, 0x38),
        (b.cmdline_paddr, b.cmdline_len as u64 + 1),
        (b.memmap_paddr, 24 * b.memmap_entries as u64),
        (b.modlist_paddr, 32 * b.nr_modules),
        (b.rsdp_paddr, 36),
        (mp.floating, 16),
        (mp.config, mp.config_len),
    ];
    let mut page = 0x1000u64;
    while page + 0x1000 <= 0x9f000 {
        let end = page + 0x1000;
        let free = busy.iter().all(|&(s, l)| l == 0 || s == 0 || s + l <= page || s >= end);
        let ram = b.memmap_entries == 0
            || b.memmap[..b.memmap_entries]
                .iter()
                .any(|e| e.kind == 1 && e.base <= page && end <= e.base + e.size);
        if free && ram {
            return Some(page);
        }
        page += 0x1000;
    }
    None
}

// --- command line ------------------------------------------------------------------------

fn tokens(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    s.split(|c| c.is_ascii_whitespace()).filter(|t| !t.is_empty())
}

fn param<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    tokens(cmdline).filter_map(|t| t.strip_prefix(key)).last()
}

/// Parses a number (`0x` hex or decimal) at the start of `s`; returns it and the rest.
fn parse_num(s: &[u8]) -> Option<(u64, &[u8])> {
    let (radix, digits) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (16, rest),
        _ => (10, s),
    };
    let mut value: u64 = 0;
    let mut n = 0;
    for &c in digits {
        let d = match c {
            b'0'..=b'9' => u64::from(c - b'0'),
            b'a'..=b'f' if radix == 16 => u64::from(c - b'a' + 10),
            b'A'..=b'F' if radix == 16 => u64::from(c - b'A' + 10),
            _ => break,
        };
        value = value.checked_mul(radix)?.checked_add(d)?;
        n += 1;
    }
    if n == 0 {
        return None;
    }
    Some((value, &digits[n..]))
}

/// Like Linux's memparse: a number with an optional K/M/G suffix.
fn parse_size(s: &[u8]) -> Option<(u64, &[u8])> {
    let (v, rest) = parse_num(s)?;
    let (shift, rest) = match rest.first() {
        Some(b'k' | b'K') => (10, &rest[1..]),
        Some(b'm' | b'M') => (20, &rest[1..]),
        Some(b'g' | b'G') => (30, &rest[1..]),
        _ => (0, rest),
    };
    Some((v.checked_shl(shift)?, rest))
}

struct Virtio {
    addr: u64,
    irq: u64,
    /// DeviceID read from the window (0 if unreadable or not virtio).
    device_id: u32,
}

/// `<size>@<addr>:<irq>[:<id>]`
fn parse_virtio(s: &[u8]) -> Option<Virtio> {
    let (_size, rest) = parse_size(s)?;
    let rest = rest.strip_prefix(b"@")?;
    let (addr, rest) = parse_num(rest)?;
    let rest = rest.strip_prefix(b":")?;
    let (irq, rest) = parse_num(rest)?;
    if !rest.is_empty() && rest[0] != b':' {
        return None;
    }
    Some(Virtio { addr, irq, device_id: 0 })
}

// --- the report --------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Hello,
    Count,
    TripleFault,
    Blk,
    NetEcho,
    Rng,
    Dirty,
}

/// A numeric `key=N` from the command line.
fn num_param(cmdline: &[u8], key: &[u8]) -> Option<u64> {
    match param(cmdline, key).map(parse_num) {
        Some(Some((v, b""))) => Some(v),
        Some(_) => {
            puts("probe: bad number for ");
            put_bytes(key);
            puts("\n");
            None
        }
        None => None,
    }
}

/// RAM for device memory: from the first MiB boundary past the image to the end of the RAM
/// entry holding it (below 4 GiB and below any boot module placed there).
fn device_arena(b: &BootInfo) -> virtio::Arena {
    // SAFETY: only the address of the linker symbol is taken.
    let image_end = unsafe { &__probe_end as *const u8 as u64 };
    let start = (image_end + ARENA_ALIGN - 1) & !(ARENA_ALIGN - 1);
    let mut end = if b.memmap_entries == 0 {
        start + ARENA_DEFAULT
    } else {
        b.memmap[..b.memmap_entries]
            .iter()
            .find(|e| e.kind == 1 && e.base <= start && start < e.base + e.size)
            .map_or(start, |e| e.base + e.size)
    };
    end = end.min(MAPPED_END);
    for i in 0..b.nr_modules.min(16) {
        let m = b.modlist_paddr + 32 * i;
        if b.modlist_paddr == 0 || m >= MAPPED_END {
            break;
        }
        let paddr = peek64(m);
        if paddr >= start {
            end = end.min(paddr & !0xfff);
        }
    }
    puts("probe: device memory=");
    put_hex(start);
    puts("-");
    put_hex(end);
    puts("\n");
    virtio::Arena::new(start, end.max(start))
}

/// The first virtio window holding a device of `id`.
fn first_of(virtio: &[Option<Virtio>], id: u32) -> Option<u64> {
    virtio.iter().flatten().find(|v| v.device_id == id).map(|v| v.addr)
}

/// `probe=count` and `probe=dirty`: `count: <n>` lines forever, with the options of README.md
/// (`probe.log=blk`, `probe.net=echo`; `probe.dirty-mib=` and the COM1 commands in dirty mode).
fn counter(boot: &BootInfo, virtio: &[Option<Virtio>], dirty_mode: bool) -> ! {
    let cmdline = boot.cmdline();
    // Tells records of different boots apart; a restored snapshot keeps it.
    let run = rdtsc() | 1;
    let mut arena = None;
    let mut log = None;
    match param(cmdline, b"probe.log=") {
        None => {}
        Some(b"blk") => match first_of(virtio, virtio::ID_BLOCK) {
            Some(addr) => {
                let mem = arena.get_or_insert_with(|| device_arena(boot));
                log = Some(blk::Log::open(addr, mem, run));
            }
            None => {
                puts("log: error=no-device\n");
                stop()
            }
        },
        Some(other) => {
            puts("probe: unknown probe.log=");
            put_bytes(other);
            puts("\n");
        }
    }
    let mut echo = None;
    match param(cmdline, b"probe.net=") {
        None => {}
        Some(b"echo") => match first_of(virtio, virtio::ID_NET) {
            Some(addr) => {
                let mem = arena.get_or_insert_with(|| device_arena(boot));
                echo = Some(net::Echo::open(addr, mem));
            }
            None => {
                puts("net: error=no-device\n");
                stop()
            }
        },
        Some(other) => {
            puts("probe: unknown probe.net=");
            put_bytes(other);
            puts("\n");
        }
    }
    let mut dirty = None;
    if dirty_mode {
        let mib = num_param(cmdline, b"probe.dirty-mib=").unwrap_or(DIRTY_DEFAULT_MIB);
        let mem = arena.get_or_insert_with(|| device_arena(boot));
        dirty = Some(dirty::Dirty::start(mem, mib));
    }

    let mut n = 0u64;
    let mut keys = CtrlAltDel::default();
    loop {
        // The record is on the host's disk before its line is printed.
        if let Some(l) = log.as_mut() {
            l.record(n);
        }
        puts("count: ");
        put_dec(n);
        puts("\n");
        n += 1;
        if keys.poll() {
            puts("probe: ctrl-alt-del\n");
            stop()
        }
        if let Some(d) = dirty.as_mut() {
            for _ in 0..16 {
                let Some(c) = uart::getc() else { break };
                d.command(c);
            }
        }
        let start = rdtsc();
        while rdtsc().wrapping_sub(start) < COUNT_DELAY {
            if let Some(e) = echo.as_mut() {
                // STOP frames are dropped here: the counter does not end.
                let _ = e.poll(u64::MAX);
            }
            core::hint::spin_loop();
        }
    }
}

#[no_mangle]
pub extern "C" fn probe_main(start_info: u64) -> ! {
    build_idt();
    uart::init();
    puts("LEDGE-PROBE start\n");
    let boot = read_start_info(start_info);
    let cmdline = boot.cmdline();
    puts("cmdline: ");
    put_bytes(cmdline);
    puts("\n");

    let mode = match param(cmdline, b"probe=") {
        None | Some(b"hello") => Mode::Hello,
        Some(b"count") => Mode::Count,
        Some(b"triple-fault") => Mode::TripleFault,
        Some(b"blk") => Mode::Blk,
        Some(b"net-echo") => Mode::NetEcho,
        Some(b"rng") => Mode::Rng,
        Some(b"dirty") => Mode::Dirty,
        Some(other) => {
            puts("probe: unknown mode ");
            put_bytes(other);
            puts("\n");
            Mode::Hello
        }
    };
    puts("mode: ");
    puts(match mode {
        Mode::Hello => "hello",
        Mode::Count => "count",
        Mode::TripleFault => "triple-fault",
        Mode::Blk => "blk",
        Mode::NetEcho => "net-echo",
        Mode::Rng => "rng",
        Mode::Dirty => "dirty",
    });
    puts("\n");

    let ram: u64 = boot.memmap[..boot.memmap_entries].iter().filter(|e| e.kind == 1).map(|e| e.size).sum();
    puts("mem: total_mib=");
    put_dec(ram >> 20);
    puts(" entries=");
    put_dec(boot.memmap_entries as u64);
    puts("\n");
    for e in boot.memmap[..boot.memmap_entries].iter() {
        puts("memmap: base=");
        put_hex(e.base);
        puts(" size=");
        put_hex(e.size);
        puts(" type=");
        put_dec(u64::from(e.kind));
        puts("\n");
    }

    let mp = smp::parse();
    let bsp_id = smp::lapic_id();
    puts("probe: bsp apic_id=");
    put_dec(u64::from(bsp_id));
    puts("\n");
    let mut aps = 0;
    if mp.ncpus > 1 {
        match pick_trampoline_page(&boot, &mp) {
            Some(page) => aps = smp::start_aps(&mp, bsp_id, page),
            None => puts("probe: no free page below 1 MiB for the AP trampoline\n"),
        }
    }
    puts("cpus: mp=");
    put_dec(mp.ncpus as u64);
    puts(" online=");
    put_dec(1 + u64::from(aps));
    puts("\n");

    let mut virtio = [const { None }; VIRTIO_MAX];
    let mut nvirtio = 0;
    for t in tokens(cmdline) {
        if let Some(spec) = t.strip_prefix(b"virtio_mmio.device=") {
            match parse_virtio(spec) {
                Some(v) if nvirtio < VIRTIO_MAX => {
                    virtio[nvirtio] = Some(v);
                    nvirtio += 1;
                }
                Some(_) => puts("probe: too many virtio_mmio.device entries\n"),
                None => {
                    puts("probe: bad virtio_mmio.device=");
                    put_bytes(spec);
                    puts("\n");
                }
            }
        }
    }
    puts("virtio: count=");
    put_dec(nvirtio as u64);
    puts("\n");
    for v in virtio[..nvirtio].iter_mut().flatten() {
        let readable = v.addr % 4 == 0 && v.addr + 0x10 <= MAPPED_END;
        let (magic, version, device_id) = if readable {
            (mmio_read32(v.addr), mmio_read32(v.addr + 4), mmio_read32(v.addr + 8))
        } else {
            puts("probe: virtio window not mapped or misaligned\n");
            (0, 0, 0)
        };
        puts("virtio: addr=");
        put_hex(v.addr);
        puts(" irq=");
        put_dec(v.irq);
        puts(" magic=");
        puts(if magic == VIRTIO_MAGIC { "ok" } else { "bad" });
        puts(" version=");
        put_dec(u64::from(version));
        puts(" device_id=");
        put_dec(u64::from(device_id));
        // What this driver would negotiate: the offered bits it knows (VERSION_1 always).
        let features = if magic == VIRTIO_MAGIC && version == 2 {
            v.device_id = device_id;
            let m = virtio::Mmio { base: v.addr };
            m.device_features() & virtio::wanted_features(device_id)
        } else {
            0
        };
        puts(" features=");
        put_hex(features);
        puts("\n");
    }
    puts("LEDGE-PROBE done\n");

    match mode {
        Mode::Hello => stop(),
        Mode::Blk => {
            let arena = device_arena(&boot);
            let p = blk::Params {
                seed: num_param(cmdline, b"blk_seed=").unwrap_or(1),
                mib: num_param(cmdline, b"blk_mib="),
            };
            let rounds = num_param(cmdline, b"blk_rounds=").unwrap_or(1).max(1);
            let serial = num_param(cmdline, b"blk_serial=") == Some(1);
            let mut addrs = [0u64; MAX_DISKS];
            let mut n = 0;
            for v in virtio[..nvirtio].iter().flatten().filter(|v| v.device_id == virtio::ID_BLOCK) {
                if n == MAX_DISKS {
                    puts("probe: blk: only the first 8 disks are used\n");
                    break;
                }
                addrs[n] = v.addr;
                n += 1;
            }
            for round in 0..rounds {
                // The first round brings every disk up before any is used (all live at
                // once), the next takes them one at a time in reverse order (up, used,
                // reset, next), and so on; `blk_serial=1` starts with one at a time. Each
                // disk is reset when done, so the next one reuses the same memory.
                let mut mem = arena;
                if (round % 2 == 1) == serial {
                    let mut disks = [const { None }; MAX_DISKS];
                    for (i, d) in disks[..n].iter_mut().enumerate() {
                        *d = blk::open(i, addrs[i], &mut mem);
                    }
                    for d in disks[..n].iter_mut().flatten() {
                        blk::exercise(d, &p);
                    }
                    for d in disks[..n].iter().flatten() {
                        d.reset();
                    }
                } else {
                    for i in (0..n).rev() {
                        if let Some(mut d) = blk::open(i, addrs[i], &mut mem) {
                            blk::exercise(&mut d, &p);
                            d.reset();
                        }
                        mem = arena;
                    }
                }
                if rounds > 1 {
                    puts("blk: round=");
                    put_dec(round + 1);
                    puts("\n");
                }
            }
            puts("blk: devices=");
            put_dec(n as u64);
            puts("\n");
            stop()
        }
        Mode::NetEcho => match first_of(&virtio[..nvirtio], virtio::ID_NET) {
            Some(addr) => {
                let frames = num_param(cmdline, b"net_frames=").unwrap_or(10_000);
                net::run(addr, device_arena(&boot), frames)
            }
            None => {
                puts("net: error=no-device\n");
                stop()
            }
        },
        Mode::Rng => match first_of(&virtio[..nvirtio], virtio::ID_RNG) {
            Some(addr) => rng::run(addr, device_arena(&boot)),
            None => {
                puts("rng: error=no-device\n");
                stop()
            }
        },
        Mode::Count | Mode::Dirty => counter(&boot, &virtio[..nvirtio], mode == Mode::Dirty),
        Mode::TripleFault => {
            puts("probe: triple-fault now\n");
            // SAFETY: int 0x81 is a DPL-3 gate that triple-faults the vCPU.
            unsafe { asm!("int 0x81", options(nomem, nostack)) };
            puts("probe: triple fault did not happen\n");
            stop()
        }
    }
}
