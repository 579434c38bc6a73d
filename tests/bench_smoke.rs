//! CI smoke test of the benchmarks (tools/bench): `tools/bench/run --quick --no-lab` with this
//! build's `ledge`, into a scratch directory, so the benchmark code cannot rot unnoticed. It
//! checks that the run exited 0 and wrote the JSON, Markdown and PNG results, and that every
//! scenario that was not skipped finished and measured something. Numbers are printed, never
//! asserted: --quick enforces no targets.
//!
//! Needs /dev/kvm; with LEDGE_SKIP_KVM_TESTS=1 it prints SKIPPED and passes. The first run
//! creates the benchmarks' virtualenv (matplotlib from PyPI).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(600);

fn result_file(dir: &Path, ext: &str) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read the output directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(ext))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one .{ext} file expected in {dir:?}: {found:?}"
    );
    found.into_iter().next().unwrap()
}

#[test]
fn bench_quick_run_writes_every_result() {
    let test = "bench_quick_run_writes_every_result";
    if std::env::var("LEDGE_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        println!("[{test}] SKIPPED: LEDGE_SKIP_KVM_TESTS=1");
        return;
    }
    if !common::require_kvm(test) {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = common::scratch("bench");
    let start = Instant::now();
    let run = common::run(
        Command::new(repo.join("tools/bench/run"))
            .args(["--quick", "--no-lab", "--out"])
            .arg(&out)
            .arg("--ledge")
            .arg(common::ledge_bin())
            .current_dir(repo),
        LIMIT,
    );
    println!(
        "--- tools/bench/run --quick --no-lab ({:.0} s)\n{}--- stderr\n{}",
        start.elapsed().as_secs_f64(),
        run.stdout,
        run.stderr
    );
    assert_eq!(run.code, Some(0), "the quick benchmark run failed");

    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(result_file(&out, "json")).unwrap())
            .expect("the JSON result parses");
    let md = fs::read_to_string(result_file(&out, "md")).unwrap();
    let png = fs::read(result_file(&out, "png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        md.contains("| target |"),
        "no targets table in the Markdown"
    );
    assert!(
        json["errors"].as_array().unwrap().is_empty(),
        "{}",
        json["errors"]
    );

    let scenarios = json["scenarios"].as_object().expect("scenarios");
    for name in [
        "boot-probe",
        "boot-linux",
        "api",
        "memory",
        "snapshot",
        "io",
        "density",
    ] {
        let s = &scenarios[name];
        let status = s["status"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} missing"));
        println!("[{test}] {name}: {status}, {} metrics", s["metrics"]);
        if status == "skipped" {
            continue;
        }
        assert_eq!(status, "ok", "{name}");
        assert!(
            s["metrics"].as_u64().unwrap() > 0,
            "{name} measured nothing"
        );
        assert!(
            md.contains(&format!("## {name}")),
            "{name} not in the Markdown"
        );
    }
    // The probe boots with Ledge on any KVM; they must be there whatever else is skipped.
    assert_eq!(scenarios["boot-probe"]["status"], "ok");
    assert_eq!(scenarios["boot-linux"]["status"], "skipped", "--no-lab");
    let _ = fs::remove_dir_all(out);
}
