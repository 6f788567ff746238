"""Capture and restore every random number generator a training step touches.

An exact resume needs the generators to continue where they stopped: torch's CPU generator
(dropout, `torch.rand`, a `DataLoader`'s base seed), numpy's global generator and python's
`random` module (both used by data augmentation), and, when CUDA is in use, each device's
generator. Each rank has its own streams, so a trainer saves one such dict per rank (the
`per_rank` part of a checkpoint).

The captured dict holds only tensors, ints, floats, strings and None, so that it loads with
`torch.load(..., weights_only=True)`: numpy's and python's states are tuples of native
objects and would otherwise need an unrestricted unpickler.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

def capture_rng_state() -> dict[str, Any]:
    """Return the state of torch's, numpy's and python's global generators.

    Returns:
        `{"torch": ByteTensor, "numpy": {...}, "python": {...}}`, plus `"cuda"` (a list of
        ByteTensors, one per device) when CUDA has been initialised in this process.
        Checking `is_initialized` rather than `is_available` keeps a CPU run from creating
        a CUDA context just to read generators it never used.
    """
    # Legacy tuple form of the global RandomState: ("MT19937", keys (624,) uint32, pos,
    # has_gauss, cached_gaussian).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # python: (version, 625 ints below 2**32: 624 MT words plus the position, gauss_next).
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put the generators back into the state `capture_rng_state` returned.

    Args:
        state: a dict from `capture_rng_state`, possibly after a save/load round trip.

    Raises:
        KeyError: if `state` lacks the torch, numpy or python part.
    """
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"],
                         np_state["cached_gaussian"]))
    py_state = state["python"]
    internal = tuple(int(v) for v in py_state["internal"].tolist())
    random.setstate((py_state["version"], internal, py_state["gauss_next"]))
    if "cuda" in state:
        cuda_states = state["cuda"]
        if len(cuda_states) > torch.cuda.device_count():
            # Resuming a GPU run elsewhere (on CPU, say) is useful even though it cannot
            # continue the CUDA streams exactly; say so instead of refusing.
            log.warning("not restoring %d CUDA RNG states: this process sees %d devices",
                        len(cuda_states), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all(cuda_states)
