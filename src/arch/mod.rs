//! Architecture support. Ledge runs x86_64 guests on x86_64 KVM hosts only; everything that
//! depends on the instruction set (guest memory layout, CPUID, MSRs, boot registers, the MP
//! table) lives under `x86_64` and is re-exported here so the rest of the crate says
//! `crate::arch::…`.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;
