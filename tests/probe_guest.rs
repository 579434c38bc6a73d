//! Probe-guest tests on the real /dev/kvm: boot the built-in PVH probe guest with `ledge run`
//! and check what the guest reported on COM1 and how `ledge` exited.

mod common;

use std::time::Duration;

use common::{ledge, require_kvm, Guest, Output};

const LIMIT: Duration = Duration::from_secs(120);

fn boot(args: &[&str]) -> Output {
    let mut v = vec!["run", "--console", "stdio"];
    v.extend_from_slice(args);
    let out = ledge(&v, LIMIT);
    println!("--- ledge {v:?}\n{}--- stderr\n{}", out.stdout, out.stderr);
    out
}

fn field(line: &str, key: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= missing in {line:?}"));
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => v.parse().unwrap(),
    }
}

#[test]
fn probe_boots_reports_and_resets_cleanly() {
    if !require_kvm("probe_boots_reports_and_resets_cleanly") {
        return;
    }
    let out = boot(&[]);
    assert_eq!(
        out.code,
        Some(0),
        "the i8042 reset must end `ledge run` with 0"
    );
    assert!(out.stdout.contains("LEDGE-PROBE start"));
    assert_eq!(out.line("mode:"), "mode: hello");
    assert_eq!(out.line("cpus:"), "cpus: mp=1 online=1");
    assert_eq!(out.line("virtio:"), "virtio: count=0");
    assert!(out.stdout.contains("LEDGE-PROBE done"));
    assert!(!out.stderr.contains("error"), "{}", out.stderr);
}

#[test]
fn probe_sees_every_vcpu() {
    if !require_kvm("probe_sees_every_vcpu") {
        return;
    }
    for n in [1, 2, 4] {
        let out = boot(&["--vcpus", &n.to_string()]);
        assert_eq!(out.code, Some(0));
        assert_eq!(out.line("cpus:"), format!("cpus: mp={n} online={n}"));
    }
}

/// The memory map the guest saw: RAM adds up to the configured size (less the legacy hole below
/// 1 MiB), and no RAM entry overlaps the MMIO gap.
#[test]
fn probe_memory_map_matches_the_configuration() {
    if !require_kvm("probe_memory_map_matches_the_configuration") {
        return;
    }
    const GAP: (u64, u64) = (0xd000_0000, 0x1_0000_0000);
    for mib in [64u64, 2048, 4096] {
        let out = boot(&["--mem-mib", &mib.to_string()]);
        assert_eq!(out.code, Some(0));
        let total = field(&out.line("mem:"), "total_mib");
        assert!(
            total == mib || total == mib - 1,
            "{mib} MiB configured, guest saw {total}"
        );
        let mut ram = 0;
        for l in out.lines_with("memmap:") {
            let (base, size, kind) = (field(l, "base"), field(l, "size"), field(l, "type"));
            if kind == 1 {
                ram += size;
                assert!(
                    base + size <= GAP.0 || base >= GAP.1,
                    "RAM entry {l:?} overlaps the MMIO gap"
                );
            }
        }
        assert_eq!(ram >> 20, total);
        if mib > 3328 {
            assert!(
                out.lines_with("memmap:")
                    .any(|l| field(l, "base") == GAP.1 && field(l, "type") == 1),
                "memory above the gap must start at 4 GiB"
            );
        }
    }
}

#[test]
fn probe_gets_the_command_line_intact() {
    if !require_kvm("probe_gets_the_command_line_intact") {
        return;
    }
    let cmdline = "probe=hello alpha=1 beta=\"two words\" gamma=x/y,z:0x10";
    let out = boot(&["--cmdline", cmdline]);
    assert_eq!(out.code, Some(0));
    assert_eq!(out.line("cmdline:"), format!("cmdline: {cmdline}"));
}

#[test]
fn probe_triple_fault_is_a_clear_error() {
    if !require_kvm("probe_triple_fault_is_a_clear_error") {
        return;
    }
    let out = boot(&["--cmdline", "probe=triple-fault"]);
    assert!(out.stdout.contains("probe: triple-fault now"));
    out.assert_clean_error("triple fault");
}

#[test]
fn config_file_boots_the_same_vm() {
    if !require_kvm("config_file_boots_the_same_vm") {
        return;
    }
    let dir = common::scratch("cfgfile");
    let cfg = dir.join("vm.json");
    let console = dir.join("console.txt");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"machine": {{"vcpus": 2, "mem_mib": 96}},
                "boot": {{"cmdline": "probe=hello from=file"}},
                "console": "file:{}"}}"#,
            console.display()
        ),
    )
    .unwrap();
    let out = ledge(&["run", "--config-file", cfg.to_str().unwrap()], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("cmdline: probe=hello from=file"), "{text}");
    assert!(text.contains("cpus: mp=2 online=2"), "{text}");
    assert!(
        out.stdout.is_empty(),
        "console went to the file, not stdout"
    );
}

#[test]
fn exported_probe_boots_as_an_external_pvh_kernel() {
    if !require_kvm("exported_probe_boots_as_an_external_pvh_kernel") {
        return;
    }
    let dir = common::scratch("export");
    let elf = dir.join("probe.elf");
    let out = ledge(&["export-probe", elf.to_str().unwrap()], LIMIT);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let bytes = std::fs::read(&elf).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    let out = boot(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--boot-protocol",
        "pvh",
        "--cmdline",
        "probe=hello external=1",
    ]);
    assert_eq!(out.code, Some(0));
    assert_eq!(out.line("cmdline:"), "cmdline: probe=hello external=1");
}

/// `probe=dirty`: the probe fills its buffer with round 1, then on `d` (sent through `ledge
/// run`'s stdin to COM1) checks the round and rewrites the buffer with the next one, on `v`
/// only checks; the counter runs in between.
#[test]
fn probe_dirty_rewrites_and_verifies_on_command() {
    let test = "probe_dirty_rewrites_and_verifies_on_command";
    if !require_kvm(test) {
        return;
    }
    let mut guest = Guest::spawn_with_stdin(&[
        "run",
        "--console",
        "stdio",
        "--mem-mib",
        "256",
        "--cmdline",
        "probe=dirty probe.dirty-mib=64",
    ]);
    let limit = Duration::from_secs(60);
    // Sends `send`, expects the `dirty:` lines `want`, then a count line (the counter goes on).
    let expect = |guest: &mut Guest, send: &[u8], want: &[&str]| {
        if !send.is_empty() {
            guest.send(send);
        }
        for w in want {
            let Some(l) = guest.wait_line(&["dirty: ", "probe: dirty:"], limit) else {
                panic!("no dirty: line (wanted {w:?}): {:?}", guest.seen);
            };
            assert_eq!(&l, w);
        }
        assert!(
            guest.wait_line(&["count: "], limit).is_some(),
            "no count line after {want:?}"
        );
    };
    assert_eq!(
        guest.wait_line(&["mode:"], limit).as_deref(),
        Some("mode: dirty")
    );
    expect(&mut guest, b"", &["dirty: round=1 pages=16384"]);
    expect(&mut guest, b"v", &["dirty: verify round=1 ok"]);
    expect(&mut guest, b"d", &["dirty: round=2 pages=16384 ok"]);
    expect(&mut guest, b"v", &["dirty: verify round=2 ok"]);
    // Other bytes are ignored; commands sent together are all carried out, in order.
    expect(
        &mut guest,
        b"x\ndvd",
        &[
            "dirty: round=3 pages=16384 ok",
            "dirty: verify round=3 ok",
            "dirty: round=4 pages=16384 ok",
        ],
    );
    expect(&mut guest, b"v", &["dirty: verify round=4 ok"]);
    // A check that cannot fail proves nothing: corrupt one page and see it caught, by `v`
    // and by `d` (which still writes the next round whole).
    let page = (4 * 7919 + 13) % 16384;
    expect(
        &mut guest,
        b"cvdv",
        &[
            &format!("dirty: corrupted round=4 page={page}"),
            &format!("dirty: verify round=4 BAD page={page}"),
            &format!("dirty: round=5 pages=16384 BAD page={page}"),
            "dirty: verify round=5 ok",
        ],
    );
    guest.kill_and_drain();
}

/// A buffer larger than the free RAM is refused with a `probe:` line, and the VM stops.
#[test]
fn probe_dirty_buffer_must_fit() {
    if !require_kvm("probe_dirty_buffer_must_fit") {
        return;
    }
    let out = boot(&[
        "--mem-mib",
        "64",
        "--cmdline",
        "probe=dirty probe.dirty-mib=64",
    ]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(
        out.line("probe: dirty:")
            .starts_with("probe: dirty: probe.dirty-mib=64 does not fit"),
        "{}",
        out.stdout
    );
    assert!(out.lines_with("dirty: ").next().is_none());
    assert!(out.lines_with("count: ").next().is_none());
}
