"""Training throughput on synthetic data, written as a Horovod user writes a benchmark.

The shape of Horovod's ``pytorch_synthetic_benchmark.py`` (warm-up batches, then timed
iterations of a few batches each, the mean and a 95 % interval of samples per second) with
``import gradsync.horovod as hvd``. ``--wrapper dataparallel`` runs the same loop on
``gradsync.DataParallel`` instead of ``hvd.DistributedOptimizer``, to compare the two::

    gradsync run -np 2 examples/horovod_synthetic.py
    gradsync run -np 2 examples/horovod_synthetic.py --wrapper dataparallel
    gradsync run -H h0:1,h1:1,h2:1 examples/horovod_synthetic.py    # a 3-host lab (root)

Rank 0 prints each iteration's rate, the summary, and whether every rank ends with the
same parameters (one all-reduce of a checksum: Max equal to Min).
"""

import argparse
import statistics
import timeit

import torch
from torch import nn

import gradsync
import gradsync.horovod as hvd  # was: import horovod.torch as hvd
from gradsync.models import MLP


class SmallCNN(nn.Module):
    """A few convolutions on (b, 3, 32, 32) images (Horovod's default is ResNet-50; this
    one keeps a 2-core CPU busy for milliseconds, not seconds)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # (b, 32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (b, 64, 8, 8)
            nn.Flatten())
        self.head = nn.Linear(64 * 8 * 8, classes)

    def forward(self, x):
        return self.head(self.features(x))


def build(name: str, batch: int):
    """The model and one synthetic batch: (model, input, target)."""
    if name == "mlp":  # 1024 -> 2048 -> 2048 -> 10: 6.3 M parameters, 25 MB of gradients
        return MLP(1024, [2048, 2048], 10), torch.randn(batch, 1024), \
            torch.randint(0, 10, (batch,))
    return SmallCNN(), torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--num-warmup-batches", type=int, default=5)
    parser.add_argument("--num-batches-per-iter", type=int, default=5)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--fp16-allreduce", action="store_true")
    parser.add_argument("--use-adasum", action="store_true", help="refused: no Adasum")
    parser.add_argument("--wrapper", choices=["horovod", "dataparallel"], default="horovod")
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(0)
    model, data, target = build(args.model, args.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * hvd.size())
    if args.wrapper == "horovod":
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
        optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), compression=compression,
            op=hvd.Adasum if args.use_adasum else hvd.Average)
        net = model
    else:
        net = gradsync.DataParallel(model)  # broadcasts rank 0's parameters itself

    def benchmark_step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(data), target).backward()
        optimizer.step()

    def log(text: str):
        if hvd.rank() == 0:
            print(text, flush=True)

    log(f"model {args.model}, batch size {args.batch_size} per worker, {hvd.size()} workers, "
        f"{args.wrapper}{' with fp16 gradients' if args.fp16_allreduce else ''}")
    timeit.timeit(benchmark_step, number=args.num_warmup_batches)
    rates = []
    for it in range(args.num_iters):
        seconds = timeit.timeit(benchmark_step, number=args.num_batches_per_iter)
        rates.append(args.batch_size * args.num_batches_per_iter / seconds)
        log(f"iter #{it}: {rates[-1]:.1f} samples/sec per worker")
    mean = statistics.mean(rates)
    spread = 1.96 * statistics.stdev(rates) if len(rates) > 1 else 0.0
    log(f"samples/sec per worker: {mean:.1f} +-{spread:.1f}")
    log(f"total samples/sec on {hvd.size()} workers: {hvd.size() * mean:.1f} "
        f"+-{hvd.size() * spread:.1f}")
    checksum = torch.stack([sum(p.detach().double().sum() for p in model.parameters())])
    agree = torch.equal(hvd.allreduce(checksum, op=hvd.Max), hvd.allreduce(checksum, op=hvd.Min))
    log(f"replicas agree: {agree}")
    hvd.shutdown()


if __name__ == "__main__":
    main()
