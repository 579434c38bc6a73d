//! The VMM thread's side of the control API: one loop that owns the VM — or, before boot, the
//! `VmConfig` being assembled — and answers every `api::Request` with one `match`.
//!
//! Threading: the API thread only translates HTTP; requests reach this loop through
//! `ApiReceiver` (a channel plus an eventfd). While the VM runs, the eventfd sits in the VMM's
//! event loop next to the devices, so a request wakes `Vmm::poll` and is served after it. Before
//! boot and while paused the loop serves requests only: no device event is processed while
//! paused, which is what makes a pause a pause for the devices too. Every state change asks the
//! transition table first (`VmState::check_transition`); a refusal is a 400 naming the state.
//!
//! Metrics: `PUT /metrics` names a file; a JSON record (uptime, vCPU exits by kind, each
//! device's counters, API requests by route and status) is appended on `FlushMetrics` and every
//! 60 s while the VM exists.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::types::{self, ActionType, VmStateChange};
use crate::api::{ApiError, ApiReceiver, ApiRequest, Reply, Request, Response};
use crate::builder::BuildError;
use crate::config::{LimiterSlot, VmConfig};
use crate::devices::legacy::SerialOut;
use crate::devices::virtio::balloon::Balloon;
use crate::exit::VmExit;
use crate::rate_limiter::RateLimiterConfig;
use crate::vmm::{VmState, Vmm, VmmError};

/// How often metrics are written while a metrics file is set.
const METRICS_PERIOD: Duration = Duration::from_secs(60);
/// The longest the loop sleeps without looking at the stop signal and the metrics clock.
const TICK: Duration = Duration::from_millis(500);

/// Errors that end the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot boot the VM")]
    Build(#[from] BuildError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Wakes the event loop when API requests wait; the controller drains them after `poll`.
struct RequestWake(EventFd);

impl MutEventSubscriber for RequestWake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the API request event: {e}");
        }
    }
}

/// The VMM thread of `ledge --api-sock`.
pub struct Controller {
    id: String,
    config: VmConfig,
    vmm: Option<Vmm>,
    requests: ApiReceiver,
    logger: Option<types::Logger>,
    metrics: Option<(types::Metrics, PathBuf)>,
    metrics_written: Instant,
    /// API requests answered, by route (the Request variant) and status.
    api_counts: BTreeMap<String, u64>,
    /// Readable when the process was asked to terminate.
    terminate: Option<EventFd>,
    /// A caller-supplied sink for the guest console (library use).
    console: Option<SerialOut>,
    /// The `kvm-prewarm` thread: the VM-wide KVM objects, made while waiting for requests.
    prewarm: Option<std::thread::JoinHandle<Result<crate::builder::Prewarmed, BuildError>>>,
}

/// A config file's contents, whichever format it was in.
#[derive(Debug, Default)]
pub struct LoadedConfig {
    pub config: VmConfig,
    pub logger: Option<types::Logger>,
    pub metrics: Option<types::Metrics>,
}

/// Errors reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("config file {path}: {message}")]
    Firecracker { path: PathBuf, message: String },
}

/// Reads a config file in Firecracker's format (keys `boot-source`, `machine-config`, …) or
/// in Ledge's own (`machine`, `boot`, …), telling them apart by their top-level keys.
pub fn load_config_file(path: &std::path::Path) -> Result<LoadedConfig, ConfigFileError> {
    let text = VmConfig::read_file(path)?;
    let firecracker = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.as_object().map(|o| {
                o.keys().any(|k| {
                    matches!(
                        k.as_str(),
                        "boot-source"
                            | "machine-config"
                            | "drives"
                            | "network-interfaces"
                            | "logger"
                            | "metrics"
                            | "entropy"
                    )
                })
            })
        })
        .unwrap_or(false);
    if !firecracker {
        return Ok(LoadedConfig {
            config: VmConfig::from_json(&text, path)?,
            ..Default::default()
        });
    }
    let parsed =
        types::parse_config_file_full(&text).map_err(|e| ConfigFileError::Firecracker {
            path: path.to_path_buf(),
            message: e.message,
        })?;
    Ok(LoadedConfig {
        config: parsed.vm,
        logger: parsed.logger,
        metrics: parsed.metrics,
    })
}

/// A chain of error messages on one line: "outer: inner: root cause".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// True when an I/O error in `e`'s chain says the filesystem is full or the quota is used up.
fn out_of_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn json(v: serde_json::Value) -> Reply {
    Ok(Response::Json(v))
}

fn refuse_load(e: &dyn std::error::Error) -> ApiError {
    ApiError::bad_request(format!("cannot load the snapshot: {}", error_chain(e)))
}

/// Reads and checks a snapshot for `PUT /snapshot/load` (or `ledge restore`): the state file,
/// its memory file, and the snapshot's configuration with the request's overrides and the
/// given console. Nothing is created yet.
pub fn prepare_restore(
    p: &types::SnapshotLoadParams,
    console: &crate::config::ConsoleConfig,
) -> Result<(VmConfig, crate::builder::RestoreSource), ApiError> {
    let mem_path = p.memory_path()?;
    let file = crate::snapshot::read_state(std::path::Path::new(&p.snapshot_path))
        .map_err(|e| refuse_load(&e))?;
    let memory =
        crate::snapshot::open_memory(&mem_path, &file.header).map_err(|e| refuse_load(&e))?;
    let mut config = file.body.config.clone();
    config.console = console.clone();
    p.apply_overrides(&mut config)?;
    Ok((
        config,
        crate::builder::RestoreSource {
            state: file,
            memory,
        },
    ))
}

fn route_name(r: &Request) -> String {
    let s = format!("{r:?}");
    s.split(['(', ' ', '{']).next().unwrap_or("?").to_string()
}

impl Controller {
    pub fn new(id: &str, config: VmConfig, requests: ApiReceiver) -> Self {
        Controller {
            id: id.to_string(),
            config,
            vmm: None,
            requests,
            logger: None,
            metrics: None,
            metrics_written: Instant::now(),
            api_counts: BTreeMap::new(),
            terminate: None,
            console: None,
            prewarm: std::thread::Builder::new()
                .name("kvm-prewarm".into())
                .spawn(crate::builder::prewarm)
                .ok(),
        }
    }

    /// Sends the guest's console output to `sink` instead of what the config says.
    pub fn set_console(&mut self, sink: SerialOut) {
        self.console = Some(sink);
    }

    /// Stops the VM (or, before boot, the controller) when `evt` becomes readable.
    pub fn stop_on(&mut self, evt: EventFd) {
        self.terminate = Some(evt);
    }

    fn terminate_requested(&self) -> bool {
        self.terminate.as_ref().is_some_and(|e| e.read().is_ok())
    }

    /// Applies the `logger` and `metrics` sections of a config file, as the API calls would.
    pub fn apply_file_sections(
        &mut self,
        logger: Option<types::Logger>,
        metrics: Option<types::Metrics>,
    ) -> Result<(), ApiError> {
        if let Some(l) = logger {
            self.put_logger(l)?;
        }
        if let Some(m) = metrics {
            self.put_metrics(m)?;
        }
        Ok(())
    }

    pub fn state(&self) -> VmState {
        self.vmm.as_ref().map_or(VmState::NotStarted, Vmm::state)
    }

    /// Builds and starts the VM from the configuration assembled so far.
    pub fn boot(&mut self) -> Result<(), ControllerError> {
        let pre = self.take_prewarmed();
        let vmm = crate::builder::build_prewarmed(&self.config, self.console.take(), pre)?;
        self.install(vmm)?;
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.start()?;
        }
        Ok(())
    }

    /// Restores a snapshot (pre-boot only): the VM comes back paused, or running with
    /// `resume`. `config` is the snapshot's, with the caller's overrides.
    pub fn restore(
        &mut self,
        config: VmConfig,
        source: crate::builder::RestoreSource,
        resume: bool,
    ) -> Result<(), ControllerError> {
        // The filters are the process's choice; a snapshot does not carry them.
        let config = VmConfig {
            seccomp: self.config.seccomp,
            ..config
        };
        let pre = self.take_prewarmed();
        let vmm = crate::builder::restore_prewarmed(&config, source, self.console.take(), pre)?;
        self.config = config;
        self.install(vmm)?;
        if resume {
            if let Some(vmm) = self.vmm.as_mut() {
                vmm.resume()?;
            }
        }
        Ok(())
    }

    /// The KVM objects the prewarm thread made, if it succeeded (else the build makes them and
    /// reports what failed).
    fn take_prewarmed(&mut self) -> Option<crate::builder::Prewarmed> {
        let h = self.prewarm.take()?;
        match h.join() {
            Ok(Ok(p)) => Some(p),
            Ok(Err(e)) => {
                log::debug!(
                    "KVM prewarm failed ({}); building from scratch",
                    error_chain(&e)
                );
                None
            }
            Err(_) => None,
        }
    }

    /// Takes over a built VM: API requests and the stop event wake its event loop. From here on
    /// this thread is the VMM thread of a running VM: it installs the VMM seccomp filter (its
    /// vCPU threads, already started, carry their own).
    fn install(&mut self, mut vmm: Vmm) -> Result<(), ControllerError> {
        let wake = self
            .requests
            .event()
            .try_clone()
            .map_err(|e| ControllerError::Build(BuildError::EventFd(e)))?;
        vmm.add_subscriber(Arc::new(Mutex::new(RequestWake(wake))));
        if let Some(t) = &self.terminate {
            let t = t
                .try_clone()
                .map_err(|e| ControllerError::Build(BuildError::EventFd(e)))?;
            vmm.stop_on(t);
        }
        crate::seccomp::install(crate::seccomp::ThreadKind::Vmm, self.config.seccomp)?;
        self.vmm = Some(vmm);
        Ok(())
    }

    /// Serves requests until the VM stops; returns why it stopped.
    pub fn run(mut self) -> Result<VmExit, ControllerError> {
        loop {
            match self.vmm.as_mut() {
                Some(vmm) if vmm.state() == VmState::Running => {
                    if let Some(exit) = vmm.poll(TICK.as_millis() as i32)? {
                        self.final_metrics();
                        return Ok(exit);
                    }
                    while let Some(r) = self.requests.try_recv() {
                        self.handle(r);
                    }
                }
                _ => {
                    // Before boot or paused: control requests only.
                    if let Some(r) = self.requests.recv_timeout(TICK) {
                        self.handle(r);
                    }
                    if self.terminate_requested() {
                        match self.vmm.as_ref() {
                            Some(v) => v.request_stop(),
                            None => return Ok(VmExit::Stopped),
                        }
                    }
                    if let Some(vmm) = self.vmm.as_mut() {
                        if vmm.exit_signal().requested() {
                            if let Some(exit) = vmm.poll(0)? {
                                self.final_metrics();
                                return Ok(exit);
                            }
                        }
                    }
                }
            }
            if self.metrics_written.elapsed() >= METRICS_PERIOD {
                self.write_metrics_logged();
            }
        }
    }

    fn handle(&mut self, req: ApiRequest) {
        let route = route_name(&req.request);
        let reply = self.dispatch(&req.request);
        let status = match &reply {
            Ok(Response::NoContent) => 204,
            Ok(Response::Json(_)) => 200,
            Err(e) => e.status,
        };
        *self
            .api_counts
            .entry(format!("{route} {status}"))
            .or_default() += 1;
        if let Err(e) = &reply {
            log::info!("api: {route} refused ({}): {}", e.status, e.message);
        }
        req.respond(reply);
    }

    /// Changes the pre-boot configuration, or refuses naming the state.
    fn pre_boot(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut VmConfig) -> Result<(), ApiError>,
    ) -> Reply {
        let state = self.state();
        if state != VmState::NotStarted {
            return Err(ApiError::wrong_state(what, state));
        }
        f(&mut self.config).map(|()| Response::NoContent)
    }

    fn running_vmm(&mut self, what: &str) -> Result<&mut Vmm, ApiError> {
        let state = self.state();
        match self.vmm.as_mut() {
            Some(v) if matches!(state, VmState::Running | VmState::Paused) => Ok(v),
            _ => Err(ApiError::wrong_state(what, state)),
        }
    }

    fn dispatch(&mut self, request: &Request) -> Reply {
        use Request as R;
        let state = self.state();
        match request {
            R::GetInstanceInfo => json(types::InstanceInfo::new(&self.id, state).to_json()),
            R::GetVersion => json(types::version_json()),
            R::GetVmConfig => {
                let mut v = types::vm_config_json(&self.config);
                v["logger"] = serde_json::to_value(&self.logger).unwrap_or_default();
                v["metrics"] =
                    serde_json::to_value(self.metrics.as_ref().map(|m| &m.0)).unwrap_or_default();
                json(v)
            }
            R::GetMachineConfig => json(
                serde_json::to_value(types::MachineConfig::from_config(&self.config))
                    .unwrap_or_default(),
            ),
            R::PutMachineConfig(m) => self.pre_boot("PUT /machine-config", |c| m.apply(c)),
            R::PatchMachineConfig(m) => self.pre_boot("PATCH /machine-config", |c| m.apply(c)),
            R::PutBootSource(b) => self.pre_boot("PUT /boot-source", |c| b.apply(c)),
            R::PutDrive(d) => self.pre_boot("PUT /drives", |c| d.apply(c)),
            R::PatchDrive(p) => match state {
                VmState::NotStarted => Err(p.refuse_before_boot()),
                _ => self.patch_drive(p),
            },
            R::PutNetworkInterface(n) => self.pre_boot("PUT /network-interfaces", |c| n.apply(c)),
            R::PatchNetworkInterface(p) => match state {
                VmState::NotStarted => Err(p.refuse_before_boot()),
                _ => self.patch_network_interface(p),
            },
            R::PutVsock(v) => self.pre_boot("PUT /vsock", |c| v.apply(c)),
            R::PutEntropy(e) => self.pre_boot("PUT /entropy", |c| e.apply(c)),
            R::PutBalloon(b) => self.pre_boot("PUT /balloon", |c| b.apply(c)),
            R::PatchBalloon(u) => match state {
                VmState::NotStarted => self.pre_boot("PATCH /balloon", |c| u.apply(c)),
                _ => self.balloon_update(u),
            },
            R::GetBalloon => self.balloon_get(),
            R::GetBalloonStats => self.balloon_stats(),
            R::PatchBalloonStats(u) => match state {
                VmState::NotStarted => self.pre_boot("PATCH /balloon/statistics", |c| u.apply(c)),
                _ => self.balloon_stats_update(u),
            },
            R::Action(ActionType::InstanceStart) => {
                // Paused -> Running is in the table too, but that is resume, not a boot.
                if state != VmState::NotStarted {
                    return Err(ApiError::wrong_state("InstanceStart", state));
                }
                state
                    .check_transition(VmState::Running)
                    .map_err(|_| ApiError::wrong_state("InstanceStart", state))?;
                self.config.validate()?;
                self.boot().map_err(|e| {
                    ApiError::bad_request(format!("cannot start the VM: {}", error_chain(&e)))
                })?;
                Ok(Response::NoContent)
            }
            R::Action(ActionType::SendCtrlAltDel) => {
                if state != VmState::Running {
                    return Err(ApiError::wrong_state("SendCtrlAltDel", state));
                }
                let vmm = self.running_vmm("SendCtrlAltDel")?;
                // Refusals here are guest states (keys not read yet, keyboard disabled).
                vmm.send_ctrl_alt_del()
                    .map_err(|e| ApiError::bad_request(error_chain(&e)))?;
                Ok(Response::NoContent)
            }
            R::Action(ActionType::FlushMetrics) => {
                if self.metrics.is_none() {
                    return Err(ApiError::bad_request(
                        "FlushMetrics needs a metrics file: PUT /metrics first",
                    ));
                }
                self.write_metrics()
                    .map_err(|e| ApiError::internal(format!("cannot write metrics: {e}")))?;
                Ok(Response::NoContent)
            }
            R::PatchVm(change) => {
                let (what, to) = match change {
                    VmStateChange::Paused => ("pausing", VmState::Paused),
                    VmStateChange::Resumed => ("resuming", VmState::Running),
                };
                state
                    .check_transition(to)
                    .map_err(|_| ApiError::wrong_state(what, state))?;
                let vmm = self.running_vmm(what)?;
                let r = match change {
                    VmStateChange::Paused => vmm.pause(),
                    VmStateChange::Resumed => vmm.resume(),
                };
                r.map_err(|e| ApiError::internal(error_chain(&e)))?;
                Ok(Response::NoContent)
            }
            R::PutLogger(l) => self.put_logger(l.clone()).map(|()| Response::NoContent),
            R::PutMetrics(m) => self.put_metrics(m.clone()).map(|()| Response::NoContent),
            R::CreateSnapshot(p) => self.create_snapshot(p),
            R::LoadSnapshot(p) => self.load_snapshot(p),
        }
    }

    /// `PATCH /drives/{id}` on a started VM: the live device's limiter, then the configuration
    /// (`GET /vm/config` and snapshots show the limits in force).
    fn patch_drive(&mut self, p: &types::DrivePatch) -> Reply {
        let (index, update) = p.check(&self.config)?;
        let updates = [(LimiterSlot::Disk(index), update)];
        self.patch_limiters("PATCH /drives", &updates)?;
        log::info!(
            "drive {}: rate limiter now {:?}",
            p.drive_id,
            self.config.disks[index].rate_limiter
        );
        Ok(Response::NoContent)
    }

    /// `PATCH /network-interfaces/{id}` on a started VM: each limiter given, as for drives.
    fn patch_network_interface(&mut self, p: &types::NetworkInterfacePatch) -> Reply {
        let index = p.check(&self.config)?;
        let updates = [
            (LimiterSlot::NetRx(index), p.rx_rate_limiter),
            (LimiterSlot::NetTx(index), p.tx_rate_limiter),
        ];
        self.patch_limiters("PATCH /network-interfaces", &updates)?;
        let n = &self.config.nets[index];
        log::info!(
            "network interface {}: rate limiters now rx {:?} tx {:?}",
            p.iface_id,
            n.rx_rate_limiter,
            n.tx_rate_limiter
        );
        Ok(Response::NoContent)
    }

    /// The updates given (None: that limiter stays as it is), on the running VM's devices and
    /// then in this configuration; the first that fails ends it, and the ones made before it
    /// are recorded all the same (the VMM's configuration has them too).
    fn patch_limiters(
        &mut self,
        what: &str,
        updates: &[(LimiterSlot, Option<RateLimiterConfig>)],
    ) -> Result<(), ApiError> {
        let vmm = self.running_vmm(what)?;
        let mut done = Vec::with_capacity(updates.len());
        let mut result = Ok(());
        for (slot, update) in updates {
            let Some(u) = update else { continue };
            match vmm.update_rate_limiter(*slot, u) {
                Ok(now) => done.push((*slot, now)),
                Err(e) => {
                    result = Err(ApiError::bad_request(error_chain(&e)));
                    break;
                }
            }
        }
        for (slot, now) in done {
            if let Some(limits) = slot.limits_mut(&mut self.config) {
                *limits = now;
            }
        }
        result
    }

    fn create_snapshot(&mut self, p: &types::SnapshotCreateParams) -> Reply {
        let state = self.state();
        if state != VmState::Paused {
            return Err(ApiError::bad_request(format!(
                "a snapshot needs a paused VM and this one is {state}: PATCH /vm {{\"state\": \"Paused\"}} first"
            )));
        }
        if let Some(v) = p.version.as_deref() {
            if v != env!("CARGO_PKG_VERSION") {
                return Err(ApiError::unsupported(
                    "version",
                    format!("Ledge writes one snapshot format, which every later Ledge reads; leave version out (got {v:?})"),
                ));
            }
        }
        let vmm = self.running_vmm("creating a snapshot")?;
        let r = vmm
            .snapshot(
                std::path::Path::new(&p.snapshot_path),
                std::path::Path::new(&p.mem_file_path),
                p.snapshot_type,
            )
            .map_err(|e| {
                let hint = if out_of_space(&e) {
                    "; files of an earlier snapshot at these paths are unchanged: free space there or write the snapshot elsewhere"
                } else {
                    ""
                };
                ApiError::bad_request(format!(
                    "cannot create the snapshot: {}{hint}",
                    error_chain(&e)
                ))
            })?;
        log::info!(
            "snapshot {} ({:?}) written in {:?}: {} bytes of memory, {} bytes of state",
            r.id,
            r.kind,
            r.duration,
            r.memory_bytes_written,
            r.state_bytes
        );
        Ok(Response::NoContent)
    }

    /// `PUT /snapshot/load`, also for `ledge restore --api-sock`.
    pub fn load_snapshot(&mut self, p: &types::SnapshotLoadParams) -> Reply {
        let state = self.state();
        if state != VmState::NotStarted {
            return Err(ApiError::wrong_state("loading a snapshot", state));
        }
        let pristine = VmConfig {
            console: self.config.console.clone(),
            seccomp: self.config.seccomp,
            ..VmConfig::default()
        };
        if self.config != pristine {
            return Err(ApiError::bad_request(
                "a snapshot loads only into a fresh process, before any boot configuration (machine, boot source, drives, interfaces, vsock, entropy, balloon): start a new process for it",
            ));
        }
        let (config, source) = prepare_restore(p, &self.config.console)?;
        self.restore(config, source, p.resume_vm)
            .map_err(|e| refuse_load(&e))?;
        Ok(Response::NoContent)
    }

    fn put_logger(&mut self, l: types::Logger) -> Result<(), ApiError> {
        if l.module.is_some() {
            return Err(ApiError::unsupported(
                "module",
                "Ledge logs from one crate; leave it out",
            ));
        }
        crate::logger::configure(
            l.log_path.as_deref().map(std::path::Path::new),
            l.level.map(types::LogLevel::to_filter),
            l.show_level,
            l.show_log_origin,
        )
        .map_err(|e| ApiError::bad_request(error_chain(&e)))?;
        self.logger = Some(l);
        Ok(())
    }

    fn put_metrics(&mut self, m: types::Metrics) -> Result<(), ApiError> {
        if self.metrics.is_some() {
            return Err(ApiError::bad_request(
                "the metrics file is already set; it can be set once",
            ));
        }
        let path = PathBuf::from(&m.metrics_path);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                ApiError::bad_request(format!("cannot open metrics file {}: {e}", path.display()))
            })?;
        self.metrics = Some((m, path));
        Ok(())
    }

    fn metrics_record(&self) -> serde_json::Value {
        let mut v = match &self.vmm {
            Some(vmm) => vmm.metrics(),
            None => serde_json::json!({ "state": VmState::NotStarted.to_string() }),
        };
        v["api_requests"] = serde_json::to_value(&self.api_counts).unwrap_or_default();
        v
    }

    fn write_metrics(&mut self) -> std::io::Result<()> {
        self.metrics_written = Instant::now();
        let Some((_, path)) = &self.metrics else {
            return Ok(());
        };
        let line = format!("{}\n", self.metrics_record());
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(line.as_bytes())
    }

    fn write_metrics_logged(&mut self) {
        if let Err(e) = self.write_metrics() {
            log::warn!("cannot write metrics: {e}");
        }
    }

    fn final_metrics(&mut self) {
        if self.metrics.is_some() {
            self.write_metrics_logged();
        }
    }

    fn balloon_missing() -> ApiError {
        ApiError::bad_request("no balloon device: PUT /balloon before InstanceStart")
    }

    fn balloon_get(&mut self) -> Reply {
        let mut v = types::balloon_json(&self.config)?;
        if let Some(b) = self.vmm.as_ref().and_then(Vmm::balloon) {
            v["amount_mib"] = lock(&b).target_mib().into();
        }
        json(v)
    }

    fn live_balloon(&mut self, what: &str) -> Result<(Arc<Mutex<Balloon>>, u64), ApiError> {
        let vmm = self.running_vmm(what)?;
        let mem = vmm.config().machine.mem_mib;
        let b = vmm.balloon().ok_or_else(Self::balloon_missing)?;
        Ok((b, mem))
    }

    fn balloon_update(&mut self, u: &types::BalloonUpdate) -> Reply {
        let (b, mem) = self.live_balloon("PATCH /balloon")?;
        if u64::from(u.amount_mib) > mem {
            return Err(ApiError::bad_request(format!(
                "amount_mib {} is larger than guest memory ({mem} MiB)",
                u.amount_mib
            )));
        }
        drop(b);
        self.change_balloon("PATCH /balloon", |b| b.set_target_mib(u.amount_mib))
    }

    /// `f` on the live balloon; the configuration (this one and the VMM's, which snapshots
    /// save) follows.
    fn change_balloon(&mut self, what: &str, f: impl FnOnce(&mut Balloon)) -> Reply {
        let vmm = self.running_vmm(what)?;
        vmm.update_balloon(f).ok_or_else(Self::balloon_missing)?;
        self.config.balloon = vmm.config().balloon.clone();
        Ok(Response::NoContent)
    }

    fn balloon_stats(&mut self) -> Reply {
        let (b, _) = self.live_balloon("GET /balloon/statistics")?;
        let b = lock(&b);
        if !b.stats_enabled() {
            return Err(ApiError::bad_request(
                "balloon statistics are off: set stats_polling_interval_s > 0 before boot",
            ));
        }
        let s = b.latest_stats().unwrap_or_default();
        let (target, actual) = (b.target_mib(), b.actual_mib());
        let stats = types::BalloonStats {
            target_pages: target.saturating_mul(256),
            actual_pages: actual.saturating_mul(256),
            target_mib: target,
            actual_mib: actual,
            swap_in: s.swap_in,
            swap_out: s.swap_out,
            major_faults: s.major_faults,
            minor_faults: s.minor_faults,
            free_memory: s.free_memory,
            total_memory: s.total_memory,
            available_memory: s.available_memory,
            disk_caches: s.disk_caches,
            hugetlb_allocations: s.hugetlb_allocations,
            hugetlb_failures: s.hugetlb_failures,
        };
        json(serde_json::to_value(stats).unwrap_or_default())
    }

    fn balloon_stats_update(&mut self, u: &types::BalloonStatsUpdate) -> Reply {
        let what = "PATCH /balloon/statistics";
        let (b, _) = self.live_balloon(what)?;
        if lock(&b).stats_enabled() != (u.stats_polling_interval_s > 0) {
            return Err(ApiError::bad_request(
                "balloon statistics cannot be turned on or off after boot, only their interval changed",
            ));
        }
        drop(b);
        self.change_balloon(what, |b| {
            b.set_stats_interval(u32::from(u.stats_polling_interval_s))
        })
    }
}

/// A VM on its own VMM thread, driven from any thread: Ledge's front door for programs that
/// embed it. Behind it runs the same `Controller` as behind the HTTP API, fed through an
/// in-process channel, so a library caller and an API client see the same rules (the same
/// transition table, the same errors).
///
/// Threads: `spawn` starts one thread named `vmm` (the VMM thread) plus, once started, one
/// `vcpuN` thread per vCPU. Ledge installs one process-wide signal handler, for `SIGRTMIN`
/// (used to kick vCPU threads out of `KVM_RUN`); it installs none for SIGTERM/SIGINT — that is
/// the embedding program's business — and it never exits the process.
#[derive(Clone, Debug)]
pub struct VmmHandle {
    api: crate::api::ApiSender,
    inner: Arc<HandleInner>,
}

#[derive(Debug)]
struct HandleInner {
    stop: EventFd,
    thread: Mutex<Option<std::thread::JoinHandle<Result<VmExit, ControllerError>>>>,
}

/// Errors of the handle.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("cannot start the VMM thread")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error("the VMM thread was already waited for")]
    AlreadyWaited,
    #[error("the VMM thread panicked")]
    Panicked,
}

impl VmmHandle {
    /// Starts the VMM thread with `config` (not booted yet: call `start`). With `console`, the
    /// guest's COM1 output goes to that sink instead of what `config.console` says.
    pub fn spawn(
        id: &str,
        config: VmConfig,
        console: Option<SerialOut>,
    ) -> Result<VmmHandle, HandleError> {
        config.validate().map_err(ApiError::from)?;
        let (api, requests) = crate::api::channel().map_err(HandleError::Spawn)?;
        let stop = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).map_err(HandleError::Spawn)?;
        let mut controller = Controller::new(id, config, requests);
        controller.stop_on(stop.try_clone().map_err(HandleError::Spawn)?);
        if let Some(c) = console {
            controller.set_console(c);
        }
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || controller.run())
            .map_err(HandleError::Spawn)?;
        Ok(VmmHandle {
            api,
            inner: Arc::new(HandleInner {
                stop,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Any request the API knows, answered as over the socket.
    pub fn call(&self, request: Request) -> Reply {
        self.api.call(request)
    }

    fn action(&self, request: Request) -> Result<(), HandleError> {
        self.call(request)?;
        Ok(())
    }

    /// Boots the VM (NotStarted → Running).
    pub fn start(&self) -> Result<(), HandleError> {
        self.action(Request::Action(ActionType::InstanceStart))
    }

    /// Running → Paused: every vCPU out of guest code, no device I/O, guest time frozen.
    pub fn pause(&self) -> Result<(), HandleError> {
        self.action(Request::PatchVm(VmStateChange::Paused))
    }

    /// Paused → Running.
    pub fn resume(&self) -> Result<(), HandleError> {
        self.action(Request::PatchVm(VmStateChange::Resumed))
    }

    /// What `GET /` answers: id, state, version.
    pub fn describe(&self) -> Result<serde_json::Value, HandleError> {
        match self.call(Request::GetInstanceInfo)? {
            Response::Json(v) => Ok(v),
            Response::NoContent => Ok(serde_json::Value::Null),
        }
    }

    /// Asks the VM to stop (in any state); `wait` returns once it has.
    pub fn stop(&self) {
        if let Err(e) = self.inner.stop.write(1) {
            log::error!("cannot signal the VMM thread to stop: {e}");
        }
    }

    /// Waits for the VMM thread to end and returns why the VM stopped.
    pub fn wait(&self) -> Result<VmExit, HandleError> {
        let thread = lock(&self.inner.thread)
            .take()
            .ok_or(HandleError::AlreadyWaited)?;
        Ok(thread.join().map_err(|_| HandleError::Panicked)??)
    }
}
