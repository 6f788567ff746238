"""gradsync/zero/buffers.py: the persistent buffers that stage 3's gathered buckets and the
stages 2-3 gradient buckets borrow (one process: no collective involved)."""

from __future__ import annotations

import torch

from gradsync.zero.buffers import FillBuffers, GatherBuffers, release_free_pages
from gradsync.zero.layout import shard_parameters


def test_a_view_saved_by_autograd_survives_borrowing_another_buffer():
    # The gatherer's situation: forward saves a view of the bucket's storage, the bucket is
    # freed (its buffer goes back), then gathered again into whichever buffer is free.
    flat = torch.zeros(6)
    storage = flat.untyped_storage()
    storage.resize_(0)
    pool = GatherBuffers(nbytes=64, limit=2)
    weight = torch.nn.Parameter(torch.empty(0))

    def gather(values):
        shell = pool.lend(storage)
        assert shell is not None and storage.nbytes() == 64 and shell.nbytes() == 0
        flat.copy_(values)
        weight.data = flat.view(2, 3)
        return shell

    shell = gather(torch.arange(6.0))
    x = torch.ones(4, 3, requires_grad=True)
    y = torch.nn.functional.linear(x, weight)  # saves weight (a view of flat's storage)
    weight.data = torch.empty(0)
    pool.take_back(storage, shell)
    assert storage.nbytes() == 0
    other = pool.lend(torch.empty(0).untyped_storage())  # someone else holds that buffer
    shell = gather(torch.arange(6.0))  # a second buffer, made on demand
    y.sum().backward()
    assert torch.equal(x.grad, torch.arange(6.0).view(2, 3).sum(0).expand(4, 3))
    pool.take_back(storage, shell)
    assert pool.made == 2 and other is not None
    assert pool.lend(torch.empty(0).untyped_storage()) is not None  # the free one again
    assert pool.lend(torch.empty(0).untyped_storage()) is None  # past the limit: resize
    assert pool.made == 2


def test_fill_buffers_lend_the_same_memory_again_and_fall_back_when_all_are_out():
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    buckets = shard_parameters(params, cap_bytes=1, size=2, rank=0)  # a bucket each
    fill = FillBuffers(buckets, count=2)
    a, b = fill.take(buckets[0]), fill.take(buckets[1])
    assert a.shape == buckets[0].flat.shape and a.data_ptr() != b.data_ptr()
    c = fill.take(buckets[2])  # both lent: a tensor of its own
    assert c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    fill.give_back(buckets[0])
    fill.give_back(buckets[2])  # its own: nothing to give back
    assert fill.take(buckets[2]).data_ptr() == a.data_ptr()


def test_release_free_pages_runs():
    release_free_pages()  # glibc's malloc_trim, or nothing without glibc
