//! x86_64 VM and vCPU set-up on KVM.
//!
//! Why this exists: it is the one place that knows what KVM must provide ([`check_kvm`]),
//! what a VM needs before its vCPUs exist ([`configure_vm`]) and what state each vCPU starts in
//! ([`configure_vcpu`]). The memory side of booting (kernel, zero page / PVH start info, page
//! tables, MP table) is `crate::boot::load`; this module only consumes its [`BootSetup`].
//!
//! Ordering (KVM enforces most of it):
//! 1. [`check_kvm`] on the `/dev/kvm` handle;
//! 2. create the VM and register guest memory, then [`configure_vm`] — TSS and identity-map
//!    addresses must be set before any vCPU is created, the PIT needs the irqchip, and a
//!    memory slot added after the irqchip exists costs KVM milliseconds, one before it ~0.1 ms;
//! 3. run `boot::load`;
//! 4. create each vCPU and [`configure_vcpu`]: CPUID, then MSRs (checked against CPUID), then
//!    segment/control registers, general registers, FPU and finally the local APIC (which
//!    exists only because of step 2).
//!
//! Application processors (`id > 0`) are configured the same way; with the in-kernel irqchip
//! KVM keeps them waiting for INIT/SIPI and resets their registers when the SIPI arrives.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod state;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::boot::BootSetup;

pub use layout::{E820Entry, E820Kind, LayoutError};
pub use mptable::MptableError;

/// Most vCPUs a VM may have (bounded by the MP table fitting in the 1 KiB EBDA).
pub const MAX_VCPUS: u8 = 32;

/// The KVM API version this code is written against (stable since Linux 2.6.22).
pub const KVM_API_VERSION: i32 = 12;

/// KVM capabilities Ledge cannot run without, with the reason.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "tss address"),
    (Cap::SetIdentityMapAddr, "identity map address"),
    (Cap::ExtCpuid, "extended cpuid"),
    (Cap::Pit2, "in-kernel pit"),
    (Cap::PitState2, "pit state"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::Irqfd, "irqfd"),
    (Cap::IrqRouting, "irq routing"),
    (Cap::ImmediateExit, "immediate exit"),
    (Cap::MpState, "mp state"),
    (Cap::VcpuEvents, "vcpu events"),
    (Cap::Debugregs, "debug registers"),
    (Cap::Xsave, "xsave state"),
    (Cap::Xcrs, "xcrs"),
    (Cap::AdjustClock, "clock adjustment"),
];

/// Errors setting up the VM or a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// `/dev/kvm` speaks an unexpected API version.
    #[error("kvm api version {0} is not supported: need {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// A required capability is missing.
    #[error("kvm lacks {name} (capability {cap:?}): use a newer host kernel")]
    MissingCap {
        /// The capability.
        cap: Cap,
        /// What it is for.
        name: &'static str,
    },
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("cannot set the kvm tss address")]
    TssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_SET_IDENTITY_MAP_ADDR` failed.
    #[error("cannot set the kvm identity map address")]
    IdentityMap(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("cannot create the in-kernel irqchip")]
    Irqchip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("cannot create the in-kernel pit")]
    Pit(#[source] kvm_ioctls::Error),
    /// vCPU id or count out of range.
    #[error("vcpu {id} of {num} is out of range: use 1 to {MAX_VCPUS} vcpus")]
    VcpuId {
        /// The vCPU index.
        id: u8,
        /// The vCPU count.
        num: u8,
    },
    /// `KVM_SET_CPUID2` failed.
    #[error("cannot set the vcpu cpuid")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// Boot MSRs.
    #[error("cannot set up the vcpu msrs")]
    Msrs(#[from] msr::MsrError),
    /// Registers, FPU, LAPIC.
    #[error("cannot set up the vcpu registers")]
    Regs(#[from] regs::RegsError),
}

/// Checks the KVM API version and every capability in [`REQUIRED_CAPS`].
pub fn check_kvm(kvm: &Kvm) -> Result<(), ArchError> {
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(ArchError::ApiVersion(version));
    }
    for &(cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(ArchError::MissingCap { cap, name });
        }
    }
    Ok(())
}

/// VM-wide set-up before any vCPU exists: TSS and identity-map pages in the MMIO gap, the
/// in-kernel PIC + IOAPIC + LAPICs, and the in-kernel PIT. The PIT's speaker port (0x61) is
/// also emulated in the kernel (`KVM_PIT_SPEAKER_DUMMY`): Linux reads it while calibrating
/// the TSC against PIT channel 2.
pub fn configure_vm(vm: &VmFd) -> Result<(), ArchError> {
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
        .map_err(ArchError::IdentityMap)?;
    // The address fits in usize on any x86_64 host.
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .map_err(ArchError::TssAddress)?;
    vm.create_irq_chip().map_err(ArchError::Irqchip)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(ArchError::Pit)?;
    Ok(())
}

/// Puts vCPU `id` (of `num_vcpus`) in the entry state `boot` asks for. `supported_cpuid` is
/// `Kvm::get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)`, fetched once per VM.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    num_vcpus: u8,
    boot: &BootSetup,
    supported_cpuid: &CpuId,
) -> Result<(), ArchError> {
    if num_vcpus == 0 || num_vcpus > MAX_VCPUS || id >= num_vcpus {
        return Err(ArchError::VcpuId { id, num: num_vcpus });
    }
    let cpuid = cpuid::vcpu_cpuid(supported_cpuid, id, num_vcpus);
    vcpu.set_cpuid2(&cpuid).map_err(ArchError::SetCpuid)?;
    msr::setup_msrs(vcpu)?;
    regs::setup_sregs(vcpu, boot.mode)?;
    regs::setup_regs(vcpu, boot)?;
    regs::setup_fpu(vcpu)?;
    regs::setup_lapic(vcpu)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::tests::{test_elf, TEST_ELF_ENTRY, TEST_PVH_ENTRY};
    use crate::boot::{load_from, BootProtocol, EntryMode, ReadSeek};
    use crate::kvm::memory::GuestMemoryMmap;
    use kvm_bindings::{kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::VcpuExit;
    use std::io::Cursor;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn vcpu_id_checks() {
        // No KVM needed: the range check comes first.
        let err = ArchError::VcpuId { id: 3, num: 2 };
        assert_eq!(
            err.to_string(),
            "vcpu 3 of 2 is out of range: use 1 to 32 vcpus"
        );
        let err = ArchError::MissingCap {
            cap: Cap::Irqfd,
            name: "irqfd",
        };
        assert_eq!(
            err.to_string(),
            "kvm lacks irqfd (capability Irqfd): use a newer host kernel"
        );
    }

    /// Boots a synthetic kernel on real KVM in one mode and returns the byte it writes to
    /// port 0x80, after checking the registers took.
    fn boot_and_probe(kvm: &Kvm, protocol: BootProtocol, num_vcpus: u8) -> (EntryMode, u8) {
        let vm = kvm.create_vm().unwrap();
        configure_vm(&vm).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&layout::ram_regions(64 << 20).unwrap()).unwrap();
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).unwrap();
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which outlives `vm` here.
            unsafe { vm.set_user_memory_region(desc) }.unwrap();
        }

        // 64-bit entry: mov al, [rsi + 0x202] ("H" of "HdrS" in the zero page); out 0x80, al.
        let code64 = [0x8a, 0x86, 0x02, 0x02, 0x00, 0x00, 0xe6, 0x80, 0xf4];
        // PVH entry: mov al, [ebx] (low byte of the start info magic); out 0x80, al.
        let code32 = [0x8a, 0x03, 0xe6, 0x80, 0xf4];
        let elf = test_elf(&code64, &code32, true, 0x2000);
        let boot = load_from(
            &mem,
            &mut Cursor::new(&elf),
            None::<&mut dyn ReadSeek>,
            "console=ttyS0",
            protocol,
            num_vcpus,
        )
        .unwrap();

        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let mut vcpus = Vec::new();
        for id in 0..num_vcpus {
            let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
            configure_vcpu(&vcpu, id, num_vcpus, &boot, &supported).unwrap();
            vcpus.push(vcpu);
        }
        let err = configure_vcpu(&vcpus[0], num_vcpus, num_vcpus, &boot, &supported);
        assert!(matches!(err, Err(ArchError::VcpuId { .. })));

        let vcpu = &mut vcpus[0];
        let regs = vcpu.get_regs().unwrap();
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rip, boot.entry.0);
        match boot.mode {
            EntryMode::Linux64 => {
                assert_eq!(regs.rip, TEST_ELF_ENTRY);
                assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
                assert_eq!(regs.rsp, layout::BOOT_STACK_POINTER);
                assert_eq!(sregs.cr3, layout::PML4_START);
                assert_ne!(sregs.cr0 & regs::X86_CR0_PG, 0);
                assert_ne!(sregs.cr4 & regs::X86_CR4_PAE, 0);
                assert_ne!(sregs.efer & regs::EFER_LMA, 0);
                assert_eq!((sregs.cs.l, sregs.cs.selector), (1, regs::CODE_SELECTOR));
            }
            EntryMode::Pvh => {
                assert_eq!(regs.rip, TEST_PVH_ENTRY);
                assert_eq!(regs.rbx, layout::PVH_INFO_START);
                assert_eq!(sregs.cr0 & (regs::X86_CR0_PE | regs::X86_CR0_PG), 1);
                assert_eq!(sregs.efer & regs::EFER_LMA, 0);
                assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
                assert_eq!(sregs.cs.limit, 0xffff_ffff);
            }
        }
        assert_eq!(sregs.gdt.base, layout::BOOT_GDT_START);
        let mut msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: msr::MSR_MTRR_DEF_TYPE,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
        assert_eq!(msrs.as_slice()[0].data, msr::MTRR_DEF_TYPE_WB_ENABLED);
        let (lint0, lint1) = regs::lapic_lints(vcpu).unwrap();
        assert_eq!((lint0 >> 8) & 7, regs::APIC_MODE_EXTINT);
        assert_eq!((lint1 >> 8) & 7, regs::APIC_MODE_NMI);
        let fpu = vcpu.get_fpu().unwrap();
        assert_eq!(fpu.fcw, 0x37f);
        // MXCSR read back from the XSAVE area (offset 24): some hosts (seen on kvm-pvm)
        // report 0 in KVM_GET_FPU although the value took.
        let xsave = vcpu.get_xsave().unwrap();
        assert_eq!(xsave.region[6], 0x1f80);
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");

        // Run until the probe writes its byte.
        loop {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(0x80, data)) => return (boot.mode, data[0]),
                Ok(VcpuExit::IoOut(_, _)) | Ok(VcpuExit::IoIn(_, _)) => continue,
                Ok(other) => panic!("unexpected exit {other:?} in {:?}", boot.mode),
                Err(e) => panic!("KVM_RUN failed in {:?}: {e}", boot.mode),
            }
        }
    }

    #[test]
    fn kvm_configure_and_run_both_modes() {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                println!("skipping: cannot open /dev/kvm: {e}");
                return;
            }
        };
        if let Err(e) = check_kvm(&kvm) {
            println!("skipping: {e}");
            return;
        }
        assert_eq!(
            boot_and_probe(&kvm, BootProtocol::Linux, 1),
            (EntryMode::Linux64, b'H')
        );
        assert_eq!(
            boot_and_probe(&kvm, BootProtocol::Auto, 2),
            (EntryMode::Pvh, 0x78) // XEN_HVM_START_MAGIC_VALUE low byte
        );
        assert_eq!(
            boot_and_probe(&kvm, BootProtocol::Pvh, 4),
            (EntryMode::Pvh, 0x78)
        );
    }
}
