"""The handle of an operation in flight, shared by collectives and point-to-point calls."""

from __future__ import annotations

from typing import Any, Callable


class Work:
    """Handle of an operation in flight; ``wait()`` blocks until it is done and returns its
    result (the reduced tensor, the gathered list, ...).

    Args:
        finish: completes the operation and returns its result; called once.
        poll: says whether the operation has finished, without waiting.
        group: the group whose ``finished_seq`` advances to ``seq`` on completion.
        keep: objects that must live until the operation is done (e.g. a send buffer).
    """

    def __init__(self, finish: Callable[[], object], poll: Callable[[], bool] | None = None,
                 group: Any = None, seq: int = 0, keep: object = None):
        self._finish = finish
        self._poll = poll
        self._done = False
        self._result: object = None
        self._group, self._seq = group, seq
        self._keep = keep

    def wait(self):
        if not self._done:
            self._result = self._finish()
            self._done = True
            self._keep = None
            if self._group is not None and self._seq > self._group.finished_seq:
                self._group.finished_seq = self._seq
        return self._result

    def is_completed(self) -> bool:
        """True once the operation has finished (without waiting for it)."""
        return self._done or (self._poll is not None and self._poll())

    def value(self):
        """The result (waits if needed): ``torch.futures.Future.value``'s name."""
        return self.wait()

    def then(self, callback: Callable[["Work"], object]) -> "Work":
        """A Work whose ``wait()`` finishes this one, then returns ``callback(self)``, as
        ``torch.futures.Future.then`` (the callback reads the result with ``value()``):
        e.g. a hook's decompression after its all-reduce."""
        def finish():
            self.wait()
            return callback(self)

        return Work(finish, poll=self.is_completed)
