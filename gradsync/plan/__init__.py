"""`gradsync plan`: predict each configuration's step time for a model and a cluster, pick the
best one, and check the prediction against real runs.

    profile.py   measure once, locally: forward, backward, optimizer, when each gradient is
                 ready, the compressors' costs
    cluster.py   the cluster described: hosts, ranks per host, links, latency
    predict.py   the model: overlap of transfers with backward, all-reduce and PS costs
    report.py    the ranking, the best one's flags, the scaling table and plot
    validate.py  run the configurations and print predicted vs measured
    cli.py       the command
"""
