"""Elastic training across hosts in the lab: from a host's failure to the next completed step.

    python -m benchmarks.bench_elastic_hosts                 # 10 trials of each failure
    python -m benchmarks.bench_elastic_hosts --trials 3 --failures link

A lab of 4 hosts at 1 Gbit (root): host 0 runs `gradsync rdzv --nnodes 3`, hosts 1-3 each
run an agent with 2 workers of tests/scripts/elastic_hosts.py (`gradsync run --elastic
--rdzv-endpoint`). Each trial is a fresh job: once a step >= 10 has completed, host 3 fails:

- ``kill``: every process of host 3 (its agent and workers) is SIGKILLed at once, so nobody
  reports the loss; the service sees it through the agent's and workers' silence;
- ``link``: host 3's interface is taken down (``ip link set ... down``): its processes live
  on, cut off; the survivors cut their own connections to it once it is declared lost;
- ``stop``: one worker of host 3 is stopped with SIGSTOP (alive, not stepping): its
  silence declares it lost, its agent SIGKILLs it; the host's other worker trains on.

Before the failures, one undisturbed job (``none``) gives the reference accuracy (the
final model on the script's data); each trial reports its accuracy beside it. The global
batch is kept when workers are lost, so a trial trains on the same global batches.

The recovery time is the first step completed after the failure by the survivors alone (any
of them; a step in flight may still complete with host 3's workers) minus the failure's time (one clock: the lab's hosts are namespaces of this machine). The survivors
must finish with exit 0 and the service too. Default settings: GRADSYNC_HEARTBEAT_S 0.5,
GRADSYNC_ELASTIC_LOST_S 3, GRADSYNC_TIMEOUT 300.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradsync.lab.cluster import up
from tests.elastic_hosts import Job

PORT = 29400


def trial(lab, failure: str, out: Path, epochs: int) -> tuple[float, float]:
    """(seconds from the failure to the next step, accuracy at the end); 0 s for "none"."""
    job = Job(out, epochs=epochs, nnodes="3", min_workers=2, pause_s=0.01)
    try:
        job.start_service(lab.hosts[0].addr, PORT, lab.exec_argv(0, []))
        for h in (1, 2, 3):
            job.start_host(2, lab.exec_argv(h, []))
        job.wait_step(10, 120)
        victim = lab.hosts[3]
        if failure == "none":
            t0 = None
        elif failure == "kill":
            t0 = job.kill_host(2)
        elif failure == "stop":
            t0 = job.stop_worker(2)
        else:
            t0 = time.time()
            subprocess.run(["ip", "-n", victim.ns, "link", "set", victim.ifname, "down"],
                           check=True)
        recovered = 0.0 if t0 is None else job.next_step_after(t0, 120, workers=6)
        service, codes = job.finish(300)
        if service != 0 or codes[:2] != [0, 0]:
            raise SystemExit(f"{failure}: service {service}, hosts {codes}\n{job.logs()}")
        accuracies = {r["accuracy"] for r in job.results().values()}
        if len(accuracies) != 1:
            raise SystemExit(f"{failure}: the workers end with accuracies {accuracies}")
        return recovered, accuracies.pop()
    finally:
        job.close()
        if failure == "link":
            subprocess.run(["ip", "-n", lab.hosts[3].ns, "link", "set", lab.hosts[3].ifname,
                            "up"], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--failures", nargs="+", default=["kill", "link", "stop"],
                        choices=["kill", "link", "stop"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--keep", action="store_true", help="keep each trial's logs")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {sys.version.split()[0]}; "
          f"4 lab hosts at 1gbit, 3 x 2 workers", flush=True)
    with up(4, "1gbit", procs_per_host=2) as lab:
        def run(failure: str) -> tuple[float, float]:
            out = Path(tempfile.mkdtemp(prefix="gradsync-bench-hosts-"))
            try:
                return trial(lab, failure, out, args.epochs)
            finally:
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)

        _, reference = run("none")
        print(f"none: accuracy {100 * reference:.2f} % (undisturbed)", flush=True)
        for failure in args.failures:
            times, gaps = [], []
            for i in range(args.trials):
                recovered, accuracy = run(failure)
                times.append(recovered)
                gaps.append(100 * abs(accuracy - reference))
                print(f"{failure} trial {i}: next step after {recovered:.2f} s, accuracy "
                      f"{100 * accuracy:.2f} %", flush=True)
            print(f"{failure}: median {statistics.median(times):.2f} s, max {max(times):.2f} "
                  f"s over {len(times)} trials; accuracy at most {max(gaps):.2f} points from "
                  f"the undisturbed run's", flush=True)


if __name__ == "__main__":
    main()
