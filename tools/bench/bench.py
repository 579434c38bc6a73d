#!/usr/bin/env python3
"""Ledge against its peers (QEMU microvm, Firecracker when present), every scenario in one
run, interleaved A/B/A/B; writes OUT/<date>.json, .md and .png. Start it through
tools/bench/run, which prepares the virtualenv, QEMU and the release build.

Exit status: 0; 1 if a scenario crashed; 3 (full runs only) if a target was not met."""
import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
import traceback

from benchlib import report, scenarios
from benchlib.common import Skip, machine_info
from benchlib.context import Context
from benchlib.vmms import discover

SCENARIOS = [
    ("boot-probe", scenarios.boot_probe, "probe guest boot, 1 and 4 vCPUs"),
    ("boot-linux", scenarios.boot_linux, "Linux guest boot (KVM lab or hardware KVM)"),
    ("api", scenarios.api, "API socket, GET / and pause+resume latency"),
    ("memory", scenarios.memory, "VMM RSS/PSS, peak RSS, binary size"),
    ("snapshot", scenarios.snapshot, "snapshot create/restore, clones"),
    ("io", scenarios.io, "virtio-blk and virtio-net with the probe's drivers"),
    ("density", scenarios.density, "VMs started per second, VMs that fit"),
]


def parse_args(repo):
    ap = argparse.ArgumentParser(
        prog="tools/bench/run", description=__doc__.split("\n\n")[0],
        epilog="scenarios: " + "; ".join(f"{n} ({d})" for n, _, d in SCENARIOS))
    ap.add_argument("--quick", action="store_true",
                    help="1 iteration per scenario, small sizes, targets not enforced")
    ap.add_argument("--runs", type=int, help="iterations per scenario (default 10; "
                    "density 5)")
    ap.add_argument("--lab-runs", type=int, help="Linux boots per VMM and console setting "
                    "(default 5, 1 with --quick)")
    ap.add_argument("--only", help="comma-separated scenarios to run")
    ap.add_argument("--no-lab", action="store_true", help="skip the Linux (KVM lab) scenario")
    ap.add_argument("--out", default=os.path.join(repo, "bench-results"),
                    help="output directory (default bench-results/)")
    ap.add_argument("--ledge", default=os.path.join(repo, "target/release/ledge"),
                    help="the ledge binary (default target/release/ledge)")
    ap.add_argument("--density-max", type=int,
                    help="most VMs to start in the density scenario (default 100; 6 --quick)")
    a = ap.parse_args()
    known = [n for n, _, _ in SCENARIOS]
    a.only = [s.strip() for s in a.only.split(",")] if a.only else known
    for s in a.only:
        if s not in known:
            ap.error(f"unknown scenario {s!r}; known: {', '.join(known)}")
    if a.runs is not None and a.runs < 1:
        ap.error("--runs must be at least 1")
    return a


def main():
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
    args = parse_args(repo)
    ledge = os.path.abspath(args.ledge)
    if not os.access(ledge, os.X_OK):
        sys.exit(f"{ledge}: not executable (cargo build --release, or --ledge PATH)")
    if not os.path.exists("/dev/kvm"):
        sys.exit("/dev/kvm is missing: the benchmarks need KVM")

    workdir = scenarios.tmpdir()
    probe = os.path.join(workdir, "probe.elf")
    if subprocess.run([ledge, "export-probe", probe], capture_output=True).returncode != 0:
        sys.exit("ledge export-probe failed")
    vmms = discover(ledge, probe, lambda m: print(m, file=sys.stderr))
    ctx = Context(args, vmms, workdir, probe, repo)
    started = datetime.datetime.now()
    machine = machine_info()
    ctx.log(f"{machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}, "
            f"KVM: {machine['kvm_description']}; VMMs: {', '.join(v.name for v in vmms)}")

    status = {}
    for name, fn, _ in SCENARIOS:
        if name not in args.only:
            continue
        ctx.log(f"== {name}")
        before = len(ctx.metrics)
        t0 = time.perf_counter()
        try:
            fn(ctx)
            skipped = any(s["scenario"] == name for s in ctx.skips)
            status[name] = "skipped" if skipped and len(ctx.metrics) == before else "ok"
        except Skip as e:
            ctx.skip(name, None, str(e))
            status[name] = "skipped"
        except Exception as e:  # any failure is this scenario's crash; the others go on
            ctx.error(name, None, f"{e}\n{traceback.format_exc()}")
            status[name] = "crashed"
        ctx.log(f"   {name}: {status[name]}, {len(ctx.metrics) - before} metrics, "
                f"{time.perf_counter() - t0:.1f} s")

    metrics = [m.as_dict() for m in ctx.metrics.values()]
    result = {
        "date": started.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine,
        "lab": ctx.lab,
        "vmms": [{"name": v.name, "version": v.version(), "binary": v.binary} for v in vmms],
        "settings": {"quick": args.quick, "runs": ctx.runs(), "lab_runs":
                     args.lab_runs or ctx.pick(5, 1), "scenarios": args.only},
        "scenarios": {n: {"status": s, "metrics": sum(1 for m in metrics if m["scenario"] == n)}
                      for n, s in status.items()},
        "metrics": metrics,
        "skips": ctx.skips,
        "errors": ctx.errors,
        "elapsed_s": time.perf_counter() - ctx.t_start,
    }
    result["targets"] = report.evaluate_targets(metrics)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, started.strftime("%Y-%m-%d-%H%M%S"))
    report.write_json(stem + ".json", result)
    report.write_markdown(stem + ".md", result)
    report.write_png(stem + ".png", result)
    shutil.rmtree(workdir, ignore_errors=True)
    print(report.markdown(result))
    print(f"\nwritten: {stem}.json, {stem}.md, {stem}.png", file=sys.stderr)

    if ctx.errors:
        return 1
    if not args.quick and any(t["status"] == "NOT met" for t in result["targets"]):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
