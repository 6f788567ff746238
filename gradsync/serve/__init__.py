"""Serving models data-parallel: `gradsync serve` (the Open Inference Protocol).

    protocol.py  the protocol's JSON: metadata, checking a request, writing the answer
    wire.py      the frames between the front process and a replica (no pickles), datatypes
    sources.py   what --model and --checkpoint-dir name, parsed once
    model.py     the newest committed checkpoint and its workload's model; Served
    export.py    a user's torch.export program, or module:factory plus a checkpoint
    replica.py   a replica process: one model, answering frames
    replicas.py  supervising replicas, restarts backed off; a dead one's work retried once
    batcher.py   dynamic batching, each batch split across the replicas
    metrics.py   Prometheus counters
    app.py       the HTTP routes (FastAPI), one endpoint per model
    frontends.py --frontends N: forked fronts accepting on one socket
    limits.py    what one client may hold: a request's head and body bounded in size and time
    config.py    ServeConfig, from which the flags derive
    cli.py       `gradsync serve`

Nothing here imports torch.distributed: replicas never communicate with each other.
"""
