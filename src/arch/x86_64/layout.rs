//! Guest physical memory layout: every guest address Ledge uses, in one place.
//!
//! Why this exists: the kernel loader, the boot-structure writers, the MP table, the vCPU
//! set-up and the device allocator all have to agree on where things live. Keeping every
//! address here (and nowhere else) makes overlaps visible in one screenful and lets the tests
//! below check them.
//!
//! Map (low memory is where the boot structures live; nothing here is below 0x500 so the
//! real-mode IVT and BIOS data area stay zero, as a guest expects):
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)             0x0000_0520  IDT (empty, limit 7)
//! 0x0000_6000  PVH hvm_start_info          0x0000_6040  PVH module list (initrd)
//! 0x0000_6100  PVH memory map              0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8000..0x0000_8ff0  boot stack (grows down from BOOT_STACK_POINTER)
//! 0x0000_9000  PML4   0x0000_a000  PDPT   0x0000_b000..0x0000_efff  4 page directories
//! 0x0002_0000..0x0003_0000  kernel command line
//! 0x0009_fc00..0x000a_0000  EBDA: MP floating pointer + MP config table (e820 reserved)
//! 0x000a_0000..0x0010_0000  legacy VGA/ROM hole (e820 reserved)
//! 0x0010_0000  HIMEM_START: kernel; initrd at the top of low RAM
//! 0xd000_0000..0x1_0000_0000  MMIO gap: virtio-mmio windows upward from 0xd000_0000,
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000, KVM identity map + TSS 0xfffb_c000
//! 0x1_0000_0000  RAM above the gap, if any
//! ```
//!
//! Ordering: `ram_regions` must be used to create guest memory before anything in `boot`
//! writes to it; the e820 map given to the guest is derived from the same numbers so the guest
//! never sees RAM we did not map, and never sees our boot structures in the EBDA as free RAM.

use vm_memory::GuestAddress;

/// Start of the MMIO gap below 4 GiB (3.25 GiB). RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO gap (exclusive): 4 GiB.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; the lead's allocator hands windows out upward from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// The IOAPIC register window (fixed by the in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC register window (fixed by the architecture).
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the real-mode TSS on Intel (`KVM_SET_TSS_ADDR`), inside the gap.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// One page KVM needs for the EPT identity map on Intel (`KVM_SET_IDENTITY_MAP_ADDR`), just
/// below the TSS pages.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;

/// COM1 interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 keyboard (ISA IRQ 1).
pub const I8042_IRQ: u32 = 1;
/// First interrupt line handed to virtio devices.
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// Last interrupt line handed to virtio devices (the IOAPIC has 24 pins).
pub const LAST_DEVICE_IRQ: u32 = 23;
/// Number of IOAPIC pins (and ISA-style interrupt entries in the MP table).
pub const IOAPIC_PINS: u8 = 24;

/// Where high memory starts: the kernel is loaded here (or where its ELF headers say, never
/// lower).
pub const HIMEM_START: u64 = 0x10_0000;

/// Flat-model GDT used at entry (both modes).
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT (the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` (passed in %ebx).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list: one `hvm_modlist_entry` for the initrd.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux zero page (`boot_params`, passed in %rsi).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (Linux 64-bit entry); the stack grows down into 0x8000..0x8ff0.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// First of the page directories (2 MiB pages) of the boot identity mapping.
pub const PDE_START: u64 = 0xb000;
/// How many page directories (each maps 1 GiB): the boot identity map covers 4 GiB, so the
/// kernel, zero page, command line and an initrd anywhere in low RAM are all mapped.
pub const PDE_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Room reserved for the command line (including the terminating NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Extended BIOS data area: start of the 1 KiB where the MP table lives. Linux scans the last
/// KiB of base memory (639 KiB) for the MP floating pointer.
pub const EBDA_START: u64 = 0x9_fc00;
/// Size of the area reserved for the MP table.
pub const EBDA_SIZE: u64 = 0x400;
/// Start of the legacy hole (VGA, option ROMs, BIOS); reserved in e820 like the EBDA.
pub const LEGACY_HOLE_START: u64 = 0xa_0000;

/// Smallest guest memory accepted, in MiB: the kernel starts at 1 MiB and the project's probe
/// guest needs only a few MiB; below 16 MiB nothing useful (no Linux) fits.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest memory accepted, in MiB (64 GiB): an edge micro-VM has no business being
/// bigger, and staying small keeps host reservations and e820/PVH memmap sizes trivially safe.
pub const MAX_MEM_MIB: u64 = 65536;

const MIB: u64 = 1 << 20;
const PAGE_SIZE: u64 = 0x1000;

/// Errors computing the memory layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// Requested memory below the minimum.
    #[error("guest memory of {mib} MiB is too small: use at least {MIN_MEM_MIB} MiB")]
    TooSmall {
        /// Requested size, MiB (rounded down).
        mib: u64,
    },
    /// Requested memory above the maximum.
    #[error("guest memory of {mib} MiB is too large: use at most {MAX_MEM_MIB} MiB")]
    TooLarge {
        /// Requested size, MiB (rounded down).
        mib: u64,
    },
    /// Requested memory not a whole number of pages.
    #[error("guest memory size {bytes:#x} is not a multiple of 4 KiB: round it")]
    Unaligned {
        /// Requested size, bytes.
        bytes: u64,
    },
    /// A region does not fit in the host's address size.
    #[error("guest memory region of {bytes:#x} bytes does not fit the host address space")]
    HostOverflow {
        /// Region size, bytes.
        bytes: u64,
    },
}

/// Checks a guest memory size against the limits.
pub fn check_mem_size(mem_bytes: u64) -> Result<(), LayoutError> {
    let mib = mem_bytes / MIB;
    if mem_bytes < MIN_MEM_MIB * MIB {
        return Err(LayoutError::TooSmall { mib });
    }
    if mem_bytes > MAX_MEM_MIB * MIB {
        return Err(LayoutError::TooLarge { mib });
    }
    if !mem_bytes.is_multiple_of(PAGE_SIZE) {
        return Err(LayoutError::Unaligned { bytes: mem_bytes });
    }
    Ok(())
}

/// The RAM regions for `mem_bytes` of guest memory: one below the MMIO gap and, when memory
/// does not fit there, a second starting at 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Result<Vec<(GuestAddress, usize)>, LayoutError> {
    check_mem_size(mem_bytes)?;
    let to_usize =
        |bytes: u64| usize::try_from(bytes).map_err(|_| LayoutError::HostOverflow { bytes });
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), to_usize(low)?)];
    let high = mem_bytes - low;
    if high > 0 {
        regions.push((GuestAddress(MMIO_GAP_END), to_usize(high)?));
    }
    Ok(regions)
}

/// End (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// Kind of an e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram,
    /// Reserved: the guest must not use it as RAM.
    Reserved,
}

impl E820Kind {
    /// The numeric type both e820 and the PVH memmap use (1 = RAM, 2 = reserved).
    pub fn code(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }
}

/// One entry of the memory map given to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// RAM or reserved.
    pub kind: E820Kind,
}

/// The memory map described to the guest (zero page e820 table and PVH memmap alike):
/// `[0, EBDA)` RAM, `EBDA..1 MiB` reserved (keeps the MP table and legacy hole safe),
/// `1 MiB..low end` RAM, and RAM above 4 GiB if any. Sizes outside
/// [`MIN_MEM_MIB`, `MAX_MEM_MIB`] are not rejected here (see [`ram_regions`]); empty entries
/// are left out.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = Vec::with_capacity(4);
    let mut push = |addr: u64, end: u64, kind: E820Kind| {
        if end > addr {
            map.push(E820Entry {
                addr,
                size: end - addr,
                kind,
            });
        }
    };
    let low_end = low_ram_end(mem_bytes);
    push(0, EBDA_START.min(low_end), E820Kind::Ram);
    push(EBDA_START, HIMEM_START, E820Kind::Reserved);
    push(HIMEM_START, low_end, E820Kind::Ram);
    if mem_bytes > MMIO_GAP_START {
        push(
            MMIO_GAP_END,
            MMIO_GAP_END.saturating_add(mem_bytes - MMIO_GAP_START),
            E820Kind::Ram,
        );
    }
    map
}

// Compile-time checks that the boot structures do not overlap one another.
const _: () = {
    assert!(BOOT_GDT_START + 4 * 8 <= BOOT_IDT_START);
    assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
    assert!(PVH_INFO_START + 56 <= PVH_MODLIST_START);
    assert!(PVH_MODLIST_START + 32 <= PVH_MEMMAP_START);
    assert!(PVH_MEMMAP_MAX_ENTRIES >= 8);
    assert!(ZERO_PAGE_START + 4096 <= 0x8000);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PML4_START + PAGE_SIZE <= PDPTE_START);
    assert!(PDPTE_START + PAGE_SIZE <= PDE_START);
    assert!(PDE_START + PDE_COUNT * PAGE_SIZE <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(EBDA_START + EBDA_SIZE == LEGACY_HOLE_START);
    assert!(LEGACY_HOLE_START < HIMEM_START);
    assert!(HIMEM_START + MIN_MEM_MIB * MIB <= MMIO_GAP_START);
    assert!(VIRTIO_MMIO_START >= MMIO_GAP_START);
    assert!(IOAPIC_START > VIRTIO_MMIO_START && APIC_START > IOAPIC_START);
    assert!(KVM_IDENTITY_MAP_START + PAGE_SIZE == KVM_TSS_START);
    assert!(KVM_TSS_START + 3 * PAGE_SIZE <= MMIO_GAP_END);
    assert!(KVM_IDENTITY_MAP_START > APIC_START + PAGE_SIZE);
    assert!(FIRST_DEVICE_IRQ > SERIAL_IRQ && LAST_DEVICE_IRQ < IOAPIC_PINS as u32);
};

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn regions(mem: u64) -> Vec<(u64, usize)> {
        ram_regions(mem)
            .unwrap()
            .into_iter()
            .map(|(a, s)| (a.0, s))
            .collect()
    }

    #[test]
    fn ram_regions_small_and_at_gap() {
        assert_eq!(regions(64 * MIB), vec![(0, 64 << 20)]);
        assert_eq!(regions(2 * GIB), vec![(0, 2 << 30)]);
        // Exactly the gap start: all of it below the gap, no high region.
        assert_eq!(regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START as usize)]);
    }

    #[test]
    fn ram_regions_above_gap() {
        assert_eq!(
            regions(4 * GIB),
            vec![
                (0, MMIO_GAP_START as usize),
                (MMIO_GAP_END, (4 * GIB - MMIO_GAP_START) as usize)
            ]
        );
        assert_eq!(
            regions(8 * GIB),
            vec![
                (0, MMIO_GAP_START as usize),
                (MMIO_GAP_END, (8 * GIB - MMIO_GAP_START) as usize)
            ]
        );
        // Total always equals the request.
        for mem in [64 * MIB, MMIO_GAP_START, 4 * GIB, 8 * GIB] {
            let total: usize = regions(mem).iter().map(|r| r.1).sum();
            assert_eq!(total as u64, mem);
        }
    }

    #[test]
    fn ram_regions_rejects_bad_sizes() {
        assert_eq!(ram_regions(8 * MIB), Err(LayoutError::TooSmall { mib: 8 }));
        assert_eq!(
            ram_regions(MAX_MEM_MIB * MIB + PAGE_SIZE),
            Err(LayoutError::TooLarge { mib: MAX_MEM_MIB })
        );
        assert_eq!(
            ram_regions(64 * MIB + 1),
            Err(LayoutError::Unaligned {
                bytes: 64 * MIB + 1
            })
        );
        assert!(ram_regions(MIN_MEM_MIB * MIB).is_ok());
        assert!(ram_regions(MAX_MEM_MIB * MIB).is_ok());
        assert_eq!(
            LayoutError::TooSmall { mib: 8 }.to_string(),
            "guest memory of 8 MiB is too small: use at least 16 MiB"
        );
    }

    fn e(addr: u64, end: u64, kind: E820Kind) -> E820Entry {
        E820Entry {
            addr,
            size: end - addr,
            kind,
        }
    }

    #[test]
    fn e820_low_only() {
        for mem in [64 * MIB, 2 * GIB, MMIO_GAP_START] {
            assert_eq!(
                e820_map(mem),
                vec![
                    e(0, EBDA_START, E820Kind::Ram),
                    e(EBDA_START, HIMEM_START, E820Kind::Reserved),
                    e(HIMEM_START, mem, E820Kind::Ram),
                ]
            );
        }
    }

    #[test]
    fn e820_with_high_ram() {
        for mem in [4 * GIB, 8 * GIB] {
            assert_eq!(
                e820_map(mem),
                vec![
                    e(0, EBDA_START, E820Kind::Ram),
                    e(EBDA_START, HIMEM_START, E820Kind::Reserved),
                    e(HIMEM_START, MMIO_GAP_START, E820Kind::Ram),
                    e(
                        MMIO_GAP_END,
                        mem + (MMIO_GAP_END - MMIO_GAP_START),
                        E820Kind::Ram
                    ),
                ]
            );
        }
    }

    #[test]
    fn e820_ram_matches_regions() {
        // Every RAM byte in the e820 map is backed by a region, and the only region bytes
        // missing from the map's RAM are the reserved EBDA..1 MiB.
        for mem in [64 * MIB, MMIO_GAP_START, 4 * GIB, 8 * GIB] {
            let ram: u64 = e820_map(mem)
                .iter()
                .filter(|e| e.kind == E820Kind::Ram)
                .map(|e| e.size)
                .sum();
            assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
            for entry in e820_map(mem).iter().filter(|e| e.kind == E820Kind::Ram) {
                assert!(regions(mem)
                    .iter()
                    .any(|&(a, s)| entry.addr >= a && entry.addr + entry.size <= a + s as u64));
            }
        }
    }

    #[test]
    fn e820_never_panics_on_odd_sizes() {
        assert_eq!(e820_map(0).len(), 1); // just the reserved hole
        assert!(!e820_map(u64::MAX).is_empty());
    }
}
