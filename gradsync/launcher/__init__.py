"""Start the ranks of a job and supervise them until every one has ended.

    launch.py     ranks on this machine: the environment torchrun would give them, a free port
    supervise.py  the supervision shared with the lab: root-cause rank, grace, no orphans
    elastic.py    elastic supervision: a lost worker is reported, not fatal; replacements
    procs.py      the process primitives (sessions, PR_SET_PDEATHSIG, reaping)

No torch import anywhere here: a launcher must start fast.
"""

from .launch import LaunchError, check_port_free, find_free_port, launch
from .supervise import EXIT_TIMEOUT, SELF_EXPLAINED, LaunchResult, OnLine, run_processes

__all__ = ["EXIT_TIMEOUT", "LaunchError", "LaunchResult", "OnLine", "SELF_EXPLAINED",
           "check_port_free", "find_free_port", "launch", "run_processes"]
