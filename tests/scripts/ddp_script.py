"""A training script written for torch DDP, run under torchrun. The only change for gradsync
is the wrapper class (chosen by --wrapper so the test can run both)."""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradsync

parser = argparse.ArgumentParser()
parser.add_argument("--wrapper", choices=["gradsync", "ddp"], required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).double()
wrapper = gradsync.DataParallel if args.wrapper == "gradsync" else nn.parallel.DistributedDataParallel
model = wrapper(model)
g = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(96, 8, generator=g, dtype=torch.float64),
                     torch.randint(0, 2, (96,), generator=g))
sampler = DistributedSampler(data, shuffle=True, seed=3)
loader = DataLoader(data, batch_size=8, sampler=sampler)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for epoch in range(3):
    sampler.set_epoch(epoch)
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
torch.save(model.module.state_dict(), os.path.join(args.out, f"{args.wrapper}-{dist.get_rank()}.pt"))
dist.destroy_process_group()
