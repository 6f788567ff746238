"""The digits CNN, elastic, written as a Horovod elastic user writes it.

Horovod's ``pytorch_mnist_elastic.py`` pattern (hvd.elastic.run, TorchState, ElasticSampler,
commit every few batches) with one line changed: ``import gradsync.horovod as hvd`` instead
of ``import horovod.torch as hvd``. Launch it with gradsync's elastic launcher, which hosts
the rendezvous store and may start a replacement::

    gradsync run --elastic -np 3 --min-np 2 --max-restarts 1 examples/horovod_elastic.py

Kill a worker while it trains (``kill -9 PID``): the others see a HorovodInternalError, roll
back to their last commit, form a new generation, and go on; the samples of the epoch that
nobody has trained on yet are cut over the new members. A replacement joins at a commit.
Rank 0 prints the test accuracy at the end.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

import gradsync.horovod as hvd  # was: import horovod.torch as hvd
from digits_ddp import DigitsCNN, accuracy, digits  # the model and data of the DDP example


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.025, help="per worker; scaled by size")
    parser.add_argument("--batches-per-commit", type=int, default=4)
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(hvd.rank())  # different on purpose: the state's first sync fixes it
    train_set, test_set = digits(train=True), digits(train=False)
    sampler = hvd.elastic.ElasticSampler(train_set, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    def on_reset():  # the learning rate follows the number of workers
        for group in optimizer.param_groups:
            group["lr"] = args.lr * hvd.size()

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, args.epochs):
            for i, (x, y) in enumerate(loader):  # this epoch's samples nobody trained on
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                state.train_sampler.record_batch(i, args.batch_size)
                state.batch += 1
                if state.batch % args.batches_per_commit == 0:
                    state.commit()
            if hvd.rank() == 0:
                print(f"epoch {state.epoch}: loss {loss.item():.4f} on {hvd.size()} "
                      "workers", flush=True)
            state.batch = 0
            state.train_sampler.set_epoch(state.epoch + 1)
            state.epoch += 1  # committed with the sampler's epoch: a roll-back agrees
            state.commit()

    state = hvd.elastic.TorchState(model, optimizer, train_sampler=sampler, epoch=0, batch=0)
    state.register_reset_callbacks([on_reset])
    train(state)
    if hvd.rank() == 0:
        print(f"test accuracy {accuracy(model, test_set):.4f} on {hvd.size()} workers",
              flush=True)


if __name__ == "__main__":
    main()
