//! The Intel MultiProcessor Specification (1.4) table: how a guest without ACPI finds its CPUs,
//! its IOAPIC and how ISA interrupts are wired.
//!
//! Why this exists: Ledge gives the guest no ACPI tables and no BIOS. Linux
//! (`CONFIG_X86_MPPARSE`) and the project's probe guest scan the last KiB of base memory
//! (639 KiB, [`EBDA_START`]) for the `_MP_` floating pointer, which points at the `PCMP`
//! configuration table that follows it.
//!
//! What it describes, matching what `configure_vm`/`configure_vcpu` create:
//! - one processor entry per vCPU, APIC id = vCPU index, vCPU 0 flagged as the BSP;
//! - one ISA bus; the IOAPIC at [`IOAPIC_START`] with an id after the last APIC id;
//! - IOAPIC pins 0–23 wired one-to-one to ISA IRQs 0–23, which is KVM's default GSI routing;
//! - LINT0 as ExtINT (the PIC, virtual-wire mode) and LINT1 as NMI on every local APIC.
//!
//! Ordering: guest memory must exist; the e820 map ([`super::layout::e820_map`]) marks
//! `EBDA..1 MiB` reserved so the guest does not reuse this area as RAM before parsing it. The
//! table is built in a host buffer, checksummed, and written with one checked `write_slice`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{APIC_START, EBDA_SIZE, EBDA_START, IOAPIC_PINS, IOAPIC_START};
use super::MAX_VCPUS;

const FLOATING_POINTER_SIZE: usize = 16;
const CONFIG_HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;

const SPEC_REV: u8 = 4; // MP spec 1.4
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const APIC_VERSION: u8 = 0x14; // integrated xAPIC
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;
/// Family 6 signature and the FPU + APIC feature bits (CPUID 1 EDX bits 0 and 9).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conforms to the bus" (ISA: active high, edge).
const INT_FLAGS_CONFORM: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The vCPU count is zero or above the maximum.
    #[error("cannot describe {0} vcpus in the mp table: use 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// The table does not fit in the reserved EBDA area (a layout bug).
    #[error("mp table of {0} bytes does not fit the reserved ebda area")]
    TooBig(usize),
    /// Guest memory does not cover the EBDA.
    #[error("cannot write the mp table to guest memory at {EBDA_START:#x}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Size in bytes of the floating pointer plus configuration table for `num_vcpus`.
pub fn table_size(num_vcpus: u8) -> usize {
    FLOATING_POINTER_SIZE + CONFIG_HEADER_SIZE + config_entries_size(num_vcpus)
}

fn config_entries_size(num_vcpus: u8) -> usize {
    usize::from(num_vcpus) * PROCESSOR_ENTRY_SIZE
        + SMALL_ENTRY_SIZE // bus
        + SMALL_ENTRY_SIZE // ioapic
        + usize::from(IOAPIC_PINS) * SMALL_ENTRY_SIZE
        + 2 * SMALL_ENTRY_SIZE // LINT0, LINT1
}

// The table for the largest VM must fit the reserved KiB.
const _: () = assert!(
    FLOATING_POINTER_SIZE
        + CONFIG_HEADER_SIZE
        + MAX_VCPUS as usize * PROCESSOR_ENTRY_SIZE
        + (4 + IOAPIC_PINS as usize) * SMALL_ENTRY_SIZE
        <= EBDA_SIZE as usize
);

/// Two's-complement checksum: the byte that makes `bytes` (with it) sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table as they must appear at [`EBDA_START`].
pub fn build(num_vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_vcpus == 0 || num_vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(num_vcpus));
    }
    let size = table_size(num_vcpus);
    if size as u64 > EBDA_SIZE {
        return Err(MptableError::TooBig(size));
    }
    let config_addr = EBDA_START + FLOATING_POINTER_SIZE as u64;
    let ioapic_id = num_vcpus; // first id after the local APICs

    // Configuration table entries.
    let mut entries = Vec::with_capacity(config_entries_size(num_vcpus));
    let mut entry_count: u16 = 0;
    for cpu in 0..num_vcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, pin, ioapic_id, pin]);
        entry_count += 1;
    }
    for (lint, kind) in [(0u8, INT_TYPE_EXTINT), (1u8, INT_TYPE_NMI)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
        entry_count += 1;
    }

    // Configuration table header.
    let config_len = CONFIG_HEADER_SIZE + entries.len();
    let config_len_u16 = u16::try_from(config_len).map_err(|_| MptableError::TooBig(size))?;
    let mut config = Vec::with_capacity(config_len);
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&config_len_u16.to_le_bytes());
    config.push(SPEC_REV);
    config.push(0); // checksum, patched below
    config.extend_from_slice(b"LEDGE   "); // OEM id, 8 bytes
    config.extend_from_slice(b"MICROVM     "); // product id, 12 bytes
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&entry_count.to_le_bytes());
    config.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    config.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    config.push(0); // extended table checksum
    config.push(0); // reserved
    debug_assert_eq!(config.len(), CONFIG_HEADER_SIZE);
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    // Floating pointer.
    let mut table = Vec::with_capacity(size);
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&(config_addr as u32).to_le_bytes());
    table.push(1); // length in 16-byte paragraphs
    table.push(SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(&[0; 5]); // feature bytes: config table present, virtual wire
    debug_assert_eq!(table.len(), FLOATING_POINTER_SIZE);
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

/// Writes the MP floating pointer and configuration table for `num_vcpus` into the reserved
/// EBDA area of guest memory.
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, num_vcpus: u8) -> Result<(), MptableError> {
    let table = build(num_vcpus)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::memory::GuestMemoryMmap;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, 4, 31, MAX_VCPUS] {
            let m = mem();
            write_mptable(&m, n).unwrap();
            let mut t = vec![0u8; table_size(n)];
            m.read_slice(&mut t, GuestAddress(EBDA_START)).unwrap();

            // Floating pointer.
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            assert_eq!(u32_at(&t, 4) as u64, EBDA_START + 16);
            assert_eq!(t[8], 1);
            assert_eq!(t[9], 4);

            // Configuration table.
            let c = &t[16..];
            assert_eq!(&c[0..4], b"PCMP");
            let len = u16_at(c, 4) as usize;
            assert_eq!(len, c.len());
            assert_eq!(sum(&c[..len]), 0);
            assert_eq!(u32_at(c, 36) as u64, APIC_START);
            let count = u16_at(c, 34) as usize;
            assert_eq!(count, n as usize + 2 + 24 + 2);

            // Walk the entries.
            let mut off = CONFIG_HEADER_SIZE;
            let (mut cpus, mut bsps, mut ioints, mut lints) = (0, 0, 0, 0);
            for _ in 0..count {
                match c[off] {
                    ENTRY_PROCESSOR => {
                        assert_eq!(c[off + 1], cpus as u8, "apic ids in order");
                        assert_ne!(c[off + 3] & CPU_ENABLED, 0);
                        if c[off + 3] & CPU_BSP != 0 {
                            assert_eq!(c[off + 1], 0);
                            bsps += 1;
                        }
                        cpus += 1;
                        off += 20;
                    }
                    ENTRY_BUS => {
                        assert_eq!(&c[off + 2..off + 8], b"ISA   ");
                        off += 8;
                    }
                    ENTRY_IOAPIC => {
                        assert_eq!(c[off + 1], n);
                        assert_eq!(u32_at(c, off + 4) as u64, IOAPIC_START);
                        off += 8;
                    }
                    ENTRY_IO_INTERRUPT => {
                        assert_eq!(c[off + 5], ioints, "isa irq");
                        assert_eq!(c[off + 6], n, "ioapic id");
                        assert_eq!(c[off + 7], ioints, "pin");
                        ioints += 1;
                        off += 8;
                    }
                    ENTRY_LOCAL_INTERRUPT => {
                        let want = if lints == 0 {
                            INT_TYPE_EXTINT
                        } else {
                            INT_TYPE_NMI
                        };
                        assert_eq!(c[off + 1], want);
                        assert_eq!(c[off + 7], lints);
                        lints += 1;
                        off += 8;
                    }
                    other => panic!("unknown entry type {other}"),
                }
            }
            assert_eq!(off, len);
            assert_eq!((cpus, bsps, ioints, lints), (n as usize, 1, 24, 2));
            assert!(EBDA_START + t.len() as u64 <= EBDA_START + EBDA_SIZE);
        }
    }

    #[test]
    fn rejects_bad_counts() {
        assert!(matches!(build(0), Err(MptableError::VcpuCount(0))));
        assert!(matches!(
            build(MAX_VCPUS + 1),
            Err(MptableError::VcpuCount(_))
        ));
    }

    #[test]
    fn memory_without_ebda_is_an_error() {
        // Guest memory that ends before the EBDA.
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(write_mptable(&m, 1), Err(MptableError::Write(_))));
    }
}
