"""An emulated cluster on one Linux machine: hosts in network namespaces, links shaped by tc.

    from gradsync.lab import up, lab_launch
    with up(hosts=3, rate="200mbit") as lab:
        rc = lab_launch(lab, ["train", "--arch", "allreduce"])

See docs/lab.md. Needs root and iproute2 (`ip`, `tc`); no torch: the ranks import it.
"""

from .cluster import Host, Lab, current, down, get, status, up
from .netns import LabError, format_rate, parse_rate
from .run import lab_launch, run_command, train_in_lab

__all__ = ["Host", "Lab", "LabError", "current", "down", "format_rate", "get", "lab_launch",
           "parse_rate", "run_command", "status", "train_in_lab", "up"]
