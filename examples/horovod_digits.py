"""A small CNN on scikit-learn's bundled digits, written as a Horovod user writes it.

Horovod's ``pytorch_mnist.py`` pattern with one line changed: ``import gradsync.horovod as
hvd`` instead of ``import horovod.torch as hvd``. Launch it with gradsync's launcher (or
torchrun), or with MPI::

    gradsync run --nproc-per-node 2 examples/horovod_digits.py --epochs 8
    torchrun --nproc-per-node 2 examples/horovod_digits.py --epochs 8
    mpiexec -n 2 python examples/horovod_digits.py --epochs 8

Rank 0 prints the test accuracy (about 0.97 after 8 epochs), summed over every rank's share
of the test set with ``hvd.allreduce``.
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradsync.horovod as hvd  # was: import horovod.torch as hvd


class DigitsCNN(nn.Module):
    """(N, 1, 8, 8) images -> (N, 10) logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),    # (N, 16, 8, 8)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),   # (N, 32, 8, 8)
            nn.MaxPool2d(2))                              # (N, 32, 4, 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                  nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def digits(train: bool) -> TensorDataset:
    """The digits as (N, 1, 8, 8) floats in [0, 1] and labels; a fixed 80/20 split."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    keep = order[:cut] if train else order[cut:]
    return TensorDataset(x[keep], y[keep])


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
