//! Guest RAM: anonymous mappings laid out by `arch::x86_64::layout` and registered as KVM slots.
//!
//! Memory is created before the VM's devices and kernel (the loader writes into it) and
//! registered before the first vCPU runs. The mappings are `MAP_NORESERVE`, so untouched guest
//! pages cost the host nothing.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout;

/// Guest memory as all of Ledge sees it: every write the VMM makes through vm-memory (device
/// DMA, used rings) sets a bit in a per-region dirty bitmap, which diff snapshots read together
/// with KVM's dirty log of what the guest itself wrote.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Errors creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("invalid guest memory layout")]
    Layout(#[from] layout::LayoutError),
    #[error("cannot map {mib} MiB of guest memory")]
    Mmap {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot register guest memory slot {slot} with KVM")]
    Register {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Maps `mem_mib` MiB of guest RAM around the MMIO gap.
pub fn create(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let bytes = mem_mib.saturating_mul(1 << 20);
    let ranges = layout::ram_regions(bytes)?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Mmap {
        mib: mem_mib,
        source,
    })
}

/// Gives every region to KVM as one memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem` of exactly `memory_size` bytes;
        // the VMM keeps `mem` alive for as long as the VM (and so the slot) exists.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}
