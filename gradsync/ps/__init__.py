"""The Parameter-Server architecture: servers hold shards of the parameters and the optimizer;
workers push gradients and pull parameters (sync, async, or bounded staleness)."""

from .architecture import PSArchitecture
from .protocol import PSProtocolError
from .server import ParameterServer, ServerConfig, ServerStats
from .sharding import ShardLayout, shard_layout
from .worker import PSWorker, RemoteOptimizer

__all__ = ["PSArchitecture", "PSProtocolError", "PSWorker", "ParameterServer",
           "RemoteOptimizer", "ServerConfig", "ServerStats", "ShardLayout", "shard_layout"]
