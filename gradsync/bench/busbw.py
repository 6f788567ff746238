"""The busbw report of `gradsync bench collectives`: rows, table, averages, plot, lab bounds.

busbw = S/t * factor (nccl-tests; the factors are in gradsync.bench.sweep and
shared/ANCHORS.md), so every algorithm and world size is held against the link's rate: in a
lab, busbw cannot exceed the slowest host's link, and for all_reduce on unequal links the
bandwidth-aware bound of ANCHORS.md says how much better than a ring is possible.
"""

from __future__ import annotations

import json

from .sweep import FACTORS, SweepConfig, format_size
from .report import log_scale_if_wide

# --- bounds in a lab ---------------------------------------------------------------------------

def aware_bound(rates: list[float]) -> float:
    """busbw bound of an all-reduce whose shards are sized to each host's link (bytes/s):
    the busbw that :func:`gradsync.comm.algorithms.aware_bound`'s time gives. With equal
    links it is the link rate, as for a ring; a very slow host bounds it at S / B_slow."""
    from ..comm.algorithms import aware_bound as aware_seconds

    return FACTORS["all_reduce"](len(rates)) / aware_seconds(1.0, rates)


def lab_bounds(op: str, rates_bits: list[int], procs_per_host: int = 1) -> dict:
    """The busbw bounds of ``op`` on hosts with these link rates (bits/s).

    With L > 1 ranks per host, busbw's factor counts p = hL ranks, but only h hosts share
    the links: the hierarchical bound 2(h-1)/h * S / B (ANCHORS.md) is then a busbw of
    B * (2(p-1)/p) / (2(h-1)/h).
    """
    rates = [r / 8 for r in rates_bits]
    out = {"rates_bits": rates_bits, "bound_busbw_gbs": min(rates) / 1e9}
    if op == "all_reduce":
        out["aware_busbw_gbs"] = aware_bound(rates) / 1e9
        h, p = len(rates), len(rates) * procs_per_host
        if procs_per_host > 1 and h > 1:
            out["aware_busbw_gbs"] *= FACTORS["all_reduce"](p) / FACTORS["all_reduce"](h)
    return out


def unequal(lab: dict) -> bool:
    """True when the bandwidth-aware bound differs from the slowest link's (unequal links)."""
    return lab.get("aware_busbw_gbs", 0) > 1.001 * lab["bound_busbw_gbs"]


# --- the report --------------------------------------------------------------------------------

def rows(cfg: SweepConfig, raw: dict, lab: dict | None) -> list[dict]:
    """The rank's rows with type, redop, root, algbw and busbw (GB/s), and in a lab busbw as a
    fraction of the slowest link."""
    factor = FACTORS[cfg.op](raw["world"])
    out = []
    for r in raw["rows"]:
        t = r["time_us"]["median"] * 1e-6
        row = {**r, "type": cfg.dtype, "redop": cfg.shown_redop, "root": cfg.root,
               "algbw_gbs": r["bytes"] / t / 1e9, "busbw_gbs": r["bytes"] / t / 1e9 * factor}
        if lab:
            row["of_link"] = row["busbw_gbs"] / lab["bound_busbw_gbs"]
        out.append(row)
    return out


def print_table(cfg: SweepConfig, report: dict) -> None:
    p, lab = report["world"], report["lab"]
    per_host = lab.get("procs_per_host", 1) if lab else 1
    where = (f"a lab of {p // per_host} hosts ({per_host} rank{'s' * (per_host > 1)} each)"
             if lab else f"{p} ranks")
    print(f"# gradsync bench collectives: {cfg.op}, {cfg.dtype}, redop {cfg.shown_redop}, "
          f"on {where}, {report.get('engine') or 'gloo'}, 1 thread per rank")
    print(f"# machine: {report['machine']}")
    print(f"# command: {report['command']}")
    print(f"# time: slowest rank, median over {cfg.iters} iterations per size (above 16 MiB "
          f"{cfg.iters} x 16 MiB / S, at least {min(cfg.iters, 10)}) after {cfg.warmup_iters} "
          "warm-up; algorithms interleaved")
    factor = {"all_reduce": "2(n-1)/n", "reduce_scatter": "(n-1)/n", "all_gather": "(n-1)/n"}
    print(f"# algbw = S/t, busbw = algbw * {factor.get(cfg.op, '1')} in GB/s; #wrong: wrong "
          f"elements over the ranks and the {'iterations' if cfg.check else 'first iteration'}")
    if lab:
        rates = ",".join(_rate(b) for b in lab["rates_bits"])
        print(f"# links {rates}: busbw bound = the slowest link = {lab['bound_busbw_gbs']:.4f} "
              "GB/s (tbf counts frames: TCP payload tops out near 0.956 of it)")
        if unequal(lab):
            kind = ("hierarchical all_reduce bound (host links carry 2(h-1)/h * S, ANCHORS.md)"
                    if per_host > 1 else
                    "bandwidth-aware all_reduce bound (shards sized to each link, ANCHORS.md)")
            print(f"# {kind}: "
                  f"{lab['aware_busbw_gbs']:.4f} GB/s = "
                  f"{lab['aware_busbw_gbs'] / lab['bound_busbw_gbs']:.2f}x the slowest link")
    per = " per rank" if cfg.op in ("reduce_scatter", "all_gather") else ""
    print(f"# {'size':>10} {'count':>10} {'type':>8} {'redop':>5} {'root':>4} {'algorithm':>16}"
          f" {'time':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>6} {'min-max':>17}"
          + (f" {'link':>6}" if lab else ""))
    print(f"# {'(B)':>10} {'(elements' + per + ')':>10} {'':>8} {'':>5} {'':>4} {'':>16}"
          f" {'(us)':>10} {'(GB/s)':>8} {'(GB/s)':>8} {'':>6} {'(us)':>17}"
          + (f" {'(frac)':>6}" if lab else ""))
    for r in report["rows"]:
        t = r["time_us"]
        spread = f"{t['min']:.0f}-{t['max']:.0f}"
        print(f"  {r['bytes']:>10} {r['count']:>10} {r['type']:>8} {r['redop']:>5} "
              f"{r['root']:>4} {r['algorithm']:>16} {t['median']:>10.1f} {r['algbw_gbs']:>8.4f} "
              f"{r['busbw_gbs']:>8.4f} {r['wrong']:>6} {spread:>17}"
              + (f" {r['of_link']:>6.3f}" if lab else ""))


def _rate(bits: int) -> str:
    from ..lab import format_rate

    return format_rate(bits)


def print_averages(report: dict) -> None:
    """nccl-tests' last line, once per algorithm; in a lab with the largest size's fractions."""
    lab = report["lab"]
    for algo, avg in report["avg_busbw_gbs"].items():
        line = f"# Avg bus bandwidth : {avg:.4f}  {algo}"
        if lab:
            last = [r for r in report["rows"] if r["algorithm"] == algo][-1]
            line += (f"   (at {format_size(last['bytes'])}: {last['of_link']:.3f} of the "
                     "slowest link")
            if unequal(lab):
                kind = "hierarchical" if lab.get("procs_per_host", 1) > 1 else "aware"
                line += (f", {last['busbw_gbs'] / lab['aware_busbw_gbs']:.3f} of the {kind} "
                         "bound")
            line += ")"
        print(line)


def write_plot(path: str, report: dict) -> None:
    """busbw against size, one line per algorithm, the link bound in a lab. The plotted
    points are stored in the PNG's "Description" text chunk as JSON {algorithm: [[S, busbw]]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {a: [[r["bytes"], r["busbw_gbs"]] for r in report["rows"] if r["algorithm"] == a]
              for a in report["avg_busbw_gbs"]}
    for algo, points in series.items():
        ax.plot([s for s, _ in points], [b for _, b in points], marker="o", label=algo)
    lab = report["lab"]
    if lab:
        ax.axhline(lab["bound_busbw_gbs"], color="black", linestyle="--",
                   label=f"slowest link ({_rate(min(lab['rates_bits']))})")
        if unequal(lab):
            ax.axhline(lab["aware_busbw_gbs"], color="grey", linestyle=":",
                       label="bandwidth-aware bound")
    sizes = sorted({r["bytes"] for r in report["rows"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [format_size(s) for s in sizes])
    ax.minorticks_off()
    where = (f"{report['world']} lab hosts, links "
             + ",".join(_rate(b) for b in dict.fromkeys(lab["rates_bits"])) if lab
             else f"{report['world']} ranks")
    ax.set(xlabel="size S (bytes)", ylabel="busbw (GB/s)",
           title=f"{report['op']} {report['dtype']} {report['redop']}, {where}")
    # busbw of small sizes is decades below the large ones': a log axis keeps them visible.
    if not log_scale_if_wide(ax, [r["busbw_gbs"] for r in report["rows"]], "y", decades=2):
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Description": json.dumps(series)})
    plt.close(fig)
