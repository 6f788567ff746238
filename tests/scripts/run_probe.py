"""A rank of `gradsync run` that reports what it was given and fails when told.

    run_probe.py OUT [--fail-rank R --code C] [--collective]

Writes OUT/env-RANK.json (torchrun's variables, its pid, the restart count). With
--collective it joins the group and all-reduces its rank (the sum goes into the file). The
rank --fail-rank exits with --code on the first attempt (TORCHELASTIC_RESTART_COUNT 0); the
others then wait for a file nobody writes, so only the launcher can stop them.
"""

import argparse
import json
import os
import sys
import time

VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
        "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
        "OMP_NUM_THREADS")

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--fail-rank", type=int)
parser.add_argument("--code", type=int, default=7)
parser.add_argument("--collective", action="store_true")
args = parser.parse_args()

rank = int(os.environ["RANK"])
report = {name: os.environ.get(name) for name in VARS}
report["pid"] = os.getpid()
if args.collective:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    total = torch.tensor([rank])
    dist.all_reduce(total)
    report["sum"] = int(total)
    dist.destroy_process_group()
with open(os.path.join(args.out, f"env-{rank}.json"), "w") as f:
    json.dump(report, f)
print(f"probe rank {rank} restart {report['TORCHELASTIC_RESTART_COUNT']}", flush=True)
if rank == args.fail_rank and report["TORCHELASTIC_RESTART_COUNT"] == "0":
    print(f"probe rank {rank} fails", file=sys.stderr, flush=True)
    sys.exit(args.code)
if args.fail_rank is not None and report["TORCHELASTIC_RESTART_COUNT"] == "0":
    never = os.path.join(args.out, "never")
    while not os.path.exists(never):  # stopped by the launcher, not by a timer
        time.sleep(0.05)
