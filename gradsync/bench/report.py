"""What the benchmarks share: the machine line, lower bounds, plots."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The processor's model name, from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_line() -> str:
    """Cores, CPU model, torch and Python versions: what a figure was measured on."""
    import torch

    cpu = cpu_model()
    return (f"{len(os.sched_getaffinity(0))} cores ({cpu}), torch {torch.__version__}, "
            f"Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}")


def link_bytes_per_s(rate: str) -> float:
    from ..lab.netns import parse_rate

    return parse_rate(rate) / 8


def bound_allreduce_s(nbytes: int, n: int, rate: str) -> float:
    """All-reduce lower bound on n hosts with full-duplex links: 2(n-1)/n * S / B."""
    from ..comm.algorithms.ring import bus_factor  # late: this module loads without torch

    return float(bus_factor(n) * nbytes) / link_bytes_per_s(rate) if n > 1 else 0.0


def bound_ps_s(nbytes: int, n: int, k: int, rate: str) -> float:
    """Parameter server with k dedicated server hosts and n workers (BytePS, OSDI 2020):
    max(S/B, n*S/(k*B))."""
    b = link_bytes_per_s(rate)
    return max(nbytes / b, n * nbytes / (k * b))


def log_scale_if_wide(ax, values, axis: str = "x", decades: float = 1.0, base: int = 10
                      ) -> bool:
    """Put ``axis`` of ``ax`` on a log scale when the positive ``values`` span more than
    ``decades`` decades: on a linear axis the small ones crowd into the first pixels (busbw
    at 8 B is a thousandth of busbw at 64 MiB). Returns True when it did."""
    positive = [v for v in values if v and v > 0]
    if len(positive) < 2 or max(positive) < min(positive) * 10 ** decades:
        return False
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=base)
    return True


def write_plot(path: str, rows: list[dict]) -> None:
    """Throughput and scaling efficiency against workers, one line per architecture."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("gradsync: error: --plot needs matplotlib "
                         "(pip install 'gradsync[plot]')") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for arch in dict.fromkeys(r["arch"] for r in rows if r["arch"] != "local"):
        mine = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["workers"])
        xs = [r["workers"] for r in mine]
        left.plot(xs, [r["samples_per_s"] for r in mine], marker="o", label=arch)
        if all(r["efficiency"] is not None for r in mine):
            right.plot(xs, [r["efficiency"] for r in mine], marker="o", label=arch)
    local = [r for r in rows if r["arch"] == "local"]
    if local:
        left.axhline(local[0]["samples_per_s"], color="grey", linestyle="--",
                     label="one process")
    left.set(xlabel="workers", ylabel="samples/s", title="throughput")
    right.set(xlabel="workers", ylabel="throughput / (workers x one process)",
              title="scaling efficiency")
    from matplotlib.ticker import MaxNLocator

    counts = sorted({r["workers"] for r in rows})
    for ax in (left, right):
        if log_scale_if_wide(ax, counts, base=2):  # 1, 2, 4 ... 64 workers
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.minorticks_off()
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
