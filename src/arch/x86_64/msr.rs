//! Model-specific registers a vCPU starts with.
//!
//! Why this exists: a fresh KVM vCPU leaves some MSRs at values no firmware would hand to an
//! OS. We do what a BIOS does before jumping to a kernel: zero the syscall/sysenter MSRs and
//! the TSC, enable fast string operations, and make memory write-back by default via
//! `MTRRdefType` (without it, Linux would map all RAM uncached).
//!
//! Ordering: after `KVM_SET_CPUID2` (KVM validates MSR writes against the guest CPUID).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// STAR (legacy-mode SYSCALL target).
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR (long-mode SYSCALL target).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR (compat-mode SYSCALL target).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SFMASK (SYSCALL flag mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE (SWAPGS).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default type write-back (6).
pub const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

/// Errors setting the boot MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// Building the KVM MSR list failed.
    #[error("cannot build the boot msr list")]
    Build(#[source] vmm_sys_util::fam::Error),
    /// The ioctl failed.
    #[error("cannot set the boot msrs")]
    Set(#[source] kvm_ioctls::Error),
    /// KVM stopped at an MSR it does not accept.
    #[error("kvm refused to set msr {0:#x}: the host kvm does not support it")]
    Refused(u32),
}

/// The MSR values every vCPU starts with.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
}

/// Sets the boot MSRs on `vcpu`; an MSR KVM does not accept is named in the error.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let written = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if written < entries.len() {
        // KVM_SET_MSRS stops at the first entry it refuses.
        let index = entries.get(written).map_or(0, |e| e.index);
        return Err(MsrError::Refused(index));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_values() {
        let entries = boot_msr_entries();
        let get = |i: u32| entries.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_LSTAR), Some(0));
        assert_eq!(get(MSR_IA32_TSC), Some(0));
        assert!(Msrs::from_entries(&entries).is_ok());
    }
}
