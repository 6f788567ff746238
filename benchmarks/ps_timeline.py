"""A PS run's pipeline fill and drain, from its merged ``--timeline`` (issue 29).

    gradsync train --workload synthetic-mlp --hidden 1024 --batch-size 64 --steps 20 \
        --arch ps --servers 3 --workers 3 --lab 6 --rate 200mbit --timeline /tmp/t.json
    python -m benchmarks.ps_timeline /tmp/t.json --skip 5

Per step (the last ones, after ``--skip``), medians over workers and steps, in ms:

- ``compute``: the worker's step start to its first push handed to gloo (forward, and
  backward as far as the first complete partition): nothing of this step is on the wire yet;
- ``first update``: that first push to the first update of the step on any server (one
  partition crossing the worker's link, shared with the flows to the other servers);
- ``updates``: the step's first update to its last, on any server (the stream);
- ``drain``: the step's last update on any server to the worker's last pull loaded
  (the last partitions crossing the worker's downlink, and the Python that loads them);
- ``step``: the worker's ``step`` span.
The four parts add up to the step but for what follows the last pull (optimizer step's end,
metrics).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def spans(path: str) -> list[dict]:
    with open(path) as f:
        return [e for e in json.load(f) if e.get("ph") == "X"]


def phases(events: list[dict], skip: int) -> dict[str, list[float]]:
    """The parts of each (worker, step) after ``skip`` steps, in ms."""
    updates: dict[int, list[tuple[float, float]]] = defaultdict(list)
    per: dict[tuple[int, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        step = e.get("args", {}).get("step")
        if step is None:
            continue
        start, end = e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3
        if e["name"] == "update":
            updates[step].append((start, end))
        elif e["name"] in ("push", "pull", "step"):
            per[(e["pid"], step)][e["name"]].append((start, end))
    out: dict[str, list[float]] = defaultdict(list)
    for (_, step), rows in sorted(per.items()):
        if step <= skip or not rows["push"] or not rows["step"] or not updates[step]:
            continue
        begin = rows["step"][0][0]
        first_push = min(end for _, end in rows["push"])
        first_update = min(s for s, _ in updates[step])
        last_update = max(e for _, e in updates[step])
        last_pull = max(e for _, e in rows["pull"])
        out["compute"].append(first_push - begin)
        out["first update"].append(first_update - first_push)
        out["updates"].append(last_update - first_update)
        out["drain"].append(last_pull - last_update)
        out["step"].append(rows["step"][0][1] - begin)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--skip", type=int, default=5, help="steps left out at the start")
    args = parser.parse_args()
    parts = phases(spans(args.trace), args.skip)
    n = len(parts["step"])
    print(f"# {n} (worker, step) pairs after step {args.skip}: median (min-max) ms")
    for name, values in parts.items():
        print(f"{name:>13}: {statistics.median(values):7.1f} ({min(values):.1f}-"
              f"{max(values):.1f})")


if __name__ == "__main__":
    main()
