"""Targets, and the three outputs: JSON (everything), Markdown (tables), PNG (ratios)."""
import json

# (metric key, what, ratio to Firecracker's median or None, absolute limit or None,
#  "max" if Ledge must be at or below, "min" if at or above). Ratios apply only when
# Firecracker ran; otherwise the absolute limit, if any, is checked.
TARGETS = [
    ("boot.probe.1vcpu.first_output", "probe: launch → first output", 0.35, 4.0, "max"),
    ("boot.probe.1vcpu.exit", "probe: launch → exit", 0.3, 8.0, "max"),
    ("boot.linux.off.marker", "Linux: launch → init (console off)", 0.8, None, "max"),
    ("boot.linux.on.marker", "Linux: launch → init (console on)", 0.8, None, "max"),
    ("api.launch_to_socket", "API socket answering after launch", None, 1.5, "max"),
    ("mem.peak_rss", "VMM peak RSS with the probe", None, 3.0, "max"),
    ("api.pause_resume_p50", "pause + resume p50", None, 100.0, "max"),
    ("api.get_p50", "`GET /` p50", None, 30.0, "max"),
    ("snap.restore.128", "restore, 128 MiB guest", None, 4.0, "max"),
    ("snap.restore.1024", "restore, 1 GiB guest", None, 4.0, "max"),
    ("snap.clones100.rss", "100 clones of a 128 MiB guest: host RSS", None, 1024.0, "max"),
    ("mem.binary", "stripped binary", None, 3.0, "max"),
]
# virtio-blk is judged against the host on the same file, not against a peer.
HOST_TARGETS = [("io.blk_seq", "virtio-blk throughput vs the host", 0.9)]


def fmt(x):
    if x is None:
        return "–"
    if isinstance(x, int) or abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) >= 0.01 else f"{x:.2g}"


def medians(metrics):
    """{key: {vmm: median}} over the metrics that have samples."""
    out = {}
    for m in metrics:
        if m.get("values"):
            out.setdefault(m["key"], {})[m["vmm"]] = m["median"]
    return out


def evaluate_targets(metrics):
    med = medians(metrics)
    units = {m["key"]: m["unit"] for m in metrics}
    rows = []
    for key, what, fc_ratio, absolute, sense in TARGETS:
        ledge = med.get(key, {}).get("ledge")
        fc = med.get(key, {}).get("firecracker")
        unit = units.get(key, "")
        if ledge is None:
            rows.append({"key": key, "target": what, "ledge": None, "limit": None,
                         "reference": "", "status": "not measured"})
            continue
        if fc_ratio is not None and fc is not None:
            limit, ref = fc_ratio * fc, f"≤ {fc_ratio}× Firecracker ({fmt(fc)} {unit})"
        elif absolute is not None:
            limit = absolute
            ref = f"{'≤' if sense == 'max' else '≥'} {fmt(absolute)} {unit}"
            if fc_ratio is not None:
                ref += f" (absolute; {fc_ratio}× Firecracker when it runs)"
        else:
            rows.append({"key": key, "target": what, "ledge": ledge, "unit": unit, "limit": None,
                         "reference": f"≤ {fc_ratio}× Firecracker",
                         "status": "n/a: needs Firecracker"})
            continue
        ok = ledge <= limit if sense == "max" else ledge >= limit
        rows.append({"key": key, "target": what, "ledge": ledge, "unit": unit, "limit": limit,
                     "reference": ref, "status": "met" if ok else "NOT met"})
    for key, what, ratio in HOST_TARGETS:
        ledge = med.get(key, {}).get("ledge")
        host = med.get(key, {}).get("host")
        if ledge is None or host is None:
            rows.append({"key": key, "target": what, "ledge": ledge, "limit": None,
                         "reference": "", "status": "not measured"})
            continue
        unit = units.get(key, "")
        rows.append({"key": key, "target": what, "ledge": ledge, "unit": unit,
                     "limit": ratio * host,
                     "reference": f"≥ {ratio}× host ({fmt(host)} {unit})",
                     "status": "met" if ledge >= ratio * host else "NOT met"})
    return rows


def write_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def markdown(result):
    mi = result["machine"]
    lines = [f"# Ledge benchmarks, {result['date']}", ""]
    load = ", ".join(f"{x:.2f}" for x in mi["loadavg_at_start"])
    lines += ["| machine | |", "|---|---|",
              f"| CPU | {mi['cpu']} |",
              f"| cores | {mi['cores']} |",
              f"| memory | {mi['mem_gib']} GiB |",
              f"| kernel | {mi['kernel']} |",
              f"| KVM | {mi['kvm_description']} |",
              f"| load average at start | {load} |"]
    if result.get("lab"):
        lines.append(f"| Linux scenarios | {result['lab']} |")
    lines += ["", "| VMM | version | binary |", "|---|---|---|"]
    for v in result["vmms"]:
        lines.append(f"| {v['name']} | {v['version']} | `{v['binary']}` |")
    s = result["settings"]
    lab_runs = s["lab_runs"] if result["scenarios"].get("boot-linux", {}).get(
        "status", "skipped") != "skipped" else "skipped"
    lines += ["", f"Mode: {'--quick (1 iteration, targets not enforced)' if s['quick'] else 'full'}"
              f"; runs per scenario: {s['runs']} (Linux: {lab_runs}); scenarios: "
              f"{', '.join(s['scenarios'])}. Runs are interleaved (every VMM once per "
              "iteration, order rotated); times are from the fork of the VMM process. "
              f"Total time {result['elapsed_s']:.0f} s.", ""]

    metrics = result["metrics"]
    med = medians(metrics)
    by_scenario = {}
    first_seen = {}
    vmm_order = {"ledge": 0, "qemu": 1, "firecracker": 2, "host": 3}
    for i, m in enumerate(metrics):
        first_seen.setdefault(m["key"], i)
        by_scenario.setdefault(m["scenario"], []).append(m)
    for ms in by_scenario.values():
        ms.sort(key=lambda m: (first_seen[m["key"]], vmm_order.get(m["vmm"], 9)))
    for sc, ms in by_scenario.items():
        lines += [f"## {sc}", "",
                  "| metric | VMM | n | median | min | max | × Ledge |",
                  "|---|---|---|---|---|---|---|"]
        last_key = last_note = None
        for m in ms:
            label = m["label"] if m["key"] != last_key else ""
            note = m.get("note", "")
            note = f" ({note})" if note and (note != last_note or label) else ""
            last_key, last_note = m["key"], m.get("note", "")
            base = med.get(m["key"], {}).get("ledge")
            ratio = "1" if m["vmm"] == "ledge" else (
                f"{m['median'] / base:.2f}×" if base else "–")
            unit = m["unit"]
            lines.append(f"| {label}{note} | {m['vmm']} | {m['n']} | {fmt(m['median'])} {unit} "
                         f"| {fmt(m['min'])} | {fmt(m['max'])} | {ratio} |")
        lines.append("")

    lines += ["## Targets", ""]
    if result["settings"]["quick"]:
        lines += ["(--quick: one iteration; shown for information, not enforced)", ""]
    lines += ["| target | Ledge (median) | limit | status |", "|---|---|---|---|"]
    for t in result["targets"]:
        val = f"{fmt(t['ledge'])} {t.get('unit', '')}" if t["ledge"] is not None else "–"
        lines.append(f"| {t['target']} | {val} | {t['reference']} | **{t['status']}** |")
    lines.append("")
    if result["skips"]:
        lines += ["## Skipped", ""]
        for s in result["skips"]:
            who = f"{s['scenario']} [{s['vmm']}]" if s["vmm"] else s["scenario"]
            lines.append(f"- {who}: {s['reason']}")
        lines.append("")
    if result["errors"]:
        lines += ["## Crashed", ""]
        for e in result["errors"]:
            who = f"{e['scenario']} [{e['vmm']}]" if e["vmm"] else e["scenario"]
            first = e["error"].splitlines()[0] if e["error"] else ""
            lines.append(f"- {who}: {first}")
        lines.append("")
    return "\n".join(lines)


def write_markdown(path, result):
    with open(path, "w") as f:
        f.write(markdown(result))


# Not a cost of the VMM, so not compared in the chart (still in the tables).
NOT_PLOTTED = {"mem.guest_touched"}


def write_png(path, result):
    """One group of bars per metric, one bar per peer: the peer's median over Ledge's, on a
    log axis (1 = same as Ledge). The host's virtio-blk baseline counts as a peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = medians(result["metrics"])
    info = {m["key"]: m for m in result["metrics"] if m["vmm"] == "ledge"}
    colors = {"qemu": "#d95f02", "firecracker": "#7570b3", "host": "#1b9e77"}
    groups = []  # (label, [(vmm, ratio)])
    for key, per_vmm in med.items():
        base = per_vmm.get("ledge")
        if not base or key not in info or key in NOT_PLOTTED:
            continue
        m = info[key]
        bars = [(v, x / base) for v, x in per_vmm.items() if v != "ledge" and x > 0]
        if bars:
            arrow = "lower is better" if m["better"] == "lower" else "higher is better"
            groups.append((f"{key} ({m['unit']}, {arrow})", bars))
    nbars = sum(len(b) for _, b in groups)
    fig, ax = plt.subplots(figsize=(11, max(2.5, 0.28 * nbars + 0.15 * len(groups) + 1.5)))
    if groups:
        y, ticks, seen = 0.0, [], set()
        for label, bars in reversed(groups):
            top = y
            for vmm, ratio in bars:
                ax.barh(y, ratio, height=0.8, color=colors.get(vmm, "#666666"),
                        label=None if vmm in seen else vmm)
                ax.text(ratio, y, f" {ratio:.2f}×", va="center", fontsize=7)
                seen.add(vmm)
                y += 1
            ticks.append(((top + y - 1) / 2, label))
            y += 0.6
        ax.set_yticks([t for t, _ in ticks])
        ax.set_yticklabels([lbl for _, lbl in ticks], fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xlabel("peer median ÷ Ledge median (1 = same as Ledge)")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no peer measured in this run: nothing to compare with Ledge",
                ha="center", va="center")
    mi = result["machine"]
    ax.set_title(f"Ledge vs peers, {result['date']} — {mi['cpu']}, {mi['cores']} cores, "
                 f"{mi['kvm']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
