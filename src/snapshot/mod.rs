//! Snapshots: the state file format, the memory file, and merging diffs.
//!
//! A snapshot is two files. The **state file** (this module's format, documented in
//! resources/SNAPSHOT-FORMAT.md) holds everything that is not guest RAM; the **memory file** is
//! guest RAM as a raw image, the regions back to back, with holes where the guest never wrote
//! (Full) or did not write since the last snapshot (Diff). Both are written to a temporary name
//! in the same directory, fsync'd, then renamed over the target, so a crash leaves the previous
//! snapshot in place; the memory file carries an extended attribute naming its snapshot, so a
//! state file is never restored onto another snapshot's memory.
//!
//! State file layout (all integers little endian):
//! ```text
//! 0   8  magic "LEDGESNP"
//! 8   4  format version (FORMAT_VERSION; every older version stays readable)
//! 12  4  header length H
//! 16  8  body length B
//! 24  H  header: JSON `SnapshotHeader` (Ledge version, snapshot id, kind, host CPU, memory)
//! .   B  body: JSON `VmSnapshot` (config, VM state, vCPUs, devices)
//! .   4  CRC-32 (IEEE) of every byte before it
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::state::{HostCpu, VcpuState, VmArchState};
use crate::config::VmConfig;
use crate::devices::state::{I8042Snapshot, SerialSnapshot, TransportSnapshot};
use crate::kvm::memory::{self, GuestMemoryMmap};

/// The magic at the start of every state file.
pub const MAGIC: &[u8; 8] = b"LEDGESNP";
/// The format this Ledge writes. Bump it when the layout or a field's meaning changes, and
/// keep reading every older one (tests/fixtures holds a file of each).
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format this Ledge reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Bigger state files are refused before they are read (a real one is tens of KiB per vCPU).
pub const MAX_STATE_FILE: u64 = 64 << 20;
const PREFIX: usize = 24;
const PAGE: usize = 4096;

/// Errors writing, reading or merging snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a Ledge snapshot state file (bad magic)")]
    Magic(PathBuf),
    #[error("{path} is in snapshot format version {version}; this Ledge reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}: use a newer Ledge")]
    Version { path: PathBuf, version: u32 },
    #[error("{path} is truncated or has trailing data ({len} bytes, expected {expected})")]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("{0} is larger than any state file Ledge writes")]
    TooLarge(PathBuf),
    #[error("{path} is corrupt: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path} is corrupt: its {part} does not parse: {why}")]
    Parse {
        path: PathBuf,
        part: &'static str,
        why: String,
    },
    #[error("cannot encode the snapshot state")]
    Encode(#[source] serde_json::Error),
    #[error("memory file {path} is {len} bytes but the snapshot's guest has {expected} bytes of memory: use the memory file written with this state file")]
    MemorySize {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error(
        "memory file {path} belongs to snapshot {found}, not to this state file's {expected}{hint}"
    )]
    WrongMemory {
        path: PathBuf,
        found: String,
        expected: String,
        hint: &'static str,
    },
    #[error("cannot copy guest memory at {addr:#x}")]
    GuestMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("{diff} is a diff on snapshot {parent}, but {base} holds snapshot {found}: merge diffs in the order they were taken")]
    DiffOrder {
        diff: PathBuf,
        parent: String,
        base: PathBuf,
        found: String,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// Full: all guest memory. Diff: only pages written since the previous snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// Guest memory as the snapshot saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Total guest RAM in bytes: the memory file's exact length.
    pub size: u64,
    /// (guest address, length) of each region, in file order.
    pub regions: Vec<(u64, u64)>,
    /// Bytes of guest memory actually written into the file (the rest are holes).
    pub written: u64,
}

/// The header: what a reader checks before it trusts the body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub ledge_version: String,
    /// Unique per snapshot; the memory file is tagged with it.
    pub id: String,
    pub kind: SnapshotType,
    /// For a Diff: the snapshot it applies on.
    #[serde(default)]
    pub parent: Option<String>,
    pub created_unix_ms: u64,
    pub host_cpu: HostCpu,
    /// KVM capabilities the state relies on (checked present on restore).
    pub kvm_caps: Vec<String>,
    pub memory: MemoryInfo,
}

/// Everything but guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub config: VmConfig,
    pub vm: VmArchState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub i8042: I8042Snapshot,
    /// Each virtio-mmio window, in bus order, with the device's name.
    pub devices: Vec<(String, TransportSnapshot)>,
}

/// A state file, read and checked.
#[derive(Debug)]
pub struct StateFile {
    pub format_version: u32,
    pub header: SnapshotHeader,
    pub body: VmSnapshot,
}

/// A fresh snapshot id: 128 random bits in hex.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(f) = File::open("/dev/urandom") {
        let _ = f.read_exact_at(&mut b, 0);
    }
    if b == [0; 16] {
        // No /dev/urandom: time and pid are unique enough for an id.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&(t ^ (u128::from(std::process::id()) << 96)).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The temporary name next to `path` a file is written under before the rename.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The pid alone is not unique: every jailed VMM is PID 1 in its own namespace.
    let salt = &new_id()[..8];
    path.with_file_name(format!(".{name}.ledge-tmp.{}-{salt}", std::process::id()))
}

/// Creates a temporary file next to `path` and takes its writer's lock: an exclusive flock
/// held as long as the file is open, which the kernel drops when the writer dies however it
/// dies. Returns the file and its name.
///
/// Between the create and the lock the new file is unlocked, and another writer's sweep of
/// the same target (`remove_stale_temps`) may take it for a dead writer's and remove it; the
/// file is then claimed again under a new name, so a sweep never costs a snapshot.
fn create_temp(path: &Path) -> Result<(PathBuf, File), SnapshotError> {
    const ATTEMPTS: usize = 8;
    for _ in 0..ATTEMPTS {
        let tmp = temp_path(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        if let Some(file) = claim(file, &tmp)? {
            return Ok((tmp, file));
        }
    }
    Err(io("lock", path)(std::io::Error::other(format!(
        "{ATTEMPTS} new temporary files were removed before they could be locked: is another process sweeping this directory?"
    ))))
}

/// Locks the new temporary `file` created as `tmp`. None when a sweep got to it first: it
/// holds the lock (and removes the file), or has removed it already.
fn claim(file: File, tmp: &Path) -> Result<Option<File>, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            let _ = std::fs::remove_file(tmp);
            return Err(io("lock", tmp)(e));
        }
    }
    // Locked: no sweep removes it from now on. Still there under its name?
    let ours = file.metadata().map_err(io("stat", tmp))?;
    Ok(std::fs::metadata(tmp)
        .is_ok_and(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino()))
        .then_some(file))
}

/// Removes temporary files a killed Ledge left next to `path`: those whose writer's lock
/// (`create_temp`) nobody holds any more. A live writer's file is left alone, whichever
/// process or PID namespace it is in.
fn remove_stale_temps(path: &Path) {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(".{name}.ledge-tmp.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if !file.starts_with(&prefix) {
            continue;
        }
        let Ok(f) = File::open(e.path()) else {
            continue;
        };
        // Locked: its writer is alive. Unlocked: the writer is gone (the lock is kept until
        // the file is removed, so no new writer can take this name meanwhile: names are unique).
        if f.try_lock().is_ok() {
            log::info!(
                "removing {}, left by a Ledge that was killed mid-snapshot",
                e.path().display()
            );
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Encodes a state file: prefix, header, body, checksum.
pub fn encode(header: &SnapshotHeader, body: &VmSnapshot) -> Result<Vec<u8>, SnapshotError> {
    let h = serde_json::to_vec(header).map_err(SnapshotError::Encode)?;
    let b = serde_json::to_vec(body).map_err(SnapshotError::Encode)?;
    Ok(frame(&h, &b))
}

/// A state file around already-encoded header and body bytes: the prefix with this format's
/// version and both lengths, the two parts, and the checksum over all of it. `encode` uses
/// it; tests and the fuzzer frame arbitrary bytes with it to get past the checksum.
pub fn frame(header: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX + header.len() + body.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    // A header over 4 GiB cannot happen: it is a few hundred bytes.
    out.extend_from_slice(
        &u32::try_from(header.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks and decodes a state file's bytes; `path` only names it in errors.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<StateFile, SnapshotError> {
    let p = || path.to_path_buf();
    let len = bytes.len() as u64;
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(SnapshotError::Magic(p()));
    }
    if bytes.len() < PREFIX + 4 {
        return Err(SnapshotError::Truncated {
            path: p(),
            len,
            expected: (PREFIX + 4) as u64,
        });
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(8);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(SnapshotError::Version { path: p(), version });
    }
    let hlen = u64::from(u32_at(12));
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(&bytes[16..24]);
    let blen = u64::from_le_bytes(b8);
    let expected = (PREFIX as u64)
        .checked_add(hlen)
        .and_then(|x| x.checked_add(blen))
        .and_then(|x| x.checked_add(4))
        .unwrap_or(u64::MAX);
    if expected != len {
        return Err(SnapshotError::Truncated {
            path: p(),
            len,
            expected,
        });
    }
    // `expected == len` bounds every offset below.
    let end = bytes.len() - 4;
    let found = crc32fast::hash(&bytes[..end]);
    let stored = u32_at(end);
    if found != stored {
        return Err(SnapshotError::Checksum {
            path: p(),
            found,
            expected: stored,
        });
    }
    let hend = PREFIX + hlen as usize;
    let header: SnapshotHeader =
        serde_json::from_slice(&bytes[PREFIX..hend]).map_err(|e| SnapshotError::Parse {
            path: p(),
            part: "header",
            why: e.to_string(),
        })?;
    let body: VmSnapshot =
        serde_json::from_slice(&bytes[hend..end]).map_err(|e| SnapshotError::Parse {
            path: p(),
            part: "body",
            why: e.to_string(),
        })?;
    Ok(StateFile {
        format_version: version,
        header,
        body,
    })
}

/// Reads and checks a state file (size, magic, version, length, checksum, both JSON parts).
pub fn read_state(path: &Path) -> Result<StateFile, SnapshotError> {
    let f = File::open(path).map_err(io("open the snapshot", path))?;
    let len = f.metadata().map_err(io("read the size of", path))?.len();
    if len > MAX_STATE_FILE {
        return Err(SnapshotError::TooLarge(path.to_path_buf()));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    use std::io::Read;
    (&f).take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read the snapshot", path))?;
    decode(path, &bytes)
}

/// A state file written under a temporary name and fsync'd; `commit` renames it into place.
pub struct StagedFile {
    tmp: PathBuf,
    path: PathBuf,
    /// Open, and so locked, until the rename.
    _file: File,
}

impl StagedFile {
    pub fn write(path: &Path, bytes: &[u8]) -> Result<StagedFile, SnapshotError> {
        remove_stale_temps(path);
        let (tmp, mut file) = create_temp(path)?;
        let r = file.write_all(bytes).and_then(|()| file.sync_all());
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("write", &tmp)(e));
        }
        Ok(StagedFile {
            tmp,
            path: path.to_path_buf(),
            _file: file,
        })
    }

    pub fn commit(self) -> Result<(), SnapshotError> {
        std::fs::rename(&self.tmp, &self.path)
            .map_err(io("rename the new snapshot onto", &self.path))?;
        sync_dir(&self.path);
        Ok(())
    }
}

/// A memory file being written: the temporary file, renamed by `commit`.
pub struct MemoryWriter {
    tmp: PathBuf,
    path: PathBuf,
    file: File,
}

impl MemoryWriter {
    /// Writes guest memory into a temporary file next to `path`: with `dirty`, exactly the
    /// pages marked there (Diff); without, every page the host has backing for and that is
    /// not all zeros (Full) — `source` is the file the memory was restored from, whose data
    /// is guest memory too even where the guest never touched it since. Returns the writer
    /// (commit it once the state file is ready) and the bytes written.
    pub fn write(
        path: &Path,
        mem: &GuestMemoryMmap,
        dirty: Option<&[Vec<u64>]>,
        source: Option<&File>,
        tag: &str,
    ) -> Result<(MemoryWriter, u64), SnapshotError> {
        remove_stale_temps(path);
        let (tmp, file) = create_temp(path)?;
        let w = MemoryWriter {
            tmp,
            path: path.to_path_buf(),
            file,
        };
        match w.fill(mem, dirty, source, tag) {
            Ok(written) => Ok((w, written)),
            Err(e) => {
                let _ = std::fs::remove_file(&w.tmp);
                Err(e)
            }
        }
    }

    fn fill(
        &self,
        mem: &GuestMemoryMmap,
        dirty: Option<&[Vec<u64>]>,
        source: Option<&File>,
        tag: &str,
    ) -> Result<u64, SnapshotError> {
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        self.file.set_len(total).map_err(io("size", &self.tmp))?;
        let mut run = RunWriter::new(&self.file, &self.tmp);
        let mut file_off = 0u64;
        let mut page = vec![0u8; PAGE];
        for (i, region) in mem.iter().enumerate() {
            let npages = usize::try_from(region.len()).unwrap_or(0) / PAGE;
            let base = region.start_addr().0;
            let wanted: Vec<bool> = match dirty {
                Some(maps) => {
                    let map = maps.get(i).map(Vec::as_slice).unwrap_or(&[]);
                    (0..npages)
                        .map(|p| map.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0))
                        .collect()
                }
                None => {
                    let mut w = memory::backed_pages(region.as_ptr() as u64, npages)
                        .map_err(io("read the page map for", Path::new("/proc/self/pagemap")))?;
                    if let Some(src) = source {
                        let ext = memory::data_extents(src, file_off, file_off + region.len())
                            .map_err(io("find the data in", &self.path))?;
                        for (s, e) in ext {
                            let first = ((s - file_off) as usize) / PAGE;
                            let last = ((e - file_off) as usize).div_ceil(PAGE).min(npages);
                            for b in &mut w[first..last] {
                                *b = true;
                            }
                        }
                    }
                    w
                }
            };
            for (p, want) in wanted.into_iter().enumerate() {
                if !want {
                    continue;
                }
                let addr = base + (p * PAGE) as u64;
                mem.read_slice(&mut page, GuestAddress(addr))
                    .map_err(|source| SnapshotError::GuestMemory { addr, source })?;
                // A Full snapshot leaves all-zero pages as holes: they read back as zeros.
                if dirty.is_none() && page.iter().all(|&b| b == 0) {
                    continue;
                }
                run.add(file_off + (p * PAGE) as u64, &page)?;
            }
            file_off += region.len();
        }
        let written = run.finish()?;
        memory::set_memory_tag(&self.file, tag);
        self.file.sync_all().map_err(io("sync", &self.tmp))?;
        Ok(written)
    }

    /// Renames the memory file into place.
    pub fn commit(self) -> Result<(), SnapshotError> {
        std::fs::rename(&self.tmp, &self.path)
            .map_err(io("rename the new memory file onto", &self.path))?;
        sync_dir(&self.path);
        Ok(())
    }

    /// Drops the temporary file (the snapshot failed after memory was written).
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Coalesces consecutive pages into large writes.
struct RunWriter<'a> {
    file: &'a File,
    path: &'a Path,
    start: u64,
    buf: Vec<u8>,
    written: u64,
}

impl<'a> RunWriter<'a> {
    const MAX: usize = 1 << 20;

    fn new(file: &'a File, path: &'a Path) -> Self {
        RunWriter {
            file,
            path,
            start: 0,
            buf: Vec::with_capacity(Self::MAX),
            written: 0,
        }
    }

    fn add(&mut self, off: u64, page: &[u8]) -> Result<(), SnapshotError> {
        if !self.buf.is_empty()
            && (off != self.start + self.buf.len() as u64 || self.buf.len() >= Self::MAX)
        {
            self.flush()?;
        }
        if self.buf.is_empty() {
            self.start = off;
        }
        self.buf.extend_from_slice(page);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SnapshotError> {
        self.file
            .write_all_at(&self.buf, self.start)
            .map_err(io("write", self.path))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<u64, SnapshotError> {
        if !self.buf.is_empty() {
            self.flush()?;
        }
        Ok(self.written)
    }
}

/// Tag values on memory files: "<id>:full" for a complete image, "<id>:diff" for a diff.
pub fn full_tag(id: &str) -> String {
    format!("{id}:full")
}

pub fn diff_tag(id: &str) -> String {
    format!("{id}:diff")
}

/// Opens a memory file for restoring `header`'s snapshot: it must be exactly the guest's
/// memory size and, when tagged, hold that snapshot's complete image.
pub fn open_memory(path: &Path, header: &SnapshotHeader) -> Result<File, SnapshotError> {
    let f = File::open(path).map_err(io("open the memory file", path))?;
    let len = f.metadata().map_err(io("read the size of", path))?.len();
    if len != header.memory.size {
        return Err(SnapshotError::MemorySize {
            path: path.to_path_buf(),
            len,
            expected: header.memory.size,
        });
    }
    check_tag(&f, path, &full_tag(&header.id), header.kind)?;
    Ok(f)
}

fn check_tag(f: &File, path: &Path, want: &str, kind: SnapshotType) -> Result<(), SnapshotError> {
    match memory::memory_tag(f) {
        Some(t) if t != want => Err(SnapshotError::WrongMemory {
            path: path.to_path_buf(),
            found: t,
            expected: want.to_string(),
            hint: if kind == SnapshotType::Diff {
                " (a Diff snapshot restores from its base memory file with the diff merged in: `ledge snapshot merge`)"
            } else {
                ""
            },
        }),
        Some(_) => Ok(()),
        None => {
            log::warn!(
                "{} carries no snapshot tag (copied without extended attributes?); not checked",
                path.display()
            );
            Ok(())
        }
    }
}

/// Copies the data of a diff memory file onto `base` (a full image of the diff's parent),
/// fsyncs it and re-tags it as the diff's full image. `diff_state` is the diff's state file.
pub fn merge(base: &Path, diff: &Path, diff_state: &Path) -> Result<(), SnapshotError> {
    let state = read_state(diff_state)?;
    let h = &state.header;
    let parent = h.parent.clone().unwrap_or_default();
    let base_f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(base)
        .map_err(io("open the base memory file", base))?;
    let diff_f = File::open(diff).map_err(io("open the diff memory file", diff))?;
    for (p, f) in [(base, &base_f), (diff, &diff_f)] {
        let len = f.metadata().map_err(io("read the size of", p))?.len();
        if len != h.memory.size {
            return Err(SnapshotError::MemorySize {
                path: p.to_path_buf(),
                len,
                expected: h.memory.size,
            });
        }
    }
    if h.kind != SnapshotType::Diff {
        return Err(SnapshotError::Parse {
            path: diff_state.to_path_buf(),
            part: "header",
            why: "it is a Full snapshot; only Diff snapshots are merged".into(),
        });
    }
    check_tag(&diff_f, diff, &diff_tag(&h.id), SnapshotType::Full)?;
    if let Some(found) = memory::memory_tag(&base_f) {
        if found != full_tag(&parent) {
            return Err(SnapshotError::DiffOrder {
                diff: diff.to_path_buf(),
                parent,
                base: base.to_path_buf(),
                found,
            });
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    for (s, e) in
        memory::data_extents(&diff_f, 0, h.memory.size).map_err(io("find the data in", diff))?
    {
        let mut off = s;
        while off < e {
            let n = ((e - off) as usize).min(buf.len());
            diff_f
                .read_exact_at(&mut buf[..n], off)
                .map_err(io("read", diff))?;
            base_f
                .write_all_at(&buf[..n], off)
                .map_err(io("write", base))?;
            off += n as u64;
        }
    }
    base_f.sync_all().map_err(io("sync", base))?;
    memory::set_memory_tag(&base_f, &full_tag(&h.id));
    base_f.sync_all().map_err(io("sync", base))?;
    Ok(())
}

#[cfg(test)]
mod tests;
