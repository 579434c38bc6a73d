//! Bad input gets a one-line error naming the problem, exit status 1, no panic. Most of these
//! are refused before KVM is touched; the ones that reach KVM say so and honour the KVM gate.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{ledge, require_kvm, run, scratch};

const LIMIT: Duration = Duration::from_secs(60);

fn run_args(extra: &[&str]) -> common::Output {
    let mut v = vec!["run", "--console", "off"];
    v.extend_from_slice(extra);
    ledge(&v, LIMIT)
}

#[test]
fn vcpu_and_memory_limits() {
    run_args(&["--vcpus", "0"]).assert_clean_error("vcpus must be between 1 and 32 (got 0)");
    run_args(&["--vcpus", "33"]).assert_clean_error("vcpus must be between 1 and 32 (got 33)");
    run_args(&["--mem-mib", "1"]).assert_clean_error("mem_mib must be between");
}

#[test]
fn config_file_errors() {
    let dir = scratch("badcfg");
    let f = dir.join("vm.json");
    std::fs::write(&f, r#"{"machine": {"vcpus": 1, "memory": 64}}"#).unwrap();
    run_args(&["--config-file", f.to_str().unwrap()]).assert_clean_error("unknown field `memory`");
    std::fs::write(&f, "{").unwrap();
    run_args(&["--config-file", f.to_str().unwrap()]).assert_clean_error("vm.json");
    run_args(&["--config-file", "/nonexistent/vm.json"]).assert_clean_error("/nonexistent/vm.json");
}

#[test]
fn usage_errors_exit_2() {
    let out = ledge(&["run", "--vcpus", "many"], LIMIT);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("--vcpus"), "{}", out.stderr);
    let out = ledge(&["run", "--console", "tty"], LIMIT);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("use stdio, off or file:PATH"),
        "{}",
        out.stderr
    );
}

#[test]
fn kernel_file_errors() {
    if !require_kvm("kernel_file_errors") {
        return;
    }
    let dir = scratch("badkernel");
    run_args(&["--kernel", "/nonexistent/vmlinux"]).assert_clean_error("/nonexistent/vmlinux");

    let text = dir.join("notes.txt");
    std::fs::write(&text, "this is not a kernel\n".repeat(100)).unwrap();
    run_args(&["--kernel", text.to_str().unwrap()]).assert_clean_error("notes.txt");

    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    run_args(&["--kernel", empty.to_str().unwrap()]).assert_clean_error("empty");

    // A real ELF cut short inside its program headers / segments.
    let elf = dir.join("probe.elf");
    assert_eq!(
        ledge(&["export-probe", elf.to_str().unwrap()], LIMIT).code,
        Some(0)
    );
    let bytes = std::fs::read(&elf).unwrap();
    for cut in [20usize, 100, bytes.len() / 2] {
        let t = dir.join(format!("trunc{cut}.elf"));
        std::fs::write(&t, &bytes[..cut]).unwrap();
        run_args(&["--kernel", t.to_str().unwrap()]).assert_clean_error("trunc");
    }

    // PVH forced on a file without the PVH note is refused.
    let mut no_note = bytes.clone();
    let pos = no_note
        .windows(4)
        .position(|w| w == b"Xen\0")
        .expect("the probe carries a Xen PVH note");
    no_note[pos..pos + 3].copy_from_slice(b"Nox");
    let f = dir.join("nonote.elf");
    std::fs::write(&f, &no_note).unwrap();
    run_args(&["--kernel", f.to_str().unwrap(), "--boot-protocol", "pvh"])
        .assert_clean_error("no pvh entry note");

    // An initrd larger than guest memory.
    let big = dir.join("big.initrd");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(200 << 20)
        .unwrap();
    run_args(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--initrd",
        big.to_str().unwrap(),
        "--mem-mib",
        "64",
    ])
    .assert_clean_error("initrd");

    // A kernel command line longer than the boot protocol allows.
    let long = "x".repeat(5000);
    run_args(&["--cmdline", &long]).assert_clean_error("command line");
}

/// /dev/kvm missing (a private mount namespace with an empty /dev) and not accessible (an
/// unprivileged user) each give an error that says what to do.
#[test]
fn kvm_missing_or_not_accessible() {
    if !require_kvm("kvm_missing_or_not_accessible") {
        return;
    }
    let bin = common::ledge_bin();
    let out = run(
        Command::new("unshare").args([
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs none /dev && exec \"$0\" run --console off",
            bin.to_str().unwrap(),
        ]),
        LIMIT,
    );
    out.assert_clean_error("/dev/kvm does not exist");

    // `nobody` must be able to reach the binary; copy it somewhere world-readable.
    let dir = scratch("nobody");
    let copy = dir.join("ledge");
    std::fs::copy(&bin, &copy).unwrap();
    for p in [&dir, &copy] {
        let _ = Command::new("chmod")
            .args(["a+rx", p.to_str().unwrap()])
            .status();
    }
    let out = run(
        Command::new("setpriv").args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            copy.to_str().unwrap(),
            "run",
            "--console",
            "off",
        ]),
        LIMIT,
    );
    out.assert_clean_error("cannot open /dev/kvm: run as root or add this user to the kvm group");
}
