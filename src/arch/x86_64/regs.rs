//! Entry state of a vCPU: general registers, segment/control registers, FPU and local APIC,
//! and the in-memory tables (GDT, IDT, identity page tables) that state points at.
//!
//! Why this exists: Ledge has no firmware, so the vCPU must start already in the state a
//! kernel's entry point expects:
//! - **Linux 64-bit boot protocol**: long mode, paging on with an identity map (we map the
//!   first 4 GiB with 2 MiB pages), flat 64-bit code and data segments from a GDT in guest
//!   memory, `rip` = 64-bit entry, `rsi` = zero page, a usable stack, interrupts off.
//! - **PVH** (Xen `hvm_start_info` ABI, Linux `arch/x86/platform/pvh`): 32-bit protected
//!   mode, paging off, flat 4 GiB code/data segments, `CR0.PE` (+`ET`), `rip` = the
//!   `XEN_ELFNOTE_PHYS32_ENTRY` address, `rbx` = the start info, interrupts off.
//!
//! The GDT is described once ([`gdt`]) and used twice: written to guest memory by
//! [`write_boot_tables`] and turned into the hidden segment state by [`setup_sregs`], so the
//! two can never disagree.
//!
//! Ordering: `write_boot_tables` runs on the memory side (from `boot::load`) before the vCPU
//! first runs; `setup_lapic` needs the in-kernel irqchip, i.e. `configure_vm` before the vCPU
//! is created.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_COUNT, PDE_START, PDPTE_START,
    PML4_START,
};
use crate::boot::{BootSetup, EntryMode};

/// CR0: protection enable.
pub const X86_CR0_PE: u64 = 1;
/// CR0: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// GDT selector of the code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// GDT selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// GDT selector of the task state segment.
pub const TSS_SELECTOR: u16 = 0x18;
/// Number of GDT entries (null, code, data, TSS).
pub const GDT_ENTRIES: usize = 4;

/// Page-table entry flags: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry flags: present, writable, 2 MiB page.
const PDE_HUGE: u64 = 0x83;

/// Errors setting up vCPU registers or boot tables.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Reading the segment/control registers failed.
    #[error("cannot read the vcpu special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// Setting the segment/control registers failed.
    #[error("cannot set the vcpu special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// Setting the general registers failed.
    #[error("cannot set the vcpu general registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// Setting the FPU state failed.
    #[error("cannot set the vcpu fpu state")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// Reading the local APIC failed (no in-kernel irqchip?).
    #[error("cannot read the local apic: create the irqchip before the vcpu")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// Writing the local APIC failed.
    #[error("cannot set the local apic")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// A boot table does not fit in guest memory.
    #[error("cannot write the boot {what} to guest memory")]
    WriteTable {
        /// Which table.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Encodes a segment descriptor from its flags (access byte in the low 8 bits, granularity
/// nibble in bits 12..16), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The GDT for an entry mode: null, code, data, TSS.
pub fn gdt(mode: EntryMode) -> [u64; GDT_ENTRIES] {
    match mode {
        EntryMode::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code: G, L, P, S, execute/read, accessed
            gdt_entry(0xc093, 0, 0xfffff), // data: G, D/B, P, S, read/write, accessed
            gdt_entry(0x808b, 0, 0xfffff), // TSS: busy 64-bit TSS
        ],
        EntryMode::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit flat code: G, D/B
            gdt_entry(0xc093, 0, 0xfffff), // 32-bit flat data
            gdt_entry(0x008b, 0, 0x67),    // TSS: busy 32-bit TSS, byte granular
        ],
    }
}

/// The hidden segment state KVM loads for a descriptor and selector. The limit is given in
/// bytes (scaled by the granularity bit), as KVM expects.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write_table<M: GuestMemoryBackend, T: vm_memory::ByteValued>(
    mem: &M,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| RegsError::WriteTable { what, source })
}

/// Writes the GDT and empty IDT for `mode`, and for [`EntryMode::Linux64`] the identity page
/// tables covering the first `PDE_COUNT` GiB with 2 MiB pages.
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M, mode: EntryMode) -> Result<(), RegsError> {
    write_table(mem, "gdt", BOOT_GDT_START, gdt(mode))?;
    write_table(mem, "idt", BOOT_IDT_START, 0u64)?;
    if mode == EntryMode::Linux64 {
        write_table(mem, "page tables", PML4_START, PDPTE_START | PTE_PRESENT_RW)?;
        for dir in 0..PDE_COUNT {
            let pd = PDE_START + dir * 0x1000;
            write_table(
                mem,
                "page tables",
                PDPTE_START + dir * 8,
                pd | PTE_PRESENT_RW,
            )?;
            let mut entries = [0u64; 512];
            for (i, e) in entries.iter_mut().enumerate() {
                *e = ((dir * 512 + i as u64) << 21) | PDE_HUGE;
            }
            mem.write_slice(
                // 512 u64 → 4096 bytes, little-endian as x86 reads them
                &entries
                    .iter()
                    .flat_map(|e| e.to_le_bytes())
                    .collect::<Vec<u8>>(),
                GuestAddress(pd),
            )
            .map_err(|source| RegsError::WriteTable {
                what: "page tables",
                source,
            })?;
        }
    }
    Ok(())
}

/// The special registers for `mode`, starting from the vCPU's current ones.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let table = gdt(mode);
    let code = segment_from_gdt(table[1], CODE_SELECTOR);
    let data = segment_from_gdt(table[2], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(table[3], TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    match mode {
        EntryMode::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// The general registers for a boot setup.
pub fn boot_regs(boot: &BootSetup) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // reserved bit 1; interrupts off
        rip: boot.entry.0,
        ..Default::default()
    };
    match boot.mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = boot.boot_info.0;
        }
        EntryMode::Pvh => {
            regs.rbx = boot.boot_info.0;
        }
    }
    regs
}

/// Sets segment and control registers for `mode`.
pub fn setup_sregs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&boot_sregs(sregs, mode))
        .map_err(RegsError::SetSregs)
}

/// Sets the general registers for `boot`.
pub fn setup_regs(vcpu: &VcpuFd, boot: &BootSetup) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(boot)).map_err(RegsError::SetRegs)
}

/// Sets the FPU to its power-on control words (x87 all exceptions masked, SSE likewise).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Local APIC LVT LINT0 register offset.
pub const APIC_LVT0: usize = 0x350;
/// Local APIC LVT LINT1 register offset.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = regs[off + i] as u8;
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, val: u32) {
    for (i, byte) in val.to_le_bytes().iter().enumerate() {
        regs[off + i] = *byte as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 as ExtINT (the PIC, virtual-wire mode) and LINT1 as NMI, as the MP table says.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    let lint0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

/// Reads LINT0 and LINT1 back (for tests and diagnostics).
pub fn lapic_lints(vcpu: &VcpuFd) -> Result<(u32, u32), RegsError> {
    let lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    Ok((
        lapic_reg(&lapic.regs, APIC_LVT0),
        lapic_reg(&lapic.regs, APIC_LVT1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_decode() {
        let t = gdt(EntryMode::Linux64);
        assert_eq!(t[1], 0x00af_9b00_0000_ffff);
        assert_eq!(t[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(t[1], CODE_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.type_, cs.s, cs.present, cs.g),
            (1, 0, 0xb, 1, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let tr = segment_from_gdt(t[3], TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));

        let p = gdt(EntryMode::Pvh);
        let cs = segment_from_gdt(p[1], CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.base, cs.limit), (0, 1, 0, 0xffff_ffff));
        let ds = segment_from_gdt(p[2], DATA_SELECTOR);
        assert_eq!((ds.type_, ds.db, ds.limit), (3, 1, 0xffff_ffff));
        let tr = segment_from_gdt(p[3], TSS_SELECTOR);
        assert_eq!((tr.limit, tr.g, tr.type_), (0x67, 0, 0xb));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn boot_tables_in_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::Linux64).unwrap();
        let gdt_mem: [u64; 4] = mem.read_obj(GuestAddress(BOOT_GDT_START)).unwrap();
        assert_eq!(gdt_mem, gdt(EntryMode::Linux64));
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for dir in 0..PDE_COUNT {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + dir * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + dir * 0x1000) | 3);
        }
        let first: u64 = mem.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(first, 0x83);
        // Last 2 MiB page of the 4th GiB.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + PDE_COUNT * 0x1000 - 8))
            .unwrap();
        assert_eq!(last, (PDE_COUNT * (1 << 30) - (2 << 20)) | 0x83);

        write_boot_tables(&mem, EntryMode::Pvh).unwrap();
        let gdt_mem: [u64; 4] = mem.read_obj(GuestAddress(BOOT_GDT_START)).unwrap();
        assert_eq!(gdt_mem, gdt(EntryMode::Pvh));
    }

    #[test]
    fn boot_tables_need_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = write_boot_tables(&mem, EntryMode::Linux64).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot write the boot page tables to guest memory"
        );
    }

    #[test]
    fn lint_modes() {
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        assert_eq!(with_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0xdead_beef);
        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0xdead_beef);
    }
}
