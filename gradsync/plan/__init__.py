"""`gradsync plan`: predict each configuration's step time for a model and a cluster, pick the
best one, and check the prediction against real runs.

    profile.py   measure once, locally: forward, backward, optimizer, when each gradient is
                 ready, the compressors' costs
    cluster.py   the cluster described: hosts, ranks per host, links, latency
    predict.py   the model: overlap of transfers with backward, all-reduce and PS costs
    hooks.py     top-k's and PowerSGD's hooks: encoding in backward, the rest after it
    shared.py    ranks that share one machine's cores: a message's hop, the CPU budget
    loaded.py    the compressors' cost on loaded cores (forked loopback worlds)
    machine.py   the shared-core constants of this machine (kept per machine)
    calibrate.py measure them: a short lab sweep (`gradsync plan --lab --calibrate`)
    cpuwindow.py one run's CPU per step over a window of its steps
    choice.py    the best configuration a run allows, and the line that says why
                 (`gradsync train --arch auto`; scripts: ``choose(measure(...), cluster)``)
    report.py    the ranking, the best one's flags, the scaling table and plot
    validate.py  run the configurations and print predicted vs measured
    cli.py       the command
"""

from .choice import Choice, choose
from .cluster import Cluster
from .profile import Profile, measure, measure_module

__all__ = ["Choice", "Cluster", "Profile", "choose", "measure", "measure_module"]
