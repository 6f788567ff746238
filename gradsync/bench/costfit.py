"""The all_reduce part of `gradsync bench collectives`: does the cost model pick the winner?

For each size: the fastest algorithm measured (``auto`` aside) against the picks of the
default cost model (gradsync.comm.collectives' DEFAULT_COST_MODEL), of a model fitted to
this sweep (t = A + S/B per algorithm, least squares on relative error, inverted through the
model's shape formulas) and, with ``--calibrate``, of gradsync.comm.calibrate()'s model.
"""

from __future__ import annotations

import json

from .sweep import format_size


def fit_line(xs: list[float], ts: list[float]) -> tuple[float, float]:
    """Least-squares t = a + b x on relative error (weights 1/t): small sizes count as much as
    large ones, as they do for the choice between algorithms."""
    w = [1 / t ** 2 for t in ts]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, xs))
    st = sum(wi * t for wi, t in zip(w, ts))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    sxt = sum(wi * x * t for wi, x, t in zip(w, xs, ts))
    b = (sw * sxt - sx * st) / (sw * sxx - sx * sx)
    return (st - b * sx) / sw, b


def fitted_model(medians: dict[str, dict[int, float]], p: int, gamma: float):
    """A CostModel whose constants reproduce this sweep: each algorithm's line t = A + S b,
    inverted through the shape formulas (messages m, wire fraction w, reduced fraction r at
    p ranks): alpha = A / m, beta = (b - r gamma) / w. Unmeasured algorithms keep the
    defaults. Returns (model, {algorithm: (A s, b s/byte)})."""
    from ..comm import CostModel
    from ..comm.cost_model import shape

    links, lines = CostModel().links, {}
    for algo, by_size in medians.items():
        a, b = lines[algo] = fit_line(list(by_size), [t * 1e-6 for t in by_size.values()])
        m, w, r = shape(algo, 1.0, p)
        links[algo] = (max(1e-7, a / m), max(1e-13, (b - r * gamma) / w))
    return CostModel(links, gamma), lines


def _fmt_model(model) -> str:
    links = "  ".join(f"{algo} {alpha * 1e6:.0f}us 1/{1 / beta / 1e9:.3g}GB/s"
                      for algo, (alpha, beta) in model.links.items())
    return f"gamma=1/{1 / model.gamma / 1e9:.3g}GB/s  (alpha, beta): {links}"


def cost_model_report(raw: dict, rows: list[dict]) -> dict | None:
    """Print the comparison; returns it for the JSON (None if fewer than 2 algorithms)."""
    from ..comm import CostModel, Topology

    p = raw["world"]
    medians: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["algorithm"] not in ("auto", "memory-bound"):  # not algorithms auto picks
            medians.setdefault(r["algorithm"], {})[r["bytes"]] = r["time_us"]["median"]
    if len(medians) < 2:
        return None
    models, lines = {"default": CostModel()}, {}
    sizes = sorted({r["bytes"] for r in rows})
    if len(sizes) >= 3:  # a line through fewer sizes says nothing
        models["fitted"], lines = fitted_model(medians, p, raw["gamma"])
    if raw["calibrated"] is not None:
        models["calibrate()"] = CostModel(**raw["calibrated"])
    candidates = tuple(medians)
    # The ranks' measured topology, so that the picks are the ones auto makes on it.
    topology = Topology.from_json(json.dumps(raw["topology"])) if raw.get("topology") else None
    print("#\n# which all_reduce algorithm: measured fastest vs each cost model's pick among "
          "those measured; t(pick)/t(fastest) from this sweep")
    print(f"# {'size':>8} {'fastest':>16}" + "".join(f" {name + ' picks':>26}" for name in models))
    picks = []
    for size in sizes:
        t = {a: by_size[size] for a, by_size in medians.items()}
        best = min(t, key=t.get)
        chosen = {name: m.choose(size, p, candidates, topology=topology)
                  for name, m in models.items()}
        picks.append({"bytes": size, "fastest": best, "picks": chosen})
        print(f"# {format_size(size):>8} {best:>16}" + "".join(
            f" {pick:>18} {t[pick] / t[best]:6.2f}x" for pick in chosen.values()))
    auto = raw.get("auto_chose") or {}
    if auto:
        print("# auto, as run: " + ", ".join(f"{format_size(int(s))} {a}"
                                             for s, a in auto.items()))
    if lines:
        print("# lines t = A + S/B fitted to each algorithm's medians (relative least squares):")
    for algo, (a, b) in lines.items():
        rate = f"{1 / b / 1e9:8.4f} GB/s" if b > 0 else "     inf"
        print(f"#   {algo:<17} A = {a * 1e6:9.1f} us   B = {rate}")
    for name, model in models.items():
        print(f"# {name:<12} {_fmt_model(model)}")
    return {"picks": picks, "auto_chose": auto,
            "lines": {a: {"intercept_s": ab[0], "s_per_byte": ab[1]} for a, ab in lines.items()},
            "models": {name: vars(m) for name, m in models.items()}}
