//! The CPUID the guest sees: KVM's supported set, with the topology and identity fields made
//! to describe this VM.
//!
//! Why this exists: `KVM_GET_SUPPORTED_CPUID` describes what KVM *can* virtualise on this
//! host, with the host's topology in it. Each vCPU must instead report its own APIC id and a
//! topology that matches the MP table (one socket, one core per vCPU, one thread per core),
//! say that it runs under a hypervisor, and not advertise nested virtualisation.
//!
//! Ordering: run once per vCPU, before `KVM_SET_CPUID2`, which must precede setting MSRs
//! (KVM checks some MSR writes against the guest CPUID).

use kvm_bindings::CpuId;

const LEAF_VENDOR: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 ECX: VMX (nested virtualisation; not offered).
const ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.01H:ECX[24], the LAPIC's TSC-deadline mode.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: SVM (nested virtualisation; not offered).
const ECX_SVM: u32 = 1 << 2;

/// Extended topology level types (leaf 0xB/0x1F ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The host CPU vendor, as far as the topology leaves care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel (and anything not AMD).
    Intel,
    /// AuthenticAMD or HygonGenuine.
    Amd,
}

/// Adds what KVM emulates but leaves out of KVM_GET_SUPPORTED_CPUID because it needs a
/// capability check: the TSC-deadline timer (`tsc_deadline`: KVM_CAP_TSC_DEADLINE_TIMER).
/// Without it Linux calibrates its LAPIC timer against the PIT at boot, which costs 100 ms of
/// wall time on any host (250 ms in the nested lab).
pub fn add_kvm_emulated(cpuid: &mut CpuId, tsc_deadline: bool) {
    if !tsc_deadline {
        return;
    }
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            e.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Reads the vendor from leaf 0.
pub fn vendor(cpuid: &CpuId) -> Vendor {
    let leaf0 = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_VENDOR && e.index == 0);
    match leaf0 {
        Some(e) => {
            let mut v = [0u8; 12];
            v[0..4].copy_from_slice(&e.ebx.to_le_bytes());
            v[4..8].copy_from_slice(&e.edx.to_le_bytes());
            v[8..12].copy_from_slice(&e.ecx.to_le_bytes());
            if &v == b"AuthenticAMD" || &v == b"HygonGenuine" {
                Vendor::Amd
            } else {
                Vendor::Intel
            }
        }
        None => Vendor::Intel,
    }
}

/// Number of APIC id bits needed for `num_vcpus` cores: ceil(log2(n)).
pub fn core_id_bits(num_vcpus: u8) -> u32 {
    let n = u32::from(num_vcpus.max(1));
    n.next_power_of_two().trailing_zeros()
}

/// Returns the CPUID for vCPU `id` of `num_vcpus`, derived from KVM's supported CPUID.
/// The caller checks `id < num_vcpus`; out-of-range values still produce no panic.
pub fn vcpu_cpuid(supported: &CpuId, id: u8, num_vcpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let vendor = vendor(supported);
    let apic_id = u32::from(id);
    let n = u32::from(num_vcpus.max(1));
    let shift = core_id_bits(num_vcpus);
    let addressable = 1u32 << shift; // power-of-two count of APIC ids in the package

    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] addressable logical processors.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((addressable & 0xff) << 16);
                e.ecx = (e.ecx | ECX_HYPERVISOR) & !ECX_VMX;
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                if e.eax & 0x1f == 0 {
                    continue; // no more caches
                }
                let level = (e.eax >> 5) & 0x7;
                // EAX[25:14] threads sharing this cache - 1: L1/L2 are per core (one thread),
                // L3 is shared by the package. EAX[31:26] cores per package - 1.
                let sharing = if level >= 3 { addressable - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff)
                    | ((sharing & 0xfff) << 14)
                    | (((addressable - 1) & 0x3f) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                e.edx = apic_id; // x2APIC id
                match e.index {
                    0 => {
                        e.eax = 0; // one thread per core: no SMT bits
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = n;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index; // level type 0: invalid, ends enumeration
                    }
                }
            }
            LEAF_EXT_FEATURES => {
                e.ecx &= !ECX_SVM;
            }
            LEAF_AMD_SIZES if vendor == Vendor::Amd => {
                // ECX[7:0] cores - 1, ECX[15:12] APIC id bits for the core id.
                e.ecx = (e.ecx & !0xf0ff) | ((shift & 0xf) << 12) | ((n - 1) & 0xff);
            }
            LEAF_AMD_EXT_APIC_ID if vendor == Vendor::Amd => {
                e.eax = apic_id; // extended APIC id
                e.ebx = apic_id & 0xff; // core id; threads per core - 1 = 0
                e.ecx = 0; // node 0, one node per processor
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    pub(crate) fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    fn host(vendor: &[u8; 12]) -> CpuId {
        let r =
            |o: usize| u32::from_le_bytes([vendor[o], vendor[o + 1], vendor[o + 2], vendor[o + 3]]);
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, r(0), r(8), r(4)),
            entry(1, 0, 0x906ea, 0x0f10_0800, ECX_VMX, 0),
            entry(4, 0, 0x1c00_4121, 0, 0, 0), // L1d, 8 threads sharing
            entry(4, 1, 0x1c00_4163, 0, 0, 0), // L3
            entry(4, 2, 0, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0xb, 2, 0, 0, 2, 7),
            entry(0x8000_0001, 0, 0, 0, ECX_SVM | 1, 0),
            entry(0x8000_0008, 0, 0x3030, 0, 0xf00f, 0),
            entry(0x8000_001e, 0, 9, 0x105, 0x301, 0),
        ])
        .unwrap()
    }

    #[test]
    fn topology_bits() {
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(3), 2);
        assert_eq!(core_id_bits(32), 5);
        assert_eq!(core_id_bits(0), 0);
    }

    #[test]
    fn intel_leaves() {
        let h = host(b"GenuineIntel");
        assert_eq!(vendor(&h), Vendor::Intel);
        let c = vcpu_cpuid(&h, 2, 3);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "clflush size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & ECX_VMX, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);

        let l1d = find(&c, 4, 0);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!(l1d.eax & 0x3fff, 0x0121);
        let l3 = find(&c, 4, 1);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(find(&c, 4, 2).eax, 0);

        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&c, 0xb, 2);
        assert_eq!((end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 2));

        assert_eq!(find(&c, 0x8000_0001, 0).ecx, 1);
        // AMD-only leaves untouched on Intel.
        assert_eq!(find(&c, 0x8000_0008, 0).ecx, 0xf00f);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = vcpu_cpuid(&host(b"GenuineIntel"), 0, 1);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!(l1.ebx >> 16, 1);
    }

    #[test]
    fn amd_leaves() {
        let h = host(b"AuthenticAMD");
        assert_eq!(vendor(&h), Vendor::Amd);
        let c = vcpu_cpuid(&h, 5, 8);
        let sizes = find(&c, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 7);
        assert_eq!((sizes.ecx >> 12) & 0xf, 3);
        let ext = find(&c, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx), (5, 5, 0));
        // Leaf 4 is Intel's; left alone on AMD.
        assert_eq!(find(&c, 4, 0).eax, 0x1c00_4121);
    }

    #[test]
    fn tsc_deadline_is_added_only_with_the_capability() {
        let mut c = host(b"GenuineIntel");
        add_kvm_emulated(&mut c, false);
        assert_eq!(find(&c, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        add_kvm_emulated(&mut c, true);
        assert_ne!(find(&c, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        let v = vcpu_cpuid(&c, 0, 1);
        assert_ne!(find(&v, 1, 0).ecx & ECX_TSC_DEADLINE, 0, "the vCPU gets it");
    }
}
