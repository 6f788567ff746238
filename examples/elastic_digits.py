"""The digits CNN of examples/digits_ddp.py, elastic: a lost worker does not stop the run.

Launch it with gradsync's elastic launcher, which hosts the rendezvous store (so losing any
worker, rank 0 included, loses nothing) and may start a replacement::

    gradsync run --elastic --nproc-per-node 3 --min-workers 2 --max-restarts 1 \\
        examples/elastic_digits.py --epochs 8

Kill a worker while it trains (``kill -9 PID``): the survivors form a new group in about a
tenth of a second, take the model and optimizer of the newest step any of them finished,
and go on; the rest of the epoch is cut over them with the same global batch. The
replacement joins at a step boundary. The last rank 0 prints the test accuracy and the
membership changes.
"""

import argparse

import torch
from torch import nn

import gradsync.elastic
from digits_ddp import DigitsCNN, accuracy, digits  # the model and data of the DDP example


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="per worker at the start; the global batch stays the same")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    world = gradsync.elastic.init()          # this worker's membership (from the launcher)
    torch.manual_seed(0)
    train_set, test_set = digits(train=True), digits(train=False)
    x, y = train_set.tensors                 # (N, 1, 8, 8), (N,)
    state = gradsync.elastic.State(
        world, DigitsCNN(), lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9),
        dataset_len=len(y), batch_size=args.batch_size)

    @gradsync.elastic.run                    # called again after each membership change
    def train(state):
        for epoch in range(state.epoch, args.epochs):
            for indices, weight in state.batches():   # this worker's share of the step
                state.optimizer.zero_grad()
                loss = nn.functional.cross_entropy(state.model(x[indices]), y[indices])
                (loss * weight).backward()   # weight: shares of a step may differ in size
                state.optimizer.step()
                state.commit()               # a step boundary: the state survives from here

    train(state)
    if state.rank == 0:
        print(f"test accuracy {accuracy(state.module, test_set):.4f} on {state.size} workers; "
              f"membership changes: {len(state.changes)}", flush=True)


if __name__ == "__main__":
    main()
