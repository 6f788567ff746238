"""How many TCP segments each lab host resent during a command: the sign of a queue that
overflows (issue 29's incast, docs/benchmarks.md section 13).

    python -m benchmarks.lab_resent -- gradsync train --workload digits-wide --batch-size 32 \
        --hidden 1024 --lab 3 --procs-per-host 2 --rate 200mbit --arch ps --servers 1 \
        --steps 40 --no-progress

runs the command and, once a second while it runs, reads ``RetransSegs`` of
/proc/net/snmp inside every network namespace that appeared after it started (a lab's
hosts and switch: their counters start at zero), then prints each namespace's last count.
Needs root, as the lab does.
"""

from __future__ import annotations

import argparse
import subprocess


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def resent(ns: str) -> int | None:
    """The namespace's TCP RetransSegs, None if it is gone."""
    run = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                         capture_output=True, text=True)
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("Tcp:")]
    if run.returncode != 0 or len(rows) < 2:
        return None
    return int(rows[1][rows[0].index("RetransSegs")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    before = namespaces()
    last: dict[str, int] = {}
    proc = subprocess.Popen(command)
    while True:
        for ns in sorted(namespaces() - before):
            count = resent(ns)
            if count is not None:
                last[ns] = count
        try:
            proc.wait(timeout=args.every)
            break
        except subprocess.TimeoutExpired:
            continue
    for ns, count in sorted(last.items()):
        print(f"{ns:24s} {count:8d} TCP segments resent")
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
