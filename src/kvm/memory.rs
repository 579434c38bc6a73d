//! Guest RAM: anonymous mappings laid out by `arch::x86_64::layout` and registered as KVM slots.
//!
//! Memory is created before the VM's devices and kernel (the loader writes into it) and
//! registered before the first vCPU runs. The mappings are `MAP_NORESERVE`, so untouched guest
//! pages cost the host nothing.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::fs::File;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

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
    #[error("cannot map the snapshot memory file")]
    FileMap {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read KVM's dirty page log of slot {slot}")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
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

/// Maps guest RAM from a snapshot's memory file, privately: pages load lazily from the file
/// (shared, through the page cache, by every VM restored from it) and a guest write copies
/// only that page. The file holds the regions back to back, in `layout::ram_regions` order,
/// and must be exactly as long as the memory (the caller checks).
pub fn create_from_file(mem_mib: u64, file: &File) -> Result<GuestMemoryMmap, MemoryError> {
    let bytes = mem_mib.saturating_mul(1 << 20);
    let ranges = layout::ram_regions(bytes)?;
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for (addr, len) in ranges {
        let file = file
            .try_clone()
            .map_err(|source| MemoryError::FileMap { source })?;
        let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::FileMap {
                source: std::io::Error::other(e),
            })?;
        let region = GuestRegionMmap::new(region, addr).ok_or(MemoryError::FileMap {
            source: std::io::Error::other("region wraps around the address space"),
        })?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::FileMap {
        source: std::io::Error::other(e),
    })
}

/// Gives every region to KVM as one memory slot; with `track_dirty`, KVM logs the pages the
/// guest writes (read with `take_dirty`).
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), MemoryError> {
    let flags = if track_dirty {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let r = kvm_userspace_memory_region {
            slot,
            flags,
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

/// The pages written since the last call, one bitmap (bit per 4 KiB page, 64 per word) per
/// region: what the guest wrote (KVM's dirty log, which this clears) OR what the VMM wrote
/// through vm-memory (the regions' bitmaps, cleared too).
pub fn take_dirty(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, MemoryError> {
    let mut out = Vec::new();
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
        let mut kvm_log = vm
            .get_dirty_log(slot, len)
            .map_err(|source| MemoryError::DirtyLog { slot, source })?;
        let mmap: &vm_memory::MmapRegion<AtomicBitmap> = region;
        let vmm_log = mmap.bitmap().get_and_reset();
        for (k, v) in kvm_log.iter_mut().zip(vmm_log) {
            *k |= v;
        }
        out.push(kvm_log);
    }
    Ok(out)
}

/// Which of `npages` pages from host address `start` are backed (present in RAM or swapped
/// out), from /proc/self/pagemap: pages the guest never touched are not, and need no saving.
pub fn backed_pages(start: u64, npages: usize) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut out = Vec::with_capacity(npages);
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = start / 4096;
    let mut left = npages;
    while left > 0 {
        let n = left.min(4096);
        let bytes = &mut buf[..n * 8];
        pagemap.read_exact_at(bytes, page * 8)?;
        out.extend(bytes.chunks_exact(8).map(|c| {
            let v = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
            v & (PRESENT | SWAPPED) != 0
        }));
        page += n as u64;
        left -= n;
    }
    Ok(out)
}

/// The ranges of `file` within [start, end) that hold data (SEEK_DATA/SEEK_HOLE); a file
/// system without hole support reports all of it as data.
pub fn data_extents(file: &File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: i32| -> std::io::Result<Option<u64>> {
        let off = libc::off_t::try_from(off).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a descriptor we own (borrowed from `file` for the call); it only
        // moves the file offset, which nothing else in this process relies on.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `off`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    };
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

const XATTR_NAME: &[u8] = b"user.ledge.snapshot\0";

/// Tags a memory file with the snapshot it belongs to (an extended attribute), so a state
/// file is never restored onto another snapshot's memory. File systems without user xattrs
/// just do without the check.
pub fn set_memory_tag(file: &File, tag: &str) {
    use std::os::fd::AsRawFd;
    // SAFETY: the name is NUL-terminated, the value pointer and length describe `tag`'s bytes,
    // and the descriptor is borrowed from `file` for the call.
    let r = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            XATTR_NAME.as_ptr().cast(),
            tag.as_ptr().cast(),
            tag.len(),
            0,
        )
    };
    if r != 0 {
        log::debug!(
            "cannot tag the memory file ({}); restores will not check it belongs to its state file",
            std::io::Error::last_os_error()
        );
    }
}

/// The tag `set_memory_tag` left on a memory file, if any.
pub fn memory_tag(file: &File) -> Option<String> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 128];
    // SAFETY: the name is NUL-terminated and the value buffer is `buf`, of the length given;
    // the kernel writes at most that many bytes.
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            XATTR_NAME.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    String::from_utf8(buf.get(..n)?.to_vec()).ok()
}
