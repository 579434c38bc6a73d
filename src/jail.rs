//! `ledge jail`: run one Ledge VMM confined, the way a host that runs untrusted guests wants it.
//!
//! The jailer (this module, running as root) prepares `<root-base>/<id>/root`, a cgroup with
//! the requested limits, then forks the VMM process, which as PID 1 of a new PID namespace:
//! 1. joins the cgroup (every hierarchy of cgroup v1, or the one v2 cgroup);
//! 2. unshares mount, IPC, UTS and cgroup namespaces, and the network namespace (or joins the
//!    one `--netns` names);
//! 3. builds its file tree in a private mount namespace: the jail root bind-mounted read-only,
//!    `/run` a small writable tmpfs mounted by the jailer on the host (the API socket lives
//!    there, and the host sees it at `<root-base>/<id>/root/run`; its size bounds what the
//!    VMM can write), a small tmpfs `/dev` with only `kvm`, `null`, `urandom`
//!    (and `net/tun` when asked), a fresh `/proc` for its PID namespace, the ledge binary at
//!    `/ledge` and each `--file` bind-mounted (read-only unless `:rw`);
//! 4. `pivot_root`s into it and detaches the host's tree (chroot only where pivot_root cannot
//!    work: a host whose root is the initramfs);
//! 5. sets no_new_privs, empties the capability bounding and ambient sets, drops the
//!    supplementary groups, takes the given gid and uid, empties its remaining capabilities;
//! 6. closes every file descriptor but 0, 1 and 2, resets signal dispositions, clears the
//!    environment, and execs `/ledge` with the arguments given after `--` (behind the global
//!    `--seccomp`/`--no-seccomp`, when given).
//!
//! The jailer stays as a small supervisor: it writes the VMM's host PID to
//! `<root-base>/<id>/vmm.pid`, forwards SIGTERM/SIGINT/SIGHUP to the VMM as SIGTERM, exits
//! with the VMM's status, and removes the jail directory and the cgroup (unless `--keep`).
//! Nothing else is left behind except the (empty) parent cgroup, as with any cgroup manager.
//! A jailer killed outright (SIGKILL) takes the VMM with it but leaves the directory, its /run
//! mount and the cgroup: `umount <root>/run; rm -rf <root-base>/<id>; rmdir <cgroup>`.
//!
//! Only the child setup runs after `fork()`, and the jailer is single-threaded at that point
//! (checked), so the child may allocate.

use std::convert::Infallible;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use clap::Args;

use crate::config::parse_bytes;

/// Where jails live unless `--root-base` says otherwise.
pub const DEFAULT_ROOT_BASE: &str = "/srv/ledge";
/// The parent cgroup unless `--parent-cgroup` says otherwise.
pub const DEFAULT_PARENT_CGROUP: &str = "/ledge";
/// The ledge binary's path inside the jail.
pub const JAIL_EXE: &str = "/ledge";
/// The file, beside the jail root, that holds the VMM's host PID once it runs.
pub const PID_FILE: &str = "vmm.pid";
/// With --daemonize, the file beside the jail root that holds the supervisor's PID.
pub const JAILER_PID_FILE: &str = "jailer.pid";

/// Errors of `ledge jail`: each is one line that names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("ledge jail must run as root: it makes namespaces, device nodes and cgroups")]
    NotRoot,
    #[error("bad --id {0:?}: use 1 to 64 characters from A-Z a-z 0-9 - _")]
    BadId(String),
    #[error("refusing --{0} {1}: the jail exists to run the VMM without root's ids (pick an unused id such as 10000)")]
    BadIds(&'static str, u32),
    #[error(
        "nothing to run: give ledge's own arguments after --, e.g. -- run --api-sock /run/api.sock"
    )]
    NoArgs,
    #[error("the arguments after -- are ledge's own: drop the leading {0:?}")]
    ProgramName(String),
    #[error("--seccomp/--no-seccomp is given both before and after --: give it on one side only")]
    SeccompTwice,
    #[error("bad --file {spec:?}: {why}")]
    BadFile { spec: String, why: String },
    #[error("bad --rlimit {spec:?}: {why}")]
    BadRlimit { spec: String, why: String },
    #[error("bad --cgroup {spec:?}: {why}")]
    BadLimit { spec: String, why: String },
    #[error(
        "bad --parent-cgroup {0:?}: use a path of plain names, like /ledge or ledge (no . or ..)"
    )]
    BadParent(String),
    #[error("bad --run-size {0:?}: give bytes (at least 64K), with an optional K, M, G or T (or KiB, MiB...)")]
    BadRunSize(String),
    #[error("bad --root-base {0:?}: give an absolute directory")]
    BadRootBase(PathBuf),
    #[error("jail {id:?} is in use: {path} exists (a jail with this id runs, or one was left by --keep or a killed jailer: umount its root/run, remove it and rmdir the jail's cgroup)")]
    InUse { id: String, path: PathBuf },
    #[error("--netns {0}: not a network namespace (expected a file such as /var/run/netns/NAME)")]
    NotNetns(PathBuf),
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0} failed: {1}")]
    Sys(&'static str, io::Error),
    #[error("ledge jail must fork while single-threaded, and this process runs {0} threads")]
    Threads(usize),
    #[error("setting up the jail: {0}")]
    Child(String),
    #[error("{0}")]
    Daemon(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `ledge jail` flags, as typed; [`JailSpec::from_args`] validates them.
#[derive(Debug, Default, Args)]
pub struct JailArgs {
    /// The jail's name: its directory <root-base>/<id> and its cgroup <parent-cgroup>/<id>
    /// (1-64 of A-Z a-z 0-9 - _).
    #[arg(long, value_name = "NAME")]
    pub id: String,
    /// The user id the VMM runs as (not 0).
    #[arg(long, value_name = "N")]
    pub uid: u32,
    /// The group id the VMM runs as (not 0).
    #[arg(long, value_name = "N")]
    pub gid: u32,
    /// Where jail directories are made.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_ROOT_BASE)]
    pub root_base: PathBuf,
    /// A host file or directory to show in the jail: HOST[:JAIL_PATH][:rw] (repeatable).
    /// Bind-mounted, read-only unless :rw; JAIL_PATH defaults to /<file name>. The file keeps
    /// its host owner and mode: make it readable (writable) by --uid/--gid.
    #[arg(long = "file", value_name = "SPEC")]
    pub files: Vec<String>,
    /// The size of the jail's /run, a tmpfs (it holds the API socket and whatever else the VMM
    /// is told to write there, such as a log or metrics file).
    #[arg(long, value_name = "BYTES", default_value = "16M")]
    pub run_size: String,
    /// Join this network namespace (e.g. /var/run/netns/NAME) instead of a new, empty one.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Also make /dev/net/tun in the jail (done anyway when the VMM arguments have --net).
    #[arg(long)]
    pub tun: bool,
    /// A cgroup limit, in cgroup v2 terms (repeatable): memory.max=BYTES[K|M|G|T] or max,
    /// cpu.max=QUOTA_US[/PERIOD_US] or max, pids.max=N or max.
    #[arg(long = "cgroup", value_name = "KEY=VALUE")]
    pub limits: Vec<String>,
    /// The parent of the jail's cgroup: /PATH from the hierarchy's root, or PATH under the
    /// jailer's own cgroup (for a jailer that runs in a delegated cgroup).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PARENT_CGROUP)]
    pub parent_cgroup: String,
    /// Which cgroup version to use: auto (v2 when it has the memory, cpu and pids controllers,
    /// else v1), 1 or 2.
    #[arg(long, value_name = "V", default_value = "auto")]
    pub cgroup_version: CgroupVersion,
    /// Make no cgroup (the caller already placed the jailer in one).
    #[arg(long, conflicts_with_all = ["limits", "parent_cgroup", "cgroup_version"])]
    pub no_cgroup: bool,
    /// A resource limit for the VMM (repeatable): nofile=N (open files) or fsize=BYTES (the
    /// largest file it may write). Core dumps are always off (core=0): they would hold guest
    /// memory.
    #[arg(long = "rlimit", value_name = "KEY=VALUE")]
    pub rlimits: Vec<String>,
    /// Leave the jail directory and the cgroup in place when the VMM exits (for a post-mortem).
    #[arg(long)]
    pub keep: bool,
    /// Return once the VMM runs, leaving a detached supervisor (PID in <jail>/jailer.pid;
    /// SIGTERM it to stop the VMM) that cleans up when the VMM exits. Standard input and output
    /// go to /dev/null: give the VMM --console off or file:/run/PATH.
    #[arg(long)]
    pub daemonize: bool,
    /// The VMM's arguments, as for `ledge` itself (paths in them are paths inside the jail).
    #[arg(last = true, value_name = "LEDGE_ARGS")]
    pub vmm_args: Vec<String>,
    /// Ledge's global flags for the VMM given outside `--` (`--seccomp ACTION`,
    /// `--no-seccomp`; see `Cli::seccomp_args`): they go in front of `vmm_args`.
    #[arg(skip)]
    pub vmm_flags: Vec<String>,
}

/// A host file shown in the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailFile {
    pub host: PathBuf,
    /// Absolute, inside the jail.
    pub inside: PathBuf,
    pub writable: bool,
    pub is_dir: bool,
    /// Mapped executable by the loader (the binary's shared libraries); else noexec.
    pub exec: bool,
}

/// A limit value: a number or `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Max {
    Max,
    Value(u64),
}

/// The cgroup limits, in cgroup v2 terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: Option<Max>,
    /// (quota in µs or Max, period in µs)
    pub cpu_max: Option<(Max, u64)>,
    pub pids_max: Option<Max>,
}

/// The validated request.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    pub root_base: PathBuf,
    pub files: Vec<JailFile>,
    pub netns: Option<PathBuf>,
    pub tun: bool,
    /// Bytes of the /run tmpfs.
    pub run_size: u64,
    /// None: `--no-cgroup`.
    pub cgroup: Option<CgroupRequest>,
    pub keep: bool,
    pub daemonize: bool,
    /// (resource, soft = hard limit), core=0 first.
    pub rlimits: Vec<(Rlimit, u64)>,
    pub vmm_args: Vec<String>,
}

/// The resource limits `--rlimit` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    Core,
    Nofile,
    Fsize,
}

impl Rlimit {
    fn resource(self) -> libc::__rlimit_resource_t {
        match self {
            Rlimit::Core => libc::RLIMIT_CORE,
            Rlimit::Nofile => libc::RLIMIT_NOFILE,
            Rlimit::Fsize => libc::RLIMIT_FSIZE,
        }
    }
}

fn parse_rlimits(specs: &[String]) -> Result<Vec<(Rlimit, u64)>, JailError> {
    let mut v = vec![(Rlimit::Core, 0)];
    for spec in specs {
        let bad = |why: &str| JailError::BadRlimit {
            spec: spec.clone(),
            why: why.to_string(),
        };
        let Some((key, value)) = spec.split_once('=') else {
            return Err(bad("write it as KEY=VALUE, e.g. nofile=1024"));
        };
        let (r, n) = match key {
            "nofile" => match value.parse::<u64>() {
                // The VMM needs a few dozen fds before it runs a guest.
                Ok(n) if n >= 64 => (Rlimit::Nofile, n),
                _ => return Err(bad("give a number of files, at least 64")),
            },
            "fsize" => match parse_bytes(value) {
                Some(n) => (Rlimit::Fsize, n),
                None => {
                    return Err(bad(
                        "give bytes, with an optional K, M, G or T (or KiB, MiB...)",
                    ))
                }
            },
            k => return Err(bad(&format!("unknown key {k:?}: use nofile or fsize"))),
        };
        v.retain(|(x, _)| *x != r);
        v.push((r, n));
    }
    Ok(v)
}

/// `--cgroup-version`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupVersion {
    // (Plain comments: doc comments would turn into per-value help text.)
    // v2 when it has the memory, cpu and pids controllers, else v1.
    #[default]
    Auto,
    #[value(name = "1")]
    V1,
    #[value(name = "2")]
    V2,
}

#[derive(Debug, Clone)]
pub struct CgroupRequest {
    pub limits: Limits,
    pub parent: String,
    pub version: CgroupVersion,
}

pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Reserved top-level names inside the jail.
const RESERVED: [&str; 4] = ["ledge", "dev", "proc", "run"];

fn parse_file(spec: &str) -> Result<JailFile, JailError> {
    let bad = |why: &str| JailError::BadFile {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, inside, mode) = match parts.as_slice() {
        [h] => (*h, None, None),
        [h, m] if *m == "rw" || *m == "ro" => (*h, None, Some(*m)),
        [h, i] => (*h, Some(*i), None),
        [h, i, m] => (*h, Some(*i), Some(*m)),
        _ => {
            return Err(bad(
                "write it as HOST[:JAIL_PATH][:rw] (paths with ':' are not supported)",
            ))
        }
    };
    let writable = match mode {
        None | Some("ro") => false,
        Some("rw") => true,
        Some(m) => return Err(bad(&format!("unknown mode {m:?}: use rw or ro"))),
    };
    if host.is_empty() {
        return Err(bad("the host path is empty"));
    }
    // Absolute and free of symlinks, so the mount table says what was bound.
    let host = fs::canonicalize(host).map_err(|e| bad(&format!("{host}: {e}")))?;
    let meta = fs::metadata(&host).map_err(|e| bad(&format!("{}: {e}", host.display())))?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(bad("only regular files and directories can go into a jail"));
    }
    let inside = match inside {
        Some(i) => PathBuf::from(i),
        None => {
            let name = host
                .file_name()
                .ok_or_else(|| bad("the host path has no file name: give JAIL_PATH"))?;
            Path::new("/").join(name)
        }
    };
    if !inside.is_absolute() {
        return Err(bad("JAIL_PATH must be absolute, like /disk.img"));
    }
    let comps: Vec<_> = inside.components().skip(1).collect();
    if comps.is_empty() || !comps.iter().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("JAIL_PATH must name a file below /, with no . or .."));
    }
    if let Component::Normal(top) = comps[0] {
        if RESERVED.iter().any(|r| OsStr::new(r) == top) {
            return Err(bad("/ledge, /dev, /proc and /run are the jail's own"));
        }
    }
    Ok(JailFile {
        host,
        inside,
        writable,
        is_dir: meta.is_dir(),
        exec: false,
    })
}

/// The first of `files` whose jail path is `inside`, or contains it, or lies inside it: two
/// binds on one path (or one under the other) would hide one another.
fn overlap<'a>(files: &'a [JailFile], inside: &Path) -> Option<&'a JailFile> {
    files
        .iter()
        .find(|o| o.inside.starts_with(inside) || inside.starts_with(&o.inside))
}

/// The ELF interpreter (PT_INTERP) a binary names, if it is dynamically linked.
fn elf_interpreter(bytes: &[u8]) -> Option<PathBuf> {
    // Every offset comes from the file: checked arithmetic throughout.
    let at = |o: usize, n: usize| bytes.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| Some(u16::from_le_bytes(at(o, 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(at(o, 4)?.try_into().ok()?));
    let u64_at = |o: usize| usize::try_from(u64::from_le_bytes(at(o, 8)?.try_into().ok()?)).ok();
    if bytes.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let phoff = u64_at(0x20)?;
    let (size, num) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    for i in 0..num {
        let ph = phoff.checked_add(i.checked_mul(size)?)?;
        if u32_at(ph)? == 3 {
            let s = at(u64_at(ph.checked_add(8)?)?, u64_at(ph.checked_add(32)?)?)?;
            let s = s.split(|b| *b == 0).next()?;
            return Some(PathBuf::from(OsStr::from_bytes(s)));
        }
    }
    None
}

/// What the ledge binary needs to start in the jail when it is dynamically linked: its ELF
/// interpreter at the path the binary names, and the shared libraries this very process
/// (the same binary) has mapped, at their own paths. A static binary needs none.
fn runtime_files(exe: &Path, maps: &str) -> Result<Vec<JailFile>, JailError> {
    // The ELF and program headers and the interpreter path sit at the start of the file.
    let mut bytes = Vec::new();
    fs::File::open(exe)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut bytes))
        .map_err(io_err("read", exe))?;
    let Some(interp) = elf_interpreter(&bytes) else {
        return Ok(Vec::new());
    };
    let lib = |host: PathBuf, inside: PathBuf| JailFile {
        host,
        inside,
        writable: false,
        is_dir: false,
        exec: true,
    };
    let real = fs::canonicalize(&interp).map_err(io_err("find the ELF interpreter", &interp))?;
    let mut v = vec![lib(real, interp)];
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let p = Path::new(path);
        let is_so = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".so") || n.contains(".so."));
        if is_so && p.is_absolute() && !v.iter().any(|f| f.inside == p) {
            v.push(lib(p.to_path_buf(), p.to_path_buf()));
        }
    }
    Ok(v)
}

/// Parses the `--cgroup` values.
pub fn parse_limits(specs: &[String]) -> Result<Limits, JailError> {
    let mut l = Limits::default();
    for spec in specs {
        let bad = |why: &str| JailError::BadLimit {
            spec: spec.clone(),
            why: why.to_string(),
        };
        let Some((key, value)) = spec.split_once('=') else {
            return Err(bad("write it as KEY=VALUE, e.g. memory.max=512M"));
        };
        let value = value.trim();
        match key.trim() {
            "memory.max" => {
                let m = if value == "max" {
                    Max::Max
                } else {
                    match parse_bytes(value) {
                        Some(b) if b >= 1 << 20 => Max::Value(b),
                        Some(_) => return Err(bad("at least 1M: the VMM cannot start in less")),
                        None => return Err(bad(
                            "give bytes, with an optional K, M, G or T (or KiB, MiB...), or max",
                        )),
                    }
                };
                l.memory_max = Some(m);
            }
            "cpu.max" => {
                let mut it = value.split(['/', ' ']).filter(|s| !s.is_empty());
                let quota = it.next().unwrap_or("");
                let period = match it.next() {
                    None => 100_000,
                    Some(p) => match p.parse::<u64>() {
                        Ok(p) if (1000..=1_000_000).contains(&p) => p,
                        _ => return Err(bad("the period is 1000 to 1000000 microseconds")),
                    },
                };
                if it.next().is_some() {
                    return Err(bad("write it as QUOTA_US[/PERIOD_US] or max"));
                }
                let quota = if quota == "max" {
                    Max::Max
                } else {
                    match quota.parse::<u64>() {
                        Ok(q) if q >= 1000 => Max::Value(q),
                        Ok(_) => return Err(bad("the quota is at least 1000 microseconds")),
                        Err(_) => return Err(bad("write it as QUOTA_US[/PERIOD_US] or max")),
                    }
                };
                l.cpu_max = Some((quota, period));
            }
            "pids.max" => {
                let m = if value == "max" {
                    Max::Max
                } else {
                    match value.parse::<u64>() {
                        Ok(n) if n >= 1 => Max::Value(n),
                        _ => return Err(bad("give a number of tasks (at least 1) or max")),
                    }
                };
                l.pids_max = Some(m);
            }
            k => {
                return Err(bad(&format!(
                    "unknown key {k:?}: use memory.max, cpu.max or pids.max"
                )))
            }
        }
    }
    Ok(l)
}

impl JailSpec {
    /// Validates every flag; touches nothing but `stat` on the --file paths.
    pub fn from_args(a: &JailArgs) -> Result<JailSpec, JailError> {
        if !valid_id(&a.id) {
            return Err(JailError::BadId(a.id.clone()));
        }
        for (name, v) in [("uid", a.uid), ("gid", a.gid)] {
            // 0 is root; u32::MAX is -1, which set*id(2) reads as "leave unchanged".
            if v == 0 || v == u32::MAX {
                return Err(JailError::BadIds(name, v));
            }
        }
        if !a.root_base.is_absolute() {
            return Err(JailError::BadRootBase(a.root_base.clone()));
        }
        match a.vmm_args.first() {
            None => return Err(JailError::NoArgs),
            Some(p) if p == "ledge" || p.ends_with("/ledge") => {
                return Err(JailError::ProgramName(p.clone()))
            }
            Some(_) => {}
        }
        // A global flag given twice is not a clap error (the later one wins, and --seccomp
        // with --no-seccomp both stay set): refuse it rather than guess.
        let seccomp_flag =
            |x: &String| x == "--seccomp" || x.starts_with("--seccomp=") || x == "--no-seccomp";
        if !a.vmm_flags.is_empty() && a.vmm_args.iter().any(seccomp_flag) {
            return Err(JailError::SeccompTwice);
        }
        let mut files: Vec<JailFile> = Vec::new();
        for s in &a.files {
            let f = parse_file(s)?;
            if let Some(o) = overlap(&files, &f.inside) {
                return Err(JailError::BadFile {
                    spec: s.clone(),
                    why: format!("{} overlaps {}", f.inside.display(), o.inside.display()),
                });
            }
            files.push(f);
        }
        let cgroup = if a.no_cgroup {
            None
        } else {
            let p = a.parent_cgroup.trim_start_matches('/');
            if p.is_empty()
                || !Path::new(p)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
            {
                return Err(JailError::BadParent(a.parent_cgroup.clone()));
            }
            Some(CgroupRequest {
                limits: parse_limits(&a.limits)?,
                parent: a.parent_cgroup.clone(),
                version: a.cgroup_version,
            })
        };
        let run_size = match parse_bytes(&a.run_size) {
            Some(n) if n >= 64 << 10 => n,
            _ => return Err(JailError::BadRunSize(a.run_size.clone())),
        };
        let tun = a.tun
            || a.vmm_args
                .iter()
                .any(|x| x == "--net" || x.starts_with("--net="));
        Ok(JailSpec {
            id: a.id.clone(),
            uid: a.uid,
            gid: a.gid,
            root_base: a.root_base.clone(),
            files,
            netns: a.netns.clone(),
            tun,
            run_size,
            cgroup,
            keep: a.keep,
            daemonize: a.daemonize,
            rlimits: parse_rlimits(&a.rlimits)?,
            vmm_args: a.vmm_flags.iter().chain(&a.vmm_args).cloned().collect(),
        })
    }

    pub fn jail_dir(&self) -> PathBuf {
        self.root_base.join(&self.id)
    }

    pub fn root(&self) -> PathBuf {
        self.jail_dir().join("root")
    }
}

// ---------------------------------------------------------------------------------------------
// cgroups

/// One cgroup directory the jail uses, with the files to write into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    pub dir: PathBuf,
    pub writes: Vec<(&'static str, String)>,
}

/// Where the jail's cgroup goes and what is written there, before anything is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    /// v2 (None: v1): the hierarchy's mount and the parent's path below it, whose ancestors
    /// get the controllers enabled in `cgroup.subtree_control`.
    pub v2_enable: Option<(PathBuf, PathBuf)>,
    pub dirs: Vec<CgroupDir>,
}

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Undoes the octal escapes of /proc/self/mountinfo (space, tab, newline, backslash).
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// The cgroup mounts in a mountinfo text: (mount point, "cgroup2" or the v1 controllers).
fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, Option<Vec<String>>)> {
    let mut v = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mnt) = pre.split(' ').nth(4) else {
            continue;
        };
        let mut post = post.split(' ');
        match (post.next(), post.nth(1)) {
            (Some("cgroup2"), _) => v.push((unescape(mnt), None)),
            (Some("cgroup"), Some(opts)) => v.push((
                unescape(mnt),
                Some(opts.split(',').map(str::to_string).collect()),
            )),
            _ => {}
        }
    }
    v
}

impl CgroupPlan {
    /// Plans the jail's cgroup from the host's mounts (`mountinfo`) and the jailer's own
    /// cgroups (`self_cgroup`, the text of /proc/self/cgroup); `read` reads a cgroup file.
    pub fn new(
        req: &CgroupRequest,
        id: &str,
        mountinfo: &str,
        self_cgroup: &str,
        read: impl Fn(&Path) -> io::Result<String>,
    ) -> Result<CgroupPlan, JailError> {
        let mounts = cgroup_mounts(mountinfo);
        let relative = !req.parent.starts_with('/');
        let parent = req.parent.trim_start_matches('/');
        // The jailer's own cgroup in the v2 hierarchy ("0::/x") or for a v1 controller.
        let own = |ctrl: Option<&str>| -> PathBuf {
            for l in self_cgroup.lines() {
                let mut f = l.splitn(3, ':');
                let (Some(_), Some(c), Some(p)) = (f.next(), f.next(), f.next()) else {
                    continue;
                };
                let hit = match ctrl {
                    None => c.is_empty(),
                    Some(x) => c.split(',').any(|n| n == x),
                };
                if hit {
                    return PathBuf::from(p.trim_start_matches('/'));
                }
            }
            PathBuf::new()
        };
        let v2 = mounts.iter().find(|(_, o)| o.is_none()).map(|(m, _)| m);
        let v2_controllers = v2
            .and_then(|m| read(&m.join("cgroup.controllers")).ok())
            .unwrap_or_default();
        let v2_missing: Vec<&str> = CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !v2_controllers.split_whitespace().any(|x| x == *c))
            .collect();
        let v1_for = |c: &str| {
            mounts.iter().find_map(|(m, o)| {
                o.as_ref()
                    .filter(|o| o.iter().any(|x| x == c))
                    .map(|_| m.clone())
            })
        };
        let use_v2 =
            match req.version {
                CgroupVersion::V2 => true,
                CgroupVersion::V1 => false,
                CgroupVersion::Auto if v2.is_some() && v2_missing.is_empty() => true,
                CgroupVersion::Auto if CONTROLLERS.iter().all(|c| v1_for(c).is_some()) => false,
                CgroupVersion::Auto => return Err(JailError::Cgroup(
                    "no cgroup v2 hierarchy with the memory, cpu and pids controllers, nor a v1 \
                     hierarchy for each of them (or pass --no-cgroup)"
                        .into(),
                )),
            };
        let l = &req.limits;
        if use_v2 {
            let Some(mnt) = v2 else {
                return Err(JailError::Cgroup("cgroup v2 is not mounted".into()));
            };
            if !v2_missing.is_empty() {
                return Err(JailError::Cgroup(format!(
                    "cgroup v2 at {} lacks the {} controller(s) (bound to cgroup v1 here? try --cgroup-version 1)",
                    mnt.display(),
                    v2_missing.join(", ")
                )));
            }
            let base = if relative {
                own(None).join(parent)
            } else {
                PathBuf::from(parent)
            };
            let mut writes = Vec::new();
            if let Some(m) = l.memory_max {
                writes.push(("memory.max", max_str(m)));
            }
            if let Some((q, p)) = l.cpu_max {
                writes.push(("cpu.max", format!("{} {p}", max_str(q))));
            }
            if let Some(m) = l.pids_max {
                writes.push(("pids.max", max_str(m)));
            }
            return Ok(CgroupPlan {
                v2_enable: Some((mnt.clone(), base.clone())),
                dirs: vec![CgroupDir {
                    dir: mnt.join(&base).join(id),
                    writes,
                }],
            });
        }
        let mut dirs: Vec<CgroupDir> = Vec::new();
        for c in CONTROLLERS {
            let Some(mnt) = v1_for(c) else {
                return Err(JailError::Cgroup(format!(
                    "no cgroup v1 hierarchy has the {c} controller"
                )));
            };
            let base = if relative {
                own(Some(c)).join(parent)
            } else {
                PathBuf::from(parent)
            };
            let dir = mnt.join(base).join(id);
            let mut writes = Vec::new();
            match c {
                "memory" => {
                    if let Some(m) = l.memory_max {
                        writes.push(("memory.limit_in_bytes", v1_str(m)));
                    }
                }
                "cpu" => {
                    if let Some((q, p)) = l.cpu_max {
                        writes.push(("cpu.cfs_period_us", p.to_string()));
                        writes.push(("cpu.cfs_quota_us", v1_str(q)));
                    }
                }
                _ => {
                    if let Some(m) = l.pids_max {
                        writes.push(("pids.max", max_str(m)));
                    }
                }
            }
            // Controllers co-mounted in one hierarchy (cpu,cpuacct) share one directory.
            match dirs.iter_mut().find(|d| d.dir == dir) {
                Some(d) => d.writes.extend(writes),
                None => dirs.push(CgroupDir { dir, writes }),
            }
        }
        Ok(CgroupPlan {
            v2_enable: None,
            dirs,
        })
    }

    /// Makes the cgroup directories and writes the limits. Returns the directories made, for
    /// removal, even when a later step fails (`made` is filled as it goes).
    pub fn create(&self, made: &mut Vec<PathBuf>) -> Result<(), JailError> {
        self.create_with(made, write_file)
    }

    /// `create`, writing cgroup files through `write` (a stand-in directory in unit tests,
    /// where the kernel does not make the files).
    fn create_with(
        &self,
        made: &mut Vec<PathBuf>,
        write: impl Fn(&Path, &str) -> io::Result<()>,
    ) -> Result<(), JailError> {
        // The parents, made once: on v2 they are the chain enabled below.
        for d in &self.dirs {
            if let Some(p) = d.dir.parent() {
                fs::create_dir_all(p).map_err(io_err("make the cgroup", p))?;
            }
        }
        if let Some((mnt, parent)) = &self.v2_enable {
            // Each cgroup from the root down to the parent must hand the controllers on.
            let mut at = mnt.clone();
            let mut chain = vec![at.clone()];
            for c in parent.components() {
                at.push(c);
                chain.push(at.clone());
            }
            for dir in &chain {
                let f = dir.join("cgroup.subtree_control");
                for c in CONTROLLERS {
                    write(&f, &format!("+{c}")).map_err(|e| {
                        JailError::Cgroup(format!(
                            "cannot enable the {c} controller in {}: {e}{}",
                            f.display(),
                            if e.raw_os_error() == Some(libc::EBUSY) {
                                " (that cgroup has processes of its own: pick another --parent-cgroup)"
                            } else {
                                ""
                            }
                        ))
                    })?;
                }
            }
        }
        for d in &self.dirs {
            match fs::create_dir(&d.dir) {
                Ok(()) => made.push(d.dir.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(JailError::Cgroup(format!(
                        "{} exists: a jail with this id runs, or its cgroup was kept (rmdir it)",
                        d.dir.display()
                    )))
                }
                Err(e) => return Err(io_err("make the cgroup", &d.dir)(e)),
            }
            for (file, value) in &d.writes {
                let f = d.dir.join(file);
                write(&f, value).map_err(|e| {
                    JailError::Cgroup(format!("cannot write {value:?} to {}: {e}", f.display()))
                })?;
            }
        }
        Ok(())
    }
}

fn max_str(m: Max) -> String {
    match m {
        Max::Max => "max".into(),
        Max::Value(v) => v.to_string(),
    }
}

fn v1_str(m: Max) -> String {
    match m {
        Max::Max => "-1".into(),
        Max::Value(v) => v.to_string(),
    }
}

/// One write(2) of the whole value, as cgroup files want.
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// Removes a cgroup directory; its last tasks may take a moment to leave after the VMM is
/// reaped (the PID namespace's other tasks are killed with it).
fn remove_cgroup(dir: &Path) {
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => {
                log::warn!("jail: cannot remove the cgroup {}: {e}", dir.display());
                return;
            }
        }
    }
    log::warn!("jail: the cgroup {} stays busy; not removed", dir.display());
}

// ---------------------------------------------------------------------------------------------
// small syscall helpers

fn cpath(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Io {
        what: "use",
        path: p.to_path_buf(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

fn check(rc: libc::c_long, what: &'static str) -> Result<libc::c_long, JailError> {
    if rc < 0 {
        Err(JailError::Sys(what, io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src_c = src.map(cpath).transpose()?;
    let target_c = cpath(target)?;
    let fstype_c = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data_c = data.map(|s| CString::new(s).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string alive for the call.
    let rc = unsafe {
        libc::mount(
            ptr(&src_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    if rc != 0 {
        return Err(JailError::Io {
            what: "mount onto",
            path: target.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Bind-mounts `src` on `target`, then remounts it with `flags` (MS_RDONLY, MS_NOSUID...).
fn bind(src: &Path, target: &Path, flags: libc::c_ulong) -> Result<(), JailError> {
    mount(Some(src), target, None, libc::MS_BIND, None)?;
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
}

fn mknod(
    path: &Path,
    rdev: libc::dev_t,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), JailError> {
    let c = cpath(path)?;
    // SAFETY: `c` is a NUL-terminated path alive for the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, rdev) };
    if rc != 0 {
        return Err(io_err("make the device", path)(io::Error::last_os_error()));
    }
    // mknod applies the umask: set the mode exactly.
    // SAFETY: as above.
    let rc = unsafe { libc::chmod(c.as_ptr(), mode) };
    if rc != 0 {
        return Err(io_err("chmod", path)(io::Error::last_os_error()));
    }
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(path, Some(u), Some(g)).map_err(io_err("chown", path))?;
    }
    Ok(())
}

/// This process's thread count, from /proc/self/status. Not knowing it is an error: the
/// fork that follows is only sound single-threaded, so "unknown" must not pass as 1.
fn threads() -> Result<usize, JailError> {
    let path = Path::new("/proc/self/status");
    let status = fs::read_to_string(path).map_err(io_err("read", path))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| {
            io_err("count the threads in", path)(io::Error::new(
                io::ErrorKind::InvalidData,
                "no Threads: line",
            ))
        })
}

// ---------------------------------------------------------------------------------------------
// the jailer

/// The devices the jail gets: (name under /dev, host device, mode, owned by the VMM).
fn devices(tun: bool) -> Vec<(&'static str, &'static str, u32, bool)> {
    let mut d = vec![
        ("kvm", "/dev/kvm", 0o600, true),
        ("null", "/dev/null", 0o666, false),
        ("urandom", "/dev/urandom", 0o666, false),
    ];
    if tun {
        d.push(("net/tun", "/dev/net/tun", 0o600, true));
    }
    d
}

/// What the child needs, all resolved before the fork.
struct ChildPlan {
    root: PathBuf,
    /// The ledge binary on the host (a path: /proc/self/exe would name a mount of the host's
    /// mount namespace, which cannot be bound once the child has its own).
    exe: PathBuf,
    uid: u32,
    gid: u32,
    files: Vec<JailFile>,
    /// (path under /dev, rdev, mode, chown to the VMM)
    devices: Vec<(&'static str, libc::dev_t, u32, bool)>,
    cgroup_procs: Vec<PathBuf>,
    netns: Option<OwnedFd>,
    rlimits: Vec<(Rlimit, u64)>,
    argv: Vec<CString>,
}

/// Removes what the jail made, unless kept.
struct Leftovers {
    /// `<root-base>/<id>`.
    dir: PathBuf,
    /// The /run tmpfs, mounted on the host.
    run: Option<PathBuf>,
    cgroups: Vec<PathBuf>,
    keep: bool,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for c in self.cgroups.iter().rev() {
            remove_cgroup(c);
        }
        if let Some(r) = &self.run {
            if let Ok(c) = cpath(r) {
                // SAFETY: a NUL-terminated path alive for the call.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                    log::warn!(
                        "jail: cannot unmount {}: {}",
                        r.display(),
                        io::Error::last_os_error()
                    );
                    return; // never remove_dir_all into a mount still there
                }
            }
        }
        // The binds live only in the VMM's mount namespace, gone with it: this removes the
        // jail's own mount-point files and directories, never the host files.
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            log::warn!("jail: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// `ledge jail`: runs the VMM in the jail and returns its exit status (128+N if killed by
/// signal N). `terminate` is the eventfd the caller's SIGTERM/SIGINT/SIGHUP handler writes;
/// each such signal is passed on to the VMM as SIGTERM.
pub fn run(args: &JailArgs, terminate: RawFd) -> Result<i32, JailError> {
    let spec = JailSpec::from_args(args)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    let n = threads()?;
    if n != 1 {
        return Err(JailError::Threads(n));
    }
    let netns = match &spec.netns {
        Some(p) => Some(open_netns(p)?),
        None => None,
    };
    let mut devs = Vec::new();
    for (name, host, mode, owned) in devices(spec.tun) {
        let m = match fs::metadata(host) {
            // The VMM says best what a missing /dev/kvm or /dev/net/tun means.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::warn!("jail: the host has no {host}: the jail will not have it either");
                continue;
            }
            r => r.map_err(io_err("find the device", Path::new(host)))?,
        };
        if !m.file_type().is_char_device() {
            return Err(io_err("use the device", Path::new(host))(io::Error::other(
                "not a character device",
            )));
        }
        devs.push((name, m.rdev(), mode, owned));
    }
    let cg_plan = match &spec.cgroup {
        Some(req) => {
            let mi = fs::read_to_string("/proc/self/mountinfo")
                .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
            let own = fs::read_to_string("/proc/self/cgroup")
                .map_err(io_err("read", Path::new("/proc/self/cgroup")))?;
            Some(CgroupPlan::new(req, &spec.id, &mi, &own, |p| {
                fs::read_to_string(p)
            })?)
        }
        None => None,
    };
    let exe = std::env::current_exe().map_err(io_err("find", Path::new("/proc/self/exe")))?;
    if !exe.is_file() {
        return Err(io_err("use the ledge binary", &exe)(io::Error::from(
            io::ErrorKind::NotFound,
        )));
    }
    let maps = fs::read_to_string("/proc/self/maps")
        .map_err(io_err("read", Path::new("/proc/self/maps")))?;
    let mut files = runtime_files(&exe, &maps)?;
    for f in &spec.files {
        if let Some(o) = overlap(&files, &f.inside) {
            return Err(JailError::BadFile {
                spec: f.host.display().to_string(),
                why: format!(
                    "{} overlaps {}, which the ledge binary needs",
                    f.inside.display(),
                    o.inside.display()
                ),
            });
        }
    }
    files.extend(spec.files.iter().cloned());
    let mut argv = vec![CString::new("ledge").unwrap_or_default()];
    for a in &spec.vmm_args {
        argv.push(CString::new(a.as_str()).map_err(|_| JailError::NoArgs)?);
    }

    // From here on, things are made on the host: `leftovers` removes them on any way out.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&spec.root_base)
        .map_err(io_err("make", &spec.root_base))?;
    let jail_dir = spec.jail_dir();
    match fs::DirBuilder::new().mode(0o750).create(&jail_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(JailError::InUse {
                id: spec.id.clone(),
                path: jail_dir,
            })
        }
        Err(e) => return Err(io_err("make", &jail_dir)(e)),
    }
    let mut leftovers = Leftovers {
        dir: jail_dir.clone(),
        cgroups: Vec::new(),
        run: None,
        keep: false,
    };
    let root = spec.root();
    layout(&root, &files)?;
    // /run: a tmpfs the size of --run-size, so that the VMM cannot fill the host's disk, mounted
    // here (not in the VMM's namespace) so that the host sees the API socket in it.
    let run = root.join("run");
    mount(
        Some(Path::new("tmpfs")),
        &run,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(&format!(
            "mode=0750,uid={},gid={},size={},nr_inodes=1024",
            spec.uid, spec.gid, spec.run_size
        )),
    )?;
    leftovers.run = Some(run);
    let mut cgroup_procs = Vec::new();
    if let Some(p) = &cg_plan {
        p.create(&mut leftovers.cgroups)?;
        cgroup_procs = p.dirs.iter().map(|d| d.dir.join("cgroup.procs")).collect();
    }
    let plan = ChildPlan {
        root: root.clone(),
        exe,
        uid: spec.uid,
        gid: spec.gid,
        files,
        devices: devs,
        cgroup_procs,
        netns,
        rlimits: spec.rlimits.clone(),
        argv,
    };

    // --daemonize: what follows runs in a detached supervisor; this process waits until the
    // VMM runs (or the start failed) and exits with that.
    let mut ready: Option<OwnedFd> = None;
    if spec.daemonize {
        let (r, w) = pipe()?;
        // SAFETY: the process is single-threaded (checked above).
        let sup = unsafe { libc::fork() };
        if sup < 0 {
            return Err(JailError::Sys("fork", io::Error::last_os_error()));
        }
        if sup > 0 {
            // The supervisor owns the jail now.
            std::mem::forget(leftovers);
            drop(w);
            drop(plan);
            let mut msg = String::new();
            let _ = fs::File::from(r).read_to_string(&mut msg);
            return match msg.strip_prefix("ok ") {
                Some(vmm) => {
                    log::info!("jail {}: supervisor pid {sup}, VMM pid {vmm}", spec.id);
                    Ok(0)
                }
                None if msg.is_empty() => Err(JailError::Daemon(
                    "the jail's supervisor died before the VMM ran".into(),
                )),
                None => Err(JailError::Daemon(msg)),
            };
        }
        drop(r);
        detach(&jail_dir)?;
        ready = Some(w);
    }
    let result = launch(&spec, plan, leftovers, terminate, &mut ready);
    if let (Err(e), Some(w)) = (&result, ready.take()) {
        let _ = fs::File::from(w).write_all(e.to_string().as_bytes());
    }
    result
}

/// The supervisor of a --daemonize jail: its own session, stdio on /dev/null (the VMM's too),
/// its PID in `<jail>/jailer.pid` for whoever stops it.
fn detach(jail_dir: &Path) -> Result<(), JailError> {
    // SAFETY: setsid has no preconditions; a fresh child is never a group leader.
    check(unsafe { libc::setsid() } as libc::c_long, "setsid")?;
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_err("open", Path::new("/dev/null")))?;
    for fd in 0..3 {
        check(
            // SAFETY: dup2 onto the standard fds; `null` stays open for the call.
            unsafe { libc::dup2(null.as_raw_fd(), fd) } as libc::c_long,
            "dup2",
        )?;
    }
    let f = jail_dir.join(JAILER_PID_FILE);
    fs::write(&f, format!("{}\n", std::process::id())).map_err(io_err("write", &f))
}

/// Forks the VMM into the jail and supervises it; `ready` (with --daemonize) hears "ok PID"
/// once it runs.
fn launch(
    spec: &JailSpec,
    plan: ChildPlan,
    mut leftovers: Leftovers,
    terminate: RawFd,
    ready: &mut Option<OwnedFd>,
) -> Result<i32, JailError> {
    let (err_r, err_w) = pipe()?;
    check(
        // SAFETY: unshare(CLONE_NEWPID) only changes where this process's next child goes.
        unsafe { libc::unshare(libc::CLONE_NEWPID) } as libc::c_long,
        "unshare(CLONE_NEWPID)",
    )?;
    // SAFETY: the process is single-threaded (checked above), so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::Sys("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        // The leftovers are the parent's to remove, whatever happens here.
        std::mem::forget(leftovers);
        drop(err_r);
        let e = match child(&plan, err_w.as_raw_fd()) {
            Err(e) => e.to_string(),
            Ok(never) => match never {},
        };
        let mut f = fs::File::from(err_w);
        let _ = f.write_all(e.as_bytes());
        // SAFETY: _exit ends the child without running the parent's destructors (the
        // leftovers belong to the parent).
        unsafe { libc::_exit(1) };
    }
    drop(err_w);
    drop(plan);
    // EOF without a word: the exec happened (the pipe is close-on-exec).
    let mut msg = String::new();
    let _ = fs::File::from(err_r).read_to_string(&mut msg);
    if !msg.is_empty() {
        let _ = wait_status(pid);
        return Err(JailError::Child(msg));
    }
    leftovers.keep = spec.keep;
    let jail_dir = spec.jail_dir();
    let pid_file = jail_dir.join(PID_FILE);
    let tmp = jail_dir.join(format!("{PID_FILE}.tmp"));
    fs::write(&tmp, format!("{pid}\n"))
        .and_then(|()| fs::rename(&tmp, &pid_file))
        .map_err(io_err("write", &pid_file))?;
    log::info!(
        "jail {}: VMM pid {pid} (PID 1 in its namespace), root {}",
        spec.id,
        spec.root().display()
    );
    if let Some(w) = ready.take() {
        let _ = fs::File::from(w).write_all(format!("ok {pid}").as_bytes());
    }
    let status = supervise(pid, terminate)?;
    drop(leftovers);
    Ok(status)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0 as libc::c_int; 2];
    check(
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } as libc::c_long,
        "pipe2",
    )?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// ioctl(2) on a namespace fd: its CLONE_NEW* type. _IO(0xb7, 0x3).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

fn open_netns(p: &Path) -> Result<OwnedFd, JailError> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(p)
        .map_err(io_err("open the network namespace", p))?;
    // SAFETY: NS_GET_NSTYPE takes no argument; on a non-namespace file it fails with ENOTTY.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if t != libc::CLONE_NEWNET {
        return Err(JailError::NotNetns(p.to_path_buf()));
    }
    Ok(OwnedFd::from(f))
}

/// Makes the jail's tree on the host: directories and mount-point files, owned by root. (/run
/// too: the VMM only ever sees the tmpfs the jailer mounts over it, with the VMM's ids.)
fn layout(root: &Path, files: &[JailFile]) -> Result<(), JailError> {
    let mk = |d: &Path| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(d)
            .map_err(io_err("make", d))
    };
    let touch = |f: &Path| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(f)
            .map(drop)
            .map_err(io_err("make", f))
    };
    mk(root)?;
    for d in ["dev", "proc", "run"] {
        mk(&root.join(d))?;
    }
    touch(&root.join(JAIL_EXE.trim_start_matches('/')))?;
    for f in files {
        let at = root.join(f.inside.strip_prefix("/").unwrap_or(&f.inside));
        if let Some(p) = at.parent() {
            mk(p)?;
        }
        if f.is_dir {
            mk(&at)?;
        } else {
            touch(&at)?;
        }
    }
    Ok(())
}

/// Waits for the VMM, passing termination signals on; returns its status.
fn supervise(pid: libc::pid_t, terminate: RawFd) -> Result<i32, JailError> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let pidfd = check(
        unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) },
        "pidfd_open",
    )?;
    // SAFETY: pidfd_open succeeded: the fd is ours.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // As PID 1 of its namespace, the VMM gets a signal from here only once it has a handler
    // for it: a SIGTERM that lands between the exec and ledge installing its handler is
    // dropped by the kernel. So once asked to stop, repeat it every second until it exits.
    let mut stopping = false;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: terminate,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let nfds = if terminate >= 0 { 2 } else { 1 };
        // SAFETY: `fds` holds `nfds` valid pollfd entries.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, if stopping { 1000 } else { -1 }) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(JailError::Sys("poll", e));
        }
        if nfds == 2 && fds[1].revents & libc::POLLIN != 0 {
            let mut v = [0u8; 8];
            // SAFETY: reads 8 bytes from the eventfd into a live buffer.
            unsafe { libc::read(terminate, v.as_mut_ptr().cast(), 8) };
            stopping = true;
        }
        if stopping && fds[0].revents == 0 {
            // SAFETY: kill(2) on our own child, not yet reaped (its pidfd is not readable).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if fds[0].revents != 0 {
            return wait_status(pid);
        }
    }
}

fn wait_status(pid: libc::pid_t) -> Result<i32, JailError> {
    let mut st = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut st, 0) };
        if rc >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(JailError::Sys("waitpid", e));
        }
    }
    Ok(if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        128 + libc::WTERMSIG(st)
    })
}

// ---------------------------------------------------------------------------------------------
// the child: PID 1 of the new PID namespace, until it execs the VMM

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// SIGKILL this process when the jailer (its parent) dies: no VMM, nor half-made jail, runs
/// unsupervised.
fn kill_with_parent() -> Result<(), JailError> {
    check(
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } as libc::c_long,
        "PR_SET_PDEATHSIG",
    )?;
    Ok(())
}

/// True once the jailer is gone: it holds the read end of the error pipe (`err_fd` is the
/// write end) until the exec, so a write end with no reader left polls as POLLERR.
/// (getppid() cannot tell: the parent is outside the child's PID namespace, so it reads 0.)
fn parent_gone(err_fd: RawFd) -> Result<bool, JailError> {
    let mut pfd = libc::pollfd {
        fd: err_fd,
        events: 0,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, alive for the call; a zero timeout never blocks.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc >= 0 {
            return Ok(pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(JailError::Sys("poll", e));
        }
    }
}

fn child(p: &ChildPlan, err_fd: RawFd) -> Result<Infallible, JailError> {
    // Set now, so a jailer killed during the set-up below takes the child with it; the uid
    // change clears it, so it is set again after that.
    kill_with_parent()?;
    // Its own session: the host terminal (if any) is no longer its controlling terminal, so
    // TIOCSTI and terminal signals cannot reach through it.
    // SAFETY: setsid has no preconditions; a fresh child is never a group leader.
    check(unsafe { libc::setsid() } as libc::c_long, "setsid")?;
    for path in &p.cgroup_procs {
        write_file(path, "0").map_err(io_err("join the cgroup", path))?;
    }
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP;
    match &p.netns {
        Some(fd) => {
            check(
                // SAFETY: `fd` is an open network-namespace fd (checked by the parent).
                unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } as libc::c_long,
                "setns(--netns)",
            )?;
        }
        None => flags |= libc::CLONE_NEWNET,
    }
    // SAFETY: the process is single-threaded; unshare only changes its own namespaces.
    check(unsafe { libc::unshare(flags) } as libc::c_long, "unshare")?;

    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = &p.root;
    // The root: its own mount (pivot_root wants one), read-only.
    // Recursive, to bring the /run tmpfs the parent mounted along.
    mount(Some(root), root, None, libc::MS_BIND | libc::MS_REC, None)?;
    let dev = root.join("dev");
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=64"),
    )?;
    for (name, rdev, mode, owned) in &p.devices {
        let at = dev.join(name);
        if let Some(d) = at.parent().filter(|d| *d != dev) {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(d)
                .map_err(io_err("make", d))?;
        }
        mknod(&at, *rdev, *mode, owned.then_some((p.uid, p.gid)))?;
    }
    mount(
        None,
        &dev,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )?;
    // Its own PID namespace's /proc; with subset=pid (Linux 5.8+) only the process
    // directories, none of the host-wide files (/proc/sys, /proc/kallsyms...). The VMM reads
    // /proc/self only.
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let proc_dir = root.join("proc");
    let proc = Some(Path::new("proc"));
    if mount(
        proc,
        &proc_dir,
        Some("proc"),
        proc_flags,
        Some("subset=pid"),
    )
    .is_err()
    {
        mount(proc, &proc_dir, Some("proc"), proc_flags, None)?;
    }
    bind(
        &p.exe,
        &root.join(JAIL_EXE.trim_start_matches('/')),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
    )?;
    for f in &p.files {
        let at = root.join(f.inside.strip_prefix("/").unwrap_or(&f.inside));
        let ro = if f.writable { 0 } else { libc::MS_RDONLY };
        let noexec = if f.exec { 0 } else { libc::MS_NOEXEC };
        bind(&f.host, &at, ro | noexec | libc::MS_NOSUID | libc::MS_NODEV)?;
    }
    mount(
        None,
        root,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;

    enter_root(root)?;

    check(
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long,
        "PR_SET_NO_NEW_PRIVS",
    )?;
    // Every capability number the 64-bit capability sets can hold: the kernel answers EINVAL
    // for one it does not know (and only then: prctl(2)), which is nothing to drop.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only; needs CAP_SETPCAP, which root has here.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(JailError::Sys(
                "PR_CAPBSET_DROP",
                io::Error::last_os_error(),
            ));
        }
    }
    check(
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        } as libc::c_long,
        "PR_CAP_AMBIENT_CLEAR_ALL",
    )?;
    check(
        // SAFETY: an empty list: no pointer is read.
        unsafe { libc::setgroups(0, std::ptr::null()) } as libc::c_long,
        "setgroups",
    )?;
    check(
        // SAFETY: integer arguments only.
        unsafe { libc::setresgid(p.gid, p.gid, p.gid) } as libc::c_long,
        "setresgid",
    )?;
    check(
        // SAFETY: integer arguments only. Leaving uid 0 clears the permitted and effective sets.
        unsafe { libc::setresuid(p.uid, p.uid, p.uid) } as libc::c_long,
        "setresuid",
    )?;
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    check(
        // SAFETY: capset reads a v3 header and two data structs, both alive for the call.
        unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) },
        "capset",
    )?;
    // The jailer dying (even by SIGKILL) takes the VMM with it: no unsupervised VMM. Set
    // again after the uid change, which clears it (prctl(2)), then check that the jailer did
    // not die while it was cleared: from here on, its death is a SIGKILL.
    kill_with_parent()?;
    if parent_gone(err_fd)? {
        return Err(JailError::Child(
            "the jailer died before the VMM ran".into(),
        ));
    }

    for (r, n) in &p.rlimits {
        let l = libc::rlimit {
            rlim_cur: *n,
            rlim_max: *n,
        };
        // SAFETY: `l` is a valid rlimit alive for the call. Lowering needs no privilege.
        if unsafe { libc::setrlimit(r.resource(), &l) } != 0 {
            return Err(JailError::Sys("setrlimit", io::Error::last_os_error()));
        }
    }
    reset_signals()?;
    close_fds_but(err_fd)?;
    let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let exe = cpath(Path::new(JAIL_EXE))?;
    // SAFETY: `exe` and every argv entry are NUL-terminated strings alive for the call; argv
    // and envp end with a null pointer.
    unsafe { libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(JailError::Io {
        what: "execute",
        path: PathBuf::from(JAIL_EXE),
        source: io::Error::last_os_error(),
    })
}

/// pivot_root into `root` and detach the host's tree. Where pivot_root cannot work (the host
/// root is the initramfs, which cannot be unmounted), move the jail over / and chroot:
/// without capabilities the VMM cannot chroot again to escape.
fn enter_root(root: &Path) -> Result<(), JailError> {
    let root_c = cpath(root)?;
    let dot = CString::new(".").unwrap_or_default();
    let slash = CString::new("/").unwrap_or_default();
    // SAFETY: NUL-terminated paths alive for each call.
    unsafe {
        check(
            libc::chdir(root_c.as_ptr()) as libc::c_long,
            "chdir to the jail",
        )?;
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == 0 {
            // The old root is now stacked on the new one at "/": detach it.
            check(
                libc::umount2(dot.as_ptr(), libc::MNT_DETACH) as libc::c_long,
                "detaching the host's root",
            )?;
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            log::warn!("jail: pivot_root is not possible here (initramfs root?): using chroot");
            check(
                libc::mount(
                    dot.as_ptr(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_MOVE,
                    std::ptr::null(),
                ) as libc::c_long,
                "moving the jail onto /",
            )?;
            check(libc::chroot(dot.as_ptr()) as libc::c_long, "chroot")?;
        } else {
            return Err(JailError::Sys("pivot_root", io::Error::last_os_error()));
        }
        check(libc::chdir(slash.as_ptr()) as libc::c_long, "chdir /")?;
    }
    Ok(())
}

/// Default dispositions and an empty mask: exec keeps ignored signals and the mask.
fn reset_signals() -> Result<(), JailError> {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL is always a valid disposition; errors (signals the C library
        // reserves) are harmless to ignore.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: an empty set, initialised by sigemptyset, passed by pointer for the call.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        check(
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) as libc::c_long,
            "sigprocmask",
        )?;
    }
    Ok(())
}

/// Closes every fd above 2 except `keep` (the close-on-exec error pipe).
fn close_fds_but(keep: RawFd) -> Result<(), JailError> {
    let ranges = [(3u32, keep as u32 - 1), (keep as u32 + 1, u32::MAX)];
    for (lo, hi) in ranges {
        if lo > hi {
            continue;
        }
        // SAFETY: close_range only closes descriptors; none of them is used afterwards.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0) };
        if rc != 0 {
            // Kernels before 5.9: close them one by one, from the jail's own /proc.
            let fds: Vec<RawFd> = fs::read_dir("/proc/self/fd")
                .map_err(io_err("list", Path::new("/proc/self/fd")))?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            for fd in fds {
                if fd > 2 && fd != keep {
                    // SAFETY: as above.
                    unsafe { libc::close(fd) };
                }
            }
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<JailSpec, JailError> {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: JailArgs,
        }
        let mut v = vec!["t", "--id", "vm-1"];
        for (flag, default) in [("--uid", "1000"), ("--gid", "1000")] {
            if !extra.contains(&flag) {
                v.extend_from_slice(&[flag, default]);
            }
        }
        v.extend_from_slice(extra);
        JailSpec::from_args(&T::try_parse_from(v).unwrap().a)
    }

    #[test]
    fn thread_count() {
        // The test harness runs each test on a thread of its own, beside the main one.
        assert!(threads().unwrap() >= 1);
    }

    /// The child's "is the jailer still there" test: the error pipe's read end, open or not.
    #[test]
    fn parent_gone_sees_the_reader_close() {
        let (r, w) = pipe().unwrap();
        assert!(!parent_gone(w.as_raw_fd()).unwrap());
        drop(r);
        assert!(parent_gone(w.as_raw_fd()).unwrap());
    }

    #[test]
    fn ids() {
        assert!(valid_id("a-B_9"));
        assert!(valid_id(&"x".repeat(64)));
        for bad in ["", "a/b", "..", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn validation() {
        let s = args(&["--", "run"]).unwrap();
        assert_eq!(s.root(), Path::new("/srv/ledge/vm-1/root"));
        assert!(!s.tun);
        assert!(args(&["--", "run", "--net", "tap=t0"]).unwrap().tun);
        assert!(matches!(args(&[]), Err(JailError::NoArgs)));
        assert!(matches!(
            args(&["--", "ledge", "run"]),
            Err(JailError::ProgramName(_))
        ));
        assert!(matches!(
            args(&["--uid", "0", "--", "run"]),
            Err(JailError::BadIds("uid", 0))
        ));
        assert!(matches!(
            args(&["--gid", "4294967295", "--", "run"]),
            Err(JailError::BadIds("gid", _))
        ));
        assert!(matches!(
            args(&["--root-base", "rel", "--", "run"]),
            Err(JailError::BadRootBase(_))
        ));
        assert_eq!(args(&["--", "run"]).unwrap().run_size, 16 << 20);
        assert_eq!(
            args(&["--run-size", "64K", "--", "run"]).unwrap().run_size,
            64 << 10
        );
        for bad in ["1K", "lots", ""] {
            assert!(matches!(
                args(&["--run-size", bad, "--", "run"]),
                Err(JailError::BadRunSize(_))
            ));
        }
        for p in ["/", "a/../b", "./x"] {
            assert!(matches!(
                args(&["--parent-cgroup", p, "--", "run"]),
                Err(JailError::BadParent(_))
            ));
        }
    }

    /// The jail's byte sizes take the same spellings as the VMM's (`--disk bw=16MiB`).
    #[test]
    fn byte_sizes_take_both_spellings() {
        for (v, n) in [
            ("16M", 16u64 << 20),
            ("16MiB", 16 << 20),
            ("16mi", 16 << 20),
            ("1024K", 1 << 20),
            ("1024KiB", 1 << 20),
            ("1G", 1 << 30),
            ("1GiB", 1 << 30),
            ("1T", 1 << 40),
            ("1TiB", 1 << 40),
            ("1048576", 1 << 20),
        ] {
            let s = args(&["--run-size", v, "--", "run"]).unwrap();
            assert_eq!(s.run_size, n, "--run-size {v}");
            let l = parse_limits(&[format!("memory.max={v}")]).unwrap();
            assert_eq!(l.memory_max, Some(Max::Value(n)), "memory.max={v}");
            let r = parse_rlimits(&[format!("fsize={v}")]).unwrap();
            assert_eq!(r, vec![(Rlimit::Core, 0), (Rlimit::Fsize, n)], "fsize={v}");
        }
        for bad in ["16MB", "16 M", "M", "-1M", "1P", "99999999999T"] {
            assert!(
                matches!(
                    args(&[&format!("--run-size={bad}"), "--", "run"]),
                    Err(JailError::BadRunSize(_))
                ),
                "{bad}"
            );
            assert!(
                parse_limits(&[format!("memory.max={bad}")]).is_err(),
                "{bad}"
            );
            assert!(parse_rlimits(&[format!("fsize={bad}")]).is_err(), "{bad}");
        }
    }

    /// The global --seccomp/--no-seccomp reach the VMM, in front of its own arguments.
    #[test]
    fn seccomp_flags_are_passed_on() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: JailArgs,
        }
        let with = |flags: &[&str], vmm: &[&str]| {
            let mut v = vec!["t", "--id", "j", "--uid", "1", "--gid", "1", "--"];
            v.extend_from_slice(vmm);
            let mut a = T::try_parse_from(v).unwrap().a;
            a.vmm_flags = flags.iter().map(|s| s.to_string()).collect();
            JailSpec::from_args(&a)
        };
        assert_eq!(with(&[], &["run"]).unwrap().vmm_args, ["run"]);
        assert_eq!(
            with(&["--seccomp", "log"], &["run", "--rng"])
                .unwrap()
                .vmm_args,
            ["--seccomp", "log", "run", "--rng"]
        );
        assert_eq!(
            with(&["--no-seccomp"], &["--api-sock", "/run/a"])
                .unwrap()
                .vmm_args,
            ["--no-seccomp", "--api-sock", "/run/a"]
        );
        // Inside only: left as it is.
        assert_eq!(
            with(&[], &["run", "--seccomp", "log"]).unwrap().vmm_args,
            ["run", "--seccomp", "log"]
        );
        for inner in [
            &["run", "--seccomp", "kill"][..],
            &["run", "--seccomp=log"],
            &["--no-seccomp", "run"],
        ] {
            assert!(
                matches!(
                    with(&["--seccomp", "log"], inner),
                    Err(JailError::SeccompTwice)
                ),
                "{inner:?}"
            );
        }
        // The program-name check still looks at the arguments as typed.
        assert!(matches!(
            with(&["--no-seccomp"], &["ledge", "run"]),
            Err(JailError::ProgramName(_))
        ));
    }

    #[test]
    fn files() {
        let f = parse_file("/etc/hostname").unwrap();
        assert_eq!(f.inside, Path::new("/hostname"));
        assert!(!f.writable);
        let f = parse_file("/etc/hostname:/a/b:rw").unwrap();
        assert_eq!((f.inside.as_path(), f.writable), (Path::new("/a/b"), true));
        assert!(parse_file("/etc/hostname:rw").unwrap().writable);
        assert!(parse_file("/etc:/conf").unwrap().is_dir);
        for (bad, why) in [
            ("/nonexistent", "No such file"),
            ("/etc/hostname:rel", "absolute"),
            ("/etc/hostname:/a/../b", "no . or .."),
            ("/etc/hostname:/dev/x", "the jail's own"),
            ("/etc/hostname:/ledge", "the jail's own"),
            ("/etc/hostname:/x:wr", "unknown mode"),
            ("/etc/hostname:/x:rw:y", "HOST[:JAIL_PATH]"),
            ("/dev/null", "regular files"),
            ("", "empty"),
        ] {
            let e = parse_file(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = args(&[
            "--file",
            "/etc/hostname:/x",
            "--file",
            "/etc:/x",
            "--",
            "run",
        ]);
        assert!(e.unwrap_err().to_string().contains("overlaps"));
        // By path components: /lib holds /lib/x/libc.so.6, /lib2 and /li do not.
        let libc = JailFile {
            host: "/h".into(),
            inside: "/lib/x/libc.so.6".into(),
            writable: false,
            is_dir: false,
            exec: true,
        };
        let libs = [libc];
        for p in ["/lib", "/lib/x", "/lib/x/libc.so.6", "/lib/x/libc.so.6/y"] {
            assert!(overlap(&libs, Path::new(p)).is_some(), "{p}");
        }
        for p in ["/lib2", "/li", "/lib/y", "/lib/x/libc.so"] {
            assert!(overlap(&libs, Path::new(p)).is_none(), "{p}");
        }
    }

    #[test]
    fn rlimits() {
        assert_eq!(parse_rlimits(&[]).unwrap(), vec![(Rlimit::Core, 0)]);
        let v = parse_rlimits(&["nofile=256".into(), "fsize=1G".into(), "nofile=512".into()]);
        assert_eq!(
            v.unwrap(),
            vec![
                (Rlimit::Core, 0),
                (Rlimit::Fsize, 1 << 30),
                (Rlimit::Nofile, 512)
            ]
        );
        for bad in ["nofile", "nofile=10", "fsize=x", "core=1", "as=1G"] {
            assert!(parse_rlimits(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits() {
        let l = parse_limits(&[
            "memory.max=512M".into(),
            "cpu.max=50000/200000".into(),
            "pids.max=64".into(),
        ])
        .unwrap();
        assert_eq!(l.memory_max, Some(Max::Value(512 << 20)));
        assert_eq!(l.cpu_max, Some((Max::Value(50000), 200_000)));
        assert_eq!(l.pids_max, Some(Max::Value(64)));
        let l = parse_limits(&["cpu.max=max".into(), "memory.max=max".into()]).unwrap();
        assert_eq!(l.cpu_max, Some((Max::Max, 100_000)));
        assert_eq!(l.memory_max, Some(Max::Max));
        assert_eq!(
            parse_limits(&["cpu.max=20000 100000".into()])
                .unwrap()
                .cpu_max,
            Some((Max::Value(20000), 100_000))
        );
        for bad in [
            "memory.max",
            "memory.max=lots",
            "memory.max=1K",
            "memory.max=99999999999T",
            "cpu.max=10",
            "cpu.max=5000/10",
            "cpu.max=1/2/3",
            "pids.max=0",
            "io.max=1",
        ] {
            assert!(parse_limits(&[bad.into()]).is_err(), "{bad}");
        }
    }

    fn req(parent: &str, version: CgroupVersion) -> CgroupRequest {
        CgroupRequest {
            limits: parse_limits(&[
                "memory.max=1G".into(),
                "cpu.max=max/50000".into(),
                "pids.max=32".into(),
            ])
            .unwrap(),
            parent: parent.into(),
            version,
        }
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_plan() {
        let own = "4:memory:/outer/x\n2:cpu,cpuacct:/\n0::/\n";
        let read = |_: &Path| Ok::<_, io::Error>("hugetlb\n".to_string());
        let p = CgroupPlan::new(&req("nest", CgroupVersion::Auto), "j", HYBRID, own, read).unwrap();
        assert_eq!(p.v2_enable, None, "a v1 plan");
        assert_eq!(
            p.dirs,
            vec![
                CgroupDir {
                    dir: "/sys/fs/cgroup/memory/outer/x/nest/j".into(),
                    writes: vec![("memory.limit_in_bytes", "1073741824".into())]
                },
                CgroupDir {
                    dir: "/sys/fs/cgroup/cpu/nest/j".into(),
                    writes: vec![
                        ("cpu.cfs_period_us", "50000".into()),
                        ("cpu.cfs_quota_us", "-1".into())
                    ]
                },
                CgroupDir {
                    dir: "/sys/fs/cgroup/pids/nest/j".into(),
                    writes: vec![("pids.max", "32".into())]
                },
            ]
        );
        let p =
            CgroupPlan::new(&req("/ledge", CgroupVersion::Auto), "j", HYBRID, own, read).unwrap();
        assert_eq!(p.dirs[0].dir, Path::new("/sys/fs/cgroup/memory/ledge/j"));
        // v2 is there, but without the controllers.
        let e =
            CgroupPlan::new(&req("/ledge", CgroupVersion::V2), "j", HYBRID, own, read).unwrap_err();
        assert!(e.to_string().contains("lacks the memory, cpu, pids"), "{e}");
        let e = CgroupPlan::new(&req("/l", CgroupVersion::Auto), "j", "", own, read).unwrap_err();
        assert!(e.to_string().contains("--no-cgroup"), "{e}");
    }

    /// The v2 path against a directory standing in for the hierarchy: the controllers are
    /// enabled from the root down, the limits written in v2 syntax.
    #[test]
    fn v2_plan_and_create() {
        let base = std::env::temp_dir().join(format!("ledge-jail-cg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("svc")).unwrap();
        // The parent /ledge/a is not there yet: create makes it.
        fs::write(base.join("cgroup.subtree_control"), "").unwrap();
        fs::write(
            base.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let mi = format!(
            "41 31 0:38 / {} rw,relatime - cgroup2 cgroup2 rw\n",
            base.display().to_string().replace(' ', "\\040")
        );
        let own = "0::/svc\n";
        let read = |p: &Path| fs::read_to_string(p);
        let p =
            CgroupPlan::new(&req("/ledge/a", CgroupVersion::Auto), "j", &mi, own, read).unwrap();
        assert_eq!(p.v2_enable, Some((base.clone(), "ledge/a".into())));
        assert_eq!(p.dirs[0].dir, base.join("ledge/a/j"));
        let mut made = Vec::new();
        // Appends, as the kernel's subtree_control accumulates.
        let write = |p: &Path, v: &str| {
            let mut f = fs::OpenOptions::new().create(true).append(true).open(p)?;
            f.write_all(format!("{v}\n").as_bytes())
        };
        p.create_with(&mut made, write).unwrap();
        assert_eq!(made, vec![base.join("ledge/a/j")]);
        for d in ["", "ledge", "ledge/a"] {
            assert_eq!(
                fs::read_to_string(base.join(d).join("cgroup.subtree_control")).unwrap(),
                "+memory\n+cpu\n+pids\n"
            );
        }
        let j = base.join("ledge/a/j");
        assert_eq!(
            fs::read_to_string(j.join("memory.max")).unwrap(),
            "1073741824\n"
        );
        assert_eq!(
            fs::read_to_string(j.join("cpu.max")).unwrap(),
            "max 50000\n"
        );
        assert_eq!(fs::read_to_string(j.join("pids.max")).unwrap(), "32\n");
        // A second jail with the same id is refused.
        let e = p
            .create_with(&mut Vec::new(), write)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exists"), "{e}");
        // Relative to the jailer's own cgroup.
        let p = CgroupPlan::new(&req("sub", CgroupVersion::V2), "j", &mi, own, read).unwrap();
        assert_eq!(p.dirs[0].dir, base.join("svc/sub/j"));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn elf_interpreters() {
        // The probe guest is a static ELF: no interpreter.
        assert_eq!(elf_interpreter(crate::probe::PROBE_ELF), None);
        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        if let Some(i) = elf_interpreter(&exe) {
            assert!(i.is_absolute() && i.exists(), "{}", i.display());
        }
        for bad in [
            &b""[..],
            b"\x7fELF\x02",
            &[0u8; 64],
            b"\x7fELF\x02\x01\x01\0\0\0\0\0",
        ] {
            assert_eq!(elf_interpreter(bad), None);
        }
        // Program headers that point past the end.
        let mut h = vec![0u8; 64];
        h[..5].copy_from_slice(b"\x7fELF\x02");
        h[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        h[0x36] = 56;
        h[0x38] = 3;
        assert_eq!(elf_interpreter(&h), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b\\134c"), Path::new("/a b\\c"));
        assert_eq!(unescape("/plain\\"), Path::new("/plain\\"));
    }
}
