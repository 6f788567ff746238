"""The Horovod elastic example across lab hosts (issue 28): a host killed, the others finish.

    python -m benchmarks.bench_horovod_elastic_hosts               # one undisturbed job, one killed
    python -m benchmarks.bench_horovod_elastic_hosts --kill-after 3

A lab of 4 hosts at 1 Gbit (root): host 0 runs `gradsync rdzv --nnodes 3 --min-workers 2`,
hosts 1-3 each run `gradsync run --elastic --rdzv-endpoint HOST0:PORT --nproc-per-node 1
examples/horovod_elastic.py` (the script with `import gradsync.horovod as hvd`, unchanged).
In the second job every process of host 3 (its agent and its worker) is SIGKILLed once rank
0 has printed ``--kill-after`` epochs; the two survivors must roll back to their last
commit, form a new generation and finish with exit 0. It prints each job's test accuracy
(rank 0's line) and exit codes. The jobs are tests/elastic_hosts.Job's, with this script.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

from gradsync.bench.report import machine_line
from gradsync.lab.cluster import up
from tests import elastic_hosts
from tests.elastic_hosts import Job

PORT = 29410
SCRIPT = str(elastic_hosts.REPO / "examples" / "horovod_elastic.py")


class HorovodJob(Job):
    """Job's service and hosts, each host running the Horovod elastic example."""

    def start_host(self, nproc: int, prefix: list[str] = ()):
        proc = self._spawn(f"host-{len(self.hosts)}", [
            sys.executable, "-m", "gradsync", "run", "--elastic", "--rdzv-endpoint",
            self.endpoint, "--nproc-per-node", str(nproc), SCRIPT, "--epochs",
            str(self.epochs)], list(prefix))
        self.hosts.append(proc)
        return proc

    def epochs_printed(self) -> int:
        text = "".join(p.read_text() for p in self.out.glob("host-*.log"))
        return len(re.findall(r"epoch \d+: loss", text))

    def accuracy(self) -> str:
        text = "".join(p.read_text() for p in self.out.glob("host-*.log"))
        found = re.findall(r"test accuracy ([\d.]+) on (\d+) workers", text)
        return ", ".join(f"{a} on {n} workers" for a, n in found) or "none printed"


def job(lab, out: Path, epochs: int, kill_after: int | None) -> str:
    j = HorovodJob(out, epochs=epochs, nnodes="3", min_workers=2)
    try:
        j.start_service(lab.hosts[0].addr, PORT, lab.exec_argv(0, []))
        for h in (1, 2, 3):
            j.start_host(1, lab.exec_argv(h, []))
        if kill_after is not None:
            deadline = time.monotonic() + 300
            while j.epochs_printed() < kill_after:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no epoch {kill_after} within 300 s:\n{j.logs()}")
                time.sleep(0.1)
            j.kill_host(2)
        service, codes = j.finish(600)
        survivors = codes if kill_after is None else codes[:2]
        ok = service == 0 and all(c == 0 for c in survivors)
        return (f"service exit {service}, hosts {codes}, test accuracy {j.accuracy()}"
                f"{'' if ok else ' FAIL'}" + ("" if ok else "\n" + j.logs()))
    finally:
        j.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--kill-after", type=int, default=3, help="epochs printed before")
    args = parser.parse_args()
    print(f"# {machine_line()}")
    with up(4, "1gbit", name=f"hvdel-{PORT}") as lab:
        for kill in (None, args.kill_after):
            with tempfile.TemporaryDirectory(prefix="gradsync-hvd-elastic-") as tmp:
                what = "undisturbed" if kill is None else f"host 3 killed after {kill} epochs"
                print(f"{what}: {job(lab, Path(tmp), args.epochs, kill)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
