//! Seccomp filters, one allow-list per kind of thread, built into the binary (seccompiler).
//!
//! Each of Ledge's long-lived threads installs its own filter before it does anything a guest
//! or a client can influence:
//! - a **vCPU** thread (`vcpuN`) at its start, before its first `KVM_RUN` (`kvm::vcpu`);
//! - the **API** thread (`api`) at its start, before it accepts its first connection
//!   (`api::server`);
//! - the **VMM** thread (the thread running `controller::Controller`: `vmm` under a
//!   `VmmHandle`, the main thread of `ledge --api-sock` / `ledge run --api-sock` /
//!   `ledge restore --api-sock`; and the main thread of a foreground `ledge run` /
//!   `ledge restore`) once the VM is built, before the guest runs. Building the VM (opening
//!   /dev/kvm, creating the VM, mapping memory, opening disks and TAPs) needs far more than
//!   serving it, and it happens before that point; before boot, this thread only edits the
//!   `VmConfig` from requests the (filtered) API thread parsed.
//!
//! Other threads: `kvm-prewarm` (opens /dev/kvm and creates the VM fd while an API process
//! waits for its first request) has ended — it is joined — before the guest is built, so it
//! runs no filter. The filtered threads never start threads: `clone`/`clone3` are not in any
//! list. A library embedder calling `Vmm::run` on its own thread gets no VMM filter on that
//! thread (the library does not filter threads it does not own; call [`install`] there to
//! opt in); its vCPU threads are filtered as the config says.
//!
//! What a call outside the list does is the [`SeccompLevel`] in `VmConfig::seccomp`: `Kill`
//! (the default, for the binary and the library alike) is `SECCOMP_RET_KILL_PROCESS` — the
//! whole process dies with SIGSYS; `Log` is `SECCOMP_RET_LOG` — the call goes through and the
//! kernel logs it (`type=1326` audit records, in `dmesg` or the audit log, with the thread's
//! name as `comm=` and the call's number as `syscall=`); `Off` installs nothing.
//!
//! The lists were found with `strace -f` over the probe-guest test suite and kept minimal;
//! every entry says why it is there. Arguments are checked where that narrows something
//! useful: `ioctl` only with the request numbers each thread uses, `mmap`/`mprotect` never
//! with `PROT_EXEC`, `socket` only for `AF_UNIX`, `tgkill` only with the vCPU kick signal or
//! SIGABRT, `madvise` only `MADV_DONTNEED`, `fcntl` only the commands used.

use std::collections::{BTreeMap, BTreeSet};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use crate::config::SeccompLevel;

/// The kinds of thread that carry a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// `vcpuN`: `KVM_RUN`, exit dispatch to the device buses, vCPU state saves.
    Vcpu,
    /// The VMM event loop: devices, API requests, pause/resume, snapshots.
    Vmm,
    /// `api`: the HTTP server on the control socket.
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::Vmm, ThreadKind::Api];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter for the {0} thread")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter on the {0} thread")]
    Install(ThreadKind, #[source] seccompiler::Error),
}

/// The ioctl request numbers the filters allow (the same definitions as kvm-ioctls' and the
/// kernel's uapi headers).
mod nr {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_irqchip, kvm_lapic_state,
        kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
        kvm_xsave,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    // vCPU fd.
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    // VM fd.
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
}

/// An argument check: (argument index, comparison, value), on the argument's low 32 bits.
type Cond = (u8, SeccompCmpOp, u64);

/// One allow-list being assembled: syscall number → the argument rules (OR-ed), or `None`
/// for "any arguments".
#[derive(Default)]
struct List {
    calls: BTreeMap<i64, Option<Vec<Vec<Cond>>>>,
    names: BTreeSet<&'static str>,
}

impl List {
    /// Allows `nr` with any arguments.
    fn any(&mut self, name: &'static str, nr: i64) -> &mut Self {
        self.calls.insert(nr, None);
        self.names.insert(name);
        self
    }

    /// Allows `nr` when every (argument index, comparison, value) of `conds` holds; several
    /// calls for one syscall are alternatives.
    fn when(&mut self, name: &'static str, nr: i64, conds: &[Cond]) -> &mut Self {
        self.names.insert(name);
        // `None` means the call is already allowed with any arguments.
        if let Some(rules) = self.calls.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(conds.to_vec());
        }
        self
    }

    /// `nr` with its argument `arg` (32 bits) equal to one of `values`.
    fn arg_in(&mut self, name: &'static str, nr: i64, arg: u8, values: &[u64]) -> &mut Self {
        for v in values {
            self.when(name, nr, &[(arg, SeccompCmpOp::Eq, *v)]);
        }
        self
    }

    fn filter(&self, kind: ThreadKind, level: SeccompLevel) -> Result<SeccompFilter, SeccompError> {
        let build = |e| SeccompError::Build(kind, e);
        let mut rules = BTreeMap::new();
        for (nr, alts) in &self.calls {
            let chain = match alts {
                None => Vec::new(),
                Some(alts) => alts
                    .iter()
                    .map(|conds| {
                        let conds = conds
                            .iter()
                            .map(|(arg, op, v)| {
                                SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *v)
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conds)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(build)?,
            };
            rules.insert(*nr, chain);
        }
        let mismatch = match level {
            SeccompLevel::Log => SeccompAction::Log,
            _ => SeccompAction::KillProcess,
        };
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64).map_err(build)
    }
}

/// A 32-bit argument with none of `bits` set.
fn without(arg: u8, bits: u64) -> Cond {
    (arg, SeccompCmpOp::MaskedEq(bits), 0)
}

fn ioctl_requests(l: &mut List, requests: &[u64]) {
    l.arg_in("ioctl", libc::SYS_ioctl, 1, requests);
}

/// What every filtered thread needs: memory management by the allocator, locks and channels,
/// eventfds and logging, signals, time, and ending the thread.
fn base(l: &mut List) {
    let sig = |s: i32| u64::try_from(s).unwrap_or_default();
    // Channels, mutexes, condition variables, thread join/park.
    l.any("futex", libc::SYS_futex)
        // Thread-local heaps (glibc arenas): reserved PROT_NONE, grown read/write; never
        // executable.
        .when(
            "mmap",
            libc::SYS_mmap,
            &[without(2, libc::PROT_EXEC as u64)],
        )
        .when(
            "mprotect",
            libc::SYS_mprotect,
            &[without(2, libc::PROT_EXEC as u64)],
        )
        .any("munmap", libc::SYS_munmap)
        // realloc of large blocks.
        .any("mremap", libc::SYS_mremap)
        // The main heap, when a thread shares the main arena.
        .any("brk", libc::SYS_brk)
        // glibc returns freed heap and a finished thread's stack with MADV_DONTNEED (the
        // balloon drops guest pages the same way).
        .arg_in(
            "madvise",
            libc::SYS_madvise,
            2,
            &[libc::MADV_DONTNEED as u64],
        )
        // eventfds (device interrupts are irqfds, stop and wake events), logging to stderr or
        // the log file, the guest console.
        .any("read", libc::SYS_read)
        .any("write", libc::SYS_write)
        // Dropped fds (a vCPU fd when its thread ends, closed connections).
        .any("close", libc::SYS_close)
        // std's debug builds check an fd is open before closing it.
        .arg_in("fcntl", libc::SYS_fcntl, 1, &[libc::F_GETFD as u64])
        // The vCPU kick handler returns; an interrupted wait restarts.
        .any("rt_sigreturn", libc::SYS_rt_sigreturn)
        .any("restart_syscall", libc::SYS_restart_syscall)
        // glibc masks signals around thread exit and abort.
        .any("rt_sigprocmask", libc::SYS_rt_sigprocmask)
        // std takes down the thread's alternate signal stack when the thread ends.
        .any("sigaltstack", libc::SYS_sigaltstack)
        // The clock when the vDSO cannot answer; sleeps (the paused loop).
        .any("clock_gettime", libc::SYS_clock_gettime)
        .any("clock_nanosleep", libc::SYS_clock_nanosleep)
        // std's channels back off under contention.
        .any("sched_yield", libc::SYS_sched_yield)
        // Hash-map seeds (std) for maps made on this thread.
        .any("getrandom", libc::SYS_getrandom)
        // A panic aborts (release builds): abort() raises SIGABRT on its own thread with
        // tgkill(getpid(), tid, SIGABRT).
        .any("getpid", libc::SYS_getpid)
        .arg_in("tgkill", libc::SYS_tgkill, 2, &[sig(libc::SIGABRT)])
        // The thread ends.
        .any("exit", libc::SYS_exit);
}

fn vcpu(l: &mut List) {
    base(l);
    ioctl_requests(
        l,
        &[
            nr::KVM_RUN(),
            // Saving the vCPU for a snapshot, on its own thread (arch::x86_64::state).
            nr::KVM_GET_CPUID2(),
            nr::KVM_GET_MP_STATE(),
            nr::KVM_GET_REGS(),
            nr::KVM_GET_SREGS(),
            nr::KVM_GET_XSAVE(),
            nr::KVM_GET_XCRS(),
            nr::KVM_GET_DEBUGREGS(),
            nr::KVM_GET_LAPIC(),
            nr::KVM_GET_MSRS(),
            nr::KVM_GET_VCPU_EVENTS(),
            nr::KVM_GET_TSC_KHZ(),
            // The guest's MMIO writes activate and reset virtio devices on this thread:
            // virtio-net sets the TAP's offloads then.
            u64::from(libc::TUNSETOFFLOAD as u32),
        ],
    );
    // Device activation/reset on this thread: the balloon's statistics timer and the rate
    // limiters' timers are armed or disarmed; virtio-vsock's reset closes host connections.
    l.any("timerfd_settime", libc::SYS_timerfd_settime)
        .any("shutdown", libc::SYS_shutdown);
}

fn vmm(l: &mut List) {
    base(l);
    ioctl_requests(
        l,
        &[
            // Pause saves the kvmclock, resume puts it back.
            nr::KVM_GET_CLOCK(),
            nr::KVM_SET_CLOCK(),
            // Snapshot: interrupt controllers, PIT, dirty pages.
            nr::KVM_GET_IRQCHIP(),
            nr::KVM_GET_PIT2(),
            nr::KVM_GET_DIRTY_LOG(),
            // virtio-net offloads; non-blocking accepted vsock streams (set_nonblocking).
            u64::from(libc::TUNSETOFFLOAD as u32),
            libc::FIONBIO,
        ],
    );
    let sig = |s: i32| u64::try_from(s).unwrap_or_default();
    // The event loop (event-manager on epoll).
    l.any("epoll_wait", libc::SYS_epoll_wait)
        .any("epoll_pwait", libc::SYS_epoll_pwait)
        .any("epoll_ctl", libc::SYS_epoll_ctl)
        // Kicking vCPUs out of KVM_RUN (pause, stop): pthread_kill with SIGRTMIN.
        .arg_in(
            "tgkill",
            libc::SYS_tgkill,
            2,
            &[sig(vmm_sys_util::signal::SIGRTMIN())],
        )
        // The main thread ends the process (ledge's VMM thread is its main thread).
        .any("exit_group", libc::SYS_exit_group)
        // virtio-blk: positioned I/O and flush (virtio-net, -rng and -vsock use read/write).
        .any("pread64", libc::SYS_pread64)
        .any("pwrite64", libc::SYS_pwrite64)
        .any("fdatasync", libc::SYS_fdatasync)
        .any("fsync", libc::SYS_fsync)
        // Snapshots: the state and memory files are created beside their target, sized,
        // tagged (xattr), synced and renamed into place (or removed on failure); a memory file
        // is read sparsely (SEEK_DATA/SEEK_HOLE); leftovers of dead writers are swept
        // (directory listing, unlocked files). Metrics and a log file set through the API are
        // opened here too. The snapshot id is read from /dev/urandom.
        .any("openat", libc::SYS_openat)
        // The writer's lock on a temporary snapshot file, and the sweep's test of it.
        .any("flock", libc::SYS_flock)
        .any("lseek", libc::SYS_lseek)
        .any("ftruncate", libc::SYS_ftruncate)
        .any("fsetxattr", libc::SYS_fsetxattr)
        .any("rename", libc::SYS_rename)
        .any("unlink", libc::SYS_unlink)
        .any("getdents64", libc::SYS_getdents64)
        .any("newfstatat", libc::SYS_newfstatat)
        .any("statx", libc::SYS_statx)
        // virtio-vsock: host clients connect to the device's Unix socket (accept4, then their
        // CONNECT line is read with recv), guest connections reach host listeners at
        // PATH_PORT (socket, connect); guest data moves with read/write, the `OK <port>`
        // answer with std's send (MSG_NOSIGNAL). Unix sockets only.
        .arg_in("socket", libc::SYS_socket, 0, &[libc::AF_UNIX as u64])
        .any("connect", libc::SYS_connect)
        .any("accept4", libc::SYS_accept4)
        .any("recvfrom", libc::SYS_recvfrom)
        .arg_in("sendto", libc::SYS_sendto, 3, &[libc::MSG_NOSIGNAL as u64])
        .any("shutdown", libc::SYS_shutdown)
        // Timers: the balloon's statistics, vsock's timeouts, the rate limiters (read on
        // expiry is `read`).
        .any("timerfd_create", libc::SYS_timerfd_create)
        .any("timerfd_settime", libc::SYS_timerfd_settime);
}

fn api(l: &mut List) {
    base(l);
    // Accepted connections are made non-blocking.
    ioctl_requests(l, &[libc::FIONBIO]);
    // The epoll loop over the listener, the stop eventfd and the connections; HTTP in and out
    // (send with MSG_NOSIGNAL); half-closing a connection after an error reply.
    l.any("epoll_wait", libc::SYS_epoll_wait)
        .any("epoll_pwait", libc::SYS_epoll_pwait)
        .any("epoll_ctl", libc::SYS_epoll_ctl)
        .any("accept4", libc::SYS_accept4)
        .any("recvfrom", libc::SYS_recvfrom)
        .arg_in("sendto", libc::SYS_sendto, 3, &[libc::MSG_NOSIGNAL as u64])
        .any("shutdown", libc::SYS_shutdown);
}

fn list(kind: ThreadKind) -> List {
    let mut l = List::default();
    match kind {
        ThreadKind::Vcpu => vcpu(&mut l),
        ThreadKind::Vmm => vmm(&mut l),
        ThreadKind::Api => api(&mut l),
    }
    l
}

/// The names of the system calls `kind` may make (some only with certain arguments).
pub fn allowed(kind: ThreadKind) -> Vec<&'static str> {
    list(kind).names.into_iter().collect()
}

/// The compiled filter for `kind` at `level`; `None` when the level is `Off`.
pub fn filter(kind: ThreadKind, level: SeccompLevel) -> Result<Option<BpfProgram>, SeccompError> {
    if level == SeccompLevel::Off {
        return Ok(None);
    }
    let f = list(kind).filter(kind, level)?;
    BpfProgram::try_from(f)
        .map(Some)
        .map_err(|e| SeccompError::Build(kind, e))
}

/// Installs a compiled filter on the calling thread (it also sets `no_new_privs` there). The
/// threads this thread starts afterwards inherit it.
pub fn apply(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind, e))
}

/// Why `spawn_filtered` has no thread to give.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the system gave no new thread")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("the thread ended before it installed its seccomp filter")]
    Gone,
}

/// Starts the thread `name`, which installs `filter` (the compiled filter of `kind`; None:
/// none) first thing, before `f` runs, and returns once the filter is in place, or with why
/// it is not: then the thread has ended without running `f`.
pub fn spawn_filtered(
    name: String,
    kind: ThreadKind,
    filter: Option<BpfProgram>,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, SpawnError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let installed = filter.as_ref().map_or(Ok(()), |p| apply(kind, p));
            let ok = installed.is_ok();
            let _ = ready_tx.send(installed);
            if ok {
                f();
            }
        })
        .map_err(SpawnError::Spawn)?;
    // No answer means the thread ended early: it can only have panicked.
    let installed = ready_rx
        .recv()
        .map_err(|_| SpawnError::Gone)
        .and_then(|r| r.map_err(SpawnError::Seccomp));
    if let Err(e) = installed {
        let _ = thread.join();
        return Err(e);
    }
    Ok(thread)
}

/// Builds and installs the filter of `kind` on the calling thread (nothing for `Off`).
pub fn install(kind: ThreadKind, level: SeccompLevel) -> Result<(), SeccompError> {
    match filter(kind, level)? {
        Some(p) => apply(kind, &p),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_at_every_level() {
        for kind in ThreadKind::ALL {
            for level in [SeccompLevel::Kill, SeccompLevel::Log] {
                let p = filter(kind, level).unwrap().unwrap();
                assert!(
                    p.len() > 20 && p.len() < 4096,
                    "{kind}: {} instructions",
                    p.len()
                );
                if level == SeccompLevel::Kill {
                    println!(
                        "{kind}: {} system calls, {} BPF instructions",
                        allowed(kind).len(),
                        p.len()
                    );
                }
            }
            assert!(filter(kind, SeccompLevel::Off).unwrap().is_none());
        }
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From <linux/kvm.h>, computed by hand: _IO/_IOR/_IOW/_IOWR(0xAE, nr, size).
        assert_eq!(nr::KVM_RUN(), 0xae80);
        assert_eq!(nr::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(nr::KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(nr::KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(nr::KVM_GET_CLOCK(), 0x8030_ae7c);
        assert_eq!(nr::KVM_SET_CLOCK(), 0x4030_ae7b);
        assert_eq!(nr::KVM_GET_DIRTY_LOG(), 0x4010_ae42);
    }

    #[test]
    fn lists_differ_where_the_threads_do() {
        let (v, m, a) = (
            allowed(ThreadKind::Vcpu),
            allowed(ThreadKind::Vmm),
            allowed(ThreadKind::Api),
        );
        for forbidden in [
            "execve",
            "clone",
            "clone3",
            "fork",
            "ptrace",
            "open_by_handle_at",
        ] {
            assert!(!v.contains(&forbidden) && !m.contains(&forbidden) && !a.contains(&forbidden));
        }
        // Only the VMM thread opens files or makes sockets; only it and the API thread poll.
        assert!(m.contains(&"openat") && !v.contains(&"openat") && !a.contains(&"openat"));
        assert!(m.contains(&"socket") && !a.contains(&"socket") && !v.contains(&"socket"));
        assert!(a.contains(&"accept4") && !v.contains(&"accept4"));
        assert!(!v.contains(&"epoll_wait"));
    }
}

/// For device tests: run code under a real filter in a child process, so a call outside the
/// list kills the child (SIGSYS), not the whole test run.
#[cfg(test)]
pub(crate) mod under_filter {
    use std::os::unix::process::ExitStatusExt;

    use super::{install, SeccompLevel, ThreadKind};

    const ENV: &str = "LEDGE_SECCOMP_UNIT_CHILD";

    /// Runs the ignored test `name` (its path from the crate root) alone in a new process of
    /// this test binary, marked as the child; fails unless it passed there.
    pub fn run_child(name: &str) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                name,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV, name)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run the child test");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let killed = if out.status.signal() == Some(libc::SIGSYS) {
            " — SIGSYS: a system call outside the list (dmesg: type=1326 ... syscall=N)"
        } else {
            ""
        };
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{name} in a child: {}{killed}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// True in the child `run_child` started for `name`.
    pub fn is_child(name: &str) -> bool {
        std::env::var(ENV).as_deref() == Ok(name)
    }

    /// Runs `f` on a new thread with `kind`'s filter at `Kill`, returning what it returns.
    pub fn filtered<T: Send>(kind: ThreadKind, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name(format!("{kind}-filtered"))
                .spawn_scoped(scope, move || {
                    install(kind, SeccompLevel::Kill).expect("install the filter");
                    f()
                })
                .unwrap()
                .join()
                .expect("the filtered thread panicked")
        })
    }
}
