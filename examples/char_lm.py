"""A character-level transformer language model: data-parallel, compressed gradients,
checkpoints, and a resume that continues exactly where the run stopped.

    gradsync run --nproc-per-node 2 examples/char_lm.py --steps 200 --ckpt lm-ckpt
    # ... interrupted, or wanting more steps: continue from the newest checkpoint
    gradsync run --nproc-per-node 2 examples/char_lm.py --steps 400 --ckpt lm-ckpt --resume
    # serve the newest checkpoint (build_model is the factory; example_input its input)
    PYTHONPATH=examples gradsync serve --model lm=char_lm:build_model@lm-ckpt

The text is a Python source file (``--text``; default: the standard library's argparse.py),
read as bytes: ids 0-255. Gradients cross the network in bfloat16 (``--compression``; a
communication hook, as DDP's ``bf16_compress_hook``, which runs here unchanged too). A cast
keeps no state between steps, so the resumed run equals the uninterrupted one bit for bit;
rank 0 prints a digest of the parameters to show it.
"""

import argparse
import hashlib
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gradsync
from gradsync.checkpoint import CheckpointError, Checkpointer
from gradsync.compress.spec import make_hook
from gradsync.data import ShardedSampler

CONTEXT, VOCAB = 64, 256


class CharLM(nn.Module):
    """(N, CONTEXT) int64 byte ids -> (N, CONTEXT, VOCAB) next-byte logits."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(CONTEXT, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)
        # Causal: position t sees positions <= t only.
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT),
                             persistent=False)
        self.example_input = torch.zeros(1, CONTEXT, dtype=torch.int64)  # for gradsync serve

    def forward(self, ids):
        h = self.embed(ids) + self.position[: ids.shape[1]]  # (N, T, width)
        h = self.blocks(h, mask=self.mask[: ids.shape[1], : ids.shape[1]], is_causal=True)
        return self.head(h)                                  # (N, T, VOCAB)


def build_model() -> CharLM:
    """The factory `gradsync serve` calls; the checkpoint's weights are loaded into it."""
    torch.manual_seed(0)
    return CharLM()


class Chunks(Dataset):
    """Windows of CONTEXT + 1 bytes: (input ids, the ids one byte later)."""

    def __init__(self, text: bytes):
        self.data = torch.tensor(list(text), dtype=torch.int64)

    def __len__(self):
        return (len(self.data) - 1) // CONTEXT

    def __getitem__(self, i):
        window = self.data[i * CONTEXT: i * CONTEXT + CONTEXT + 1]
        return window[:-1], window[1:]


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:16]


def main():
    import argparse as stdlib_argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=stdlib_argparse.__file__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--compression", default="bf16", help="none, fp16, bf16, powersgd:R")
    parser.add_argument("--ckpt", help="checkpoint directory")
    parser.add_argument("--every", type=int, default=50, help="save every this many steps")
    parser.add_argument("--resume", action="store_true", help="continue from the newest")
    parser.add_argument("--overwrite", action="store_true", help="replace what --ckpt holds")
    args = parser.parse_args()

    gradsync.comm.init_process_group()
    model = gradsync.DataParallel(build_model())
    hook = make_hook(args.compression, model.group)
    if hook is not None:
        model.register_comm_hook(*hook)
    with open(args.text, "rb") as f:
        data = Chunks(f.read())
    sampler = ShardedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ckpt = None
    step = 0
    rank = model.group.rank
    if args.ckpt:
        ckpt = Checkpointer(args.ckpt, model, opt, sampler=sampler,
                            batch_size=args.batch_size, every=args.every)
        try:  # model, optimizer, data position and RNG put back, agreed by every rank
            step = ckpt.start(resume=args.resume, overwrite=args.overwrite)
        except CheckpointError as exc:  # locked, or a fresh run over checkpoints: every rank
            if rank == 0:
                print(f"char_lm: {exc}", file=sys.stderr)
            sys.exit(2)
    epoch = ckpt.epoch if ckpt else 0
    while step < args.steps:
        sampler.set_epoch(epoch)              # (a resumed sampler keeps its position)
        for ids, target in loader:
            opt.zero_grad()
            logits = model(ids)               # (N, CONTEXT, VOCAB)
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
            loss.backward()
            opt.step()
            step += 1
            if ckpt:
                ckpt.step(step)               # saves when due
            if rank == 0 and step % 50 == 0:
                print(f"step {step}: loss {loss.item():.3f}", flush=True)
            if step == args.steps:
                break
        epoch += 1
    if rank == 0:
        print(f"final loss {loss.item():.4f} parameters {digest(model.module)}", flush=True)
    if ckpt:
        ckpt.close()


if __name__ == "__main__":
    main()
