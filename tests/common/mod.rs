//! Helpers shared by the integration tests: running the `ledge` binary with a time limit, and
//! the KVM gate (a KVM test fails without /dev/kvm unless LEDGE_SKIP_KVM_TESTS=1 says to skip).
#![allow(dead_code)]

pub mod probe_io;
pub mod vm;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The kind of KVM this test runs on, printed so every test log says it.
pub fn kvm_kind() -> &'static str {
    ledge::kvm::kvm_kind()
}

/// True when KVM tests should run. Panics (fails the test) when /dev/kvm is missing, unless
/// LEDGE_SKIP_KVM_TESTS=1, in which case it prints the skip and returns false.
pub fn require_kvm(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        println!("[{test}] running on KVM kind: {}", kvm_kind());
        return true;
    }
    if std::env::var("LEDGE_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        println!("[{test}] SKIPPED: /dev/kvm is missing and LEDGE_SKIP_KVM_TESTS=1");
        return false;
    }
    panic!(
        "[{test}] /dev/kvm is missing: KVM tests need it (set LEDGE_SKIP_KVM_TESTS=1 to skip them)"
    );
}

/// One VM at a time within a test binary: a probe guest's vCPU spins a host CPU, and the
/// machines these tests run on have two cores (cargo runs a binary's tests on several threads).
static ONE_VM: Mutex<()> = Mutex::new(());

/// Holds the one-VM-at-a-time lock while the guard lives. A test that failed holding it does
/// not fail the others (the poisoned lock is taken anyway).
pub fn one_vm() -> MutexGuard<'static, ()> {
    ONE_VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// The value of `key` (without its colon) in the text of a /proc file of `Key:  value` lines
/// (status, smaps_rollup): its words joined by single spaces; None when there is no such key.
pub fn proc_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

/// `key` of /proc/PID/status (see `proc_field`); None when the process or the key is not there.
pub fn proc_status(pid: u32, key: &str) -> Option<String> {
    proc_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        key,
    )
}

/// A /proc size value (`1234 kB`) in KiB.
pub fn kib(value: &str) -> Option<u64> {
    value.strip_suffix(" kB")?.parse().ok()
}

/// A number as the tests' reports and settings write it: decimal, or hex with 0x.
pub fn parse_u64(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// The seed of a randomised test: `LEDGE_TEST_SEED` (hex with 0x, or decimal) when set, to
/// replay a run, else `default` (each test derives its own, e.g. from the process id). Printed
/// either way. Never 0 (an `Rng` cannot start from 0): a 0 or unreadable override fails.
pub fn seed(test: &str, default: u64) -> u64 {
    let (seed, from) = match std::env::var("LEDGE_TEST_SEED") {
        Ok(v) => match parse_u64(v.trim()) {
            Some(s) if s != 0 => (s, "from LEDGE_TEST_SEED"),
            _ => {
                panic!("LEDGE_TEST_SEED={v:?}: not a nonzero number (hex with 0x, or decimal)")
            }
        },
        Err(_) => (default, "replay with LEDGE_TEST_SEED"),
    };
    assert_ne!(seed, 0, "[{test}] the default seed must not be 0");
    println!("[{test}] seed {seed:#x} ({from}={seed:#x})");
    seed
}

/// A small deterministic generator (xorshift64*) for tests that act at random moments: a
/// failing run can be replayed with the seed it printed (see `seed`). The seed must not be 0.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn lines_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.stdout.lines().filter(move |l| l.starts_with(prefix))
    }

    pub fn line(&self, prefix: &str) -> String {
        self.lines_with(prefix)
            .next()
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", self.stdout))
            .to_string()
    }

    /// The error line of a failed run: exactly one line, from Ledge, no panic.
    pub fn assert_clean_error(&self, needle: &str) {
        assert_eq!(self.code, Some(1), "stderr: {}", self.stderr);
        let lines: Vec<_> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected, got: {}", self.stderr);
        assert!(lines[0].starts_with("ledge: error: "), "{}", lines[0]);
        assert!(
            lines[0].contains(needle),
            "error should mention {needle:?}: {}",
            lines[0]
        );
        assert!(!self.stderr.contains("panicked"));
    }
}

pub fn ledge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ledge"))
}

/// Runs `ledge ARGS`, killing it after `limit` (then `code` is None).
pub fn ledge(args: &[&str], limit: Duration) -> Output {
    run(Command::new(ledge_bin()).args(args), limit)
}

pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        code,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
    }
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ledge-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Polls `done` until it holds; fails the test with `what()` when it does not within `limit`.
pub fn wait_until(limit: Duration, what: impl FnOnce() -> String, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() >= limit {
            panic!("{}", what());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The format-1 snapshot fixture (tests/fixtures/snapshot-v1, a counting probe guest with one
/// vCPU): its state file, and its memory file unpacked into `dir`.
pub fn snapshot_v1_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshot-v1");
    let mem = dir.join("vm.mem");
    let unpacked = Command::new("gzip")
        .arg("-dc")
        .arg(fixture.join("vm.mem.gz"))
        .stdout(std::fs::File::create(&mem).unwrap())
        .status()
        .expect("gzip");
    assert!(unpacked.success());
    (fixture.join("vm.snap"), mem)
}

/// Where tools/build-guest.sh put the Linux guest: $LEDGE_GUEST_DIR or ~/.cache/ledge/guest.
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("LEDGE_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/ledge/guest"),
    }
}

/// The guest directory when every file in `needed` is there. Missing artifacts fail the test,
/// unless LEDGE_SKIP_LAB_TESTS=1, in which case the skip is printed and None returned.
pub fn require_guest_artifacts(needed: &[&str]) -> Option<PathBuf> {
    let g = guest_dir();
    if needed.iter().all(|f| g.join(f).exists()) {
        return Some(g);
    }
    if std::env::var("LEDGE_SKIP_LAB_TESTS").as_deref() == Ok("1") {
        println!(
            "SKIPPED: guest artifacts missing in {} and LEDGE_SKIP_LAB_TESTS=1",
            g.display()
        );
        return None;
    }
    panic!(
        "guest artifacts missing in {}: run tools/build-guest.sh (or set LEDGE_SKIP_LAB_TESTS=1)",
        g.display()
    );
}

/// A `ledge` process whose console lines (stdout) arrive as they are printed; stderr goes to
/// the test's. Killed (SIGKILL) when dropped.
pub struct Guest {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stdin: Option<ChildStdin>,
    /// Every line received so far, in order.
    pub seen: Vec<String>,
}

impl Guest {
    /// `ledge ARGS` with stdin from /dev/null.
    pub fn spawn(args: &[&str]) -> Guest {
        Guest::start(args, false)
    }

    /// `ledge ARGS` with stdin a pipe the test writes with `send` (`ledge run --console
    /// stdio` forwards it to COM1).
    pub fn spawn_with_stdin(args: &[&str]) -> Guest {
        Guest::start(args, true)
    }

    fn start(args: &[&str], stdin: bool) -> Guest {
        let mut child = Command::new(ledge_bin())
            .args(args)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ledge");
        let out = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("guest| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            lines: rx,
            stdin,
            seen: Vec::new(),
        }
    }

    /// Writes `bytes` to the process's stdin (spawn_with_stdin only).
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("spawned without a stdin pipe");
        stdin.write_all(bytes).expect("write to ledge's stdin");
        stdin.flush().expect("flush ledge's stdin");
    }

    /// The first line starting with one of `prefixes`, within `limit`.
    pub fn wait_line(&mut self, prefixes: &[&str], limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if prefixes.iter().any(|p| line.starts_with(p)) {
                return Some(line);
            }
        }
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// SIGKILLs the process, waits for it, and takes every line it printed before dying
    /// into `seen`.
    pub fn kill_and_drain(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin = None;
        // The reader thread sees EOF once the process is gone and drops its sender.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(line);
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
