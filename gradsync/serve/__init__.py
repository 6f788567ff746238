"""Serving a trained model data-parallel: `gradsync serve` (the Open Inference Protocol).

    protocol.py  the protocol's JSON: metadata, checking a request, writing the answer
    wire.py      the frames between the front process and a replica (no pickles)
    model.py     the newest committed checkpoint and its workload's model
    replica.py   a replica process: the model, answering frames
    replicas.py  starting and supervising replicas; retrying a dead one's work once
    batcher.py   dynamic batching, each batch split across the replicas
    metrics.py   Prometheus counters
    app.py       the HTTP routes (FastAPI)
    config.py    ServeConfig, from which the flags derive
    cli.py       `gradsync serve`

Nothing here imports torch.distributed: replicas never communicate with each other.
"""
