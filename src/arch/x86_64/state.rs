//! x86_64 vCPU and VM state for snapshots: what KVM holds that guest memory does not.
//!
//! KVM's own structures (`kvm_regs`, `kvm_lapic_state`, ...) are kernel ABI and serialise as
//! their bytes (kvm-bindings' serde support): a struct the kernel later grows is read back
//! zero-padded. Saving happens on the vCPU's own thread while it is paused; restoring happens
//! on a freshly created vCPU before its thread starts, in the order KVM needs: CPUID, MP state,
//! registers, FPU/XSAVE, XCRs, debug registers, LAPIC, MSRs (TSC deadline needs the LAPIC
//! mode), then pending events.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring vCPU and VM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the saved state has {0} CPUID entries, more than KVM takes")]
    CpuidSize(usize),
    #[error("the saved state has {0} MSRs, more than KVM takes")]
    MsrCount(usize),
    #[error("the snapshot was taken on a {saved} CPU and this host is {host}: restore it on a host with the same CPU vendor")]
    Vendor { saved: String, host: String },
    #[error("this host's CPU lacks features the snapshot's guest was given (CPUID leaf {leaf:#x}.{index} {reg} bits {bits:#x}): restore it on a host with the same or a newer CPU")]
    MissingFeatures {
        leaf: u32,
        index: u32,
        reg: &'static str,
        bits: u32,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// One vCPU, everything KVM keeps for it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// (index, value) of every MSR KVM lets us read.
    pub msrs: Vec<(u32, u64)>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, when KVM reports it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// The VM-wide state: interrupt controllers, PIT and kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmArchState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The MSRs to save for every vCPU: KVM's list of MSRs it saves and restores
/// (`KVM_GET_MSR_INDEX_LIST`), read once per VM.
pub fn msrs_to_save(kvm_fd: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("read KVM's MSR list"))?;
    Ok(list.as_slice().to_vec())
}

/// Reads `indices`; KVM stops at the first MSR it cannot read, which is skipped (logged).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::MsrCount(entries.len()))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm("read the vcpu's MSRs"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            log::debug!("MSR {:#x} cannot be read; not saved", chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

/// Saves vCPU `id`. The vCPU must be out of `KVM_RUN` (paused).
pub fn save_vcpu(vcpu: &VcpuFd, id: u8, msr_list: &[u32]) -> Result<VcpuState, StateError> {
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("read the vcpu's CPUID"))?;
    // MP state first: reading it makes KVM settle pending INIT/SIPI into the registers.
    let mp_state = vcpu.get_mp_state().map_err(kvm("read the MP state"))?;
    let regs = vcpu.get_regs().map_err(kvm("read the registers"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("read the system registers"))?;
    let xsave = vcpu.get_xsave().map_err(kvm("read the XSAVE area"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("read the XCRs"))?;
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(kvm("read the debug registers"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("read the LAPIC"))?;
    let msrs = read_msrs(vcpu, msr_list)?;
    let events = vcpu
        .get_vcpu_events()
        .map_err(kvm("read the pending vcpu events"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        msrs,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        mp_state,
        events,
        tsc_khz,
    })
}

/// Puts `s` into a vCPU that was created (after the irqchip) but has not run.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| StateError::CpuidSize(s.cpuid.len()))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
    if let Some(khz) = s.tsc_khz {
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            // Without TSC scaling the guest sees the host's frequency; its clocksource
            // (kvmclock) copes, a TSC-calibrated guest may drift.
            if let Err(e) = vcpu.set_tsc_khz(khz) {
                log::warn!(
                    "cannot give the guest its {khz} kHz TSC back ({e}); it runs at the host's"
                );
            }
        }
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("set the MP state"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("set the registers"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(kvm("set the system registers"))?;
    // SAFETY: `s.xsave` is a whole `kvm_xsave` (4 KiB, the legacy size KVM_SET_XSAVE reads);
    // KVM validates its contents and refuses features the vCPU's CPUID does not allow.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("set the XSAVE area"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("set the XCRs"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm("set the debug registers"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("set the LAPIC"))?;
    write_msrs(vcpu, &s.msrs)?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("set the pending vcpu events"))?;
    Ok(())
}

/// Writes saved MSRs; one KVM refuses is logged and skipped, the rest still go in.
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), StateError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let m = Msrs::from_entries(&entries).map_err(|_| StateError::MsrCount(entries.len()))?;
        let n = vcpu.set_msrs(&m).map_err(kvm("set the MSRs"))?;
        if n < chunk.len() {
            log::warn!(
                "MSR {:#x} = {:#x} refused by KVM on restore; skipped",
                chunk[n].0,
                chunk[n].1
            );
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(kvm("read the interrupt controllers"))?;
    Ok(c)
}

/// Saves the irqchip, PIT and clock. `clock` is the kvmclock the VMM read when it paused.
pub fn save_vm(vm: &VmFd, clock: kvm_clock_data) -> Result<VmArchState, StateError> {
    Ok(VmArchState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
        clock,
    })
}

/// Restores the irqchip and PIT of a VM made by `configure_vm`. The clock is set by the VMM
/// when it resumes (see `Vmm::resume`).
pub fn restore_vm(vm: &VmFd, s: &VmArchState) -> Result<(), StateError> {
    for (chip, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        let mut c = *chip;
        c.chip_id = id;
        vm.set_irqchip(&c)
            .map_err(kvm("set the interrupt controllers"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm("set the PIT"))?;
    Ok(())
}

/// What a snapshot records of the host CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub brand: String,
}

fn entry(cpuid: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    // The index only counts for leaves KVM flags as indexed; elsewhere it may be anything.
    cpuid.iter().find(|e| {
        e.function == function
            && (e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

/// The CPU's identity from CPUID (KVM's supported list mirrors the host's vendor and
/// family/model/stepping).
pub fn host_cpu(supported: &[kvm_cpuid_entry2]) -> HostCpu {
    let vendor = entry(supported, 0, 0).map_or(String::new(), |e| {
        let mut v = Vec::with_capacity(12);
        for r in [e.ebx, e.edx, e.ecx] {
            v.extend_from_slice(&r.to_le_bytes());
        }
        String::from_utf8_lossy(&v).into_owned()
    });
    let eax = entry(supported, 1, 0).map_or(0, |e| e.eax);
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((eax >> 20) & 0xff)
    } else {
        base_family
    };
    let model = if base_family == 0x6 || base_family == 0xf {
        ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4)
    } else {
        (eax >> 4) & 0xf
    };
    let mut brand = Vec::with_capacity(48);
    for f in 0x8000_0002..=0x8000_0004u32 {
        if let Some(e) = entry(supported, f, 0) {
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                brand.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    let brand = String::from_utf8_lossy(&brand)
        .trim_matches(char::from(0))
        .trim()
        .to_string();
    HostCpu {
        vendor,
        family,
        model,
        stepping: eax & 0xf,
        brand,
    }
}

/// Feature words checked on restore, with the bits Ledge or the guest set dynamically (and so
/// may differ from the host's list without meaning anything): leaf 1 ECX hypervisor (31),
/// OSXSAVE (27), TSC-deadline (24), x2APIC (21); leaf 1 EDX APIC (9).
const FEATURE_WORDS: &[(u32, u32, &str, u32)] = &[
    (
        1,
        0,
        "ecx",
        !((1 << 31) | (1 << 27) | (1 << 24) | (1 << 21)),
    ),
    (1, 0, "edx", !(1 << 9)),
    (7, 0, "ebx", !0),
    (7, 0, "ecx", !(1 << 4)), // OSPKE follows CR4
    (7, 0, "edx", !0),
    (0xd, 1, "eax", !0),
    (0x8000_0001, 0, "ecx", !0),
    (0x8000_0001, 0, "edx", !0),
];

/// The host CPU's own CPUID leaf.
fn host_leaf(leaf: u32, index: u32) -> kvm_cpuid_entry2 {
    let max = std::arch::x86_64::__cpuid(leaf & 0x8000_0000).eax;
    if leaf > max {
        return kvm_cpuid_entry2::default();
    }
    let r = std::arch::x86_64::__cpuid_count(leaf, index);
    kvm_cpuid_entry2 {
        function: leaf,
        index,
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
        ..Default::default()
    }
}

fn reg(e: &kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// Refuses a guest CPUID this host cannot run: another vendor, or a feature the host's KVM
/// does not offer.
pub fn check_cpu(
    saved: &[kvm_cpuid_entry2],
    saved_vendor: &str,
    supported: &[kvm_cpuid_entry2],
) -> Result<(), StateError> {
    check_cpu_with(saved, saved_vendor, supported, host_leaf)
}

fn check_cpu_with(
    saved: &[kvm_cpuid_entry2],
    saved_vendor: &str,
    supported: &[kvm_cpuid_entry2],
    host_cpuid: impl Fn(u32, u32) -> kvm_cpuid_entry2,
) -> Result<(), StateError> {
    let host = host_cpu(supported);
    if host.vendor != saved_vendor {
        return Err(StateError::Vendor {
            saved: saved_vendor.to_string(),
            host: host.vendor,
        });
    }
    for &(leaf, index, name, mask) in FEATURE_WORDS {
        let Some(guest) = entry(saved, leaf, index) else {
            continue;
        };
        // What KVM lists, or what the CPU itself has: some KVMs (kvm-pvm) list less than a
        // vCPU really gets.
        let have = entry(supported, leaf, index).map_or(0, |e| reg(e, name))
            | reg(&host_cpuid(leaf, index), name);
        let missing = reg(guest, name) & mask & !have;
        if missing != 0 {
            return Err(StateError::MissingFeatures {
                leaf,
                index,
                reg: name,
                bits: missing,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpuid::tests::entry as e;

    fn host() -> Vec<kvm_cpuid_entry2> {
        // "AuthenticAMD", family 0x19 model 0x01.
        vec![
            e(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            e(1, 0, 0x00a0_0f11, 0, 0x7ed8_320b, 0x178b_fbff),
            kvm_cpuid_entry2 {
                flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..e(7, 0, 0, 0x219c_91a9, 0x0040_0684, 0)
            },
        ]
    }

    fn no_host(_: u32, _: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2::default()
    }

    #[test]
    fn host_identity() {
        let h = host_cpu(&host());
        assert_eq!(h.vendor, "AuthenticAMD");
        assert_eq!((h.family, h.model, h.stepping), (0x19, 0x01, 1));
    }

    #[test]
    fn same_cpu_passes_and_dynamic_bits_are_ignored() {
        let mut guest = host();
        guest[1].ecx |= 1 << 31; // hypervisor
        check_cpu_with(&guest, "AuthenticAMD", &host(), no_host).unwrap();
    }

    #[test]
    fn missing_feature_and_vendor_are_refused() {
        let mut guest = host();
        guest[2].ebx |= 1 << 30;
        let err = check_cpu_with(&guest, "AuthenticAMD", &host(), no_host).unwrap_err();
        assert!(matches!(
            err,
            StateError::MissingFeatures {
                leaf: 7,
                reg: "ebx",
                bits: 0x4000_0000,
                ..
            }
        ));
        let err = check_cpu_with(&host(), "GenuineIntel", &host(), no_host).unwrap_err();
        assert!(err.to_string().contains("GenuineIntel"), "{err}");
        // A feature the CPU has but KVM does not list (kvm-pvm lists little) passes.
        let with_cpu = |l: u32, i: u32| {
            if (l, i) == (7, 0) {
                e(7, 0, 0, 1 << 30, 0, 0)
            } else {
                no_host(l, i)
            }
        };
        check_cpu_with(&guest, "AuthenticAMD", &host(), with_cpu).unwrap();
    }

    #[test]
    fn vcpu_state_serialises_as_kernel_bytes() {
        let s = VmArchState {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip::default(),
            ioapic: kvm_irqchip::default(),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 1234,
                ..Default::default()
            },
        };
        let j = serde_json::to_vec(&s).unwrap();
        let back: VmArchState = serde_json::from_slice(&j).unwrap();
        assert_eq!(back.clock.clock, 1234);
    }
}
