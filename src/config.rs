//! `VmConfig`: the one schema every front end produces.
//!
//! The CLI flags, a JSON config file and library callers all end in a `VmConfig`; nothing else
//! builds a VM. `validate()` runs before anything touches KVM, so a bad value is refused with a
//! message that names the field, without side effects. Every struct denies unknown keys: a key
//! Ledge does not understand is an error, never silently ignored.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::{MAX_MEM_MIB, MIN_MEM_MIB};
use crate::arch::x86_64::MAX_VCPUS;
pub use crate::boot::BootProtocol;
pub use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

/// Kernel command line used for a Linux kernel when the caller gives none.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Largest config file Ledge reads; a real one is a few hundred bytes.
const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Errors in a configuration, each naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {max} (got {0})", max = MAX_VCPUS)]
    Vcpus(u32),
    #[error("mem_mib must be between {min} and {max} (got {0})", min = MIN_MEM_MIB, max = MAX_MEM_MIB)]
    MemSize(u64),
    #[error("{field} is empty: give a file path")]
    EmptyPath { field: &'static str },
    #[error("initrd needs a kernel: the built-in probe guest takes no initrd")]
    InitrdWithoutKernel,
    #[error("cmdline contains a NUL byte")]
    CmdlineNul,
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is larger than {max} bytes", max = MAX_CONFIG_FILE_BYTES)]
    FileTooLarge { path: PathBuf },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid console {0:?}: use stdio, off or file:PATH")]
    Console(String),
    #[error("invalid {flag} {spec:?}: {why}")]
    DeviceSpec {
        flag: &'static str,
        spec: String,
        why: String,
    },
    #[error("invalid MAC address {0:?}: use six hex pairs like 06:00:ac:10:00:02, unicast")]
    Mac(String),
    #[error("{0} virtio devices requested; at most {max} fit (one interrupt each)", max = MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    #[error("disk id {0:?} must be 1 to {max} bytes", max = MAX_DISK_ID_LEN)]
    DiskId(String),
    #[error("{kind} id {id:?} is used twice")]
    DuplicateId { kind: &'static str, id: String },
    #[error("only one disk can be the root device")]
    TwoRoots,
    #[error("tap name {0:?} must be 1 to {max} bytes of letters, digits, '-', '_' or '.'", max = MAX_TAP_NAME_LEN)]
    TapName(String),
    #[error("vsock cid {0} is reserved: use 3 or more")]
    VsockCid(u32),
    #[error("balloon of {balloon} MiB is larger than guest memory ({mem} MiB)")]
    BalloonTooBig { balloon: u32, mem: u64 },
    #[error("{device}: {why}")]
    RateLimiter { device: String, why: String },
}

/// The whole description of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub machine: MachineConfig,
    #[serde(default)]
    pub boot: BootConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...), root first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces on TAP devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// virtio-vsock with a host Unix-socket backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// virtio-rng from the host's entropy pool.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rng: bool,
    /// virtio-balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// What the seccomp filters of Ledge's threads do with a forbidden system call (see
    /// `seccomp`). A property of the process running the VM, not of the VM: never read from
    /// or written to a config file, the API or a snapshot. Default `Kill`, for the library too.
    #[serde(skip)]
    pub seccomp: SeccompLevel,
}

/// Most virtio devices one VM can have: one GSI each, from IRQ 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// virtio-blk serial numbers (GET_ID) are at most 20 bytes.
pub const MAX_DISK_ID_LEN: usize = 20;
/// Linux interface names are at most 15 bytes.
pub const MAX_TAP_NAME_LEN: usize = 15;

/// One virtio-blk disk backed by a raw image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Drive id, returned to the guest by GET_ID (at most 20 bytes). Default: "diskN".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The guest's root file system: Ledge adds `root=/dev/vda` (and `ro` or `rw`).
    #[serde(default)]
    pub root: bool,
    /// Bandwidth (bytes) and operations (requests) limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl DiskConfig {
    /// The drive's id: the configured one, or "diskN" for the disk at `index`. The guest reads
    /// it with GET_ID and the API names the drive by it.
    pub fn drive_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("disk{index}"))
    }

    /// The VMM's name of the disk's device ("block:ID"), by which metrics report it and live
    /// updates find it.
    pub fn device_name(&self, index: usize) -> String {
        format!("block:{}", self.drive_id(index))
    }
}

/// One virtio-net interface on a TAP device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP interface name; created if missing (needs CAP_NET_ADMIN).
    pub tap: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`. Default: a locally administered one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Limits on frames from the TAP to the guest (bytes are Ethernet frame bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on frames from the guest to the TAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetConfig {
    /// The VMM's name of the interface's device ("net:" and its id, or its TAP's name), by
    /// which metrics report it and live updates find it.
    pub fn device_name(&self) -> String {
        format!("net:{}", self.id.as_deref().unwrap_or(&self.tap))
    }
}

/// Where a device's rate limiter is in the configuration: disk `i`'s, or network interface
/// `i`'s receive or transmit one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimiterSlot {
    Disk(usize),
    NetRx(usize),
    NetTx(usize),
}

impl LimiterSlot {
    /// The field's name in the API and in configuration files.
    pub fn field(self) -> &'static str {
        match self {
            LimiterSlot::Disk(_) => "rate_limiter",
            LimiterSlot::NetRx(_) => "rx_rate_limiter",
            LimiterSlot::NetTx(_) => "tx_rate_limiter",
        }
    }

    /// The VMM's name of the device (None: `c` has no such device).
    pub fn device_name(self, c: &VmConfig) -> Option<String> {
        match self {
            LimiterSlot::Disk(i) => c.disks.get(i).map(|d| d.device_name(i)),
            LimiterSlot::NetRx(i) | LimiterSlot::NetTx(i) => {
                c.nets.get(i).map(NetConfig::device_name)
            }
        }
    }

    /// The limits in `c` (None: `c` has no such device).
    pub fn limits_mut(self, c: &mut VmConfig) -> Option<&mut Option<RateLimiterConfig>> {
        match self {
            LimiterSlot::Disk(i) => c.disks.get_mut(i).map(|d| &mut d.rate_limiter),
            LimiterSlot::NetRx(i) => c.nets.get_mut(i).map(|n| &mut n.rx_rate_limiter),
            LimiterSlot::NetTx(i) => c.nets.get_mut(i).map(|n| &mut n.tx_rate_limiter),
        }
    }
}

/// virtio-vsock: the guest's context id and the host socket it is reached through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context id, 3 or more (0-2 are reserved).
    pub cid: u32,
    /// Host Unix socket: host processes connect here and send `CONNECT <port>`; guest
    /// connections to host port P go to `<uds>_P`.
    pub uds: PathBuf,
}

/// virtio-balloon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target balloon size in MiB (memory taken from the guest).
    pub mib: u32,
    /// Let the guest deflate the balloon when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 disables the statistics queue.
    #[serde(default)]
    pub stats_interval_s: u32,
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Mac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || out[0] & 1 != 0 {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Splits `a=1,flag,b=2` into (key, value) pairs, for the device flags.
fn key_values(s: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        })
}

fn kv_error(flag: &'static str, spec: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::DeviceSpec {
        flag,
        spec: spec.to_string(),
        why: why.into(),
    }
}

fn need<'a>(
    flag: &'static str,
    spec: &str,
    key: &str,
    v: Option<&'a str>,
) -> Result<&'a str, ConfigError> {
    v.filter(|v| !v.is_empty())
        .ok_or_else(|| kv_error(flag, spec, format!("{key} needs a value")))
}

/// The rate-limit keys of `--disk` and `--net` (after any `rx-`/`tx-` prefix), collected
/// before they become buckets: `bw=RATE` / `ops=N` (per second, bucket = one second of it),
/// or the full form `bw-size=`, `bw-refill-ms=`, `bw-burst=` (and the same with `ops-`).
#[derive(Default)]
struct LimitKeys {
    /// Index 0 bandwidth, 1 ops.
    rate: [Option<u64>; 2],
    size: [Option<u64>; 2],
    refill_ms: [Option<u64>; 2],
    burst: [Option<u64>; 2],
}

/// `10MiB`, `512K`, `1G`, `2T`, `4096`: binary multiples (K, Ki, KiB are all 1024), any case.
/// Also the parser of `ledge jail`'s byte sizes.
pub(crate) fn parse_bytes(v: &str) -> Option<u64> {
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = v.split_at(digits);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kib" => 10,
        "m" | "mi" | "mib" => 20,
        "g" | "gi" | "gib" => 30,
        "t" | "ti" | "tib" => 40,
        _ => return None,
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

impl LimitKeys {
    /// Takes `key=value` if it is a limit key; Ok(false) if it is not one.
    fn take(
        &mut self,
        flag: &'static str,
        spec: &str,
        key: &str,
        v: Option<&str>,
    ) -> Result<bool, ConfigError> {
        let (i, rest) = if let Some(r) = key.strip_prefix("bw") {
            (0, r)
        } else if let Some(r) = key.strip_prefix("ops") {
            (1, r)
        } else {
            return Ok(false);
        };
        let slot = match rest {
            "" => &mut self.rate[i],
            "-size" => &mut self.size[i],
            "-refill-ms" => &mut self.refill_ms[i],
            "-burst" => &mut self.burst[i],
            _ => return Ok(false),
        };
        let v = need(flag, spec, key, v)?;
        let n = if i == 0 && rest != "-refill-ms" {
            parse_bytes(v)
        } else {
            v.parse().ok()
        };
        let n = n.ok_or_else(|| {
            let what = if i == 0 && rest != "-refill-ms" {
                "a byte count like 4096, 512K, 10MiB or 1G (binary multiples), at most 2^64-1"
            } else {
                "a number"
            };
            kv_error(flag, spec, format!("{key} {v:?} is not {what}"))
        })?;
        if n == 0 && rest != "-burst" {
            return Err(kv_error(
                flag,
                spec,
                format!("{key}=0 limits nothing: leave {key} out for no limit"),
            ));
        }
        *slot = Some(n);
        Ok(true)
    }

    /// The limiter these keys describe (`prefix` names them in errors), None if none given.
    fn finish(
        self,
        flag: &'static str,
        spec: &str,
        prefix: &str,
    ) -> Result<Option<RateLimiterConfig>, ConfigError> {
        let mut out = RateLimiterConfig::default();
        for (i, name) in [(0, "bw"), (1, "ops")] {
            let (rate, size, refill, burst) =
                (self.rate[i], self.size[i], self.refill_ms[i], self.burst[i]);
            let bucket = match (rate, size) {
                (Some(_), Some(_)) => {
                    return Err(kv_error(
                        flag,
                        spec,
                        format!("{prefix}{name}= and {prefix}{name}-size= both given: use one"),
                    ))
                }
                (Some(_), None) if refill.is_some() => {
                    return Err(kv_error(
                        flag,
                        spec,
                        format!("{prefix}{name}= is per second: give {prefix}{name}-size= with {prefix}{name}-refill-ms="),
                    ))
                }
                (Some(n), None) | (None, Some(n)) => Some(TokenBucketConfig {
                    size: n,
                    one_time_burst: burst,
                    refill_time: refill.unwrap_or(1000),
                }),
                (None, None) if refill.is_some() || burst.is_some() => {
                    return Err(kv_error(
                        flag,
                        spec,
                        format!("{prefix}{name}-refill-ms= and {prefix}{name}-burst= need {prefix}{name}= or {prefix}{name}-size="),
                    ))
                }
                (None, None) => None,
            };
            if i == 0 {
                out.bandwidth = bucket;
            } else {
                out.ops = bucket;
            }
        }
        // Every bucket given has a size and a refill time above 0 (`take` refuses 0): it limits.
        Ok(out.effective())
    }
}

const DISK_USAGE: &str = "use path=P[,ro][,id=ID][,root][,bw=BYTES_PER_S][,ops=N_PER_S] (or bw-size=,bw-refill-ms=,bw-burst=, ops-size=,ops-refill-ms=,ops-burst=)";
const NET_USAGE: &str = "use tap=NAME[,mac=MAC][,id=ID][,rx-bw=BYTES_PER_S][,tx-bw=..][,rx-ops=N_PER_S][,tx-ops=..] (or rx-bw-size=,rx-bw-refill-ms=,rx-bw-burst=, and the same for ops and tx)";

impl FromStr for DiskConfig {
    type Err = ConfigError;
    /// `path=P[,ro][,id=ID][,root][,bw=..][,ops=..]` (see `DISK_USAGE`).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let f = "--disk";
        let (mut path, mut read_only, mut id, mut root) = (None, false, None, false);
        let mut limits = LimitKeys::default();
        for (k, v) in key_values(s) {
            match (k, v) {
                ("path", v) => path = Some(PathBuf::from(need(f, s, k, v)?)),
                ("ro", None) | ("readonly", None) => read_only = true,
                ("root", None) => root = true,
                ("id", v) => id = Some(need(f, s, k, v)?.to_string()),
                _ if limits.take(f, s, k, v)? => {}
                _ => {
                    return Err(kv_error(
                        f,
                        s,
                        format!("unknown option {k:?}: {DISK_USAGE}"),
                    ))
                }
            }
        }
        let path = path.ok_or_else(|| kv_error(f, s, "path=P is required"))?;
        Ok(DiskConfig {
            path,
            read_only,
            id,
            root,
            rate_limiter: limits.finish(f, s, "")?,
        })
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;
    /// `tap=NAME[,mac=MAC][,id=ID][,rx-bw=..][,tx-ops=..]` (see `NET_USAGE`).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let f = "--net";
        let (mut tap, mut mac, mut id) = (None, None, None);
        let (mut rx, mut tx) = (LimitKeys::default(), LimitKeys::default());
        for (k, v) in key_values(s) {
            let taken = match (k.strip_prefix("rx-"), k.strip_prefix("tx-")) {
                (Some(rest), _) => rx.take(f, s, rest, v)?,
                (_, Some(rest)) => tx.take(f, s, rest, v)?,
                _ => false,
            };
            match k {
                _ if taken => {}
                "tap" => tap = Some(need(f, s, k, v)?.to_string()),
                "mac" => mac = Some(need(f, s, k, v)?.parse()?),
                "id" => id = Some(need(f, s, k, v)?.to_string()),
                _ => return Err(kv_error(f, s, format!("unknown option {k:?}: {NET_USAGE}"))),
            }
        }
        let tap = tap.ok_or_else(|| kv_error(f, s, "tap=NAME is required"))?;
        Ok(NetConfig {
            tap,
            mac,
            id,
            rx_rate_limiter: rx.finish(f, s, "rx-")?,
            tx_rate_limiter: tx.finish(f, s, "tx-")?,
        })
    }
}

impl FromStr for VsockConfig {
    type Err = ConfigError;
    /// `cid=N,uds=PATH`
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let f = "--vsock";
        let (mut cid, mut uds) = (None, None);
        for (k, v) in key_values(s) {
            match k {
                "cid" => {
                    let v = need(f, s, k, v)?;
                    cid = Some(
                        v.parse()
                            .map_err(|_| kv_error(f, s, format!("cid {v:?} is not a number")))?,
                    )
                }
                "uds" => uds = Some(PathBuf::from(need(f, s, k, v)?)),
                _ => {
                    return Err(kv_error(
                        f,
                        s,
                        format!("unknown option {k:?}: use cid=N,uds=PATH"),
                    ))
                }
            }
        }
        match (cid, uds) {
            (Some(cid), Some(uds)) => Ok(VsockConfig { cid, uds }),
            _ => Err(kv_error(f, s, "both cid=N and uds=PATH are required")),
        }
    }
}

impl FromStr for BalloonConfig {
    type Err = ConfigError;
    /// `mib=N[,deflate-on-oom][,stats=SECONDS]`
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let f = "--balloon";
        let (mut mib, mut deflate_on_oom, mut stats_interval_s) = (None, false, 0);
        for (k, v) in key_values(s) {
            match (k, v) {
                ("mib", v) => {
                    let v = need(f, s, k, v)?;
                    mib = Some(
                        v.parse()
                            .map_err(|_| kv_error(f, s, format!("mib {v:?} is not a number")))?,
                    )
                }
                ("deflate-on-oom", None) => deflate_on_oom = true,
                ("stats", v) => {
                    let v = need(f, s, k, v)?;
                    stats_interval_s = v.parse().map_err(|_| {
                        kv_error(f, s, format!("stats {v:?} is not a number of seconds"))
                    })?
                }
                _ => {
                    return Err(kv_error(
                        f,
                        s,
                        format!("unknown option {k:?}: use mib=N[,deflate-on-oom][,stats=SECONDS]"),
                    ))
                }
            }
        }
        let mib = mib.ok_or_else(|| kv_error(f, s, "mib=N is required"))?;
        Ok(BalloonConfig {
            mib,
            deflate_on_oom,
            stats_interval_s,
        })
    }
}

/// vCPUs and memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// Log the pages the guest writes, so Diff snapshots can save only those.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

fn default_vcpus() -> u32 {
    1
}

fn default_mem_mib() -> u64 {
    128
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: default_vcpus(),
            mem_mib: default_mem_mib(),
            track_dirty_pages: false,
        }
    }
}

/// What to boot. No kernel means the built-in probe guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Replaces the default command line entirely when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub protocol: BootProtocol,
}

impl BootConfig {
    /// The command line the guest gets: the caller's, or the default for the kind of guest.
    pub fn effective_cmdline(&self) -> String {
        match (&self.cmdline, &self.kernel) {
            (Some(c), _) => c.clone(),
            (None, Some(_)) => DEFAULT_LINUX_CMDLINE.to_string(),
            (None, None) => String::new(),
        }
    }
}

/// What a thread's seccomp filter does with a system call outside its allow-list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompLevel {
    /// `SECCOMP_RET_KILL_PROCESS`: the process dies with SIGSYS (the default).
    #[default]
    Kill,
    /// `SECCOMP_RET_LOG`: the call goes through and the kernel logs it (audit log, dmesg).
    Log,
    /// No filters: debugging only.
    Off,
}

impl fmt::Display for SeccompLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompLevel::Kill => "kill",
            SeccompLevel::Log => "log",
            SeccompLevel::Off => "off",
        })
    }
}

/// Where the guest's COM1 goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ConsoleConfig {
    /// Output to stdout; input from stdin when stdin can be polled.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded.
    Off,
}

impl FromStr for ConsoleConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(ConsoleConfig::Stdio),
            "off" => Ok(ConsoleConfig::Off),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(p))),
                _ => Err(ConfigError::Console(s.to_string())),
            },
        }
    }
}

impl TryFrom<String> for ConsoleConfig {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl From<ConsoleConfig> for String {
    fn from(c: ConsoleConfig) -> String {
        c.to_string()
    }
}

impl fmt::Display for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleConfig::Stdio => f.write_str("stdio"),
            ConsoleConfig::Off => f.write_str("off"),
            ConsoleConfig::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl VmConfig {
    /// Checks every field; nothing has touched KVM or the files yet.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.machine;
        if m.vcpus == 0 || m.vcpus > u32::from(MAX_VCPUS) {
            return Err(ConfigError::Vcpus(m.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&m.mem_mib) {
            return Err(ConfigError::MemSize(m.mem_mib));
        }
        let b = &self.boot;
        check_path("kernel", b.kernel.as_deref())?;
        check_path("initrd", b.initrd.as_deref())?;
        if b.initrd.is_some() && b.kernel.is_none() {
            return Err(ConfigError::InitrdWithoutKernel);
        }
        if b.cmdline.as_deref().is_some_and(|c| c.contains('\0')) {
            return Err(ConfigError::CmdlineNul);
        }
        if let ConsoleConfig::File(p) = &self.console {
            check_path("console file", Some(p))?;
        }
        self.validate_devices()
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        let count = self.disks.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.balloon.is_some());
        if count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(count));
        }
        let mut ids = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            check_path("disk path", Some(&d.path))?;
            check_limiter(
                || format!("disk {}", d.drive_id(i)),
                "rate_limiter",
                &d.rate_limiter,
            )?;
            if let Some(id) = &d.id {
                if id.is_empty() || id.len() > MAX_DISK_ID_LEN {
                    return Err(ConfigError::DiskId(id.clone()));
                }
                if !ids.insert(id.as_str()) {
                    return Err(ConfigError::DuplicateId {
                        kind: "disk",
                        id: id.clone(),
                    });
                }
            }
        }
        if self.disks.iter().filter(|d| d.root).count() > 1 {
            return Err(ConfigError::TwoRoots);
        }
        let mut ids = std::collections::HashSet::new();
        let mut taps = std::collections::HashSet::new();
        for n in &self.nets {
            let name = || format!("network interface {}", n.id.as_deref().unwrap_or(&n.tap));
            check_limiter(name, "rx_rate_limiter", &n.rx_rate_limiter)?;
            check_limiter(name, "tx_rate_limiter", &n.tx_rate_limiter)?;
            let ok = !n.tap.is_empty()
                && n.tap.len() <= MAX_TAP_NAME_LEN
                && n.tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(ConfigError::TapName(n.tap.clone()));
            }
            if !taps.insert(n.tap.as_str()) {
                return Err(ConfigError::DuplicateId {
                    kind: "tap",
                    id: n.tap.clone(),
                });
            }
            if let Some(id) = &n.id {
                if !ids.insert(id.as_str()) {
                    return Err(ConfigError::DuplicateId {
                        kind: "network interface",
                        id: id.clone(),
                    });
                }
            }
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 {
                return Err(ConfigError::VsockCid(v.cid));
            }
            check_path("vsock uds", Some(&v.uds))?;
        }
        if let Some(b) = &self.balloon {
            if u64::from(b.mib) > self.machine.mem_mib {
                return Err(ConfigError::BalloonTooBig {
                    balloon: b.mib,
                    mem: self.machine.mem_mib,
                });
            }
        }
        Ok(())
    }

    /// Parses a JSON config file (the same keys `VmConfig` serialises to).
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| {
            let hint = if text.contains("\"boot-source\"") || text.contains("\"machine-config\"") {
                " (this is a Firecracker config file: pass it as `ledge --config-file`)"
            } else {
                ""
            };
            ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("{e}{hint}"),
            }
        })
    }

    /// Reads the text of a config file, refusing absurdly large ones.
    pub fn read_file(path: &Path) -> Result<String, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
            return Err(ConfigError::FileTooLarge {
                path: path.to_path_buf(),
            });
        }
        Ok(text)
    }

    /// Reads and parses a config file in Ledge's own format.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_json(&Self::read_file(path)?, path)
    }
}

fn check_limiter(
    device: impl Fn() -> String,
    field: &str,
    l: &Option<RateLimiterConfig>,
) -> Result<(), ConfigError> {
    match l {
        Some(l) => l.validate(field).map_err(|e| ConfigError::RateLimiter {
            device: device(),
            why: e.to_string(),
        }),
        None => Ok(()),
    }
}

fn check_path(field: &'static str, p: Option<&Path>) -> Result<(), ConfigError> {
    match p {
        Some(p) if p.as_os_str().is_empty() => Err(ConfigError::EmptyPath { field }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_json(s, Path::new("t.json"))
    }

    #[test]
    fn empty_object_is_the_default_probe_vm() {
        let c = parse("{}").unwrap();
        assert_eq!(c, VmConfig::default());
        assert_eq!(c.machine.vcpus, 1);
        assert_eq!(c.machine.mem_mib, 128);
        assert!(c.boot.kernel.is_none());
        c.validate().unwrap();
    }

    #[test]
    fn full_config_round_trips() {
        let c = parse(
            r#"{"machine":{"vcpus":4,"mem_mib":512},
                "boot":{"kernel":"/k","initrd":"/i","cmdline":"console=ttyS0","protocol":"pvh"},
                "console":"file:/tmp/out"}"#,
        )
        .unwrap();
        assert_eq!(c.machine.vcpus, 4);
        assert_eq!(c.boot.protocol, BootProtocol::Pvh);
        assert_eq!(c.console, ConsoleConfig::File("/tmp/out".into()));
        let again = parse(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn unknown_keys_are_refused_and_named() {
        for bad in [
            r#"{"machin":{}}"#,
            r#"{"machine":{"vcpu":2}}"#,
            r#"{"boot":{"kernal":"/k"}}"#,
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("unknown field"), "{bad}: {e}");
        }
    }

    #[test]
    fn vcpu_bounds() {
        let mut c = VmConfig::default();
        for (n, ok) in [(0, false), (1, true), (32, true), (33, false), (300, false)] {
            c.machine.vcpus = n;
            assert_eq!(c.validate().is_ok(), ok, "vcpus={n}");
        }
        c.machine.vcpus = 0;
        assert!(c.validate().unwrap_err().to_string().contains("vcpus"));
    }

    #[test]
    fn mem_bounds() {
        let mut c = VmConfig::default();
        c.machine.mem_mib = 0;
        assert!(c.validate().unwrap_err().to_string().contains("mem_mib"));
        c.machine.mem_mib = MAX_MEM_MIB + 1;
        assert!(c.validate().is_err());
        c.machine.mem_mib = 2048;
        c.validate().unwrap();
    }

    #[test]
    fn console_forms() {
        assert_eq!(
            "stdio".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::Stdio
        );
        assert_eq!("off".parse::<ConsoleConfig>().unwrap(), ConsoleConfig::Off);
        assert_eq!(
            "file:/a/b".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::File("/a/b".into())
        );
        for bad in ["file:", "tty", ""] {
            assert!(bad.parse::<ConsoleConfig>().is_err(), "{bad}");
        }
        assert!(parse(r#"{"console":"serial"}"#).is_err());
    }

    #[test]
    fn initrd_needs_kernel_and_paths_not_empty() {
        let mut c = VmConfig::default();
        c.boot.initrd = Some("/i".into());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InitrdWithoutKernel)
        ));
        c.boot.kernel = Some("".into());
        assert!(matches!(c.validate(), Err(ConfigError::EmptyPath { .. })));
    }

    #[test]
    fn default_cmdline_depends_on_guest() {
        let mut b = BootConfig::default();
        assert_eq!(b.effective_cmdline(), "");
        b.kernel = Some("/k".into());
        assert_eq!(b.effective_cmdline(), DEFAULT_LINUX_CMDLINE);
        b.cmdline = Some("x=1".into());
        assert_eq!(b.effective_cmdline(), "x=1");
    }

    #[test]
    fn device_flags_parse() {
        let d: DiskConfig = "path=/img,ro,id=data1,root".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img".into(),
                read_only: true,
                id: Some("data1".into()),
                root: true,
                rate_limiter: None,
            }
        );
        let n: NetConfig = "tap=tap0,mac=06:00:ac:10:00:02,id=eth0".parse().unwrap();
        assert_eq!(n.mac.unwrap().to_string(), "06:00:ac:10:00:02");
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!(v.cid, 3);
        let b: BalloonConfig = "mib=64,deflate-on-oom,stats=1".parse().unwrap();
        assert_eq!((b.mib, b.deflate_on_oom, b.stats_interval_s), (64, true, 1));
        for bad in ["", "ro", "path=", "path=/x,bogus", "path=/x,ro=1"] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "mac=06:00:00:00:00:01",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mac=1:2:3:4:5:6",
            "tap=t,mac=06:00:00:00:00",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad:?}");
        }
        for bad in ["cid=3", "uds=/x", "cid=x,uds=/x"] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad:?}");
        }
        let e = "path=/x,bogus"
            .parse::<DiskConfig>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--disk") && e.contains("bogus"), "{e}");
    }

    #[test]
    fn device_validation() {
        let disk = |id: &str, root| DiskConfig {
            path: "/d".into(),
            read_only: false,
            id: Some(id.into()),
            root,
            rate_limiter: None,
        };
        let mut c = VmConfig {
            disks: vec![disk("a", true), disk("a", false)],
            ..Default::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateId { .. })));
        c.disks = vec![disk("a", true), disk("b", true)];
        assert!(matches!(c.validate(), Err(ConfigError::TwoRoots)));
        c.disks = vec![disk("this-id-is-longer-than-20", false)];
        assert!(matches!(c.validate(), Err(ConfigError::DiskId(_))));
        c.disks = (0..20).map(|i| disk(&format!("d{i}"), false)).collect();
        assert!(matches!(c.validate(), Err(ConfigError::TooManyDevices(20))));
        c.disks.clear();
        c.nets = vec![NetConfig {
            tap: "bad/name".into(),
            mac: None,
            id: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }];
        assert!(matches!(c.validate(), Err(ConfigError::TapName(_))));
        c.nets.clear();
        c.vsock = Some(VsockConfig {
            cid: 2,
            uds: "/v".into(),
        });
        assert!(matches!(c.validate(), Err(ConfigError::VsockCid(2))));
        c.vsock = None;
        c.balloon = Some(BalloonConfig {
            mib: 200,
            deflate_on_oom: false,
            stats_interval_s: 0,
        });
        assert!(matches!(
            c.validate(),
            Err(ConfigError::BalloonTooBig { .. })
        ));
        c.balloon = None;
        c.rng = true;
        c.validate().unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json.matches("rng").count(), 1);
    }

    #[test]
    fn rate_limit_flags_parse() {
        let d: DiskConfig = "path=/x,bw=10MiB,ops=500".parse().unwrap();
        assert_eq!(
            d.rate_limiter,
            Some(RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig::new(10 << 20, 1000)),
                ops: Some(TokenBucketConfig::new(500, 1000)),
            })
        );
        let d: DiskConfig = "path=/x,bw-size=1M,bw-refill-ms=100,bw-burst=4k,ops-size=8"
            .parse()
            .unwrap();
        let l = d.rate_limiter.unwrap();
        assert_eq!(
            l.bandwidth,
            Some(TokenBucketConfig {
                size: 1 << 20,
                one_time_burst: Some(4096),
                refill_time: 100
            })
        );
        assert_eq!(l.ops, Some(TokenBucketConfig::new(8, 1000)));
        assert_eq!("path=/x".parse::<DiskConfig>().unwrap().rate_limiter, None);
        let n: NetConfig = "tap=t0,rx-bw=1G,tx-ops=100,tx-bw-size=512,tx-bw-refill-ms=10"
            .parse()
            .unwrap();
        assert_eq!(
            n.rx_rate_limiter.unwrap().bandwidth,
            Some(TokenBucketConfig::new(1 << 30, 1000))
        );
        let tx = n.tx_rate_limiter.unwrap();
        assert_eq!(tx.ops, Some(TokenBucketConfig::new(100, 1000)));
        assert_eq!(tx.bandwidth, Some(TokenBucketConfig::new(512, 10)));
        for bad in [
            "path=/x,bw=0",
            "path=/x,bw=10XB",
            "path=/x,bw=",
            "path=/x,bw=-1",
            "path=/x,bw=16777216T",
            "path=/x,bw=99999999999999999999",
            "path=/x,bw=17179869184G",
            "path=/x,bw=1M,bw-size=1M",
            "path=/x,bw=1M,bw-refill-ms=10",
            "path=/x,bw-refill-ms=10",
            "path=/x,ops-burst=10",
            "path=/x,ops=1.5",
            "path=/x,ops-refill-ms=0,ops-size=1",
            "path=/x,rx-bw=1M",
            "path=/x,bwx=1",
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(e.starts_with("invalid --disk"), "{bad}: {e}");
        }
        for bad in [
            "tap=t,bw=1M",
            "tap=t,rx-bw=0",
            "tap=t,tx-ops=x",
            "tap=t,rx-=1",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
        // A burst on a bucket that limits nothing is refused by validate (API bodies).
        let mut c = VmConfig::default();
        c.disks.push(DiskConfig {
            rate_limiter: Some(RateLimiterConfig {
                bandwidth: Some(TokenBucketConfig {
                    size: 0,
                    one_time_burst: Some(1),
                    refill_time: 0,
                }),
                ops: None,
            }),
            ..d
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("disk disk0") && e.contains("one_time_burst"),
            "{e}"
        );
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let e = VmConfig::from_file(Path::new("/nonexistent/vm.json")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vm.json"));
        let e = parse("{not json").unwrap_err();
        assert!(e.to_string().contains("t.json"));
    }
}
