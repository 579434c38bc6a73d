//! Helpers shared by the integration tests: running the `ledge` binary with a time limit, and
//! the KVM gate (a KVM test fails without /dev/kvm unless LEDGE_SKIP_KVM_TESTS=1 says to skip).
#![allow(dead_code)]

pub mod vm;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
