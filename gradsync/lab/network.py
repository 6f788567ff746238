"""A lab's network: building the namespaces, bridge and shaped links that a planned
:class:`~gradsync.lab.cluster.Lab` names, and tearing all of it down, also after a crash.

Apart from ``cluster.py``, which plans labs and records them in the state directory. Takes
the lab by its fields (no import of ``Lab``: that module is above this one).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import threading

from . import cpu, netns


@contextlib.contextmanager
def _no_interrupts():
    """Defer Ctrl-C / SIGTERM while a teardown runs, so it is never left half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending signal fires here


def create(lab) -> None:
    """Build the namespaces, bridge and shaped links that the planned ``lab`` names."""
    netns.add_netns(lab.switch_ns)
    netns.add_bridge(lab.switch_ns, lab.bridge)
    prefix_len = str(ipaddress.IPv4Network(lab.subnet).prefixlen)
    for h in lab.hosts:
        netns.add_netns(h.ns)
        netns.add_veth(lab.switch_ns, h.port, h.ns, h.ifname)
        netns.ip("link", "set", h.port, "master", lab.bridge, "up", ns=lab.switch_ns)
        netns.shape(lab.switch_ns, h.port, h.rate)  # switch -> host
        netns.ip("addr", "add", f"{h.addr}/{prefix_len}", "dev", h.ifname, ns=h.ns)
        netns.ip("link", "set", h.ifname, "up", ns=h.ns)
        netns.shape(h.ns, h.ifname, h.rate)  # host -> switch
        if h.cgroup:
            cpu.create(h.cgroup, h.cpus)


def destroy(lab) -> None:
    """Remove everything of ``lab`` and its state file; safe to call more than once."""
    with _no_interrupts():
        # Anything named with the prefix is the lab's, also pieces a crashed `up` did not
        # record. A process still inside a namespace would keep it (and its links) alive
        # after `ip netns del`, so the lab's remaining processes are killed first.
        names = set(lab.namespaces())
        names.update(ns for ns in netns.list_netns() if ns.startswith(lab.prefix + "-"))
        for ns in sorted(names):
            for pid in netns.netns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            netns.del_netns(ns)
        for h in lab.hosts:  # after its processes were killed
            if h.cgroup:
                cpu.remove(h.cgroup)
        with contextlib.suppress(FileNotFoundError):
            lab.state_path.unlink()
