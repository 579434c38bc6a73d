//! The Firecracker-compatible bodies, and how they map onto Ledge's one schema, `VmConfig`.
//!
//! Field names, types, defaults and required fields are Firecracker's (API v1.10), so that an
//! SDK written for Firecracker sends bodies Ledge parses. Every struct denies unknown fields.
//! Fields Ledge parses but does not support are refused by `apply` with a 400 naming them —
//! never silently ignored. The config file (`--config-file`, Firecracker's format) is made of
//! the same structs, under Firecracker's keys (`boot-source`, `machine-config`, ...).
//!
//! Every `apply` works on a copy of the config, runs `VmConfig::validate` on it, and only then
//! replaces the caller's config: a refused request changes nothing.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ApiError;
use crate::arch::x86_64::layout::{MAX_MEM_MIB, MIN_MEM_MIB};
use crate::arch::x86_64::MAX_VCPUS;
use crate::config::{BalloonConfig, DiskConfig, MacAddr, NetConfig, VmConfig, VsockConfig};
use crate::vmm::VmState;

/// `app_name` in `GET /`.
pub const APP_NAME: &str = "Ledge";

/// The Firecracker API version whose subset Ledge serves (`firecracker_version` in
/// `GET /version`). SDKs check this number to pick request shapes; 1.10 is the last release
/// before the bodies Ledge implements changed, and the one these types follow.
pub const FIRECRACKER_API_VERSION: &str = "1.10.0";

/// Largest value of `stats_polling_interval_s`, as in Firecracker (u16).
type StatsInterval = u16;

/// Runs `change` on a copy of `c`, validates the copy, then keeps it.
fn commit(
    c: &mut VmConfig,
    change: impl FnOnce(&mut VmConfig) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    let mut next = c.clone();
    change(&mut next)?;
    next.validate()?;
    *c = next;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Instance information and version

/// `GET /` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    /// "Not started", "Running" or "Paused" (Ledge also reports "Stopped" for a VM that shut
    /// down while the process still serves the socket).
    pub state: String,
    pub vmm_version: String,
}

impl InstanceInfo {
    pub fn new(id: &str, state: VmState) -> Self {
        InstanceInfo {
            app_name: APP_NAME.to_string(),
            id: id.to_string(),
            state: state.to_string(),
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// `GET /version` body.
pub fn version_json() -> Value {
    json!({
        "firecracker_version": FIRECRACKER_API_VERSION,
        "ledge_version": env!("CARGO_PKG_VERSION"),
    })
}

// ---------------------------------------------------------------------------------------------
// Rate limiters

/// Firecracker's token bucket and rate limiter are Ledge's own limiter configuration (the
/// same fields; `refill_time` in ms; size or refill_time 0 means no limit).
pub use crate::rate_limiter::{RateLimiterConfig as RateLimiter, TokenBucketConfig as TokenBucket};

/// Entropy devices have no limiter in Ledge: a limiter with no bucket is accepted, any
/// bucket refused.
fn refuse_rate_limiter(field: &str, r: &Option<RateLimiter>) -> Result<(), ApiError> {
    match r {
        Some(r) if r.bandwidth.is_some() || r.ops.is_some() => Err(ApiError::unsupported(
            field,
            "virtio-rng is not rate limited; leave it out",
        )),
        _ => Ok(()),
    }
}

/// A limiter from a body: checked (400 naming `field`), buckets that limit nothing dropped,
/// None when nothing is left.
fn accepted_limiter(field: &str, r: &Option<RateLimiter>) -> Result<Option<RateLimiter>, ApiError> {
    match r {
        None => Ok(None),
        Some(r) => {
            r.validate(field)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            Ok(r.effective())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Machine configuration

/// Firecracker's `huge_pages`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PUT /machine-config` body and `GET /machine-config` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
}

/// `PATCH /machine-config` body: the same fields, all optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigPatch {
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    #[serde(default)]
    pub smt: Option<bool>,
    #[serde(default)]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
}

fn check_machine_fields(
    smt: Option<bool>,
    cpu_template: Option<&str>,
    huge_pages: Option<HugePages>,
) -> Result<(), ApiError> {
    if smt == Some(true) {
        return Err(ApiError::unsupported(
            "smt",
            "vCPUs are never SMT siblings; set smt to false",
        ));
    }
    if let Some(t) = cpu_template.filter(|t| *t != "None") {
        return Err(ApiError::unsupported(
            "cpu_template",
            format!("there are no CPU templates (got {t:?}); leave it out or use \"None\""),
        ));
    }
    if huge_pages.is_some_and(|h| h != HugePages::None) {
        return Err(ApiError::unsupported(
            "huge_pages",
            "guest memory uses normal pages; use \"None\"",
        ));
    }
    Ok(())
}

fn check_sizes(vcpu_count: Option<u8>, mem_size_mib: Option<u64>) -> Result<(), ApiError> {
    if let Some(n) = vcpu_count {
        if n == 0 || n > MAX_VCPUS {
            return Err(ApiError::bad_request(format!(
                "vcpu_count must be between 1 and {MAX_VCPUS} (got {n})"
            )));
        }
    }
    if let Some(m) = mem_size_mib {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&m) {
            return Err(ApiError::bad_request(format!(
                "mem_size_mib must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} (got {m})"
            )));
        }
    }
    Ok(())
}

impl MachineConfig {
    /// The machine configuration of `c`, as `GET /machine-config` shows it.
    pub fn from_config(c: &VmConfig) -> Self {
        MachineConfig {
            vcpu_count: u8::try_from(c.machine.vcpus).unwrap_or(u8::MAX),
            mem_size_mib: c.machine.mem_mib,
            smt: false,
            cpu_template: None,
            track_dirty_pages: c.machine.track_dirty_pages,
            huge_pages: HugePages::None,
        }
    }

    /// Pre-boot: replaces vCPUs and memory (fields left out take their defaults, as in
    /// Firecracker's PUT).
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        check_machine_fields(
            Some(self.smt),
            self.cpu_template.as_deref(),
            Some(self.huge_pages),
        )?;
        check_sizes(Some(self.vcpu_count), Some(self.mem_size_mib))?;
        commit(c, |c| {
            c.machine.vcpus = u32::from(self.vcpu_count);
            c.machine.mem_mib = self.mem_size_mib;
            c.machine.track_dirty_pages = self.track_dirty_pages;
            Ok(())
        })
    }
}

impl MachineConfigPatch {
    /// Pre-boot: changes only the fields given.
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        check_machine_fields(self.smt, self.cpu_template.as_deref(), self.huge_pages)?;
        check_sizes(self.vcpu_count, self.mem_size_mib)?;
        commit(c, |c| {
            if let Some(t) = self.track_dirty_pages {
                c.machine.track_dirty_pages = t;
            }
            if let Some(n) = self.vcpu_count {
                c.machine.vcpus = u32::from(n);
            }
            if let Some(m) = self.mem_size_mib {
                c.machine.mem_mib = m;
            }
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Boot source

/// `PUT /boot-source` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default)]
    pub boot_args: Option<String>,
    #[serde(default)]
    pub initrd_path: Option<String>,
}

impl BootSource {
    /// Pre-boot: the kernel, initrd and command line (no boot_args: Ledge's default for the
    /// kind of kernel).
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        if self.kernel_image_path.is_empty() {
            return Err(ApiError::bad_request(
                "kernel_image_path is empty: give the path of a kernel image",
            ));
        }
        if self.initrd_path.as_deref() == Some("") {
            return Err(ApiError::bad_request(
                "initrd_path is empty: give a path or leave it out",
            ));
        }
        if self.boot_args.as_deref().is_some_and(|a| a.contains('\0')) {
            return Err(ApiError::bad_request("boot_args contains a NUL byte"));
        }
        commit(c, |c| {
            c.boot.kernel = Some(PathBuf::from(&self.kernel_image_path));
            c.boot.initrd = self.initrd_path.as_ref().map(PathBuf::from);
            c.boot.cmdline = self.boot_args.clone();
            Ok(())
        })
    }

    /// The boot source of `c`; `None` for the built-in probe guest.
    pub fn from_config(c: &VmConfig) -> Option<Self> {
        let kernel = c.boot.kernel.as_ref()?;
        Some(BootSource {
            kernel_image_path: kernel.display().to_string(),
            boot_args: Some(c.boot.effective_cmdline()),
            initrd_path: c.boot.initrd.as_ref().map(|p| p.display().to_string()),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Drives

/// Firecracker's `cache_type`. Both are accepted: Ledge always advertises and honours flushes,
/// which is what "Writeback" means, and is safe for "Unsafe" users too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

/// Firecracker's `io_engine`; only "Sync" is supported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// `PUT /drives/{drive_id}` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: Option<bool>,
    #[serde(default)]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub io_engine: Option<IoEngine>,
    /// vhost-user back end (refused).
    #[serde(default)]
    pub socket: Option<String>,
}

impl Drive {
    /// Pre-boot: adds the drive, or replaces the one with the same id. The root device is
    /// always the guest's first disk (/dev/vda); the others keep their order.
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        if self.partuuid.is_some() {
            return Err(ApiError::unsupported(
                "partuuid",
                "the root device is always /dev/vda; leave partuuid out",
            ));
        }
        if self.io_engine == Some(IoEngine::Async) {
            return Err(ApiError::unsupported(
                "io_engine \"Async\"",
                "use \"Sync\" or leave io_engine out",
            ));
        }
        if self.socket.is_some() {
            return Err(ApiError::unsupported(
                "socket",
                "vhost-user drives are not implemented; give path_on_host",
            ));
        }
        let rate_limiter = accepted_limiter("rate_limiter", &self.rate_limiter)?;
        let path = match self.path_on_host.as_deref() {
            None | Some("") => {
                return Err(ApiError::bad_request(
                    "path_on_host is missing: give the disk image's path",
                ))
            }
            Some(p) => PathBuf::from(p),
        };
        let disk = DiskConfig {
            path,
            read_only: self.is_read_only.unwrap_or(false),
            id: Some(self.drive_id.clone()),
            root: self.is_root_device,
            rate_limiter,
        };
        commit(c, |c| {
            match c
                .disks
                .iter_mut()
                .find(|d| d.id.as_deref() == Some(&self.drive_id))
            {
                Some(d) => *d = disk,
                None => c.disks.push(disk),
            }
            if c.disks.iter().filter(|d| d.root).count() > 1 {
                return Err(ApiError::bad_request(
                    "a root drive already exists: only one drive can have is_root_device true",
                ));
            }
            // Stable: the root first, the others in the order they were added.
            c.disks.sort_by_key(|d| !d.root);
            Ok(())
        })
    }

    /// The drives of `c`, in guest order.
    pub fn list_from_config(c: &VmConfig) -> Vec<Drive> {
        c.disks
            .iter()
            .enumerate()
            .map(|(i, d)| Drive {
                drive_id: d.drive_id(i),
                path_on_host: Some(d.path.display().to_string()),
                is_root_device: d.root,
                is_read_only: Some(d.read_only),
                partuuid: None,
                cache_type: CacheType::Writeback,
                rate_limiter: d.rate_limiter,
                io_engine: Some(IoEngine::Sync),
                socket: None,
            })
            .collect()
    }
}

/// `PATCH /drives/{drive_id}` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrivePatch {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

impl DrivePatch {
    /// The answer before boot: Firecracker refuses it too (PUT the drive again instead).
    pub fn refuse_before_boot(&self) -> ApiError {
        ApiError::bad_request(format!(
            "PATCH /drives/{id} is for a started VM: before InstanceStart, PUT /drives/{id} again",
            id = self.drive_id
        ))
    }

    /// After boot: the position of the drive in `c.disks`, and the limiter update to apply
    /// (None: nothing to change). A new `path_on_host` is refused: Ledge does not swap a
    /// running drive's backing file.
    pub fn check(&self, c: &VmConfig) -> Result<(usize, Option<RateLimiter>), ApiError> {
        let index = Drive::list_from_config(c)
            .iter()
            .position(|d| d.drive_id == self.drive_id)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "there is no drive {:?}: GET /vm/config lists the drives",
                    self.drive_id
                ))
            })?;
        if let Some(p) = &self.path_on_host {
            if std::path::Path::new(p) != c.disks[index].path {
                return Err(ApiError::unsupported(
                    "path_on_host",
                    format!(
                        "the backing file of running drive {} cannot be swapped; leave path_on_host out",
                        self.drive_id
                    ),
                ));
            }
        }
        if let Some(r) = &self.rate_limiter {
            r.validate("rate_limiter")
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        Ok((index, self.rate_limiter))
    }
}

// ---------------------------------------------------------------------------------------------
// Network interfaces

/// `PUT /network-interfaces/{iface_id}` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default)]
    pub guest_mac: Option<String>,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl NetworkInterface {
    /// Pre-boot: adds the interface, or replaces the one with the same id.
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        let rx_rate_limiter = accepted_limiter("rx_rate_limiter", &self.rx_rate_limiter)?;
        let tx_rate_limiter = accepted_limiter("tx_rate_limiter", &self.tx_rate_limiter)?;
        let mac = match self.guest_mac.as_deref() {
            None => None,
            Some(m) => Some(m.parse::<MacAddr>().map_err(|_| {
                ApiError::bad_request(format!(
                    "guest_mac {m:?} is not a unicast MAC address: use six hex pairs like 06:00:ac:10:00:02"
                ))
            })?),
        };
        let net = NetConfig {
            tap: self.host_dev_name.clone(),
            mac,
            id: Some(self.iface_id.clone()),
            rx_rate_limiter,
            tx_rate_limiter,
        };
        commit(c, |c| {
            match c
                .nets
                .iter_mut()
                .find(|n| n.id.as_deref() == Some(&self.iface_id))
            {
                Some(n) => *n = net,
                None => c.nets.push(net),
            }
            Ok(())
        })
    }

    pub fn list_from_config(c: &VmConfig) -> Vec<NetworkInterface> {
        c.nets
            .iter()
            .enumerate()
            .map(|(i, n)| NetworkInterface {
                iface_id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
                host_dev_name: n.tap.clone(),
                guest_mac: n.mac.map(|m| m.to_string()),
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            })
            .collect()
    }
}

/// `PATCH /network-interfaces/{iface_id}` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfacePatch {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl NetworkInterfacePatch {
    /// The answer before boot (see `DrivePatch::refuse_before_boot`).
    pub fn refuse_before_boot(&self) -> ApiError {
        ApiError::bad_request(format!(
            "PATCH /network-interfaces/{id} is for a started VM: before InstanceStart, PUT /network-interfaces/{id} again",
            id = self.iface_id
        ))
    }

    /// After boot: the interface's position in `c.nets`, checked limiter updates.
    pub fn check(&self, c: &VmConfig) -> Result<usize, ApiError> {
        let index = NetworkInterface::list_from_config(c)
            .iter()
            .position(|n| n.iface_id == self.iface_id)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "there is no network interface {:?}: GET /vm/config lists them",
                    self.iface_id
                ))
            })?;
        for (field, r) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            if let Some(r) = r {
                r.validate(field)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
            }
        }
        Ok(index)
    }
}

// ---------------------------------------------------------------------------------------------
// vsock, entropy

/// `PUT /vsock` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
    /// Deprecated by Firecracker and without effect there; accepted for old clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

impl Vsock {
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        if self.guest_cid < 3 {
            return Err(ApiError::bad_request(format!(
                "guest_cid {} is reserved: use 3 or more",
                self.guest_cid
            )));
        }
        if self.uds_path.is_empty() {
            return Err(ApiError::bad_request(
                "uds_path is empty: give the path of the host socket",
            ));
        }
        commit(c, |c| {
            c.vsock = Some(VsockConfig {
                cid: self.guest_cid,
                uds: PathBuf::from(&self.uds_path),
            });
            Ok(())
        })
    }

    pub fn from_config(c: &VmConfig) -> Option<Self> {
        c.vsock.as_ref().map(|v| Vsock {
            guest_cid: v.cid,
            uds_path: v.uds.display().to_string(),
            vsock_id: None,
        })
    }
}

/// `PUT /entropy` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

impl Entropy {
    /// Pre-boot: adds the virtio-rng device.
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        refuse_rate_limiter("rate_limiter", &self.rate_limiter)?;
        commit(c, |c| {
            c.rng = true;
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Balloon

/// `PUT /balloon` body and `GET /balloon` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: StatsInterval,
}

impl Balloon {
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        commit(c, |c| {
            c.balloon = Some(BalloonConfig {
                mib: self.amount_mib,
                deflate_on_oom: self.deflate_on_oom,
                stats_interval_s: u32::from(self.stats_polling_interval_s),
            });
            Ok(())
        })
    }

    pub fn from_config(c: &VmConfig) -> Option<Self> {
        c.balloon.as_ref().map(|b| Balloon {
            amount_mib: b.mib,
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: StatsInterval::try_from(b.stats_interval_s)
                .unwrap_or(StatsInterval::MAX),
        })
    }
}

fn no_balloon() -> ApiError {
    ApiError::bad_request("no balloon device is configured: PUT /balloon before boot")
}

/// `GET /balloon` answer for the configured balloon (400 when there is none).
pub fn balloon_json(c: &VmConfig) -> Result<Value, ApiError> {
    let b = Balloon::from_config(c).ok_or_else(no_balloon)?;
    serde_json::to_value(b).map_err(|e| ApiError::internal(e.to_string()))
}

/// `PATCH /balloon` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

impl BalloonUpdate {
    /// Pre-boot: changes the configured target (after boot the controller tells the device).
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        commit(c, |c| {
            c.balloon.as_mut().ok_or_else(no_balloon)?.mib = self.amount_mib;
            Ok(())
        })
    }
}

/// `PATCH /balloon/statistics` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: StatsInterval,
}

impl BalloonStatsUpdate {
    /// Pre-boot: changes the configured interval.
    pub fn apply(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        commit(c, |c| {
            c.balloon.as_mut().ok_or_else(no_balloon)?.stats_interval_s =
                u32::from(self.stats_polling_interval_s);
            Ok(())
        })
    }
}

/// `GET /balloon/statistics` answer. The guest reports the optional fields (bytes or counts)
/// when its driver has them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Actions and VM state

/// `action_type` of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PUT /actions` body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// `state` of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateChange {
    Paused,
    Resumed,
}

/// `PATCH /vm` body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub state: VmStateChange,
}

// ---------------------------------------------------------------------------------------------
// Logger and metrics

/// Firecracker's log level; parsed case-insensitively, as Firecracker does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    Off,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown log level {s:?}: use Off, Error, Warning, Info, Debug or Trace"
                )))
            }
        })
    }
}

impl LogLevel {
    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// `PUT /logger` body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default)]
    pub log_path: Option<String>,
    #[serde(default)]
    pub level: Option<LogLevel>,
    #[serde(default)]
    pub show_level: Option<bool>,
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    #[serde(default)]
    pub module: Option<String>,
}

/// `PUT /metrics` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
}

// ---------------------------------------------------------------------------------------------
// The whole configuration: GET /vm/config and --config-file

/// `GET /vm/config`: the configuration under Firecracker's config-file keys. `logger` and
/// `metrics` are null here; the controller, which holds them, fills them in.
pub fn vm_config_json(c: &VmConfig) -> Value {
    json!({
        "boot-source": BootSource::from_config(c),
        "machine-config": MachineConfig::from_config(c),
        "drives": Drive::list_from_config(c),
        "network-interfaces": NetworkInterface::list_from_config(c),
        "vsock": Vsock::from_config(c),
        "entropy": c.rng.then(Entropy::default),
        "balloon": Balloon::from_config(c),
        "logger": Value::Null,
        "metrics": Value::Null,
        "cpu-config": Value::Null,
        "mmds-config": Value::Null,
    })
}

/// A config file in Firecracker's format: the same structs as the API bodies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    #[serde(default)]
    pub drives: Option<Vec<Drive>>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Option<Vec<NetworkInterface>>,
    #[serde(default)]
    pub vsock: Option<Vsock>,
    #[serde(default)]
    pub entropy: Option<Entropy>,
    #[serde(default)]
    pub balloon: Option<Balloon>,
    #[serde(default)]
    pub logger: Option<Logger>,
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// Refused unless null.
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<Value>,
    /// Refused unless null.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<Value>,
}

/// A parsed config file: the VM, and the logger and metrics settings the process applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedConfigFile {
    pub vm: VmConfig,
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
}

impl ConfigFile {
    /// Maps the file onto a `VmConfig`, section by section, as the API calls would.
    pub fn into_config(self) -> Result<ParsedConfigFile, ApiError> {
        if self.cpu_config.is_some() {
            return Err(ApiError::unsupported(
                "cpu-config",
                "there are no custom CPU templates; remove the key",
            ));
        }
        if self.mmds_config.is_some() {
            return Err(ApiError::unsupported(
                "mmds-config",
                "there is no MMDS; remove the key",
            ));
        }
        let mut c = VmConfig::default();
        let section = |key: &str, e: ApiError| ApiError::new(e.status, format!("{key}: {e}"));
        if let Some(m) = &self.machine_config {
            m.apply(&mut c).map_err(|e| section("machine-config", e))?;
        }
        if let Some(b) = &self.boot_source {
            b.apply(&mut c).map_err(|e| section("boot-source", e))?;
        }
        for d in self.drives.iter().flatten() {
            d.apply(&mut c).map_err(|e| section("drives", e))?;
        }
        for n in self.network_interfaces.iter().flatten() {
            n.apply(&mut c)
                .map_err(|e| section("network-interfaces", e))?;
        }
        if let Some(v) = &self.vsock {
            v.apply(&mut c).map_err(|e| section("vsock", e))?;
        }
        if let Some(e) = &self.entropy {
            e.apply(&mut c).map_err(|e| section("entropy", e))?;
        }
        if let Some(b) = &self.balloon {
            b.apply(&mut c).map_err(|e| section("balloon", e))?;
        }
        Ok(ParsedConfigFile {
            vm: c,
            logger: self.logger,
            metrics: self.metrics,
        })
    }
}

/// Parses a Firecracker-format config file, logger and metrics included.
pub fn parse_config_file_full(text: &str) -> Result<ParsedConfigFile, ApiError> {
    let file: ConfigFile = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("invalid config file: {e}")))?;
    file.into_config()
}

/// Parses a Firecracker-format config file into the VM's configuration. Its `logger` and
/// `metrics` sections are checked too; use `parse_config_file_full` to get them.
pub fn parse_config_file(text: &str) -> Result<VmConfig, ApiError> {
    parse_config_file_full(text).map(|f| f.vm)
}

/// Firecracker's name for a VM state (InstanceInfo's `state`).
pub fn state_name(state: VmState) -> String {
    state.to_string()
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// `PUT /snapshot/create` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    pub snapshot_path: String,
    pub mem_file_path: String,
    #[serde(default)]
    pub snapshot_type: crate::snapshot::SnapshotType,
    /// Firecracker's deprecated target version: accepted only when it names no other format.
    #[serde(default)]
    pub version: Option<String>,
}

/// Firecracker's `mem_backend`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

/// One entry of `network_overrides`: the TAP a restored interface uses instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `vsock_override`: the host socket a restored vsock device uses instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// `PUT /snapshot/load` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

impl SnapshotLoadParams {
    /// The memory file: `mem_backend` (File) or the older `mem_file_path`, exactly one.
    pub fn memory_path(&self) -> Result<std::path::PathBuf, ApiError> {
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(ApiError::bad_request(
                "give either mem_backend or mem_file_path, not both",
            )),
            (None, None) => Err(ApiError::bad_request(
                "the memory file is missing: give mem_backend {\"backend_type\": \"File\", \"backend_path\": ...}",
            )),
            (Some(b), None) if b.backend_type == MemBackendType::Uffd => Err(ApiError::unsupported(
                "mem_backend.backend_type",
                "Uffd backends are not supported yet; use \"File\" (Ledge maps the file privately, so pages load lazily anyway)",
            )),
            (Some(b), None) => Ok(b.backend_path.clone().into()),
            (None, Some(p)) => Ok(p.clone().into()),
        }
    }

    /// The snapshot's configuration with this request's overrides applied.
    pub fn apply_overrides(&self, c: &mut VmConfig) -> Result<(), ApiError> {
        for o in &self.network_overrides {
            let Some(n) = c
                .nets
                .iter_mut()
                .find(|n| n.id.as_deref() == Some(o.iface_id.as_str()))
            else {
                return Err(ApiError::bad_request(format!(
                    "network_overrides: the snapshot has no interface {:?}",
                    o.iface_id
                )));
            };
            n.tap = o.host_dev_name.clone();
        }
        if let Some(v) = &self.vsock_override {
            match c.vsock.as_mut() {
                Some(vs) => vs.uds = v.uds_path.clone().into(),
                None => {
                    return Err(ApiError::bad_request(
                        "vsock_override: the snapshot has no vsock device",
                    ))
                }
            }
        }
        c.machine.track_dirty_pages = self.track_dirty_pages || self.enable_diff_snapshots;
        c.validate()
            .map_err(|e| ApiError::bad_request(format!("after the overrides: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn machine_config_put_patch_get() {
        let mut c = VmConfig::default();
        let m: MachineConfig = body(r#"{"vcpu_count":2,"mem_size_mib":256}"#).unwrap();
        m.apply(&mut c).unwrap();
        assert_eq!((c.machine.vcpus, c.machine.mem_mib), (2, 256));
        let p: MachineConfigPatch = body(r#"{"mem_size_mib":512}"#).unwrap();
        p.apply(&mut c).unwrap();
        assert_eq!((c.machine.vcpus, c.machine.mem_mib), (2, 512));
        let got = serde_json::to_value(MachineConfig::from_config(&c)).unwrap();
        assert_eq!(
            got,
            json!({"vcpu_count":2,"mem_size_mib":512,"smt":false,"track_dirty_pages":false,"huge_pages":"None"})
        );
        // Required fields of PUT.
        let e = body::<MachineConfig>(r#"{"vcpu_count":2}"#).unwrap_err();
        assert!(e.contains("mem_size_mib"), "{e}");
    }

    #[test]
    fn unsupported_machine_fields_are_refused_and_named() {
        let mut c = VmConfig::default();
        for (b, field) in [
            (r#"{"vcpu_count":2,"mem_size_mib":128,"smt":true}"#, "smt"),
            (
                r#"{"vcpu_count":2,"mem_size_mib":128,"cpu_template":"T2"}"#,
                "cpu_template",
            ),
            (
                r#"{"vcpu_count":2,"mem_size_mib":128,"huge_pages":"2M"}"#,
                "huge_pages",
            ),
            (r#"{"vcpu_count":0,"mem_size_mib":128}"#, "vcpu_count"),
            (r#"{"vcpu_count":33,"mem_size_mib":128}"#, "vcpu_count"),
            (r#"{"vcpu_count":1,"mem_size_mib":1}"#, "mem_size_mib"),
        ] {
            let m: MachineConfig = body(b).unwrap();
            let e = m.apply(&mut c).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(field), "{b}: {e}");
        }
        assert_eq!(c, VmConfig::default(), "a refused request changes nothing");
        let m: MachineConfig =
            body(r#"{"vcpu_count":1,"mem_size_mib":128,"track_dirty_pages":true}"#).unwrap();
        m.apply(&mut c).unwrap();
        assert!(c.machine.track_dirty_pages);
        assert!(MachineConfig::from_config(&c).track_dirty_pages);
        let m: MachineConfig =
            body(r#"{"vcpu_count":1,"mem_size_mib":128,"cpu_template":"None","smt":false}"#)
                .unwrap();
        m.apply(&mut c).unwrap();
        let e =
            body::<MachineConfig>(r#"{"vcpu_count":1,"mem_size_mib":128,"foo":1}"#).unwrap_err();
        assert!(e.contains("unknown field `foo`"), "{e}");
        let e = body::<MachineConfig>(r#"{"vcpu_count":300,"mem_size_mib":128}"#).unwrap_err();
        assert!(e.contains("300"), "{e}");
    }

    #[test]
    fn drives_map_onto_disks_root_first() {
        let mut c = VmConfig::default();
        let d = |s: &str| body::<Drive>(s).unwrap();
        d(r#"{"drive_id":"data","path_on_host":"/d","is_root_device":false,"is_read_only":true}"#)
            .apply(&mut c)
            .unwrap();
        d(r#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":false,"cache_type":"Writeback","io_engine":"Sync"}"#)
            .apply(&mut c)
            .unwrap();
        assert_eq!(c.disks[0].id.as_deref(), Some("rootfs"));
        assert!(c.disks[0].root);
        assert_eq!(c.disks[1].id.as_deref(), Some("data"));
        assert!(c.disks[1].read_only);
        // Same id replaces.
        d(r#"{"drive_id":"data","path_on_host":"/d2","is_root_device":false}"#)
            .apply(&mut c)
            .unwrap();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[1].path, PathBuf::from("/d2"));
        // A second root is refused.
        let e = d(r#"{"drive_id":"r2","path_on_host":"/r2","is_root_device":true}"#)
            .apply(&mut c)
            .unwrap_err();
        assert!(e.message.contains("root"), "{e}");
        for (b, field) in [
            (
                r#"{"drive_id":"x","path_on_host":"/x","is_root_device":false,"partuuid":"a"}"#,
                "partuuid",
            ),
            (
                r#"{"drive_id":"x","path_on_host":"/x","is_root_device":false,"io_engine":"Async"}"#,
                "io_engine",
            ),
            (
                r#"{"drive_id":"x","path_on_host":"/x","is_root_device":false,"rate_limiter":{"ops":{"size":0,"one_time_burst":5,"refill_time":100}}}"#,
                "rate_limiter.ops",
            ),
            (
                r#"{"drive_id":"x","socket":"/s","is_root_device":false}"#,
                "socket",
            ),
            (r#"{"drive_id":"x","is_root_device":false}"#, "path_on_host"),
        ] {
            let e = d(b).apply(&mut c).unwrap_err();
            assert!(e.message.contains(field), "{b}: {e}");
        }
        assert_eq!(c.disks.len(), 2);
        let listed = Drive::list_from_config(&c);
        assert_eq!(listed[0].drive_id, "rootfs");
    }

    #[test]
    fn rate_limiters_on_drives_and_interfaces() {
        let mut c = VmConfig::default();
        body::<Drive>(
            r#"{"drive_id":"d","path_on_host":"/d","is_root_device":false,
                "rate_limiter":{"bandwidth":{"size":10485760,"refill_time":1000},
                                "ops":{"size":0,"refill_time":0}}}"#,
        )
        .unwrap()
        .apply(&mut c)
        .unwrap();
        let want = RateLimiter {
            bandwidth: Some(TokenBucket::new(10 << 20, 1000)),
            ops: None,
        };
        assert_eq!(
            c.disks[0].rate_limiter,
            Some(want),
            "the no-limit bucket is dropped"
        );
        assert_eq!(Drive::list_from_config(&c)[0].rate_limiter, Some(want));
        // A limiter that limits nothing is no limiter.
        body::<Drive>(
            r#"{"drive_id":"e","path_on_host":"/e","is_root_device":false,"rate_limiter":{}}"#,
        )
        .unwrap()
        .apply(&mut c)
        .unwrap();
        assert_eq!(c.disks[1].rate_limiter, None);
        assert!(body::<Drive>(
            r#"{"drive_id":"x","path_on_host":"/x","is_root_device":false,"rate_limiter":{"bandwidth":{"size":1}}}"#
        )
        .is_err(), "refill_time is required");
        assert!(body::<Drive>(
            r#"{"drive_id":"x","path_on_host":"/x","is_root_device":false,"rate_limiter":{"bandwidth":{"size":-1,"refill_time":1}}}"#
        )
        .is_err());

        // PATCH checks (the controller applies them to the live device).
        let p = |s: &str| body::<DrivePatch>(s).unwrap();
        let (i, u) = p(r#"{"drive_id":"e","rate_limiter":{"ops":{"size":5,"refill_time":10}}}"#)
            .check(&c)
            .unwrap();
        assert_eq!(i, 1);
        assert_eq!(u.unwrap().ops, Some(TokenBucket::new(5, 10)));
        let (_, u) = p(r#"{"drive_id":"d","path_on_host":"/d"}"#)
            .check(&c)
            .unwrap();
        assert_eq!(u, None, "same path, no limiter: nothing to do");
        for (b, needle) in [
            (r#"{"drive_id":"nope"}"#, "no drive"),
            (
                r#"{"drive_id":"d","path_on_host":"/other"}"#,
                "path_on_host",
            ),
            (
                r#"{"drive_id":"d","rate_limiter":{"bandwidth":{"size":0,"one_time_burst":1,"refill_time":5}}}"#,
                "one_time_burst",
            ),
        ] {
            let e = p(b).check(&c).unwrap_err();
            assert!(e.message.contains(needle), "{b}: {e}");
        }
        assert!(p(r#"{"drive_id":"d"}"#)
            .refuse_before_boot()
            .message
            .contains("PUT /drives/d"));

        body::<NetworkInterface>(
            r#"{"iface_id":"eth0","host_dev_name":"tap0",
                "rx_rate_limiter":{"bandwidth":{"size":1000,"one_time_burst":50,"refill_time":100}},
                "tx_rate_limiter":{"ops":{"size":100,"refill_time":1000}}}"#,
        )
        .unwrap()
        .apply(&mut c)
        .unwrap();
        let n = &c.nets[0];
        assert_eq!(
            n.rx_rate_limiter.unwrap().bandwidth.unwrap().one_time_burst,
            Some(50)
        );
        assert_eq!(
            n.tx_rate_limiter.unwrap().ops,
            Some(TokenBucket::new(100, 1000))
        );
        let listed = NetworkInterface::list_from_config(&c);
        assert_eq!(listed[0].tx_rate_limiter, n.tx_rate_limiter);
        let np = |s: &str| body::<NetworkInterfacePatch>(s).unwrap();
        assert_eq!(
            np(r#"{"iface_id":"eth0","tx_rate_limiter":{}}"#)
                .check(&c)
                .unwrap(),
            0
        );
        assert!(np(r#"{"iface_id":"eth9"}"#).check(&c).is_err());
        let e = np(r#"{"iface_id":"eth0","rx_rate_limiter":{"ops":{"size":0,"refill_time":0,"one_time_burst":3}}}"#)
            .check(&c)
            .unwrap_err();
        assert!(e.message.contains("rx_rate_limiter.ops"), "{e}");
        // A Firecracker config file carries them too; Ledge's own config round-trips them.
        let fc = parse_config_file(
            r#"{"boot-source":{"kernel_image_path":"/k"},
                "drives":[{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,
                           "rate_limiter":{"ops":{"size":500,"one_time_burst":100,"refill_time":1000}}}],
                "network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0",
                           "tx_rate_limiter":{"bandwidth":{"size":1048576,"refill_time":100}}}]}"#,
        )
        .unwrap();
        assert_eq!(
            fc.disks[0]
                .rate_limiter
                .unwrap()
                .ops
                .unwrap()
                .one_time_burst,
            Some(100)
        );
        assert!(fc.nets[0].tx_rate_limiter.is_some() && fc.nets[0].rx_rate_limiter.is_none());
        let own = serde_json::to_string(&fc).unwrap();
        let back = VmConfig::from_json(&own, std::path::Path::new("x.json")).unwrap();
        assert_eq!(back, fc);
        // An older config (or snapshot body) without the fields still parses.
        let old = VmConfig::from_json(
            r#"{"disks":[{"path":"/d"}],"nets":[{"tap":"t"}]}"#,
            std::path::Path::new("x.json"),
        )
        .unwrap();
        assert_eq!(old.disks[0].rate_limiter, None);
        // Entropy devices are not limited.
        let e = body::<Entropy>(r#"{"rate_limiter":{"ops":{"size":1,"refill_time":1}}}"#)
            .unwrap()
            .apply(&mut c)
            .unwrap_err();
        assert!(e.message.contains("rate_limiter"), "{e}");
    }

    #[test]
    fn nets_vsock_entropy_balloon() {
        let mut c = VmConfig::default();
        body::<NetworkInterface>(
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:ac:10:00:02"}"#,
        )
        .unwrap()
        .apply(&mut c)
        .unwrap();
        assert_eq!(c.nets[0].tap, "tap0");
        assert_eq!(c.nets[0].mac.unwrap().to_string(), "06:00:ac:10:00:02");
        let e = body::<NetworkInterface>(
            r#"{"iface_id":"eth1","host_dev_name":"tap1","guest_mac":"zz"}"#,
        )
        .unwrap()
        .apply(&mut c)
        .unwrap_err();
        assert!(e.message.contains("guest_mac"), "{e}");
        body::<Vsock>(r#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#)
            .unwrap()
            .apply(&mut c)
            .unwrap();
        assert_eq!(c.vsock.as_ref().unwrap().cid, 3);
        let e = body::<Vsock>(r#"{"guest_cid":2,"uds_path":"/v"}"#)
            .unwrap()
            .apply(&mut c)
            .unwrap_err();
        assert!(e.message.contains("guest_cid"), "{e}");
        body::<Entropy>("{}").unwrap().apply(&mut c).unwrap();
        assert!(c.rng);
        assert!(balloon_json(&c).is_err());
        assert!(BalloonUpdate { amount_mib: 1 }.apply(&mut c).is_err());
        body::<Balloon>(r#"{"amount_mib":16,"deflate_on_oom":true}"#)
            .unwrap()
            .apply(&mut c)
            .unwrap();
        BalloonUpdate { amount_mib: 32 }.apply(&mut c).unwrap();
        BalloonStatsUpdate {
            stats_polling_interval_s: 5,
        }
        .apply(&mut c)
        .unwrap();
        assert_eq!(
            balloon_json(&c).unwrap(),
            json!({"amount_mib":32,"deflate_on_oom":true,"stats_polling_interval_s":5})
        );
        let e = BalloonUpdate { amount_mib: 4096 }
            .apply(&mut c)
            .unwrap_err();
        assert!(e.message.contains("balloon"), "{e}");
    }

    #[test]
    fn log_level_is_case_insensitive() {
        let l: Logger = body(r#"{"level":"warning","log_path":"/l"}"#).unwrap();
        assert_eq!(l.level, Some(LogLevel::Warning));
        let l: Logger = body(r#"{"level":"DEBUG"}"#).unwrap();
        assert_eq!(l.level.unwrap().to_filter(), log::LevelFilter::Debug);
        assert!(body::<Logger>(r#"{"level":"loud"}"#).is_err());
    }

    #[test]
    fn actions_and_vm_state() {
        let a: InstanceActionInfo = body(r#"{"action_type":"InstanceStart"}"#).unwrap();
        assert_eq!(a.action_type, ActionType::InstanceStart);
        assert!(body::<InstanceActionInfo>(r#"{"action_type":"Reboot"}"#).is_err());
        let v: Vm = body(r#"{"state":"Paused"}"#).unwrap();
        assert_eq!(v.state, VmStateChange::Paused);
        assert!(body::<Vm>(r#"{"state":"Stopped"}"#).is_err());
    }

    #[test]
    fn config_file_round_trips_through_vm_config_json() {
        let text = r#"{
            "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
            "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}],
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
            "vsock": {"guest_cid": 3, "uds_path": "/v.sock"},
            "entropy": {},
            "balloon": {"amount_mib": 8, "deflate_on_oom": false, "stats_polling_interval_s": 1},
            "logger": {"log_path": "/log", "level": "Info"},
            "metrics": {"metrics_path": "/m"}
        }"#;
        let f = parse_config_file_full(text).unwrap();
        let c = &f.vm;
        assert_eq!(c.machine.vcpus, 2);
        assert_eq!(c.boot.kernel.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(c.boot.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.nets[0].id.as_deref(), Some("eth0"));
        assert!(c.rng);
        assert_eq!(c.balloon.as_ref().unwrap().stats_interval_s, 1);
        assert_eq!(f.metrics.unwrap().metrics_path, "/m");
        assert_eq!(f.logger.unwrap().level, Some(LogLevel::Info));
        // GET /vm/config uses the same keys and parses back to the same VmConfig.
        let json = vm_config_json(c);
        for k in [
            "boot-source",
            "machine-config",
            "drives",
            "network-interfaces",
            "vsock",
            "entropy",
            "balloon",
            "logger",
            "metrics",
        ] {
            assert!(json.get(k).is_some(), "{k} missing in {json}");
        }
        let again = parse_config_file(&json.to_string()).unwrap();
        assert_eq!(&again, c);
        // The default (probe guest) config round-trips too.
        let d = parse_config_file(&vm_config_json(&VmConfig::default()).to_string()).unwrap();
        assert_eq!(d, VmConfig::default());
    }

    #[test]
    fn config_file_errors_name_the_key() {
        for (text, needle) in [
            (
                r#"{"boot-source":{"kernel_image_path":"/k"},"mmds-config":{"network_interfaces":[]}}"#,
                "mmds-config",
            ),
            (r#"{"cpu-config":{}}"#, "cpu-config"),
            (
                r#"{"machine-config":{"vcpu_count":1,"mem_size_mib":128,"smt":true}}"#,
                "smt",
            ),
            (r#"{"bootsource":{}}"#, "bootsource"),
            (
                r#"{"drives":[{"drive_id":"a","path_on_host":"/a","is_root_device":false,"partuuid":"x"}]}"#,
                "partuuid",
            ),
            ("{", "invalid config file"),
        ] {
            let e = parse_config_file(text).unwrap_err();
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn instance_info_and_version() {
        let i = InstanceInfo::new("vm1", VmState::NotStarted).to_json();
        assert_eq!(i["app_name"], "Ledge");
        assert_eq!(i["state"], "Not started");
        assert_eq!(i["id"], "vm1");
        assert_eq!(i["vmm_version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            version_json()["firecracker_version"],
            FIRECRACKER_API_VERSION
        );
    }

    #[test]
    fn snapshot_load_memory_and_overrides_are_checked() {
        let p = |j: &str| -> SnapshotLoadParams { body(j).unwrap() };
        let both = p(
            r#"{"snapshot_path":"/s","mem_file_path":"/m","mem_backend":{"backend_type":"File","backend_path":"/m"}}"#,
        );
        assert!(both.memory_path().unwrap_err().message.contains("not both"));
        let none = p(r#"{"snapshot_path":"/s"}"#);
        assert!(none
            .memory_path()
            .unwrap_err()
            .message
            .contains("mem_backend"));
        let uffd = p(
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd","backend_path":"/u"}}"#,
        );
        assert!(uffd.memory_path().unwrap_err().message.contains("Uffd"));
        let old = p(r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#);
        assert_eq!(old.memory_path().unwrap(), PathBuf::from("/m"));

        let mut c = VmConfig::default();
        c.nets.push(NetConfig {
            tap: "tap0".into(),
            mac: None,
            id: Some("eth0".into()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        });
        let o = p(
            r#"{"snapshot_path":"/s","network_overrides":[{"iface_id":"eth0","host_dev_name":"tap9"}],"track_dirty_pages":true}"#,
        );
        o.apply_overrides(&mut c).unwrap();
        assert_eq!(c.nets[0].tap, "tap9");
        assert!(c.machine.track_dirty_pages);
        let unknown = p(
            r#"{"snapshot_path":"/s","network_overrides":[{"iface_id":"eth1","host_dev_name":"tap9"}]}"#,
        );
        assert!(unknown
            .apply_overrides(&mut c)
            .unwrap_err()
            .message
            .contains("eth1"));
        let bad_tap = p(
            r#"{"snapshot_path":"/s","network_overrides":[{"iface_id":"eth0","host_dev_name":"no/slash"}]}"#,
        );
        assert_eq!(bad_tap.apply_overrides(&mut c).unwrap_err().status, 400);
        let vs = p(r#"{"snapshot_path":"/s","vsock_override":{"uds_path":"/v"}}"#);
        assert!(vs
            .apply_overrides(&mut c)
            .unwrap_err()
            .message
            .contains("no vsock"));
        assert!(body::<SnapshotLoadParams>(r#"{"snapshot_path":"/s","surprise":1}"#).is_err());
    }
}
