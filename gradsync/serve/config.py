"""`gradsync serve`'s configuration; its flags are derived from these fields (flags.py), but
for the repeatable --model, which cli.py adds (a list is no flag type of flags.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..flags import flag_meta as _help
from .wire import DATATYPES


@dataclass
class ServeConfig:
    """Serve models over the Open Inference Protocol (KServe v2)."""

    checkpoint_dir: str | None = field(default=None, metadata=_help(
        "a `gradsync train --checkpoint-dir`: its newest committed checkpoint is served; "
        "with a --model module:function, that model's weights come from it instead"))
    models: tuple[str, ...] = ()  # --model, repeatable (cli.py); parsed by sources.py
    input_shape: str | None = field(default=None, metadata=_help(
        "one input row's shape, e.g. 1,28,28, for a --model module:function whose module "
        "has no example_input tensor attribute"))
    input_dtype: str | None = field(default=None, metadata=_help(
        f"that input's datatype: {', '.join(DATATYPES)}"))
    replicas: int = field(default=2, metadata=_help(
        "replica processes holding each model, per front"))
    frontends: int = field(default=1, metadata=_help(
        "front processes accepting on the one port, each with its own --replicas per model "
        "and batcher: requests/s grows with cores while one front's loop is the bound"))
    host: str = field(default="127.0.0.1", metadata=_help("address to listen on"))
    port: int = field(default=8000, metadata=_help("port to listen on (0: a free one, "
                                                   "printed at start)"))
    max_batch: int = field(default=64, metadata=_help(
        "rows at which a dynamic batch closes at once"))
    max_delay_ms: float = field(default=2.0, metadata=_help(
        "longest a batch waits for more requests after its first, in ms"))
    max_request_rows: int = field(default=1024, metadata=_help(
        "most rows one request may carry; larger ones are refused (413)"))
    threads: int = field(default=1, metadata=_help("torch threads per replica"))
    replica_timeout: float = field(default=30.0, metadata=_help(
        "seconds a replica may take for a piece of work before it is killed and replaced"))
    client_timeout: float = field(default=10.0, metadata=_help(
        "seconds a client may take to send a request's line and headers, or stay silent "
        "while sending its body (then 408, connection closed)"))
    max_connections: int = field(default=1000, metadata=_help(
        "open connections and requests in progress beyond which requests get 503"))

    def __post_init__(self) -> None:
        self.models = tuple(self.models or ())
        for name in ("replicas", "frontends", "max_batch", "max_request_rows", "threads",
                     "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be between 0 and 65535, got {self.port}")
        if not 0 <= self.max_delay_ms <= 60_000:  # (also false for NaN)
            raise ValueError(f"--max-delay-ms must be between 0 and 60000, "
                             f"got {self.max_delay_ms}")
        if not 0 < self.replica_timeout <= 3600:
            raise ValueError(f"--replica-timeout must be a positive number up to 3600, "
                             f"got {self.replica_timeout}")
        if not 0 < self.client_timeout <= 3600:
            raise ValueError(f"--client-timeout must be a positive number up to 3600, "
                             f"got {self.client_timeout}")
        if self.input_dtype is not None and self.input_dtype not in DATATYPES:
            raise ValueError(f"--input-dtype must be one of {', '.join(DATATYPES)}, "
                             f"got {self.input_dtype!r}")
        self.row_shape()  # (raises on a bad --input-shape)

    def row_shape(self) -> tuple[int, ...]:
        """--input-shape as numbers (empty when not given)."""
        if not self.input_shape:
            return ()
        try:
            dims = tuple(int(d) for d in self.input_shape.split(","))
        except ValueError:
            dims = ()
        if not dims or min(dims) < 1:
            raise ValueError(f"--input-shape must be positive numbers like 1,28,28, "
                             f"got {self.input_shape!r}")
        return dims
