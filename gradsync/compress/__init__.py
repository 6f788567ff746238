"""Communication hooks for DataParallel, and the gradient compressors built on them.

One file per idea: ``bucket`` (the hook contract: GradBucket, stats), ``default`` (the plain
averaging all-reduce), then one file per compressor, each beside its naive version.
"""

from .bucket import GradBucket, HookStats
from .default import HookState, allreduce_hook

__all__ = ["GradBucket", "HookState", "HookStats", "allreduce_hook"]
