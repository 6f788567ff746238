"""`gradsync bench serve`: a closed-loop load generator against `gradsync serve`, 1, 2, ...
replicas, and 1, 2, ... front processes.

    gradsync bench serve --replicas 1,2,3 --clients 8 --duration 10 --plot docs/plots/serve.png
    gradsync bench serve --frontends 1,2 --replicas 1 --clients 8 --duration 10

Each configuration is a real `gradsync serve` (its own processes) on the same checkpoint: the
one of ``--checkpoint-dir``, or one written here of the workload's freshly initialised model
(speed does not depend on the weights). ``--clients`` clients (coroutines of one asyncio
load generator, loadgen.py) each send a request of ``--rows`` rows, wait for its answer and
send the next (closed loop, one keep-alive connection each, requests encoded once), first for ``--warmup`` seconds that are not counted,
then for ``--duration`` seconds. Reported: requests/s and rows/s, p50 and p99 latency, and
the mean rows per dynamic batch (from the server's /metrics), and where the CPU went over the
measured seconds: the fronts' CPU per request (utime + stime from /proc/PID/stat of the front
processes), and the cores used by the fronts, by the replicas and by the load generator (this
process). The load generator runs on the same machine and takes its share of the cores.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .loadgen import LoadError, run_closed_loop
from .procstat import children_of, process_cpu_s
from .ranks import usage
from .report import machine_line

START_TIMEOUT_S = 180.0


def write_checkpoint(directory: Path, workload: str, hidden: int) -> None:
    """Commit step 0 of ``workload``'s freshly initialised model into ``directory``."""
    from ..checkpoint import CheckpointManager, CheckpointMeta, model_fingerprint
    from ..workloads import build_workload

    model = build_workload(workload, hidden=hidden).model
    settings = {"workload": workload, "hidden": hidden, "dtype": "float32", "seed": 0}
    meta = CheckpointMeta(0, 0, workload, 1, "local", model_fingerprint(model), settings)
    CheckpointManager(directory).save(0, {"model": model.state_dict()}, meta)


def _start(args, replicas: int, checkpoint: str, fronts: int = 1
           ) -> tuple[subprocess.Popen, str, str]:
    """Start `gradsync serve`; returns the process, its URL and the model's name."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradsync", "serve", "--checkpoint-dir", checkpoint, "--port",
         "0", "--replicas", str(replicas), "--frontends", str(fronts),
         "--max-batch", str(args.max_batch),
         "--max-delay-ms", str(args.max_delay_ms), "--threads", str(args.threads),
         "--max-request-rows", str(max(args.rows, 1024))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, line = time.monotonic() + START_TIMEOUT_S, ""
    while not line and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit(f"gradsync bench: serve did not start:\n{proc.communicate()[1][-2000:]}")
    # "gradsync serve: MODEL step N on http://HOST:PORT (K replicas)"
    return proc, line.split(" on ")[1].split()[0], line.split()[2]


def _body(model: str, rows: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape),
                                   "datatype": "FP32", "data": rows.reshape(-1).tolist()}]}
                      ).encode()


def load(url: str, model: str, row_shape: list[int], args, sample=None) -> dict:
    """Run the closed loop against ``url`` (loadgen.py); returns requests/s, rows/s, p50/p99
    (ms). ``sample()``, if given, is called when the measured seconds begin and end."""
    host, port = _host_port(url)
    bodies = [_body(model, np.random.default_rng(k).random((args.rows, *row_shape),
                                                            dtype=np.float32))
              for k in range(args.clients)]
    try:
        result = run_closed_loop(host, port, f"/v2/models/{model}/infer", bodies,
                                 warmup=args.warmup, duration=args.duration, sample=sample)
    except LoadError as exc:
        raise SystemExit(f"gradsync bench: a client failed: {exc}") from None
    return {**result, "rows_per_s": result["requests_per_s"] * args.rows}


def _host_port(url: str) -> tuple[str, int]:
    """``http://HOST:PORT`` -> (HOST, PORT)."""
    host, port = url.split("//")[1].rsplit(":", 1)
    return host, int(port)


def _get(url: str, path: str) -> bytes:
    conn = http.client.HTTPConnection(*_host_port(url), timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def _mean_batch(url: str) -> float:
    text = _get(url, "/metrics").decode()
    values = {"sum": 0.0, "count": 0.0}  # over the model label (and one front's counts)
    for line in text.splitlines():
        for key in values:
            if line.startswith(f"gradsync_serve_batch_rows_{key}"):
                values[key] += float(line.rsplit(" ", 1)[1])
    return values["sum"] / values["count"] if values["count"] else 0.0


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) that process ``pid`` has used; 0 once it is gone."""
    try:
        return sum(process_cpu_s(pid))
    except OSError:
        return 0.0


def _tree(pid: int) -> tuple[list[int], list[int]]:
    """(the front processes, the replicas) of the server whose first front is ``pid``."""
    children = children_of()
    fronts, replicas, todo = [pid], [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            replica = b"gradsync.serve.replica" in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        (replicas if replica else fronts).append(child)
        todo += children.get(child, [])
    return fronts, replicas


class CpuSplit:
    """CPU seconds of the fronts, the replicas and this process (the load generator) between
    two calls; ``__call__`` is load()'s ``sample``."""

    def __init__(self, pid: int):
        self.fronts, self.replicas = _tree(pid)
        self.samples: list[tuple[float, float, float]] = []

    def __call__(self) -> None:
        # process_time: this process's CPU to the nanosecond (os.times counts 10 ms ticks, and
        # the asyncio generator may spend less than one in a short window)
        self.samples.append((sum(map(_cpu_s, self.fronts)), sum(map(_cpu_s, self.replicas)),
                             time.process_time()))

    def report(self, requests: int, seconds: float) -> dict:
        if len(self.samples) != 2:
            return {}
        (f0, r0, g0), (f1, r1, g1) = self.samples
        return {"front_cpu_us_per_request": 1e6 * (f1 - f0) / max(requests, 1),
                "front_cores": (f1 - f0) / seconds, "replica_cores": (r1 - r0) / seconds,
                "loadgen_cores": (g1 - g0) / seconds}


def measure(args, checkpoint: str, replicas: int, fronts: int = 1) -> dict:
    """One configuration: start the server, load it, stop it."""
    proc, url, model = _start(args, replicas, checkpoint, fronts)
    try:
        meta = _get_json(url, f"/v2/models/{model}")
        cpu = CpuSplit(proc.pid)
        result = load(url, model, meta["inputs"][0]["shape"][1:], args, cpu)
        result |= cpu.report(result["requests"], args.duration)
        result["mean_batch_rows"] = _mean_batch(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"replicas": replicas, "frontends": fronts, "model": model, **result}


def _get_json(url: str, path: str) -> dict:
    return json.loads(_get(url, path))


def write_plot(path: str, rows: list[dict], title: str) -> None:
    """Requests/s (left) and p50/p99 latency (right) against replicas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    n = [r["replicas"] for r in rows]
    left.plot(n, [r["requests_per_s"] for r in rows], marker="o")
    left.set(xlabel="replicas", ylabel="requests/s", title="throughput", xticks=n)
    left.set_ylim(bottom=0)
    right.plot(n, [r["p50_ms"] for r in rows], marker="o", label="p50")
    right.plot(n, [r["p99_ms"] for r in rows], marker="o", label="p99")
    right.set(xlabel="replicas", ylabel="latency, ms", title="latency", xticks=n)
    right.set_ylim(bottom=0)
    right.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="requests/s and latency of gradsync serve",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint-dir", help="serve this (default: a fresh model of --workload)")
    p.add_argument("--workload", default="digits-mlp")
    p.add_argument("--hidden", type=int, default=1024, help="digits-wide, synthetic-mlp")
    p.add_argument("--replicas", default="1,2,3", help="replica counts (per front), e.g. 1,2,4")
    p.add_argument("--frontends", default="1", help="front process counts, e.g. 1,2: each "
                   "replica count is measured with each")
    p.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    p.add_argument("--rows", type=int, default=1, help="rows per request")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds not counted")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.set_defaults(bench=main)


def main(args) -> int:
    try:
        counts = [int(n) for n in args.replicas.split(",")]
    except ValueError:
        return usage(f"--replicas {args.replicas!r}: expected numbers like 1,2,3")
    try:
        fronts = [int(n) for n in args.frontends.split(",")]
    except ValueError:
        return usage(f"--frontends {args.frontends!r}: expected numbers like 1,2")
    if min(counts) < 1 or min(fronts) < 1 or args.clients < 1 or args.rows < 1 \
            or args.duration <= 0 or args.warmup < 0:
        return usage("--replicas, --frontends, --clients and --rows must be >= 1, "
                     "--duration > 0, --warmup >= 0")
    print(f"# {' '.join(['gradsync', *sys.argv[1:]])}")
    print(f"# {machine_line()}")
    with tempfile.TemporaryDirectory(prefix="gradsync-bench-serve-") as tmp:
        checkpoint = args.checkpoint_dir
        if checkpoint is None:
            checkpoint = os.path.join(tmp, "ck")
            write_checkpoint(Path(checkpoint), args.workload, args.hidden)
        rows = []
        print(f"{'fronts':>6} {'replicas':>8} {'requests/s':>11} {'rows/s':>9} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'batch rows':>10} {'front us/req':>12} "
              f"{'cores: fronts':>13} {'replicas':>8} {'loadgen':>7}")
        for f in fronts:
            for n in counts:
                r = measure(args, checkpoint, n, f)
                rows.append(r)
                model = r["model"]
                print(f"{f:>6} {n:>8} {r['requests_per_s']:>11,.0f} {r['rows_per_s']:>9,.0f} "
                      f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['mean_batch_rows']:>10.1f} "
                      f"{r.get('front_cpu_us_per_request', 0):>12.0f} "
                      f"{r.get('front_cores', 0):>13.2f} {r.get('replica_cores', 0):>8.2f} "
                      f"{r.get('loadgen_cores', 0):>7.2f}", flush=True)
        if len(fronts) > 1:
            _print_speedup(rows, fronts[0])
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args) | {"bench": None},
                                               "machine": machine_line()}, indent=2) + "\n")
    if args.plot:
        write_plot(args.plot, [r for r in rows if r["frontends"] == fronts[0]],
                   f"gradsync serve, {model}, {args.clients} clients x {args.rows} row(s); "
                   f"{machine_line()}")
    return 0


def _print_speedup(rows: list[dict], base: int) -> None:
    """Requests/s of each front count over ``base`` fronts', at equal replicas per front."""
    first = {r["replicas"]: r["requests_per_s"] for r in rows if r["frontends"] == base}
    for r in rows:
        if r["frontends"] != base and first.get(r["replicas"]):
            print(f"# {r['frontends']} fronts / {base}, {r['replicas']} replicas each: "
                  f"{r['requests_per_s'] / first[r['replicas']]:.2f}x requests/s")
