"""The digits CNN of examples/digits_ddp.py on the Parameter Server: servers hold the
parameters and the optimizer, workers push gradients and pull parameters.

    gradsync run --nproc-per-node 3 examples/digits_ps.py --servers 1          # 1 server, 2 workers
    gradsync run --nproc-per-node 4 examples/digits_ps.py --servers 2 --consistency ssp --staleness 2
    gradsync run --nproc-per-node 3 examples/digits_ps.py --compression fp16

Every rank runs this script; ``gradsync.ps.init`` makes the first ``--servers`` ranks the
servers. ``sync`` is SGD on the global batch (the same result as All-Reduce); ``async`` and
``ssp`` let fast workers run ahead. The first worker prints the test accuracy (about 0.97
after 8 epochs in sync mode) and the Parameter Server's figures.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

import gradsync
from digits_ddp import DigitsCNN, accuracy, digits  # the model and data of the DDP example
from gradsync.data import ShardedSampler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--consistency", default="sync", choices=["sync", "async", "ssp"])
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--compression", default="none", help="none, fp16, bf16, topk:RATIO")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    gradsync.comm.init_process_group()
    ps = gradsync.ps.init(servers=args.servers, consistency=args.consistency,
                          staleness=args.staleness, compression=args.compression)
    torch.manual_seed(0)                   # the same initial model on every rank
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if ps.is_server:
        ps.serve(model, opt)               # until every worker has shut down
        return

    opt = ps.DistributedOptimizer(opt, model)   # pushes in backward, pulls in step()
    train_set, test_set = digits(train=True), digits(train=False)
    sampler = ShardedSampler(train_set, ps.num_workers, ps.worker_rank, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    with ps:                               # shutdown() at the end tells the servers
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    if ps.worker_rank == 0:
        figures = ps.shutdown()
        print(f"test accuracy {accuracy(model, test_set):.4f} on {ps.num_workers} workers "
              f"and {len(ps.server_ranks)} servers ({args.consistency})", flush=True)
        print(f"parameter server: {sum(figures['server_updates'])} updates, "
              f"{figures['bytes_pushed_per_step_per_worker'] / 1e3:.0f} kB pushed per step "
              f"per worker, servers busy {sum(figures['server_busy_s']):.2f} s", flush=True)


if __name__ == "__main__":
    main()
