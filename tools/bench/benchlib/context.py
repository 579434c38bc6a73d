"""What a scenario gets (settings, the VMMs, a scratch directory) and where it puts numbers."""
import os
import sys
import time

from .common import summary


class Metric:
    """One measured quantity for one VMM: every sample of the run, its unit, and whether
    lower or higher is better."""

    def __init__(self, key, scenario, label, vmm, unit, better, note=""):
        self.key = key
        self.scenario = scenario
        self.label = label
        self.vmm = vmm
        self.unit = unit
        self.better = better
        self.note = note
        self.values = []

    def as_dict(self):
        d = {"key": self.key, "scenario": self.scenario, "label": self.label, "vmm": self.vmm,
             "unit": self.unit, "better": self.better, "values": self.values}
        if self.note:
            d["note"] = self.note
        if self.values:
            d.update(summary(self.values))
        return d


class Context:
    def __init__(self, args, vmms, workdir, probe_elf, repo):
        self.args = args
        self.quick = args.quick
        self.vmms = vmms
        self.workdir = workdir
        self.probe_elf = probe_elf
        self.repo = repo
        self.metrics = {}  # (key, vmm) -> Metric, in insertion order
        self.skips = []  # {"scenario", "vmm", "reason"}
        self.errors = []  # {"scenario", "vmm", "error"}
        self.lab = None  # how the Linux scenario ran, once it has
        self.t_start = time.perf_counter()

    # --- settings that shrink with --quick --------------------------------------------

    def runs(self, default=None):
        if self.quick:
            return 1
        return self.args.runs if self.args.runs else (default or 10)

    def pick(self, full, quick):
        return quick if self.quick else full

    # --- output ---------------------------------------------------------------------------

    def log(self, msg):
        t = time.perf_counter() - self.t_start
        print(f"[{t:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def add(self, key, scenario, label, vmm, unit, value, better="lower", note=""):
        m = self.metrics.get((key, vmm))
        if m is None:
            m = Metric(key, scenario, label, vmm, unit, better, note)
            self.metrics[(key, vmm)] = m
        m.values.append(value)

    def skip(self, scenario, vmm, reason):
        who = f"{scenario} [{vmm}]" if vmm else scenario
        self.log(f"skipped: {who}: {reason}")
        self.skips.append({"scenario": scenario, "vmm": vmm, "reason": reason})

    def error(self, scenario, vmm, err):
        who = f"{scenario} [{vmm}]" if vmm else scenario
        self.log(f"CRASHED: {who}: {err}")
        self.errors.append({"scenario": scenario, "vmm": vmm, "error": str(err)})

    def interleaved(self, runs, vmms=None):
        """(iteration, vmm) pairs, A/B/A/B: every VMM once per iteration, the order rotated
        each iteration so that none always goes first."""
        vmms = list(vmms if vmms is not None else self.vmms)
        for i in range(runs):
            k = i % len(vmms)
            for vmm in vmms[k:] + vmms[:k]:
                yield i, vmm

    def scratch(self, name):
        path = os.path.join(self.workdir, name)
        os.makedirs(path, exist_ok=True)
        return path
