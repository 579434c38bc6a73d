//! Builds the probe guest (`resources/guests/probe`, see its README.md) into
//! `$OUT_DIR/probe.elf`, which the crate embeds with
//! `include_bytes!(concat!(env!("OUT_DIR"), "/probe.elf"))`.
//!
//! The probe is a `no_std` PVH unikernel compiled by the same `rustc` cargo uses, for the
//! host target (x86_64-unknown-linux-gnu: no extra target needs installing), linked
//! statically at 1 MiB by its own linker script.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The probe's directory, relative to the package root.
const PROBE_DIR: &str = "resources/guests/probe";
/// Every file the probe is built from; a change to any of them rebuilds it.
const PROBE_SOURCES: &[&str] = &[
    "main.rs",
    "uart.rs",
    "smp.rs",
    "virtio.rs",
    "blk.rs",
    "net.rs",
    "rng.rs",
    "dirty.rs",
    "boot.s",
    "probe.ld",
];
const PROBE_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let root =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let dir = root.join(PROBE_DIR);

    println!("cargo:rerun-if-changed=build.rs");
    for source in PROBE_SOURCES {
        let path = dir.join(source);
        assert!(
            path.is_file(),
            "probe guest source {} is missing",
            path.display()
        );
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let output = out_dir.join("probe.elf");
    let linker_script = dir.join("probe.ld");
    let mut cmd = Command::new(&rustc);
    cmd.current_dir(&out_dir)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "ledge_probe",
        ])
        .args(["--target", PROBE_TARGET])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=s",
            "-C",
            "relocation-model=static",
        ])
        .args(["-C", "force-unwind-tables=no", "-C", "relro-level=off"])
        .args(["-C", "debuginfo=0", "-C", "strip=debuginfo"])
        .args([
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-no-pie",
        ])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", linker_script.display()))
        .args([
            "-C",
            "link-arg=-Wl,--build-id=none",
            "-C",
            "link-arg=-Wl,-z,max-page-size=0x1000",
        ]);
    // A linker configured for the host target (cargo passes it as RUSTC_LINKER) applies here too.
    if let Some(linker) = env::var_os("RUSTC_LINKER") {
        let mut arg = std::ffi::OsString::from("linker=");
        arg.push(linker);
        cmd.arg("-C").arg(arg);
    }
    // Panic locations name the sources: keep the image the same wherever the tree lives.
    let mut remap = std::ffi::OsString::from("--remap-path-prefix=");
    remap.push(&dir);
    remap.push("=probe");
    cmd.arg(remap);
    cmd.arg("-o").arg(&output).arg(dir.join("main.rs"));

    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run {} to build the probe guest: {e}",
            rustc.to_string_lossy()
        )
    });
    if !status.success() {
        panic!(
            "building the probe guest failed ({status}); the rustc errors are above.\n\
             command: {cmd:?}\n\
             It needs rustc's standard library for {PROBE_TARGET} and a C compiler driver (cc) to link."
        );
    }
}
