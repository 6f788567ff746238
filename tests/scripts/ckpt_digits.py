"""digits-mlp trained from a user's script as `gradsync train` trains it (same seeds, same
data order, same optimizer): All-Reduce (gradsync.DataParallel) or the Parameter Server
(gradsync.ps), with checkpoints on request. tests/test_ps_script.py and
tests/test_checkpoint_script.py compare it with the CLI and with itself:

    torchrun --nproc-per-node 3 tests/scripts/ckpt_digits.py --arch ps --steps 20 --out r.json
    torchrun --nproc-per-node 2 tests/scripts/ckpt_digits.py --arch allreduce --steps 20 \
        --checkpoint-dir ck --every 5 --resume --out r.json

The first worker writes ``--out``: the parameters' digest (the CLI summary's
``parameters_sha1``), the steps, the held-out accuracy the workers measured together, and
the Parameter Server's figures.
"""

import argparse
import json

import torch
from torch.utils.data import DataLoader

import gradsync
import gradsync.checkpoint
import gradsync.ps
from gradsync.data import ShardedSampler
from gradsync.train.loop import evaluate, parameters_digest
from gradsync.workloads import build_workload

parser = argparse.ArgumentParser()
parser.add_argument("--arch", choices=["allreduce", "ps"], required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--servers", type=int, default=1)
parser.add_argument("--consistency", default="sync")
parser.add_argument("--staleness", type=int, default=0)
parser.add_argument("--checkpoint-dir")
parser.add_argument("--every", type=int)
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()

group = gradsync.comm.init_process_group()
ps = (gradsync.ps.init(servers=args.servers, consistency=args.consistency,
                       staleness=args.staleness) if args.arch == "ps" else None)
workload = build_workload("digits-mlp", seed=0)  # the same model on every rank, servers too
model, batch = workload.model, workload.default_batch_size
opt = torch.optim.SGD(model.parameters(), lr=workload.default_lr, momentum=0.9)
workers, rank = (ps.num_workers, ps.worker_rank) if ps else (group.size, group.rank)
sampler = ShardedSampler(workload.train_set, workers, rank, seed=0) if rank >= 0 else None

ckpt, start = None, 0
if args.checkpoint_dir:
    ckpt = gradsync.checkpoint.Checkpointer(args.checkpoint_dir, model, opt, sampler=sampler,
                                            batch_size=batch, every=args.every, arch=ps,
                                            workload="digits-mlp")
    start = ckpt.start(resume=args.resume)  # every rank, servers too

if ps is not None and ps.is_server:
    ps.serve(model, opt, checkpoint=ckpt)
else:
    if ps is not None:
        opt, net, evaluators = ps.DistributedOptimizer(opt, model, checkpoint=ckpt), model, \
            ps.worker_group
    else:
        net, evaluators = gradsync.DataParallel(model), group
    loader = DataLoader(workload.train_set, batch_size=batch, sampler=sampler)
    step, epoch = start, ckpt.epoch if ckpt else 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            workload.loss_fn(net(x), y).backward()
            opt.step()
            step += 1
            if ckpt is not None:
                ckpt.step(step)
            if step >= args.steps:
                break
        epoch += 1
    figures = ps.shutdown() if ps is not None else {}
    accuracy = evaluate(model, workload, evaluators, batch)["accuracy"]
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"parameters_sha1": parameters_digest(model), "steps": step,
                       "eval_accuracy": accuracy, "ps": figures}, f)
gradsync.comm.destroy_process_group()
