//! The seccomp filters (src/seccomp.rs).
//!
//! 1. Each kind of thread, once its filter is installed, dies with the whole process (SIGSYS)
//!    on a forbidden call, and with `Log` lives on: a child process — this test binary again,
//!    running only the ignored `seccomp_child` test — starts a thread, installs the real
//!    filter of one kind there, makes the allowed calls that kind relies on, then one forbidden
//!    call. The forbidden calls include ones that are allowed with other arguments (`mmap`
//!    with PROT_EXEC, `socket` for AF_INET, an ioctl request not in the list).
//! 2. The binary and the library install the filters: /proc/PID/task/*/status shows
//!    `Seccomp: 2` (filter mode) on every thread of a running VM, and 0 with `--no-seccomp`.
//!
//! Every other probe-tier test runs with the filters on (`Kill` is the default), which is what
//! shows the allow-lists are complete for the paths they cover.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::vm::Ledge;
use ledge::config::SeccompLevel;
use ledge::seccomp::ThreadKind;

const CHILD_ENV: &str = "LEDGE_SECCOMP_CHILD";

/// The forbidden calls the child can make.
const FORBIDDEN: &[&str] = &["socket-inet", "mmap-exec", "ioctl-other", "execve"];

fn parse_kind(s: &str) -> ThreadKind {
    match s {
        "vcpu" => ThreadKind::Vcpu,
        "vmm" => ThreadKind::Vmm,
        "api" => ThreadKind::Api,
        other => panic!("unknown thread kind {other}"),
    }
}

/// A call the kind is allowed to make with these arguments, where its list checks them.
fn allowed_call(kind: ThreadKind) -> String {
    match kind {
        ThreadKind::Vmm => {
            // SAFETY: plain system calls with integer arguments; the fd is closed at once.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            assert!(fd >= 0, "socket(AF_UNIX) refused");
            // SAFETY: `fd` is ours.
            unsafe { libc::close(fd) };
            "socket(AF_UNIX) ok".into()
        }
        ThreadKind::Vcpu | ThreadKind::Api => {
            let req: libc::c_ulong = if kind == ThreadKind::Vcpu {
                0xae80 // KVM_RUN
            } else {
                libc::FIONBIO
            };
            // SAFETY: an ioctl on an invalid fd: the kernel answers EBADF, touching no memory.
            let r = unsafe { libc::ioctl(-1, req, 0) };
            format!("ioctl({req:#x}) on fd -1 = {r}")
        }
    }
}

/// Makes the forbidden call `what`; returns what it returned (only under `Log`).
fn forbidden_call(what: &str) -> i64 {
    // SAFETY: every arm makes system calls on invalid or fresh resources, released at once;
    // execve gets a path that does not exist, so it can only fail.
    unsafe {
        match what {
            "socket-inet" => {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if fd >= 0 {
                    libc::close(fd);
                }
                i64::from(fd)
            }
            "mmap-exec" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p != libc::MAP_FAILED {
                    libc::munmap(p, 4096);
                }
                i64::from(p == libc::MAP_FAILED)
            }
            "ioctl-other" => i64::from(libc::ioctl(-1, 0xae01, 0)), // KVM_CREATE_VM
            "execve" => {
                let path = c"/nonexistent/ledge-seccomp-test";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                i64::from(libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()))
            }
            other => panic!("unknown call {other}"),
        }
    }
}

/// The child's side: `LEDGE_SECCOMP_CHILD=KIND:LEVEL:CALL`. Run only by the tests below.
#[test]
#[ignore = "the child process of the seccomp tests; they run it"]
fn seccomp_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        println!("{CHILD_ENV} is not set: nothing to do (the seccomp tests run this)");
        return;
    };
    let parts: Vec<String> = spec.split(':').map(str::to_string).collect();
    let kind = parse_kind(&parts[0]);
    let level = match parts[1].as_str() {
        "kill" => SeccompLevel::Kill,
        "log" => SeccompLevel::Log,
        other => panic!("unknown level {other}"),
    };
    let call = parts[2].clone();
    // No core file for the SIGSYS to come.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let t = std::thread::Builder::new()
        .name(format!("{kind}-under-test"))
        .spawn(move || {
            ledge::seccomp::install(kind, level).expect("install the filter");
            // What the thread needs keeps working: memory (mmap, munmap), output (write).
            let big = vec![7u8; 8 << 20];
            let sum: u64 = big.iter().step_by(4096).map(|b| u64::from(*b)).sum();
            drop(big);
            println!("child: installed {kind} filter ({level}); heap ok ({sum})");
            println!("child: {}", allowed_call(kind));
            let r = forbidden_call(&call);
            println!("child: survived {call} = {r}");
        })
        .expect("spawn the thread under test");
    t.join().expect("the thread under test panicked");
    println!("child: main thread done");
}

struct ChildRun {
    status: std::process::ExitStatus,
    pid: u32,
    stdout: String,
    stderr: String,
}

fn run_child(kind: &str, level: &str, call: &str) -> ChildRun {
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{kind}:{level}:{call}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for the child");
    ChildRun {
        status: out.status,
        pid,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn a_forbidden_call_kills_the_process_with_sigsys() {
    for kind in ["vcpu", "vmm", "api"] {
        for call in FORBIDDEN {
            let r = run_child(kind, "kill", call);
            let what = format!(
                "{kind} thread, {call}: {}\nstdout:\n{}\nstderr:\n{}",
                r.status, r.stdout, r.stderr
            );
            assert!(
                r.stdout.contains("child: installed"),
                "the filter was not installed: {what}"
            );
            assert!(
                r.stdout.contains("child: socket(AF_UNIX) ok")
                    || r.stdout.contains("on fd -1 = -1"),
                "the allowed call did not come back: {what}"
            );
            assert_eq!(r.status.signal(), Some(libc::SIGSYS), "{what}");
            assert!(
                !r.stdout.contains("survived") && !r.stdout.contains("main thread done"),
                "the process (not only the thread) must die at once: {what}"
            );
            println!("{kind} thread, forbidden {call}: killed by SIGSYS");
        }
    }
}

/// For each of `pids`: whether the kernel logged a SECCOMP_RET_LOG record (audit type 1326) of
/// syscall `nr` for it, when dmesg can be read here (`None` when it cannot: then nothing is
/// checked). kauditd prints the records a moment after the call, so dmesg is read until every
/// pid has one or 3 s passed: once for all the pids, not 3 s for each.
fn kernel_logged(pids: &[u32], nr: i64) -> Option<Vec<bool>> {
    let needle_nr = format!("syscall={nr} ");
    let start = Instant::now();
    loop {
        let out = Command::new("dmesg").output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let found: Vec<bool> = pids
            .iter()
            .map(|pid| {
                let needle_pid = format!("pid={pid} ");
                text.lines().any(|l| {
                    l.contains("type=1326") && l.contains(&needle_pid) && l.contains(&needle_nr)
                })
            })
            .collect();
        if found.iter().all(|&f| f) || start.elapsed() > Duration::from_secs(3) {
            return Some(found);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn with_log_a_forbidden_call_goes_through_and_is_logged() {
    let kinds = ["vcpu", "vmm", "api"];
    let mut pids = Vec::new();
    for kind in kinds {
        let r = run_child(kind, "log", "socket-inet");
        let what = format!(
            "{kind} thread: {}\nstdout:\n{}\nstderr:\n{}",
            r.status, r.stdout, r.stderr
        );
        assert!(r.status.success(), "{what}");
        assert!(r.stdout.contains("child: installed"), "{what}");
        assert!(r.stdout.contains("survived socket-inet"), "{what}");
        assert!(r.stdout.contains("main thread done"), "{what}");
        println!("{kind} thread, --seccomp log: socket(AF_INET) went through");
        pids.push(r.pid);
    }
    // Shown, not asserted: the kernel rate-limits these records (printk_ratelimit), and the
    // kill test running beside this one makes enough of them to hit the limit.
    match kernel_logged(&pids, libc::SYS_socket) {
        Some(found) => {
            for (kind, logged) in kinds.iter().zip(found) {
                if logged {
                    println!("{kind}: the kernel logged it (type=1326, syscall=41)");
                } else {
                    println!("{kind}: no type=1326 record seen (kernel rate limit?)");
                }
            }
        }
        None => println!("dmesg cannot be read here: the kernel log was not checked"),
    }
}

/// Every thread of `pid`: name → (Seccomp mode, Seccomp_filters).
fn seccomp_of_threads(pid: u32) -> BTreeMap<String, (u32, u32)> {
    let mut out = BTreeMap::new();
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    for t in std::fs::read_dir(&tasks)
        .expect("read /proc/PID/task")
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| common::proc_field(&status, key).unwrap_or_default();
        let name = field("Name");
        if name.starts_with("kvm-nx-lpage") {
            // KVM's own worker (a kernel task in the process, made at the first KVM_RUN and so
            // inheriting that vCPU thread's filter); it makes no system calls.
            continue;
        }
        let mode = field("Seccomp").parse().unwrap_or(99);
        let filters = field("Seccomp_filters").parse().unwrap_or(99);
        out.insert(name, (mode, filters));
    }
    out
}

/// Runs `ledge ARGS` (serving the API on `sock` if given) until the guest counts; returns the
/// threads' seccomp state then, and stops it with SIGTERM (the filtered exit path), checking
/// it exited cleanly.
fn threads_of(test: &str, args: &[&str], sock: Option<&Path>) -> BTreeMap<String, (u32, u32)> {
    let mut l = Ledge::spawn(args);
    if let Some(sock) = sock {
        l.wait_accepting(sock);
    }
    l.wait_count_above(None, test);
    let threads = seccomp_of_threads(l.pid());
    println!("[{test}] ledge {args:?}: threads (name: Seccomp, Seccomp_filters): {threads:?}");
    let st = l.terminate();
    assert!(st.success(), "[{test}] exit {st}:\n{}", l.diag());
    threads
}

/// The probe guest counting on 2 vCPUs via `ledge run` with `extra` flags, with or without
/// an API socket.
fn threads_of_a_running_vm(test: &str, api: bool, extra: &[&str]) -> BTreeMap<String, (u32, u32)> {
    let dir = common::scratch(test);
    let sock = dir.join("api.sock");
    let mut args = vec!["run", "--cmdline", "probe=count", "--vcpus", "2"];
    if api {
        args.extend(["--api-sock", sock.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    let threads = threads_of(test, &args, api.then_some(sock.as_path()));
    let _ = std::fs::remove_dir_all(dir);
    threads
}

/// `threads_of_a_running_vm`, checked with `expect_threads`.
fn expect_running_vm_threads(
    test: &str,
    api: bool,
    extra: &[&str],
    names: &[&str],
    want: (u32, u32),
) {
    let t = threads_of_a_running_vm(test, api, extra);
    expect_threads(&t, names, want, test);
}

fn expect_threads(
    threads: &BTreeMap<String, (u32, u32)>,
    names: &[&str],
    want: (u32, u32),
    test: &str,
) {
    let got: Vec<&str> = threads.keys().map(String::as_str).collect();
    assert_eq!(got, names, "[{test}] the process's threads");
    for (name, state) in threads {
        assert_eq!(*state, want, "[{test}] thread {name}");
    }
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    let test = "every_thread_of_a_running_vm_is_filtered";
    if !common::require_kvm(test) {
        return;
    }
    // The main thread is the VMM thread here; kvm-prewarm has ended.
    let all = ["api", "ledge", "vcpu0", "vcpu1"];
    expect_running_vm_threads(test, true, &[], &all, (2, 1));
    expect_running_vm_threads(test, false, &[], &all[1..], (2, 1));
    expect_running_vm_threads(test, true, &["--seccomp", "log"], &all, (2, 1));
}

#[test]
fn a_restored_vm_is_filtered_too() {
    let test = "a_restored_vm_is_filtered_too";
    if !common::require_kvm(test) {
        return;
    }
    // The format-1 fixture of tests/snapshot.rs: a counting probe guest with one vCPU.
    let dir = common::scratch(test);
    let (snap, mem) = common::snapshot_v1_fixture(&dir);
    let (snap, mem) = (snap.to_str().unwrap(), mem.to_str().unwrap());
    let t = threads_of(test, &["restore", "--snapshot", snap, "--mem", mem], None);
    expect_threads(&t, &["ledge", "vcpu0"], (2, 1), test);
    let sock = dir.join("api.sock");
    let args = [
        "restore",
        "--snapshot",
        snap,
        "--mem",
        mem,
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    let t = threads_of(test, &args, Some(&sock));
    expect_threads(&t, &["api", "ledge", "vcpu0"], (2, 1), test);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn no_seccomp_leaves_every_thread_unfiltered() {
    let test = "no_seccomp_leaves_every_thread_unfiltered";
    if !common::require_kvm(test) {
        return;
    }
    let all = ["api", "ledge", "vcpu0", "vcpu1"];
    expect_running_vm_threads(test, true, &["--no-seccomp"], &all, (0, 0));
}

#[test]
fn the_library_filters_its_own_threads_by_default() {
    let test = "the_library_filters_its_own_threads_by_default";
    if !common::require_kvm(test) {
        return;
    }
    let dir = common::scratch(test);
    let console = dir.join("console.txt");
    let mut cfg = ledge::VmConfig::default();
    cfg.boot.cmdline = Some("probe=count".into());
    cfg.console = ledge::config::ConsoleConfig::File(console.clone());
    assert_eq!(cfg.seccomp, SeccompLevel::Kill, "the library's default");
    let vm = ledge::controller::VmmHandle::spawn("seccomp-lib", cfg, None).expect("spawn");
    vm.start().expect("start");
    common::wait_until(
        Duration::from_secs(60),
        || format!("[{test}] no count"),
        || {
            std::fs::read_to_string(&console)
                .unwrap_or_default()
                .contains("count: 1")
        },
    );
    let threads = seccomp_of_threads(std::process::id());
    println!("[{test}] {threads:?}");
    assert_eq!(threads.get("vmm"), Some(&(2, 1)), "[{test}] the vmm thread");
    assert_eq!(
        threads.get("vcpu0"),
        Some(&(2, 1)),
        "[{test}] the vcpu thread"
    );
    // The caller's threads are left alone.
    let caller = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(
        caller.contains("Seccomp:\t0"),
        "[{test}] caller thread:\n{caller}"
    );
    // A pause and resume go through the filtered VMM and vCPU threads.
    vm.pause().expect("pause");
    vm.resume().expect("resume");
    vm.stop();
    let exit = vm.wait().expect("wait");
    assert!(
        matches!(exit, ledge::VmExit::Stopped),
        "[{test}] stopped as asked: {exit:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
