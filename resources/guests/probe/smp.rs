//! The MP table (what the VMM says about the CPUs) and AP bring-up with INIT/SIPI/SIPI
//! through the local APIC, all from ring 3 through the identity map.
//!
//! Ordering: the caller copies everything it needs out of low memory (start info, command
//! line, memory map) and parses the MP table before `start_aps` writes the trampoline
//! page, so the page may reuse memory the VMM used for boot data.

use crate::uart::{put_dec, put_hex, puts};
use crate::{peek16, peek32, peek8, rdtsc};
use core::sync::atomic::{AtomicU32, Ordering};

const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LO: u64 = 0x300;
const LAPIC_ICR_HI: u64 = 0x310;
const ICR_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 0x4500; // INIT, level assert, edge
const ICR_SIPI: u32 = 0x4600; // start-up, level assert, edge

/// Fixed cycle counts: the TSC frequency is not known and KVM does not need real delays.
const INIT_DELAY: u64 = 10_000_000;
const SIPI_DELAY: u64 = 1_000_000;
const ONLINE_TIMEOUT: u64 = 4_000_000_000;

pub const MAX_CPUS: usize = 256;

extern "C" {
    static ap_online: AtomicU32;
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

pub struct MpTable {
    /// Physical address of the "_MP_" floating pointer, 0 if none was found.
    pub floating: u64,
    /// Physical address of the "PCMP" configuration table, 0 if none.
    pub config: u64,
    pub config_len: u64,
    /// Processor entries: (local APIC id, cpu flags).
    pub cpus: [(u8, u8); MAX_CPUS],
    pub ncpus: usize,
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(peek8(addr + i));
    }
    sum == 0
}

fn find_floating() -> u64 {
    let ebda = u64::from(peek16(0x40e)) << 4;
    let mut ranges = [(0x9fc00u64, 0xa0000u64), (0xf0000, 0x100000), (0, 0)];
    if (0x80000..0xa0000).contains(&ebda) {
        ranges[2] = (ebda, ebda + 1024);
    }
    for &(start, end) in ranges.iter() {
        let mut addr = start;
        while addr + 16 <= end {
            if peek32(addr) == u32::from_le_bytes(*b"_MP_") {
                let len = u64::from(peek8(addr + 8)) * 16;
                if len >= 16 && checksum_ok(addr, len) {
                    return addr;
                }
            }
            addr += 16;
        }
    }
    0
}

/// Finds and parses the MP table, printing `probe:` lines about what it found.
pub fn parse() -> MpTable {
    let mut mp = MpTable { floating: 0, config: 0, config_len: 0, cpus: [(0, 0); MAX_CPUS], ncpus: 0 };
    mp.floating = find_floating();
    if mp.floating == 0 {
        puts("probe: mp none\n");
        return mp;
    }
    let config = u64::from(peek32(mp.floating + 4));
    puts("probe: mp floating=");
    put_hex(mp.floating);
    puts(" config=");
    put_hex(config);
    puts("\n");
    if config == 0 || config >= 0x1_0000_0000 || peek32(config) != u32::from_le_bytes(*b"PCMP") {
        puts("probe: mp config table missing\n");
        return mp;
    }
    mp.config = config;
    let len = u64::from(peek16(config + 4));
    mp.config_len = len;
    let count = peek16(config + 34);
    puts("probe: mp length=");
    put_dec(len);
    puts(" entry_count=");
    put_dec(u64::from(count));
    puts(" lapic=");
    put_hex(u64::from(peek32(config + 36)));
    puts(" checksum=");
    puts(if checksum_ok(config, len) { "ok" } else { "bad" });
    puts("\n");

    // Walk by the table's length, as Linux does: some firmware (qboot) leaves the entry
    // count at 0 while listing the entries.
    let end = config + len;
    let mut p = config + 44;
    while p < end {
        let size = match peek8(p) {
            0 => {
                let (id, flags) = (peek8(p + 1), peek8(p + 3));
                if mp.ncpus < MAX_CPUS {
                    mp.cpus[mp.ncpus] = (id, flags);
                    mp.ncpus += 1;
                }
                puts("probe: mp cpu apic_id=");
                put_dec(u64::from(id));
                puts(" enabled=");
                put_dec(u64::from(flags & 1));
                puts(" bsp=");
                put_dec(u64::from((flags >> 1) & 1));
                puts("\n");
                20
            }
            2 => {
                puts("probe: mp ioapic id=");
                put_dec(u64::from(peek8(p + 1)));
                puts(" addr=");
                put_hex(u64::from(peek32(p + 4)));
                puts("\n");
                8
            }
            1 | 3 | 4 => 8,
            other => {
                puts("probe: mp unknown entry type ");
                put_dec(u64::from(other));
                puts("\n");
                break;
            }
        };
        p += size;
    }
    mp
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the LAPIC page is identity-mapped and user-accessible; aligned MMIO read.
    unsafe { core::ptr::read_volatile((LAPIC_BASE + reg) as *const u32) }
}

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: as in lapic_read.
    unsafe { core::ptr::write_volatile((LAPIC_BASE + reg) as *mut u32, value) }
}

pub fn lapic_id() -> u8 {
    (lapic_read(LAPIC_ID) >> 24) as u8
}

fn delay(cycles: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}

fn send_ipi(apic_id: u8, icr: u32) {
    lapic_write(LAPIC_ICR_HI, u32::from(apic_id) << 24);
    lapic_write(LAPIC_ICR_LO, icr);
    let mut spins = 0;
    while lapic_read(LAPIC_ICR_LO) & ICR_PENDING != 0 && spins < 1_000_000 {
        spins += 1;
        core::hint::spin_loop();
    }
}

pub fn online_aps() -> u32 {
    // SAFETY: ap_online is a 4-byte-aligned u32 in .data, only ever accessed atomically.
    unsafe { ap_online.load(Ordering::SeqCst) }
}

/// Copies the trampoline to `page` (4 KiB-aligned, below 1 MiB) and starts every enabled
/// non-BSP CPU of the MP table. Returns how many APs came up before the timeout.
pub fn start_aps(mp: &MpTable, bsp_id: u8, page: u64) -> u32 {
    // SAFETY: the two symbols bound the trampoline code in .text; `page` is RAM the
    // caller checked is unused, and 4 KiB is far more than the trampoline.
    unsafe {
        let start = &ap_tramp_start as *const u8;
        let len = (&ap_tramp_end as *const u8 as usize) - (start as usize);
        core::ptr::copy_nonoverlapping(start, page as *mut u8, len);
    }
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff);

    let mut targets = 0u32;
    for &(id, flags) in mp.cpus[..mp.ncpus].iter() {
        if flags & 1 == 0 || flags & 2 != 0 || id == bsp_id {
            continue;
        }
        send_ipi(id, ICR_INIT);
        targets += 1;
    }
    if targets == 0 {
        return 0;
    }
    delay(INIT_DELAY);
    let vector = (page >> 12) as u32;
    for _ in 0..2 {
        for &(id, flags) in mp.cpus[..mp.ncpus].iter() {
            if flags & 1 == 0 || flags & 2 != 0 || id == bsp_id {
                continue;
            }
            send_ipi(id, ICR_SIPI | vector);
        }
        delay(SIPI_DELAY);
    }
    let start = rdtsc();
    while online_aps() < targets && rdtsc().wrapping_sub(start) < ONLINE_TIMEOUT {
        core::hint::spin_loop();
    }
    let up = online_aps();
    puts("probe: smp trampoline=");
    put_hex(page);
    puts(" started=");
    put_dec(u64::from(targets));
    puts(" online_aps=");
    put_dec(u64::from(up));
    puts(" cycles=");
    put_dec(rdtsc().wrapping_sub(start));
    if up < targets {
        puts(" timeout");
    }
    puts("\n");
    up
}
