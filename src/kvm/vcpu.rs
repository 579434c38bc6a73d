//! vCPU threads: one named thread per vCPU, driven by messages.
//!
//! A vCPU thread starts **paused**: it waits for `Resume` (which is how a VM starts, and later how
//! a restored VM starts). While running it loops on `KVM_RUN` and dispatches every exit through
//! the PIO or MMIO bus — no port numbers live here. To get a vCPU's attention while it is inside
//! `KVM_RUN` (pause, exit), the handle sends the command and then a signal (`SIGRTMIN`); the
//! signal handler sets `immediate_exit` in that thread's `kvm_run`, so `KVM_RUN` returns `EINTR`
//! at once even if the signal lands just before the thread enters the kernel. The thread answers
//! every command with an event, so the VMM knows when all vCPUs are paused.
//!
//! A stop requested through `ExitSignal` (by any thread) keeps every vCPU out of `KVM_RUN` from
//! its next iteration on; the VMM then sends `Exit` and joins the threads.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::state::{save_vcpu, StateError, VcpuState};
use crate::devices::Bus;
use crate::exit::{ExitSignal, VmExit};
use crate::seccomp::ThreadKind;
use seccompiler::BpfProgram;

/// Errors managing vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot install the vcpu kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the thread for vcpu {0}")]
    Start(u8, #[source] crate::seccomp::SpawnError),
    #[error("vcpu {0} thread is gone")]
    Gone(u8),
    #[error("vcpu {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    #[error("cannot signal vcpu {0}")]
    Kick(u8, #[source] vmm_sys_util::errno::Error),
    #[error("cannot save the state of vcpu {0}")]
    Save(u8, #[source] crate::arch::x86_64::state::StateError),
}

/// What the VMM asks of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Run guest code (also how a VM starts).
    Resume,
    /// Leave `KVM_RUN` and wait for the next command.
    Pause,
    /// Save the vCPU's state (only while paused); the state comes back on the state channel.
    SaveState,
    /// Leave the thread.
    Exit,
}

/// What a vCPU thread answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    Resumed,
    Paused,
    Saved,
    Exited,
}

thread_local! {
    /// This thread's `kvm_run` mapping, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread while
        // its VcpuFd (which owns the mapping) is alive, and cleared before the VcpuFd is dropped.
        // A volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick);
    });
    result.map_err(VcpuError::SignalHandler)
}

/// The VMM's side of one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    commands: Sender<VcpuCommand>,
    events: Receiver<VcpuEvent>,
    states: Receiver<Result<VcpuState, StateError>>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sends a command and kicks the thread out of `KVM_RUN` so it sees it.
    pub fn send(&self, cmd: VcpuCommand) -> Result<(), VcpuError> {
        self.commands
            .send(cmd)
            .map_err(|_| VcpuError::Gone(self.id))?;
        self.kick()
    }

    fn kick(&self) -> Result<(), VcpuError> {
        match &self.thread {
            Some(t) if !t.is_finished() => t
                .kill(kick_signal())
                .map_err(|e| VcpuError::Kick(self.id, e)),
            _ => Ok(()),
        }
    }

    /// Waits for the thread's answer.
    pub fn wait(&self, timeout: Duration) -> Result<VcpuEvent, VcpuError> {
        self.events.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.id, timeout),
            RecvTimeoutError::Disconnected => VcpuError::Gone(self.id),
        })
    }

    /// Saves the state of this vCPU, which must be paused.
    pub fn save_state(&self, timeout: Duration) -> Result<VcpuState, VcpuError> {
        self.commands
            .send(VcpuCommand::SaveState)
            .map_err(|_| VcpuError::Gone(self.id))?;
        match self.wait(timeout)? {
            VcpuEvent::Saved => {}
            other => {
                log::error!("vcpu {} answered {other:?} to SaveState", self.id);
                return Err(VcpuError::Gone(self.id));
            }
        }
        self.states
            .recv_timeout(timeout)
            .map_err(|_| VcpuError::Gone(self.id))?
            .map_err(|e| VcpuError::Save(self.id, e))
    }

    /// Tells the thread to leave and joins it.
    pub fn exit(mut self) {
        // A thread that already left has dropped its receiver; nothing more to do then.
        let _ = self.send(VcpuCommand::Exit);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vcpu {} thread panicked", self.id);
            }
        }
    }
}

/// Exits to userspace, by kind, summed over the VM's vCPUs (for metrics, and to check that
/// steady-state virtio I/O needs none: notifies are ioeventfds, interrupts irqfds).
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub pio_in: AtomicU64,
    pub pio_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub other: AtomicU64,
}

/// A copy of `ExitCounters` at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExitCounts {
    pub pio_in: u64,
    pub pio_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub other: u64,
}

impl ExitCounters {
    pub fn snapshot(&self) -> ExitCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExitCounts {
            pio_in: g(&self.pio_in),
            pio_out: g(&self.pio_out),
            mmio_read: g(&self.mmio_read),
            mmio_write: g(&self.mmio_write),
            other: g(&self.other),
        }
    }
}

impl std::fmt::Display for ExitCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pio_in={} pio_out={} mmio_read={} mmio_write={} other={}",
            self.pio_in, self.pio_out, self.mmio_read, self.mmio_write, self.other
        )
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A configured vCPU, before its thread starts.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    counters: Arc<ExitCounters>,
    /// The MSRs a snapshot saves (KVM's list, read once per VM).
    msrs: Arc<[u32]>,
}

/// What one `KVM_RUN` led to.
enum Step {
    Continue,
    Stop(VmExit),
    /// KVM_EXIT_INTERNAL_ERROR: the details are read once the exit's borrow ends.
    InternalError,
}

static UNCLAIMED: AtomicU64 = AtomicU64::new(0);

/// Logs an access no device claims, rate-limited: the first 32, then one in 4096.
fn log_unclaimed(kind: &str, addr: u64, len: usize, write: bool) {
    let n = UNCLAIMED.fetch_add(1, Ordering::Relaxed);
    if n < 32 || n.is_multiple_of(4096) {
        log::debug!(
            "unclaimed {kind} {} at {addr:#x}, {len} bytes (#{})",
            if write { "write" } else { "read" },
            n + 1
        );
    }
}

impl Vcpu {
    pub fn new(
        id: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        counters: Arc<ExitCounters>,
        msrs: Arc<[u32]>,
    ) -> Self {
        Vcpu {
            id,
            fd,
            pio,
            mmio,
            exit,
            counters,
            msrs,
        }
    }

    /// Starts the thread `vcpuN`, paused. The thread installs `filter` (the vCPU seccomp
    /// filter, compiled once for all of a VM's vCPUs; None when seccomp is off) first; this
    /// returns once it has (or with the reason it could not).
    pub fn start(self, filter: Option<BpfProgram>) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let id = self.id;
        let (cmd_tx, cmd_rx) = channel();
        let (evt_tx, evt_rx) = channel();
        let (state_tx, state_rx) = channel();
        // The filter goes on before anything else, and so before the first KVM_RUN.
        let thread = crate::seccomp::spawn_filtered(
            format!("vcpu{id}"),
            ThreadKind::Vcpu,
            filter,
            move || self.thread_main(cmd_rx, evt_tx, state_tx),
        )
        .map_err(|e| VcpuError::Start(id, e))?;
        Ok(VcpuHandle {
            id,
            commands: cmd_tx,
            events: evt_rx,
            states: state_rx,
            thread: Some(thread),
        })
    }

    fn thread_main(
        mut self,
        commands: Receiver<VcpuCommand>,
        events: Sender<VcpuEvent>,
        states: Sender<Result<VcpuState, StateError>>,
    ) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run));
        self.serve(&commands, &events, &states);
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        let _ = events.send(VcpuEvent::Exited);
    }

    /// The command loop; returns when told to exit or when the VMM side is gone.
    fn serve(
        &mut self,
        commands: &Receiver<VcpuCommand>,
        events: &Sender<VcpuEvent>,
        states: &Sender<Result<VcpuState, StateError>>,
    ) {
        let mut running = false;
        loop {
            let cmd = if running && !self.exit.requested() {
                match commands.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                // Paused, or the VM is stopping: run no guest code, wait for the VMM.
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            match cmd {
                Some(VcpuCommand::Exit) => return,
                Some(VcpuCommand::Pause) => {
                    running = false;
                    let _ = events.send(VcpuEvent::Paused);
                    continue;
                }
                Some(VcpuCommand::SaveState) => {
                    // Only the VMM sends this, and only after pausing every vCPU.
                    let _ = states.send(save_vcpu(&self.fd, self.id, &self.msrs));
                    let _ = events.send(VcpuEvent::Saved);
                    continue;
                }
                Some(VcpuCommand::Resume) => {
                    running = true;
                    let _ = events.send(VcpuEvent::Resumed);
                    continue;
                }
                None => {}
            }
            if let Step::Stop(why) = self.run_once() {
                self.exit.request(why);
            }
        }
    }

    fn run_once(&mut self) -> Step {
        let id = self.id;
        let step = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    bump(&self.counters.pio_in);
                    if !self.pio.read(u64::from(port), data) {
                        log_unclaimed("port", u64::from(port), data.len(), false);
                        data.fill(0xff);
                    }
                    Step::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    bump(&self.counters.pio_out);
                    if !self.pio.write(u64::from(port), data) {
                        log_unclaimed("port", u64::from(port), data.len(), true);
                    }
                    Step::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    bump(&self.counters.mmio_read);
                    if !self.mmio.read(addr, data) {
                        log_unclaimed("mmio", addr, data.len(), false);
                        data.fill(0xff);
                    }
                    Step::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    bump(&self.counters.mmio_write);
                    if !self.mmio.write(addr, data) {
                        log_unclaimed("mmio", addr, data.len(), true);
                    }
                    Step::Continue
                }
                VcpuExit::IoapicEoi(_) | VcpuExit::Intr => {
                    bump(&self.counters.other);
                    Step::Continue
                }
                VcpuExit::Shutdown => Step::Stop(VmExit::Fault(format!(
                    "guest triple fault on vcpu {id} (KVM_EXIT_SHUTDOWN)"
                ))),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Step::Stop(VmExit::Shutdown),
                    KVM_SYSTEM_EVENT_RESET => Step::Stop(VmExit::Reset),
                    KVM_SYSTEM_EVENT_CRASH => {
                        Step::Stop(VmExit::Fault(format!("guest crashed on vcpu {id}")))
                    }
                    other => Step::Stop(VmExit::Fault(format!(
                        "unhandled KVM system event {other} on vcpu {id}"
                    ))),
                },
                VcpuExit::Hlt => Step::Stop(VmExit::Fault(format!(
                    "vcpu {id} halted with no in-kernel interrupt controller to wake it"
                ))),
                VcpuExit::FailEntry(reason, cpu) => Step::Stop(VmExit::Fault(format!(
                    "vcpu {id}: KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
                ))),
                VcpuExit::InternalError => Step::InternalError,
                other => Step::Stop(VmExit::Fault(format!(
                    "vcpu {id}: unhandled KVM exit {other:?}"
                ))),
            },
            Err(e) => match e.errno() {
                libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    Step::Continue
                }
                // An AP that just got INIT: KVM wants the call repeated.
                libc::EAGAIN => Step::Continue,
                _ => Step::Stop(VmExit::Fault(format!("vcpu {id}: KVM_RUN failed: {e}"))),
            },
        };
        match step {
            Step::InternalError => Step::Stop(VmExit::Fault(self.internal_error())),
            s => s,
        }
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` from the `kvm_run` page.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in; both fields read are plain integers.
        let (sub, ndata) = unsafe {
            let i = run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata)
        };
        let what = match sub {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            _ => "unexpected exit",
        };
        format!(
            "vcpu {}: KVM internal error, suberror {sub} ({what}, {ndata} data words)",
            self.id
        )
    }
}
