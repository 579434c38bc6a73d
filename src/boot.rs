//! Loading a guest kernel (and initrd) and writing everything the kernel reads at entry.
//!
//! Why this exists: it is the whole memory side of booting, kept apart from KVM so it can be
//! tested on plain guest memory. [`load`] (a [`BootRequest`]: kernel from a path or an
//! in-memory image such as the embedded probe guest, initrd from a path) and [`load_from`]
//! (open readers) take an untrusted kernel image and:
//! 1. detect its format by magic — ELF (vmlinux, or a PVH ELF) or bzImage ("HdrS" at 0x202);
//! 2. pick the entry mode: PVH when asked or when `Auto` finds the `XEN_ELFNOTE_PHYS32_ENTRY`
//!    note, else the Linux 64-bit boot protocol (bzImage: always, at load address + 0x200);
//! 3. check, before writing anything, that the kernel, the initrd and the command line fit
//!    (clear errors for text files, truncated ELFs, kernels bigger than memory, …);
//! 4. load the kernel at 1 MiB (bzImage) or where the ELF program headers say, via
//!    linux-loader; the initrd page-aligned at the top of low RAM;
//! 5. write the command line, then the zero page (Linux) or `hvm_start_info` with its memory
//!    map and module list (PVH), the GDT/IDT (and page tables for Linux), and the MP table.
//!
//! Ordering: guest memory must be created from `arch::layout::ram_regions` first (the e820 map
//! written here describes that layout). The returned [`BootSetup`] is what
//! `arch::configure_vcpu` needs; nothing here touches KVM.
//!
//! Guest memory is reached only through vm-memory's checked accessors, with checked
//! arithmetic on every value that comes from the image.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use linux_loader::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile,
    VolatileMemoryError, VolatileSlice,
};

use crate::arch::x86_64::layout::{
    self, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::arch::x86_64::regs::{self, RegsError};

/// Linux x86 `COMMAND_LINE_SIZE`, including the terminating NUL: the limit for ELF kernels.
pub const LINUX_CMDLINE_MAX: usize = 2048;
/// Offset of the 64-bit entry point from the bzImage load address.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Offset of the setup header in a bzImage (and in the zero page).
pub const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// "HdrS", little-endian, at 0x202.
pub const BZIMAGE_MAGIC: u32 = 0x5372_6448;
/// Boot-sector signature at 0x1fe.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` for a loader without an assigned id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags`: protected-mode code is loaded at 1 MiB.
pub const LOADED_HIGH: u8 = 0x1;
/// `xloadflags`: the kernel has the 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 0x1;
/// Boot protocol 2.12: the first with `xloadflags`.
pub const MIN_BZIMAGE_VERSION: u16 = 0x020c;
/// ELF note type of the PVH 32-bit entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELF_HEADER_SIZE: u64 = 64;
const ELF_PHDR_SIZE: u16 = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Notes are small; a PT_NOTE segment bigger than this is read only this far.
const MAX_NOTE_BYTES: u64 = 64 * 1024;
const PAGE_SIZE: u64 = 0x1000;

/// Which boot protocol to use (config file and `--boot-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH when the kernel has the PVH note, else the Linux 64-bit boot protocol.
    #[default]
    Auto,
    /// The Linux 64-bit boot protocol (zero page in %rsi).
    Linux,
    /// PVH (`hvm_start_info` in %ebx, 32-bit protected mode entry).
    Pvh,
}

impl FromStr for BootProtocol {
    type Err = BootError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BootProtocol::Auto),
            "linux" => Ok(BootProtocol::Linux),
            "pvh" => Ok(BootProtocol::Pvh),
            other => Err(BootError::UnknownProtocol(other.to_string())),
        }
    }
}

impl fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootProtocol::Auto => "auto",
            BootProtocol::Linux => "linux",
            BootProtocol::Pvh => "pvh",
        })
    }
}

/// The CPU state the kernel is entered in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, paging on, `rsi` = zero page.
    Linux64,
    /// 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh,
}

/// What the vCPU set-up needs from the loader.
#[derive(Clone, Copy, Debug)]
pub struct BootSetup {
    /// Where the boot vCPU starts executing.
    pub entry: GuestAddress,
    /// The entry mode.
    pub mode: EntryMode,
    /// The zero page (Linux64) or `hvm_start_info` (PVH).
    pub boot_info: GuestAddress,
    /// End (exclusive) of the memory the kernel occupies or will use to decompress itself.
    pub kernel_end: GuestAddress,
}

/// Where the kernel image comes from.
pub enum BootSource<'a> {
    /// A file on disk (vmlinux ELF, PVH ELF or bzImage); opening errors name the path.
    Path(&'a Path),
    /// An image already in hand, e.g. the embedded probe guest in a `Cursor<&[u8]>`.
    Image {
        /// What to call it in logs.
        name: &'a str,
        /// The image.
        reader: &'a mut dyn ReadSeek,
    },
}

impl fmt::Debug for BootSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootSource::Path(p) => f.debug_tuple("Path").field(p).finish(),
            BootSource::Image { name, .. } => f.debug_struct("Image").field("name", name).finish(),
        }
    }
}

/// A boot request.
#[derive(Debug)]
pub struct BootRequest<'a> {
    /// Kernel image.
    pub kernel: BootSource<'a>,
    /// Optional initrd / initramfs file.
    pub initrd: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Boot protocol choice.
    pub protocol: BootProtocol,
    /// Number of vCPUs (for the MP table).
    pub num_vcpus: u8,
}

/// Anything the loader can read an image from: a `File`, a `Cursor<&[u8]>`, ….
pub trait ReadSeek: Read + Seek {}
impl<T: Read + Seek + ?Sized> ReadSeek for T {}

/// Errors loading the kernel and writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Unknown `--boot-protocol` value.
    #[error("unknown boot protocol {0:?}: use auto, linux or pvh")]
    UnknownProtocol(String),
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {}", .path.display())]
    OpenKernel {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The initrd file cannot be opened.
    #[error("cannot open initrd {}", .path.display())]
    OpenInitrd {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the kernel image failed.
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] io::Error),
    /// Reading the initrd failed.
    #[error("cannot read the initrd")]
    ReadInitrd(#[source] io::Error),
    /// The kernel image has no bytes.
    #[error("kernel image is empty")]
    EmptyKernel,
    /// Neither ELF nor bzImage magic.
    #[error("kernel image is not a vmlinux ELF or bzImage: pass the kernel, not another file")]
    NotAKernel,
    /// Part of the ELF lies past the end of the file.
    #[error("kernel ELF is truncated: its {0} extends past the end of the file")]
    TruncatedElf(&'static str),
    /// 32-bit ELF.
    #[error("kernel ELF is not 64-bit: use an x86_64 kernel")]
    ElfNot64Bit,
    /// Big-endian ELF.
    #[error("kernel ELF is big-endian: use an x86_64 kernel")]
    ElfBigEndian,
    /// Wrong machine.
    #[error("kernel ELF is for machine {0}, not x86_64 (62)")]
    ElfMachine(u16),
    /// Unexpected program header entry size.
    #[error("kernel ELF program header entries are {0} bytes, not 56: the file is corrupt")]
    ElfPhdrSize(u16),
    /// No PT_LOAD segments.
    #[error("kernel ELF has no loadable segments")]
    ElfNoSegments,
    /// File size larger than memory size, or an overflowing segment.
    #[error("kernel ELF segment at {addr:#x} is malformed: the file is corrupt")]
    ElfSegment {
        /// Segment physical address.
        addr: u64,
    },
    /// Segment would overwrite the boot structures.
    #[error("kernel ELF segment at {addr:#x} is below 1 MiB, where boot structures live: link the kernel at 1 MiB or above")]
    ElfSegmentLow {
        /// Segment physical address.
        addr: u64,
    },
    /// The entry point is not in a loaded segment.
    #[error("kernel entry point {entry:#x} is outside its loaded segments")]
    BadEntry {
        /// The entry point.
        entry: u64,
    },
    /// PVH requested, no PVH note.
    #[error(
        "kernel has no pvh entry note (XEN_ELFNOTE_PHYS32_ENTRY): use boot protocol linux or auto"
    )]
    NoPvhNote,
    /// PVH requested for a bzImage.
    #[error("a bzImage cannot boot with pvh: use its vmlinux, or boot protocol linux or auto")]
    PvhBzImage,
    /// bzImage shorter than its own header says.
    #[error("bzImage is truncated: it is shorter than its setup sectors")]
    TruncatedBzImage,
    /// Boot protocol too old for a 64-bit entry.
    #[error("bzImage boot protocol {:x}.{:02x} has no 64-bit entry: use a kernel with protocol 2.12 or newer", .0 >> 8, .0 & 0xff)]
    BzImageTooOld(u16),
    /// Not a "loaded high" bzImage.
    #[error("bzImage is not loadable at 1 MiB (zImage?): use a bzImage")]
    BzImageNotHigh,
    /// Guest memory too small for the kernel.
    #[error("memory too small for the kernel: it needs RAM up to {need:#x} but low RAM ends at {have:#x}; give the vm more memory")]
    MemoryTooSmall {
        /// End address the kernel needs.
        need: u64,
        /// End of low RAM.
        have: u64,
    },
    /// linux-loader failed to copy the kernel.
    #[error("cannot load the kernel into guest memory")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// Zero-length initrd.
    #[error("initrd is empty")]
    EmptyInitrd,
    /// No room for the initrd.
    #[error("initrd of {size} bytes does not fit: {room} bytes free between the kernel end and {top:#x}; give the vm more memory or use a smaller initrd")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// Bytes available.
        room: u64,
        /// Highest address the initrd may reach.
        top: u64,
    },
    /// Copying the initrd failed.
    #[error("cannot load the initrd into guest memory")]
    LoadInitrd(#[source] vm_memory::GuestMemoryError),
    /// Command line over the kernel's limit.
    #[error("kernel command line is {len} bytes, over this kernel's limit of {max}: shorten it")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit (without the terminating NUL).
        max: usize,
    },
    /// Command line has a byte the kernel will not accept.
    #[error("kernel command line has a non-printable or non-ascii byte at offset {0}")]
    CmdlineInvalid(usize),
    /// Writing a boot structure failed.
    #[error("cannot write the {what} to guest memory")]
    WriteBootInfo {
        /// Which structure.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Too many memory map entries for the PVH area (a layout bug).
    #[error("pvh memory map of {0} entries does not fit its area")]
    MemmapTooBig(usize),
    /// GDT, IDT or page tables.
    #[error("cannot write the boot cpu tables")]
    Tables(#[from] RegsError),
    /// MP table.
    #[error("cannot write the mp table")]
    Mptable(#[from] MptableError),
}

/// Opens what `req` names and loads it; see [`load_from`].
pub fn load<M: GuestMemoryBackend>(mem: &M, req: BootRequest<'_>) -> Result<BootSetup, BootError> {
    let mut kernel_file;
    let kernel: &mut dyn ReadSeek = match req.kernel {
        BootSource::Path(path) => {
            kernel_file = File::open(path).map_err(|source| BootError::OpenKernel {
                path: path.to_path_buf(),
                source,
            })?;
            log::info!("loading kernel {}", path.display());
            &mut kernel_file
        }
        BootSource::Image { name, reader } => {
            log::info!("loading kernel image {name}");
            reader
        }
    };
    let mut initrd = match req.initrd {
        Some(path) => Some(File::open(path).map_err(|source| BootError::OpenInitrd {
            path: path.to_path_buf(),
            source,
        })?),
        None => None,
    };
    load_from(
        mem,
        kernel,
        initrd.as_mut().map(|f| f as &mut dyn ReadSeek),
        req.cmdline,
        req.protocol,
        req.num_vcpus,
    )
}

/// Loads a kernel (and initrd) from open readers into `mem` and writes all boot information.
/// Everything is validated before the first byte is written to guest memory.
pub fn load_from<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut dyn ReadSeek,
    initrd: Option<&mut dyn ReadSeek>,
    cmdline: &str,
    protocol: BootProtocol,
    num_vcpus: u8,
) -> Result<BootSetup, BootError> {
    let low_end = low_ram_end(mem);
    // The boot structures below 1 MiB need all of base memory.
    if low_end < HIMEM_START {
        return Err(BootError::MemoryTooSmall {
            need: HIMEM_START,
            have: low_end,
        });
    }
    let mem_bytes = mem_size(mem);

    // 1. Inspect the kernel (no writes yet).
    let kernel_len = stream_len(kernel).map_err(BootError::ReadKernel)?;
    let image = match detect(kernel, kernel_len)? {
        Format::Elf => Image::Elf(inspect_elf(kernel, kernel_len, low_end)?),
        Format::BzImage => Image::BzImage(inspect_bzimage(kernel, kernel_len, low_end)?),
    };
    let (mode, entry, kernel_end, cmdline_max, initrd_top) = match &image {
        Image::Elf(elf) => {
            let use_pvh = match protocol {
                BootProtocol::Auto => elf.pvh_entry.is_some(),
                BootProtocol::Linux => false,
                BootProtocol::Pvh => true,
            };
            let (mode, entry) = if use_pvh {
                (EntryMode::Pvh, elf.pvh_entry.ok_or(BootError::NoPvhNote)?)
            } else {
                (EntryMode::Linux64, elf.entry)
            };
            if !elf.contains(entry) {
                return Err(BootError::BadEntry { entry });
            }
            (mode, entry, elf.end, LINUX_CMDLINE_MAX - 1, low_end)
        }
        Image::BzImage(bz) => {
            if protocol == BootProtocol::Pvh {
                return Err(BootError::PvhBzImage);
            }
            let max = match bz.hdr.cmdline_size {
                0 => 255,
                n => usize::try_from(n).unwrap_or(usize::MAX),
            };
            let top = low_end.min(u64::from(bz.hdr.initrd_addr_max).saturating_add(1));
            (
                EntryMode::Linux64,
                HIMEM_START + BZIMAGE_64BIT_ENTRY_OFFSET,
                bz.end,
                max,
                top,
            )
        }
    };
    let cmdline_max = cmdline_max.min(CMDLINE_MAX_SIZE - 1);
    check_cmdline(cmdline, cmdline_max)?;

    // 2. Place the initrd (no writes yet).
    let initrd = match initrd {
        Some(reader) => {
            let size = stream_len(reader).map_err(BootError::ReadInitrd)?;
            let addr = place_initrd(size, kernel_end, initrd_top)?;
            Some((reader, addr, size))
        }
        None => None,
    };

    // 3. Write: kernel, initrd, command line, boot info, tables, MP table.
    let mut reader = VolatileReader::new(kernel);
    let header = match &image {
        Image::Elf(_) => {
            Elf::load(mem, None, &mut reader, Some(GuestAddress(HIMEM_START)))
                .map_err(BootError::LoadKernel)?;
            None
        }
        Image::BzImage(bz) => {
            let result = BzImage::load(
                mem,
                Some(GuestAddress(HIMEM_START)),
                &mut reader,
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(BootError::LoadKernel)?;
            Some(result.setup_header.unwrap_or(bz.hdr))
        }
    };
    let initrd = match initrd {
        Some((reader, addr, size)) => {
            reader.rewind().map_err(BootError::ReadInitrd)?;
            let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig {
                size,
                room: 0,
                top: initrd_top,
            })?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut VolatileReader::new(reader), len)
                .map_err(BootError::LoadInitrd)?;
            Some((addr, size))
        }
        None => None,
    };
    write_cmdline(mem, cmdline)?;
    let boot_info = match mode {
        EntryMode::Linux64 => write_zero_page(mem, header, cmdline, initrd, mem_bytes)?,
        EntryMode::Pvh => write_start_info(mem, initrd, mem_bytes)?,
    };
    regs::write_boot_tables(mem, mode)?;
    mptable::write_mptable(mem, num_vcpus)?;

    log::info!(
        "kernel loaded: {mode:?} entry {entry:#x}, kernel end {kernel_end:#x}, initrd {}",
        match initrd {
            Some((a, s)) => format!("{s} bytes at {a:#x}"),
            None => "none".to_string(),
        }
    );
    Ok(BootSetup {
        entry: GuestAddress(entry),
        mode,
        boot_info,
        kernel_end: GuestAddress(kernel_end),
    })
}

/// Checks a command line against a kernel's limit (`max` bytes, without the NUL): length and
/// printable ASCII only (what the kernel and linux-loader's `Cmdline` accept).
pub fn check_cmdline(cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if let Some(pos) = cmdline.bytes().position(|b| !(b' '..=b'~').contains(&b)) {
        return Err(BootError::CmdlineInvalid(pos));
    }
    Ok(())
}

fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::WriteBootInfo {
            what: "command line",
            source,
        })
}

/// Page-aligned initrd address at the top of `[kernel_end, top)`.
fn place_initrd(size: u64, kernel_end: u64, top: u64) -> Result<u64, BootError> {
    if size == 0 {
        return Err(BootError::EmptyInitrd);
    }
    let bottom = align_up(kernel_end, PAGE_SIZE).unwrap_or(u64::MAX);
    let room = top.saturating_sub(bottom);
    let too_big = BootError::InitrdTooBig { size, room, top };
    let addr = top.checked_sub(size).ok_or(too_big)? & !(PAGE_SIZE - 1);
    if addr < bottom {
        return Err(BootError::InitrdTooBig { size, room, top });
    }
    Ok(addr)
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    header: Option<setup_header>,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    mem_bytes: u64,
) -> Result<GuestAddress, BootError> {
    let mut params = boot_params::default();
    match header {
        Some(hdr) => {
            // bzImage: start from the image's own setup header, as the protocol asks.
            params.hdr = hdr;
            params.hdr.code32_start = HIMEM_START as u32;
        }
        None => {
            // vmlinux: no header in the image; fill in what the kernel reads.
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = BZIMAGE_MAGIC;
            params.hdr.kernel_alignment = 0x100_0000;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32; // bounded by CMDLINE_MAX_SIZE
    if let Some((addr, size)) = initrd {
        // Both below the 3.25 GiB gap, so they fit 32 bits; the ext_ fields stay 0.
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = layout::e820_map(mem_bytes);
    if map.len() > params.e820_table.len() {
        return Err(BootError::MemmapTooBig(map.len()));
    }
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind.code(),
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::WriteBootInfo {
            what: "zero page",
            source,
        })?;
    Ok(GuestAddress(ZERO_PAGE_START))
}

fn write_start_info<M: GuestMemoryBackend>(
    mem: &M,
    initrd: Option<(u64, u64)>,
    mem_bytes: u64,
) -> Result<GuestAddress, BootError> {
    let write = |what: &'static str, addr: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| BootError::WriteBootInfo { what, source })
    };
    let map = layout::e820_map(mem_bytes);
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::MemmapTooBig(map.len()));
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.code(),
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        write("pvh memory map", at, entry.as_slice())?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        write("pvh module list", PVH_MODLIST_START, module.as_slice())?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    write("pvh start info", PVH_INFO_START, info.as_slice())?;
    Ok(GuestAddress(PVH_INFO_START))
}

/// End of the RAM that starts at address 0 and runs contiguously, capped at the MMIO gap.
fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> u64 {
    let mut end = 0u64;
    while end < MMIO_GAP_START {
        match mem.find_region(GuestAddress(end)) {
            Some(r) => match r.start_addr().0.checked_add(r.len()) {
                Some(next) if next > end => end = next,
                _ => break,
            },
            None => break,
        }
    }
    end.min(MMIO_GAP_START)
}

/// Total guest RAM, as the memory map will describe it.
fn mem_size<M: GuestMemoryBackend>(mem: &M) -> u64 {
    mem.iter().map(|r| r.len()).fold(0u64, u64::saturating_add)
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    let align = align.max(1);
    v.checked_add(align - 1).map(|x| x / align * align)
}

fn stream_len(r: &mut dyn ReadSeek) -> io::Result<u64> {
    let len = r.seek(SeekFrom::End(0))?;
    r.rewind()?;
    Ok(len)
}

/// Reads `buf.len()` bytes at `offset`, reporting a short file as `UnexpectedEof`.
fn read_at(r: &mut dyn ReadSeek, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    r.seek(SeekFrom::Start(offset))?;
    r.read_exact(buf)
}

enum Format {
    Elf,
    BzImage,
}

fn detect(kernel: &mut dyn ReadSeek, len: u64) -> Result<Format, BootError> {
    if len == 0 {
        return Err(BootError::EmptyKernel);
    }
    let mut magic = [0u8; 4];
    if len >= 4 {
        read_at(kernel, 0, &mut magic).map_err(BootError::ReadKernel)?;
        if magic == ELF_MAGIC {
            return Ok(Format::Elf);
        }
    }
    if len >= 0x206 {
        read_at(kernel, 0x202, &mut magic).map_err(BootError::ReadKernel)?;
        if u32::from_le_bytes(magic) == BZIMAGE_MAGIC {
            return Ok(Format::BzImage);
        }
    }
    Err(BootError::NotAKernel)
}

enum Image {
    Elf(ElfInfo),
    BzImage(BzInfo),
}

/// What the loader needs to know about an ELF kernel, from its headers alone.
#[derive(Debug)]
struct ElfInfo {
    entry: u64,
    pvh_entry: Option<u64>,
    /// Loaded ranges `[start, end)` of the PT_LOAD segments.
    segments: Vec<(u64, u64)>,
    end: u64,
}

impl ElfInfo {
    fn contains(&self, addr: u64) -> bool {
        self.segments.iter().any(|&(s, e)| addr >= s && addr < e)
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn eof_as(what: &'static str) -> impl Fn(io::Error) -> BootError {
    move |e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            BootError::TruncatedElf(what)
        } else {
            BootError::ReadKernel(e)
        }
    }
}

fn inspect_elf(kernel: &mut dyn ReadSeek, len: u64, low_end: u64) -> Result<ElfInfo, BootError> {
    if len < ELF_HEADER_SIZE {
        return Err(BootError::TruncatedElf("header"));
    }
    let mut eh = [0u8; ELF_HEADER_SIZE as usize];
    read_at(kernel, 0, &mut eh).map_err(eof_as("header"))?;
    if eh[4] != ELFCLASS64 {
        return Err(BootError::ElfNot64Bit);
    }
    if eh[5] != ELFDATA2LSB {
        return Err(BootError::ElfBigEndian);
    }
    let machine = le16(&eh, 18);
    if machine != EM_X86_64 {
        return Err(BootError::ElfMachine(machine));
    }
    let entry = le64(&eh, 24);
    let phoff = le64(&eh, 32);
    let phentsize = le16(&eh, 54);
    let phnum = le16(&eh, 56);
    if phentsize != ELF_PHDR_SIZE {
        return Err(BootError::ElfPhdrSize(phentsize));
    }
    let ph_bytes = u64::from(phnum) * u64::from(ELF_PHDR_SIZE);
    match phoff.checked_add(ph_bytes) {
        Some(end) if end <= len && phoff >= ELF_HEADER_SIZE => {}
        _ => return Err(BootError::TruncatedElf("program header table")),
    }
    let mut ph = vec![0u8; ph_bytes as usize]; // at most 65535 * 56 bytes
    read_at(kernel, phoff, &mut ph).map_err(eof_as("program header table"))?;

    let mut info = ElfInfo {
        entry,
        pvh_entry: None,
        segments: Vec::new(),
        end: 0,
    };
    for p in ph.chunks_exact(usize::from(ELF_PHDR_SIZE)) {
        let p_type = le32(p, 0);
        let offset = le64(p, 8);
        let paddr = le64(p, 24);
        let filesz = le64(p, 32);
        let memsz = le64(p, 40);
        match p_type {
            PT_LOAD => {
                if filesz > memsz {
                    return Err(BootError::ElfSegment { addr: paddr });
                }
                match offset.checked_add(filesz) {
                    Some(end) if end <= len => {}
                    _ => return Err(BootError::TruncatedElf("loadable segment")),
                }
                if memsz == 0 {
                    continue;
                }
                if paddr < HIMEM_START {
                    return Err(BootError::ElfSegmentLow { addr: paddr });
                }
                let end = paddr
                    .checked_add(memsz)
                    .ok_or(BootError::ElfSegment { addr: paddr })?;
                if end > low_end {
                    return Err(BootError::MemoryTooSmall {
                        need: end,
                        have: low_end,
                    });
                }
                info.segments.push((paddr, end));
                info.end = info.end.max(end);
            }
            PT_NOTE if info.pvh_entry.is_none() => {
                match offset.checked_add(filesz) {
                    Some(end) if end <= len => {}
                    _ => return Err(BootError::TruncatedElf("note segment")),
                }
                let mut notes = vec![0u8; filesz.min(MAX_NOTE_BYTES) as usize];
                read_at(kernel, offset, &mut notes).map_err(eof_as("note segment"))?;
                info.pvh_entry = find_pvh_entry(&notes);
            }
            _ => {}
        }
    }
    if info.segments.is_empty() {
        return Err(BootError::ElfNoSegments);
    }
    Ok(info)
}

/// Scans ELF notes for `XEN_ELFNOTE_PHYS32_ENTRY` with name "Xen"; returns its 32-bit
/// physical entry address.
pub fn find_pvh_entry(notes: &[u8]) -> Option<u64> {
    let mut off = 0usize;
    while off.checked_add(12)? <= notes.len() {
        let namesz = le32(notes, off) as usize;
        let descsz = le32(notes, off + 4) as usize;
        let kind = le32(notes, off + 8);
        let name_at = off + 12;
        let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
        let next = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
        let name = notes.get(name_at..name_at.checked_add(namesz)?)?;
        let desc = notes.get(desc_at..desc_at.checked_add(descsz)?)?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
            return match desc.len() {
                4 => Some(u64::from(le32(desc, 0))),
                8 => Some(le64(desc, 0)).filter(|&a| a <= u64::from(u32::MAX)),
                _ => None,
            };
        }
        off = next;
    }
    None
}

/// What the loader needs to know about a bzImage.
#[derive(Debug)]
struct BzInfo {
    hdr: setup_header,
    end: u64,
}

/// Reads and checks a bzImage's setup header and works out how much memory the kernel will
/// use from the 1 MiB load address: the compressed payload, and the buffer it decompresses
/// into (`init_size` bytes at the kernel's preferred, aligned address).
fn inspect_bzimage(kernel: &mut dyn ReadSeek, len: u64, low_end: u64) -> Result<BzInfo, BootError> {
    let hdr = read_setup_header(kernel, len)?;
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < MIN_BZIMAGE_VERSION || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::BzImageTooOld(version));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(BootError::BzImageNotHigh);
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let payload = len
        .checked_sub(setup_size)
        .filter(|&p| p > 0)
        .ok_or(BootError::TruncatedBzImage)?;
    let load_end = HIMEM_START + payload; // payload < file length, no overflow in practice
    let run_start = align_up(HIMEM_START, u64::from(hdr.kernel_alignment))
        .unwrap_or(u64::MAX)
        .max(hdr.pref_address);
    let run_end = run_start.saturating_add(u64::from(hdr.init_size));
    let end = load_end.max(run_end);
    if end > low_end {
        return Err(BootError::MemoryTooSmall {
            need: end,
            have: low_end,
        });
    }
    Ok(BzInfo { hdr, end })
}

/// Reads the setup header of a bzImage (at 0x1f1).
pub fn read_setup_header(kernel: &mut dyn ReadSeek, len: u64) -> Result<setup_header, BootError> {
    let mut hdr = setup_header::default();
    let need = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>() as u64;
    if len < need {
        return Err(BootError::TruncatedBzImage);
    }
    read_at(kernel, SETUP_HEADER_OFFSET, hdr.as_mut_slice()).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            BootError::TruncatedBzImage
        } else {
            BootError::ReadKernel(e)
        }
    })?;
    if hdr.header != BZIMAGE_MAGIC {
        return Err(BootError::NotAKernel);
    }
    Ok(hdr)
}

/// Adapts any `Read + Seek` to vm-memory's `ReadVolatile` (which linux-loader needs) through
/// a bounce buffer, so images can come from files and byte slices alike.
struct VolatileReader<'a> {
    inner: &'a mut dyn ReadSeek,
    buf: Vec<u8>,
}

impl<'a> VolatileReader<'a> {
    const BUF_SIZE: usize = 1 << 20;

    fn new(inner: &'a mut dyn ReadSeek) -> Self {
        VolatileReader {
            inner,
            buf: vec![0; Self::BUF_SIZE],
        }
    }
}

impl Read for VolatileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Seek for VolatileReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl ReadVolatile for VolatileReader<'_> {
    /// Fills as much of `slice` as the reader has, looping over the bounce buffer: vm-memory's
    /// `read_exact_volatile_from` calls this once per guest region and treats a short count
    /// as an error, so stopping after one chunk is not an option.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        slice: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0usize;
        while done < slice.len() {
            let want = (slice.len() - done).min(self.buf.len());
            let got = match self.inner.read(&mut self.buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VolatileMemoryError::IOError(e)),
            };
            slice.offset(done)?.copy_from(&self.buf[..got]);
            done += got;
        }
        Ok(done)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kvm::memory::GuestMemoryMmap;
    use std::io::Cursor;

    const MIB: u64 = 1 << 20;
    /// Where the synthetic ELF's segment is loaded, and its 64-bit entry.
    pub(crate) const TEST_ELF_ENTRY: u64 = 0x10_0000;
    /// The synthetic ELF's PVH entry.
    pub(crate) const TEST_PVH_ENTRY: u64 = 0x10_0100;

    fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
        buf[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// A minimal x86_64 ELF: one PT_LOAD at 1 MiB (file offset 0x1000, `memsz` bytes in
    /// memory) holding `code64` at its start and `code32` at +0x100, and a PT_NOTE with the
    /// PVH entry note (pointing at `code32`) or, without `pvh`, an unrelated GNU note first.
    pub(crate) fn test_elf(code64: &[u8], code32: &[u8], pvh: bool, memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x1200];
        // ELF header.
        put(&mut f, 0, &ELF_MAGIC);
        f[4] = ELFCLASS64;
        f[5] = ELFDATA2LSB;
        f[6] = 1; // EV_CURRENT
        put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut f, 18, &EM_X86_64.to_le_bytes());
        put(&mut f, 20, &1u32.to_le_bytes());
        put(&mut f, 24, &TEST_ELF_ENTRY.to_le_bytes());
        put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut f, 54, &ELF_PHDR_SIZE.to_le_bytes());
        put(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
                                              // PT_LOAD.
        let p = 64;
        put(&mut f, p, &PT_LOAD.to_le_bytes());
        put(&mut f, p + 4, &5u32.to_le_bytes()); // R+X
        put(&mut f, p + 8, &0x1000u64.to_le_bytes());
        put(&mut f, p + 16, &TEST_ELF_ENTRY.to_le_bytes());
        put(&mut f, p + 24, &TEST_ELF_ENTRY.to_le_bytes());
        put(&mut f, p + 32, &0x200u64.to_le_bytes());
        put(&mut f, p + 40, &memsz.to_le_bytes());
        put(&mut f, p + 48, &0x1000u64.to_le_bytes());
        // Notes at 0x100.
        let mut notes = Vec::new();
        let mut note = |name: &[u8], kind: u32, desc: &[u8]| {
            notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            notes.extend_from_slice(&kind.to_le_bytes());
            notes.extend_from_slice(name);
            notes.resize(notes.len().next_multiple_of(4), 0);
            notes.extend_from_slice(desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        };
        note(b"GNU\0", 3, &[0xab; 20]); // build id
        if pvh {
            note(
                b"Xen\0",
                XEN_ELFNOTE_PHYS32_ENTRY,
                &(TEST_PVH_ENTRY as u32).to_le_bytes(),
            );
        }
        put(&mut f, 0x100, &notes);
        let p = 64 + 56;
        put(&mut f, p, &PT_NOTE.to_le_bytes());
        put(&mut f, p + 8, &0x100u64.to_le_bytes());
        put(&mut f, p + 32, &(notes.len() as u64).to_le_bytes());
        put(&mut f, p + 40, &(notes.len() as u64).to_le_bytes());
        // Code.
        put(&mut f, 0x1000, code64);
        put(&mut f, 0x1100, code32);
        f
    }

    /// A synthetic bzImage: one setup sector after the boot sector, then `payload`.
    fn test_bzimage(version: u16, cmdline_size: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 1024];
        let hdr = setup_header {
            setup_sects: 1,
            boot_flag: BOOT_FLAG_MAGIC,
            header: BZIMAGE_MAGIC,
            version,
            loadflags: LOADED_HIGH,
            code32_start: HIMEM_START as u32,
            initrd_addr_max: 0x37ff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: XLF_KERNEL_64,
            cmdline_size,
            pref_address: 0x100_0000,
            init_size: 0x80_0000,
            ..Default::default()
        };
        put(&mut f, SETUP_HEADER_OFFSET as usize, hdr.as_slice());
        f.extend_from_slice(payload);
        f
    }

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&layout::ram_regions(mib * MIB).unwrap()).unwrap()
    }

    fn load_bytes(
        m: &GuestMemoryMmap,
        kernel: &[u8],
        initrd: Option<&[u8]>,
        cmdline: &str,
        protocol: BootProtocol,
    ) -> Result<BootSetup, BootError> {
        let mut k = Cursor::new(kernel);
        let mut i = initrd.map(Cursor::new);
        load_from(
            m,
            &mut k,
            i.as_mut().map(|c| c as &mut dyn ReadSeek),
            cmdline,
            protocol,
            2,
        )
    }

    fn read_cstr(m: &GuestMemoryMmap, addr: u64) -> String {
        let mut buf = vec![0u8; 4096];
        m.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        let end = buf.iter().position(|&b| b == 0).unwrap();
        String::from_utf8(buf[..end].to_vec()).unwrap()
    }

    #[test]
    fn protocol_parse_and_display() {
        for p in [BootProtocol::Auto, BootProtocol::Linux, BootProtocol::Pvh] {
            assert_eq!(p.to_string().parse::<BootProtocol>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
        }
        let err = "bios".parse::<BootProtocol>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown boot protocol \"bios\": use auto, linux or pvh"
        );
        assert_eq!(BootProtocol::default(), BootProtocol::Auto);
    }

    #[test]
    fn text_file_empty_file_and_missing_file() {
        let m = mem(64);
        let err = load_bytes(
            &m,
            b"#!/bin/sh\necho not a kernel\n",
            None,
            "",
            BootProtocol::Auto,
        )
        .unwrap_err();
        assert!(matches!(err, BootError::NotAKernel), "{err}");
        let long_text = vec![b'a'; 0x1000];
        assert!(matches!(
            load_bytes(&m, &long_text, None, "", BootProtocol::Auto),
            Err(BootError::NotAKernel)
        ));
        assert!(matches!(
            load_bytes(&m, b"", None, "", BootProtocol::Auto),
            Err(BootError::EmptyKernel)
        ));
        let req = BootRequest {
            kernel: BootSource::Path(Path::new("/nonexistent/vmlinux")),
            initrd: None,
            cmdline: "",
            protocol: BootProtocol::Auto,
            num_vcpus: 1,
        };
        let err = load(&m, req).unwrap_err();
        assert_eq!(err.to_string(), "cannot open kernel /nonexistent/vmlinux");
        assert!(std::error::Error::source(&err).is_some());
        // A missing initrd is named too.
        let elf = test_elf(&[0xf4], &[0xf4], true, 0x2000);
        let req = BootRequest {
            kernel: BootSource::Image {
                name: "test",
                reader: &mut Cursor::new(&elf[..]),
            },
            initrd: Some(Path::new("/nonexistent/initrd")),
            cmdline: "",
            protocol: BootProtocol::Auto,
            num_vcpus: 1,
        };
        let err = load(&m, req).unwrap_err();
        assert_eq!(err.to_string(), "cannot open initrd /nonexistent/initrd");
    }

    #[test]
    fn truncated_and_foreign_elfs() {
        let m = mem(64);
        let elf = test_elf(&[0xf4], &[0xf4], false, 0x2000);
        let err = load_bytes(&m, &elf[..40], None, "", BootProtocol::Auto).unwrap_err();
        assert!(matches!(err, BootError::TruncatedElf("header")), "{err}");
        let err = load_bytes(&m, &elf[..150], None, "", BootProtocol::Auto).unwrap_err();
        assert!(
            matches!(err, BootError::TruncatedElf("program header table")),
            "{err}"
        );
        let err = load_bytes(&m, &elf[..0x1008], None, "", BootProtocol::Auto).unwrap_err();
        assert!(
            matches!(err, BootError::TruncatedElf("loadable segment")),
            "{err}"
        );
        let mut elf32 = elf.clone();
        elf32[4] = 1;
        assert!(matches!(
            load_bytes(&m, &elf32, None, "", BootProtocol::Auto),
            Err(BootError::ElfNot64Bit)
        ));
        let mut arm = elf.clone();
        put(&mut arm, 18, &183u16.to_le_bytes());
        assert!(matches!(
            load_bytes(&m, &arm, None, "", BootProtocol::Auto),
            Err(BootError::ElfMachine(183))
        ));
        let mut low = elf.clone();
        put(&mut low, 64 + 24, &0x8000u64.to_le_bytes());
        assert!(matches!(
            load_bytes(&m, &low, None, "", BootProtocol::Auto),
            Err(BootError::ElfSegmentLow { addr: 0x8000 })
        ));
        let mut wild = elf.clone();
        put(&mut wild, 64 + 40, &u64::MAX.to_le_bytes());
        assert!(load_bytes(&m, &wild, None, "", BootProtocol::Auto).is_err());
        let mut bad_entry = elf;
        put(&mut bad_entry, 24, &0x50_0000u64.to_le_bytes());
        assert!(matches!(
            load_bytes(&m, &bad_entry, None, "", BootProtocol::Linux),
            Err(BootError::BadEntry { entry: 0x50_0000 })
        ));
    }

    #[test]
    fn memory_too_small_for_the_kernel() {
        let m = mem(16);
        let elf = test_elf(&[0xf4], &[0xf4], false, 32 * MIB);
        let err = load_bytes(&m, &elf, None, "", BootProtocol::Auto).unwrap_err();
        assert!(
            matches!(err, BootError::MemoryTooSmall { need, have }
                if need == HIMEM_START + 32 * MIB && have == 16 * MIB),
            "{err}"
        );
        assert!(err
            .to_string()
            .starts_with("memory too small for the kernel"));
        // Guest memory smaller than 1 MiB: no room for the boot structures.
        let tiny = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            load_bytes(&tiny, &elf, None, "", BootProtocol::Auto),
            Err(BootError::MemoryTooSmall { .. })
        ));
    }

    #[test]
    fn initrd_too_big_or_empty() {
        let m = mem(16);
        let elf = test_elf(&[0xf4], &[0xf4], true, 0x2000);
        let big = vec![0u8; 16 * MIB as usize];
        let err = load_bytes(&m, &elf, Some(&big), "", BootProtocol::Auto).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }), "{err}");
        // Fits exactly only if above the kernel: 15 MiB - the kernel's pages does not.
        let almost = vec![0u8; 15 * MIB as usize];
        assert!(matches!(
            load_bytes(&m, &elf, Some(&almost), "", BootProtocol::Auto),
            Err(BootError::InitrdTooBig { .. })
        ));
        assert!(matches!(
            load_bytes(&m, &elf, Some(&[]), "", BootProtocol::Auto),
            Err(BootError::EmptyInitrd)
        ));
    }

    #[test]
    fn large_images_cross_the_bounce_buffer() {
        // Bigger than VolatileReader's 1 MiB buffer, with a pattern to catch misplaced chunks.
        let m = mem(64);
        let elf = test_elf(&[0xf4], &[0xf4], true, 0x2000);
        let initrd: Vec<u8> = (0..(3 * MIB as u32 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        let setup = load_bytes(&m, &elf, Some(&initrd), "", BootProtocol::Auto).unwrap();
        let info: hvm_start_info = m.read_obj(setup.boot_info).unwrap();
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        let mut back = vec![0u8; initrd.len()];
        m.read_slice(&mut back, GuestAddress(module.paddr)).unwrap();
        assert!(back == initrd);
        let payload: Vec<u8> = (0..(2 * MIB as u32 + 7)).map(|i| (i % 253) as u8).collect();
        let bz = test_bzimage(0x020f, 2047, &payload);
        load_bytes(&m, &bz, None, "", BootProtocol::Auto).unwrap();
        let mut back = vec![0u8; payload.len()];
        m.read_slice(&mut back, GuestAddress(HIMEM_START)).unwrap();
        assert!(back == payload);
    }

    #[test]
    fn initrd_placement() {
        assert_eq!(
            place_initrd(0x1800, 0x20_0000, 0x100_0000).unwrap(),
            0xff_e000
        );
        assert!(place_initrd(0x1000, 0x100_0000, 0x100_0000).is_err());
        assert_eq!(
            place_initrd(0x1000, 0xff_f000, 0x100_0000).unwrap(),
            0xff_f000
        );
        assert!(place_initrd(u64::MAX, 0, 0x100_0000).is_err());
    }

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline(&"a".repeat(2047), LINUX_CMDLINE_MAX - 1).is_ok());
        let err = check_cmdline(&"a".repeat(2048), LINUX_CMDLINE_MAX - 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel command line is 2048 bytes, over this kernel's limit of 2047: shorten it"
        );
        assert!(matches!(
            check_cmdline("console=ttyS0\nquiet", 100),
            Err(BootError::CmdlineInvalid(13))
        ));
        assert!(matches!(
            check_cmdline("café", 100),
            Err(BootError::CmdlineInvalid(3))
        ));
        // Through the loader: the ELF limit, and a bzImage's own cmdline_size.
        let m = mem(64);
        let elf = test_elf(&[0xf4], &[0xf4], false, 0x2000);
        assert!(matches!(
            load_bytes(&m, &elf, None, &"x".repeat(2048), BootProtocol::Auto),
            Err(BootError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        let bz = test_bzimage(0x020f, 100, &[0x90; 0x400]);
        assert!(matches!(
            load_bytes(&m, &bz, None, &"x".repeat(101), BootProtocol::Auto),
            Err(BootError::CmdlineTooLong { len: 101, max: 100 })
        ));
    }

    #[test]
    fn pvh_note_detection() {
        let with = test_elf(&[], &[], true, 0x2000);
        let without = test_elf(&[], &[], false, 0x2000);
        let m = mem(64);
        let info = inspect_elf(&mut Cursor::new(&with), with.len() as u64, 64 * MIB).unwrap();
        assert_eq!(info.pvh_entry, Some(TEST_PVH_ENTRY));
        assert_eq!(info.entry, TEST_ELF_ENTRY);
        assert_eq!(info.end, TEST_ELF_ENTRY + 0x2000);
        let info = inspect_elf(&mut Cursor::new(&without), without.len() as u64, 64 * MIB).unwrap();
        assert_eq!(info.pvh_entry, None);
        // Pvh on an image without the note is refused; Linux on one with it is allowed.
        assert!(matches!(
            load_bytes(&m, &without, None, "", BootProtocol::Pvh),
            Err(BootError::NoPvhNote)
        ));
        let setup = load_bytes(&m, &with, None, "", BootProtocol::Linux).unwrap();
        assert_eq!(setup.mode, EntryMode::Linux64);
        assert_eq!(setup.entry, GuestAddress(TEST_ELF_ENTRY));
        // Malformed notes never panic.
        assert_eq!(find_pvh_entry(&[]), None);
        assert_eq!(
            find_pvh_entry(&[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X']),
            None
        );
        let mut huge = vec![0xff; 12];
        huge.extend_from_slice(b"Xen\0");
        assert_eq!(find_pvh_entry(&huge), None);
        let mut n8 = Vec::new();
        n8.extend_from_slice(&4u32.to_le_bytes());
        n8.extend_from_slice(&8u32.to_le_bytes());
        n8.extend_from_slice(&18u32.to_le_bytes());
        n8.extend_from_slice(b"Xen\0");
        n8.extend_from_slice(&0x20_0000u64.to_le_bytes());
        assert_eq!(find_pvh_entry(&n8), Some(0x20_0000));
    }

    #[test]
    fn pvh_boot_info() {
        let m = mem(64);
        let elf = test_elf(&[0x90], &[0xf4], true, 0x2000);
        let initrd = vec![0x5a; 0x3000];
        let setup = load_bytes(
            &m,
            &elf,
            Some(&initrd),
            "console=ttyS0 probe=rng",
            BootProtocol::Auto,
        )
        .unwrap();
        assert_eq!(setup.mode, EntryMode::Pvh);
        assert_eq!(setup.entry, GuestAddress(TEST_PVH_ENTRY));
        assert_eq!(setup.boot_info, GuestAddress(PVH_INFO_START));
        assert_eq!(setup.kernel_end, GuestAddress(TEST_ELF_ENTRY + 0x2000));
        let code: u8 = m.read_obj(GuestAddress(TEST_PVH_ENTRY)).unwrap();
        assert_eq!(code, 0xf4);

        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(read_cstr(&m, info.cmdline_paddr), "console=ttyS0 probe=rng");
        let map = layout::e820_map(64 * MIB);
        assert_eq!(info.memmap_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let got: hvm_memmap_table_entry = m
                .read_obj(GuestAddress(info.memmap_paddr + i as u64 * 24))
                .unwrap();
            assert_eq!(
                (got.addr, got.size, got.type_),
                (e.addr, e.size, e.kind.code())
            );
        }
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 0x3000);
        assert_eq!(module.paddr, 64 * MIB - 0x3000);
        let byte: u8 = m.read_obj(GuestAddress(module.paddr + 0x2fff)).unwrap();
        assert_eq!(byte, 0x5a);
        // MP table written too.
        let mut sig = [0u8; 4];
        m.read_slice(&mut sig, GuestAddress(layout::EBDA_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }

    #[test]
    fn linux_zero_page_for_vmlinux() {
        let m = mem(64);
        let elf = test_elf(&[0x90], &[0xf4], false, 0x2000);
        let initrd = vec![1u8; 0x1234];
        let setup =
            load_bytes(&m, &elf, Some(&initrd), "root=/dev/vda", BootProtocol::Auto).unwrap();
        assert_eq!(setup.mode, EntryMode::Linux64);
        assert_eq!(setup.entry, GuestAddress(TEST_ELF_ENTRY));
        assert_eq!(setup.boot_info, GuestAddress(ZERO_PAGE_START));
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, BZIMAGE_MAGIC);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr } as u64, CMDLINE_START);
        assert_eq!(read_cstr(&m, CMDLINE_START), "root=/dev/vda");
        assert_eq!({ p.hdr.ramdisk_image } as u64, 64 * MIB - 0x2000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        let map = layout::e820_map(64 * MIB);
        assert_eq!(p.e820_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let got = p.e820_table[i];
            assert_eq!(
                ({ got.addr }, { got.size }, { got.r#type }),
                (e.addr, e.size, e.kind.code())
            );
        }
        // Page tables and the 64-bit GDT are in place.
        let pml4: u64 = m.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
        let gdt: [u64; 4] = m.read_obj(GuestAddress(layout::BOOT_GDT_START)).unwrap();
        assert_eq!(gdt, regs::gdt(EntryMode::Linux64));
    }

    #[test]
    fn bzimage_header_and_load() {
        let m = mem(64);
        let payload: Vec<u8> = (0..0x800u32).map(|i| i as u8).collect();
        let bz = test_bzimage(0x020f, 2047, &payload);
        let hdr = read_setup_header(&mut Cursor::new(&bz), bz.len() as u64).unwrap();
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.cmdline_size }, 2047);
        assert_eq!(hdr.setup_sects, 1);

        let initrd = vec![7u8; 0x1000];
        let setup = load_bytes(&m, &bz, Some(&initrd), "quiet", BootProtocol::Auto).unwrap();
        assert_eq!(setup.mode, EntryMode::Linux64);
        assert_eq!(setup.entry, GuestAddress(HIMEM_START + 0x200));
        // Decompression buffer: init_size from the preferred 16 MiB address.
        assert_eq!(setup.kernel_end, GuestAddress(0x100_0000 + 0x80_0000));
        let mut loaded = vec![0u8; payload.len()];
        m.read_slice(&mut loaded, GuestAddress(HIMEM_START))
            .unwrap();
        assert_eq!(loaded, payload);
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.header }, BZIMAGE_MAGIC);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!(p.hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ p.hdr.code32_start } as u64, HIMEM_START);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.cmd_line_ptr } as u64, CMDLINE_START);
        assert_eq!({ p.hdr.ramdisk_image } as u64, 64 * MIB - 0x1000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1000);

        // initrd_addr_max is honoured.
        let mut capped = bz.clone();
        let off =
            SETUP_HEADER_OFFSET as usize + std::mem::offset_of!(setup_header, initrd_addr_max);
        put(&mut capped, off, &(0x200_0000u32 - 1).to_le_bytes());
        load_bytes(&m, &capped, Some(&initrd), "", BootProtocol::Auto).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.ramdisk_image }, 0x200_0000 - 0x1000);

        assert!(matches!(
            load_bytes(&m, &bz, None, "", BootProtocol::Pvh),
            Err(BootError::PvhBzImage)
        ));
        let old = test_bzimage(0x0206, 255, &payload);
        let err = load_bytes(&m, &old, None, "", BootProtocol::Auto).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bzImage boot protocol 2.06 has no 64-bit entry: use a kernel with protocol 2.12 or newer"
        );
        // Header only, no payload.
        assert!(matches!(
            load_bytes(&m, &bz[..1024], None, "", BootProtocol::Auto),
            Err(BootError::TruncatedBzImage)
        ));
        // Too big for 16 MiB: the decompression buffer ends at 24 MiB.
        assert!(matches!(
            load_bytes(&mem(16), &bz, None, "", BootProtocol::Auto),
            Err(BootError::MemoryTooSmall { .. })
        ));
    }
}
