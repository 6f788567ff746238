"""The human-readable summary rank 0 prints at the end of `gradsync train`.

The lines every run has come from here; the architecture that ran adds its own
(``summary_head``: how it synchronised, ``summary_lines``: its figures), so a new
architecture brings its lines along instead of a branch here.
"""

from __future__ import annotations

from .architecture import Architecture


def format_summary(s: dict, architecture: Architecture) -> str:
    """The summary ``s`` (from :func:`gradsync.train.loop.summarize`) as lines of text."""
    lines = [f"gradsync train: {s['workload']} on {s['workers']} workers "
             f"({architecture.summary_head(s)})",
             f"  steps              {s['steps']} ({s['epochs']} epochs, global batch "
             f"{s['global_batch']}, {s['parameters']:,} parameters)"]
    if "eval_perplexity" in s:
        lines.append(f"  eval loss          {s['eval_loss']:.4f} (perplexity "
                     f"{s['eval_perplexity']:.2f}, next-byte accuracy "
                     f"{100 * s['eval_accuracy']:.1f} %)")
    else:
        lines.append(f"  eval accuracy      {100 * s['eval_accuracy']:.2f} % (loss "
                     f"{s['eval_loss']:.4f})")
    if s.get("steps_run", 1) == 0:
        lines.append(f"  no step run        the checkpoint resumed was at step {s['steps']} "
                     "already")
        return "\n".join(lines)
    comm_pct = 100 * s["comm_wait_s"] / s["wall_s"] if s["wall_s"] else 0.0
    tail = min(20, s.get("steps_run") or 20)  # loop.py's summarize averages at most 20
    lines += [f"  train loss         {s['train_loss']:.4f} (mean of the last {tail} steps)",
              f"  throughput         {s['samples_per_s']:,.0f} samples/s in {s['wall_s']:.1f} s "
              f"(median step {s['step_time_ms_median']:.1f} ms)",
              f"  time               compute {s['compute_s']:.2f} s, waiting on communication "
              f"{s['comm_wait_s']:.2f} s ({comm_pct:.0f} %)",
              "  communicated       " + _communicated(s)]
    if "compute_s_per_worker" in s:
        lines.append(_stragglers(s))
    if s.get("compression", "none") != "none":
        lines.append(f"  compression        {s['compression']}: "
                     f"{s['compression_ratio']:.1f}x fewer gradient bytes than uncompressed"
                     + (f", {s['compress_s']:.2f} s compressing" if "compress_s" in s else ""))
    changes = s.get("elastic", {}).get("changes", [])
    if changes:
        lines.append(f"  membership         {len(changes)} change{'s' * (len(changes) > 1)}: "
                     + "; ".join(_change(c) for c in changes))
    if s.get("restarts"):
        lines.append(f"  restarts           {s['restarts']} (every rank started again from the "
                     "newest checkpoint)")
    skipped = s.get("nonfinite_skipped", 0)
    skipped = sum(skipped) if isinstance(skipped, list) else skipped
    if skipped:
        lines.append(f"  skipped updates    {skipped} (NaN or Inf gradients, --on-nonfinite skip)")
    return "\n".join(lines + architecture.summary_lines(s))


def _communicated(s: dict) -> str:
    sent = s["bytes_per_step_per_worker"]
    if sent is None:
        return "not measured (torch DDP)"
    shm = s.get("shm_bytes_per_step_per_worker") or 0
    if shm:
        return (f"{sent / 1e6:.3f} MB over the network + {shm / 1e6:.3f} MB through shared "
                "memory per step per worker")
    line = f"{sent / 1e6:.3f} MB sent per step per worker"
    if set(s.get("bucket_algorithms") or ()) == {"shm"}:
        # A comm that does not count its shared-memory bytes (group.stats.bytes_shm) yet.
        line += " (the gradients went through shared memory)"
    return line


def _stragglers(s: dict) -> str:
    """Per worker: its compute time, and how long the others waited for it."""
    line = "  per worker         " + "; ".join(
        f"{r}: compute {c:.2f} s (others waited {w:.2f} s for it)" for r, (c, w) in enumerate(
            zip(s["compute_s_per_worker"], s["waited_for_s_per_worker"])))
    named = "; ".join(f"worker {x['worker']} at {x['factor']:.2f}x the median compute"
                      for x in s["stragglers"])
    return line + "\n  stragglers         " + (named or "none (no worker above 1.2x the median)")


def _change(c: dict) -> str:
    """'member 2 left at step 37 (0.84 s)' for one elastic membership change."""
    who = [f"member{'s' * (len(c[k]) > 1)} {', '.join(map(str, c[k]))} {k}"
           for k in ("left", "joined") if c[k]]
    return f"{' and '.join(who)} at step {c['step']} ({c['recover_s']:.2f} s)"
