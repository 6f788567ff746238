"""The Parameter-Server architecture: servers hold shards of the parameters and the optimizer;
workers push gradients and pull parameters (sync, async, or bounded staleness).

From a user's script: ``ps = gradsync.ps.init(servers=K)``, then ``ps.serve(model, opt)`` on
the servers and ``ps.DistributedOptimizer(opt, model)`` on the workers (``script.py``)."""

from .architecture import PSArchitecture
from .protocol import PSProtocolError
from .script import DistributedOptimizer, PSContext, init
from .server import ParameterServer, ServerConfig, ServerStats
from .sharding import ShardLayout, shard_layout
from .remote_optimizer import RemoteOptimizer
from .worker import PSWorker

__all__ = ["DistributedOptimizer", "PSArchitecture", "PSContext", "PSProtocolError",
           "PSWorker", "ParameterServer", "RemoteOptimizer", "ServerConfig", "ServerStats",
           "ShardLayout", "init", "shard_layout"]
