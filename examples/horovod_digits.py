"""A small CNN on scikit-learn's bundled digits, written as a Horovod user writes it.

Horovod's ``pytorch_mnist.py`` pattern with one line changed: ``import gradsync.horovod as
hvd`` instead of ``import horovod.torch as hvd``. Launch it with gradsync's launcher (or
torchrun), or with MPI::

    gradsync run -np 2 examples/horovod_digits.py --epochs 8           # horovodrun's flags
    gradsync run -H h0:1,h1:1,h2:1 examples/horovod_digits.py        # a 3-host lab (root)
    torchrun --nproc-per-node 2 examples/horovod_digits.py --epochs 8
    mpiexec -n 2 python examples/horovod_digits.py --epochs 8

Rank 0 prints the test accuracy (about 0.97 after 8 epochs), summed over every rank's share
of the test set with ``hvd.allreduce``.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradsync.horovod as hvd  # was: import horovod.torch as hvd
from digits_ddp import DigitsCNN, digits  # the model and data of the DDP example


def test_accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Each rank scores its share of the test set; the counts are summed across ranks."""
    sampler = DistributedSampler(data, num_replicas=hvd.size(), rank=hvd.rank(),
                                 shuffle=False, drop_last=True)
    x, y = data.tensors[0][list(sampler)], data.tensors[1][list(sampler)]
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).sum()
    totals = hvd.allreduce(torch.stack([correct, torch.tensor(len(y))]), op=hvd.Sum,
                           name="accuracy")
    return totals[0].item() / totals[1].item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.025, help="per worker; scaled by size")
    parser.add_argument("--fp16-allreduce", action="store_true")
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(hvd.rank())  # different on purpose: broadcast_parameters fixes it
    train_set, test_set = digits(train=True), digits(train=False)
    sampler = DistributedSampler(train_set, num_replicas=hvd.size(), rank=hvd.rank(),
                                 shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    model = DigitsCNN()
    # Horovod's advice: scale the learning rate by the number of workers.
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, op=hvd.Average)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()                    # waits for the averaged gradients
        if hvd.rank() == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}", flush=True)

    accuracy = test_accuracy(model, test_set)
    if hvd.rank() == 0:
        print(f"test accuracy {accuracy:.4f} on {hvd.size()} workers", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
