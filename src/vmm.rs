//! `Vmm`: owns one VM — its KVM handles, memory, devices and vCPU threads — and its lifecycle.
//!
//! Every state change asks `VmState::check_transition` first; a refused change is a typed error
//! naming the current state. The VMM thread (whoever calls `run`) runs one event loop
//! (event-manager) over the stop eventfd and serial input; all device I/O that is not a vCPU
//! exit runs there. vCPUs are started paused by the builder: `start` and a later restore are
//! both "resume".

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::kvm::memory::GuestMemoryMmap;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::state::VcpuState;
use crate::config::VmConfig;
use crate::devices::legacy::{I8042Error, SerialDevice, I8042};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mmio::{MmioTransport, SharedDevice};
use crate::exit::{ExitSignal, VmExit};
use crate::kvm::vcpu::{ExitCounters, ExitCounts, VcpuCommand, VcpuError, VcpuEvent, VcpuHandle};
use crate::snapshot::{self, SnapshotType};

/// How long a vCPU may take to answer a command before the VMM gives up on it.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The lifecycle of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Stopped => "Stopped",
        })
    }
}

impl VmState {
    /// The one transition table: every state change in Ledge is checked here.
    pub fn check_transition(self, to: VmState) -> Result<(), VmmError> {
        use VmState::*;
        let ok = matches!(
            (self, to),
            (NotStarted, Running)
                | (Running, Paused)
                | (Paused, Running)
                | (NotStarted | Running | Paused, Stopped)
        );
        if ok {
            Ok(())
        } else {
            Err(VmmError::Transition { from: self, to })
        }
    }
}

/// Errors running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("the VM cannot go from {from} to {to}")]
    Transition { from: VmState, to: VmState },
    #[error("vcpu control failed")]
    Vcpu(#[from] VcpuError),
    #[error("vcpu {id} answered {got:?} instead of {want:?}")]
    VcpuAnswer {
        id: u8,
        got: VcpuEvent,
        want: VcpuEvent,
    },
    #[error("cannot set up the VMM event loop")]
    EventLoop(#[source] event_manager::Error),
    #[error("cannot send Ctrl-Alt-Del")]
    CtrlAltDel(#[source] I8042Error),
    #[error("cannot {0} the guest clock")]
    Clock(&'static str, #[source] kvm_ioctls::Error),
    #[error("a snapshot needs a paused VM and this one is {0}: pause it first (PATCH /vm {{\"state\": \"Paused\"}})")]
    SnapshotNotPaused(VmState),
    #[error("a Diff snapshot needs dirty page tracking: set track_dirty_pages in the machine configuration before boot (or when loading the snapshot)")]
    DiffUntracked,
    #[error("a Diff snapshot needs an earlier snapshot (or a restore) of this VM to be relative to, and the last one must have succeeded: take a Full snapshot first")]
    DiffWithoutBase,
    #[error("cannot save the VM state")]
    ArchState(#[from] crate::arch::x86_64::state::StateError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Memory(#[from] crate::kvm::memory::MemoryError),
    #[error("this VM has no device {0}")]
    NoDevice(String),
    #[error("device {device} has no {field}")]
    NoRateLimiter { device: String, field: String },
    #[error("cannot update the {field} of {device}")]
    RateLimiter {
        device: String,
        field: String,
        #[source]
        source: crate::rate_limiter::RateLimiterError,
    },
}

/// Everything one VM is made of. Built by `builder::build`.
pub struct Vmm {
    state: VmState,
    config: VmConfig,
    // Field order is drop order: vCPU threads are joined (in `Drop`) before the VM fd and the
    // memory they use go away.
    vcpus: Vec<VcpuHandle>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    exit_counters: Arc<ExitCounters>,
    devices: Vec<(String, SharedDevice)>,
    transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    balloon: Option<Arc<Mutex<Balloon>>>,
    started: Option<std::time::Instant>,
    /// The snapshot this VM's memory matches as of now (taken or restored), for Diffs.
    last_snapshot: Option<String>,
    /// The memory file a restored VM maps privately: its data is guest memory too.
    memory_source: Option<File>,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    /// kvmclock when the VM was paused, put back on resume so guest time stands still.
    paused_clock: Option<kvm_bindings::kvm_clock_data>,
    vm: VmFd,
    mem: GuestMemoryMmap,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("state", &self.state)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// What a finished snapshot wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotReport {
    pub id: String,
    pub kind: SnapshotType,
    pub memory_bytes_written: u64,
    pub state_bytes: u64,
    #[serde(skip)]
    pub duration: Duration,
}

/// What the builder hands over for a VM made from a snapshot.
pub(crate) struct Restored {
    pub clock: kvm_bindings::kvm_clock_data,
    pub snapshot_id: String,
    pub memory: File,
}

/// The parts the builder hands over.
pub(crate) struct VmParts {
    pub config: VmConfig,
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<VcpuHandle>,
    pub exit: Arc<ExitSignal>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The keyboard controller, for `send_ctrl_alt_del`.
    pub i8042: Arc<Mutex<I8042>>,
    /// Devices served by the event loop (virtio devices).
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    pub exit_counters: Arc<ExitCounters>,
    /// Every virtio device by name, for metrics and host-side control.
    pub devices: Vec<(String, SharedDevice)>,
    /// Every virtio-mmio window, in bus order, for snapshots.
    pub transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
    /// The balloon, typed, for the API's live target and statistics.
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    /// Forward the process's stdin to COM1 (console on stdio, no caller-supplied sink).
    pub stdin_input: bool,
}

impl Vmm {
    pub(crate) fn new(parts: VmParts) -> Result<Self, VmmError> {
        let mut events = EventManager::new().map_err(VmmError::EventLoop)?;
        let stop_watch: Arc<Mutex<dyn MutEventSubscriber + Send>> =
            Arc::new(Mutex::new(StopWatch(parts.exit.clone())));
        events.add_subscriber(stop_watch);
        for s in parts.subscribers {
            events.add_subscriber(s);
        }
        if parts.stdin_input {
            let input: Arc<Mutex<dyn MutEventSubscriber + Send>> =
                Arc::new(Mutex::new(SerialInput::stdin(parts.serial.clone())));
            events.add_subscriber(input);
        }
        Ok(Vmm {
            state: VmState::NotStarted,
            config: parts.config,
            vcpus: parts.vcpus,
            exit: parts.exit,
            serial: parts.serial,
            i8042: parts.i8042,
            exit_counters: parts.exit_counters,
            devices: parts.devices,
            transports: parts.transports,
            balloon: parts.balloon,
            started: None,
            last_snapshot: None,
            memory_source: None,
            events,
            paused_clock: None,
            vm: parts.vm,
            mem: parts.mem,
        })
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// Marks a VM built from a snapshot: paused, with the saved kvmclock put back on resume.
    pub(crate) fn set_restored(&mut self, r: Restored) {
        self.state = VmState::Paused;
        self.started = Some(std::time::Instant::now());
        self.paused_clock = Some(r.clock);
        self.last_snapshot = Some(r.snapshot_id);
        self.memory_source = Some(r.memory);
    }

    /// Snapshots the paused VM: devices, then vCPUs, then the VM-level state, then guest
    /// memory. The memory file is written first and the state file last, each through a
    /// temporary name, fsync and rename, so a crash leaves the previous snapshot loadable.
    pub fn snapshot(
        &mut self,
        state_path: &Path,
        mem_path: &Path,
        kind: SnapshotType,
    ) -> Result<SnapshotReport, VmmError> {
        if self.state != VmState::Paused {
            return Err(VmmError::SnapshotNotPaused(self.state));
        }
        let track = self.config.machine.track_dirty_pages;
        let parent = match kind {
            SnapshotType::Full => None,
            SnapshotType::Diff if !track => return Err(VmmError::DiffUntracked),
            SnapshotType::Diff => Some(
                self.last_snapshot
                    .clone()
                    .ok_or(VmmError::DiffWithoutBase)?,
            ),
        };
        let t0 = std::time::Instant::now();
        let devices = self
            .transports
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.lock().unwrap_or_else(|e| e.into_inner()).save(),
                )
            })
            .collect();
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner()).save();
        let i8042 = self.i8042.lock().unwrap_or_else(|e| e.into_inner()).save();
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.save_state(VCPU_ANSWER_TIMEOUT)?);
        }
        let clock = match self.paused_clock {
            Some(c) => c,
            None => self
                .vm
                .get_clock()
                .map_err(|e| VmmError::Clock("save", e))?,
        };
        let vm = crate::arch::x86_64::state::save_vm(&self.vm, clock)?;

        let id = snapshot::new_id();
        // Tracking: what changed since the last snapshot; a Full only clears the logs, so the
        // next Diff is relative to it.
        let dirty = if track {
            // Reading the logs clears them: until this snapshot is committed there is no base
            // a later Diff could be relative to (a failed snapshot leaves none, so a Diff is
            // refused rather than missing the pages read here).
            self.last_snapshot = None;
            Some(crate::kvm::memory::take_dirty(&self.vm, &self.mem)?)
        } else {
            None
        };
        let (tag, dirty) = match kind {
            SnapshotType::Full => (snapshot::full_tag(&id), None),
            SnapshotType::Diff => (snapshot::diff_tag(&id), dirty.as_deref()),
        };
        let (mem_file, written) = snapshot::MemoryWriter::write(
            mem_path,
            &self.mem,
            dirty,
            self.memory_source.as_ref(),
            &tag,
        )?;
        let host_cpu = crate::arch::x86_64::state::host_cpu(
            vcpus
                .first()
                .map_or(&[][..], |v: &VcpuState| v.cpuid.as_slice()),
        );
        let header = snapshot::SnapshotHeader {
            ledge_version: env!("CARGO_PKG_VERSION").to_string(),
            id: id.clone(),
            kind,
            parent,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            host_cpu,
            kvm_caps: crate::arch::x86_64::REQUIRED_CAPS
                .iter()
                .map(|(c, _)| format!("{c:?}"))
                .collect(),
            memory: snapshot::MemoryInfo {
                size: self.mem.iter().map(|r| r.len()).sum(),
                regions: self
                    .mem
                    .iter()
                    .map(|r| (r.start_addr().0, r.len()))
                    .collect(),
                written,
            },
        };
        let body = snapshot::VmSnapshot {
            config: self.config.clone(),
            vm,
            vcpus,
            serial,
            i8042,
            devices,
        };
        let staged = snapshot::encode(&header, &body).and_then(|bytes| {
            snapshot::StagedFile::write(state_path, &bytes).map(|s| (s, bytes.len()))
        });
        let (staged, state_bytes) = match staged {
            Ok(s) => s,
            Err(e) => {
                mem_file.abandon();
                return Err(e.into());
            }
        };
        mem_file.commit()?;
        staged.commit()?;
        self.last_snapshot = Some(id.clone());
        Ok(SnapshotReport {
            id,
            kind,
            memory_bytes_written: written,
            state_bytes: state_bytes as u64,
            duration: t0.elapsed(),
        })
    }

    /// PATCH semantics on the live rate limiter at `slot`; records the limits now in force in
    /// the configuration (snapshots keep them) and returns them (None: no limit left).
    pub fn update_rate_limiter(
        &mut self,
        slot: crate::config::LimiterSlot,
        update: &crate::rate_limiter::RateLimiterConfig,
    ) -> Result<Option<crate::rate_limiter::RateLimiterConfig>, VmmError> {
        let field = slot.field();
        let device = slot
            .device_name(&self.config)
            .ok_or_else(|| VmmError::NoDevice(format!("{slot:?}")))?;
        let dev = self
            .devices
            .iter()
            .find(|(n, _)| *n == device)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| VmmError::NoDevice(device.clone()))?;
        let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        let limiter = dev
            .rate_limiter_mut(field)
            .ok_or_else(|| VmmError::NoRateLimiter {
                device: device.clone(),
                field: field.to_string(),
            })?;
        limiter
            .update_buckets(update)
            .map_err(|source| VmmError::RateLimiter {
                device: device.clone(),
                field: field.to_string(),
                source,
            })?;
        let now = limiter.config().effective();
        if let Some(limits) = slot.limits_mut(&mut self.config) {
            *limits = now;
        }
        Ok(now)
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory, for callers that inspect or snapshot it.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), VmmError> {
        self.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_ctrl_alt_del()
            .map_err(VmmError::CtrlAltDel)
    }

    /// One metrics record: uptime, vCPU exits by kind, each device's counters.
    pub fn metrics(&self) -> serde_json::Value {
        let devices: serde_json::Map<String, serde_json::Value> = self
            .devices
            .iter()
            .map(|(name, d)| {
                let m = d.lock().unwrap_or_else(|e| e.into_inner()).metrics();
                (name.clone(), m)
            })
            .collect();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        serde_json::json!({
            "utc_timestamp_ms": now_ms,
            "state": self.state.to_string(),
            "uptime_ms": self.started.map_or(0, |t| t.elapsed().as_millis() as u64),
            "vcpu_exits": self.exit_counts(),
            "devices": devices,
        })
    }

    /// The balloon device, when the VM has one.
    pub fn balloon(&self) -> Option<Arc<Mutex<Balloon>>> {
        self.balloon.clone()
    }

    /// Changes the live balloon with `f`, then records its target and statistics interval in
    /// the configuration (snapshots keep them). None: the VM has no balloon.
    pub fn update_balloon<T>(&mut self, f: impl FnOnce(&mut Balloon) -> T) -> Option<T> {
        let b = self.balloon.clone()?;
        let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut b);
        if let Some(cfg) = self.config.balloon.as_mut() {
            cfg.mib = b.target_mib();
            cfg.stats_interval_s = b.stats_interval();
        }
        Some(r)
    }

    /// The virtio devices, by name.
    pub fn devices(&self) -> &[(String, SharedDevice)] {
        &self.devices
    }

    /// vCPU exits to userspace so far, by kind.
    pub fn exit_counts(&self) -> ExitCounts {
        self.exit_counters.snapshot()
    }

    /// The stop request every thread shares; `request` on it stops the VM.
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// Queues bytes for the guest's COM1 input; returns how many fitted.
    pub fn send_console_input(&self, bytes: &[u8]) -> usize {
        let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = s.input_room().min(bytes.len());
        s.enqueue_input(&bytes[..room])
    }

    /// Runs the guest: the vCPUs leave their paused start.
    pub fn start(&mut self) -> Result<(), VmmError> {
        self.state.check_transition(VmState::Running)?;
        self.command_all(VcpuCommand::Resume, VcpuEvent::Resumed)?;
        self.state = VmState::Running;
        self.started = Some(std::time::Instant::now());
        Ok(())
    }

    /// Stops every vCPU outside guest code and waits until all have; the guest's kvmclock is
    /// saved so that, after `resume`, no time seems to have passed while paused. Device I/O
    /// stops too: `poll` serves no device events while paused.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        self.state.check_transition(VmState::Paused)?;
        self.command_all(VcpuCommand::Pause, VcpuEvent::Paused)?;
        self.paused_clock = Some(
            self.vm
                .get_clock()
                .map_err(|e| VmmError::Clock("save", e))?,
        );
        self.state = VmState::Paused;
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), VmmError> {
        self.state.check_transition(VmState::Running)?;
        if let Some(saved) = self.paused_clock.take() {
            let clock = kvm_bindings::kvm_clock_data {
                clock: saved.clock,
                ..Default::default()
            };
            self.vm
                .set_clock(&clock)
                .map_err(|e| VmmError::Clock("restore", e))?;
        }
        self.command_all(VcpuCommand::Resume, VcpuEvent::Resumed)?;
        self.state = VmState::Running;
        Ok(())
    }

    fn command_all(&self, cmd: VcpuCommand, want: VcpuEvent) -> Result<(), VmmError> {
        for v in &self.vcpus {
            v.send(cmd)?;
        }
        for v in &self.vcpus {
            let got = v.wait(VCPU_ANSWER_TIMEOUT)?;
            if got != want {
                return Err(VmmError::VcpuAnswer {
                    id: v.id(),
                    got,
                    want,
                });
            }
        }
        Ok(())
    }

    /// Serves the event loop once, waiting at most `timeout_ms` (-1: until something happens).
    /// Returns the exit reason once the VM has stopped.
    pub fn poll(&mut self, timeout_ms: i32) -> Result<Option<VmExit>, VmmError> {
        if self.state == VmState::Paused {
            // Paused: no device I/O. Only a stop can end the wait.
            if !self.exit.requested() && timeout_ms != 0 {
                let ms = u64::try_from(timeout_ms).unwrap_or(100).min(100);
                std::thread::sleep(Duration::from_millis(ms));
            }
        } else if !self.exit.requested() {
            self.events
                .run_with_timeout(timeout_ms)
                .map_err(VmmError::EventLoop)?;
        }
        match self.exit.reason() {
            Some(why) => {
                self.shutdown();
                Ok(Some(why))
            }
            None => Ok(None),
        }
    }

    /// Stops the VM (as `request_stop`) when `evt` becomes readable — the binary's
    /// SIGTERM/SIGINT eventfd, for one.
    pub fn stop_on(&mut self, evt: EventFd) {
        let watch: Arc<Mutex<dyn MutEventSubscriber + Send>> =
            Arc::new(Mutex::new(StopOn(evt, self.exit.clone())));
        self.events.add_subscriber(watch);
    }

    /// Adds an event source to the VMM thread's loop (the API's request event, for one).
    pub fn add_subscriber(&mut self, s: Arc<Mutex<dyn MutEventSubscriber + Send>>) {
        self.events.add_subscriber(s);
    }

    /// Runs the VMM event loop until the guest stops; starts the VM first if needed.
    pub fn run(&mut self) -> Result<VmExit, VmmError> {
        if self.state == VmState::NotStarted {
            self.start()?;
        }
        loop {
            if let Some(why) = self.poll(-1)? {
                return Ok(why);
            }
        }
    }

    /// Asks the VM to stop from the host side; `run`/`poll` then return `VmExit::Stopped`.
    pub fn request_stop(&self) {
        self.exit.request(VmExit::Stopped);
    }

    /// Joins every vCPU thread; the VM is stopped afterwards.
    fn shutdown(&mut self) {
        if self.state != VmState::Stopped {
            // Any thread may have asked for the stop; make sure the vCPUs see it.
            if !self.exit.requested() {
                self.exit.request(VmExit::Stopped);
            }
            for v in self.vcpus.drain(..) {
                v.exit();
            }
            self.state = VmState::Stopped;
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Clears the stop eventfd so the event loop returns and `poll` sees the request.
struct StopWatch(Arc<ExitSignal>);

impl MutEventSubscriber for StopWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            log::error!("cannot watch the VM stop event: {e}");
        }
    }
}

/// Turns an outside event into a host stop.
struct StopOn(EventFd, Arc<ExitSignal>);

impl MutEventSubscriber for StopOn {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
        self.1.request(VmExit::Stopped);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch the stop event: {e}");
        }
    }
}

/// Forwards the VMM's stdin to COM1 when the console is `stdio`.
struct SerialInput {
    source: Option<File>,
    serial: Arc<Mutex<SerialDevice>>,
}

impl SerialInput {
    fn stdin(serial: Arc<Mutex<SerialDevice>>) -> Self {
        // A duplicate of fd 0, read unbuffered so epoll readiness and our reads agree.
        let source = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .ok();
        SerialInput { source, serial }
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let Some(src) = self.source.as_mut() else {
            return;
        };
        let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        // The guest's receive FIFO is small; when it is full, the byte that woke us is dropped
        // rather than spinning on a readable stdin.
        let room = s.input_room().clamp(1, 64);
        let mut buf = [0u8; 64];
        match src.read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                // EOF or a broken stdin: stop watching it, the guest keeps running.
                let _ = ops.remove(events);
                self.source = None;
            }
            Ok(n) => {
                let taken = s.enqueue_input(&buf[..n]);
                if taken < n {
                    log::debug!("serial input: {} bytes dropped, guest FIFO full", n - taken);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let Some(src) = self.source.as_ref() else {
            return;
        };
        // epoll refuses regular files and /dev/null: then there is simply no console input.
        if let Err(e) = ops.add(Events::new(src, EventSet::IN)) {
            log::debug!("stdin cannot be polled ({e}); the guest console has no input");
            self.source = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table() {
        use VmState::*;
        let all = [NotStarted, Running, Paused, Stopped];
        let allowed = [
            (NotStarted, Running),
            (Running, Paused),
            (Paused, Running),
            (NotStarted, Stopped),
            (Running, Stopped),
            (Paused, Stopped),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.check_transition(to).is_ok(),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
        let e = Stopped.check_transition(Running).unwrap_err().to_string();
        assert_eq!(e, "the VM cannot go from Stopped to Running");
    }
}
