"""Rank 1 dies (SIGKILL) after one all_reduce while the others keep calling collectives:
run under mpiexec by tests/test_mpi.py, which checks how the job ends."""

import os
import signal

import torch

from gradsync import comm

comm.init_process_group()
t = torch.ones(1000)
comm.all_reduce(t)
if comm.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
for _ in range(100_000):
    comm.all_reduce(t, algorithm="native")
