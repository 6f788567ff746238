"""A small CNN on scikit-learn's bundled digits, data-parallel, written as for torch's DDP.

The pytorch/examples DDP tutorial, with one line changed: the wrapper is
``gradsync.DataParallel`` instead of ``DistributedDataParallel``. It runs unchanged under
``gradsync run``, torchrun, or a lab of emulated hosts::

    gradsync run --nproc-per-node 2 examples/digits_ddp.py --epochs 8
    torchrun --nproc-per-node 2 examples/digits_ddp.py --epochs 8
    gradsync run --lab 3 --rate 1gbit examples/digits_ddp.py --epochs 8   # as root
    gradsync run --nproc-per-node 2 examples/digits_ddp.py --save digits_cnn.pt

Rank 0 prints the test accuracy (about 0.97 after 8 epochs); ``--save`` writes the trained
weights (a state_dict, for examples/export_and_serve.py).
"""

import argparse

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradsync


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


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        correct = (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--save", help="write the trained weights here (rank 0)")
    args = parser.parse_args()

    dist.init_process_group("gloo")            # RANK, WORLD_SIZE, MASTER_ADDR/PORT from the launcher
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = gradsync.DataParallel(DigitsCNN())  # was: DistributedDataParallel(DigitsCNN())
    train_set, test_set = digits(train=True), digits(train=False)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()                     # gradients averaged across workers here
            opt.step()
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}", flush=True)

    if rank == 0:
        print(f"test accuracy {accuracy(model.module, test_set):.4f} "
              f"on {dist.get_world_size()} workers", flush=True)
        if args.save:
            torch.save(model.module.state_dict(), args.save)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
