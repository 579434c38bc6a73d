//! The built-in probe guest: a PVH unikernel written in this project (resources/guests/probe),
//! compiled by build.rs and embedded here. `ledge run` with no kernel boots it; `ledge
//! export-probe` writes it out so other VMMs and the benchmarks can boot the very same image.

/// The probe guest's ELF image.
pub static PROBE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"));
