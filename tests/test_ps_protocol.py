"""The Parameter Server against bad messages: every kind of malformed message from a raw "bad
worker" is rejected with an error that names the sender and the fault, no message kills the
server, and under async the other worker trains on; a NaN or Inf gradient is an error by
default and skipped on request.

One world of 3 processes (server 0, good worker 1, bad worker 2) runs one short PS session per
case (tests/distributed.py's run_checks), each on a fresh group of the same ranks, so that a
rejected stream cannot leak into the next case and the processes start once for all of them.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from gradsync.ps.receive import SLACK_BYTES
from tests.distributed import run_checks
from tests.helpers import BATCH, IN, OUT, LogCapture, global_batch, make_model

STEPS = 3
BAD = 2  # the bad worker's rank; the good one is 1, the server 0
BEYOND = "payload beyond the slack"
NUMEL = IN * 16 + 16 + 16 * 16 + 16 + 16 * OUT + OUT  # make_model's, all on server 0
NAN = float("nan")
_UNSENT: list = []  # the bad worker's sends that the server never takes, kept to the end


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _wire(values: torch.Tensor) -> torch.Tensor:
    """A PUSH payload as a worker sends it: the values' bytes, then END."""
    from gradsync.ps.protocol import END_BYTES

    return torch.cat([values.reshape(-1).view(torch.uint8),
                      torch.frombuffer(bytearray(END_BYTES), dtype=torch.uint8)])


def _bad_messages(case: str, numel: int) -> list[torch.Tensor]:
    """The messages (header, payload...) the bad worker sends for ``case`` at step 0."""
    from gradsync.ps.protocol import DTYPE_CODES, Header, Kind

    f64 = DTYPE_CODES[torch.float64]
    fields = dict(kind=Kind.PUSH, step=0, shard=0, numel=numel, version=0, sender=BAD, dtype=f64)
    payload = torch.full((numel,), 0.5, dtype=torch.float64)
    overrides = {"bad magic": {"magic": 0x1234}, "unknown kind": {"kind": 99},
                 "server's kind": {"kind": Kind.PARAMS}, "shard out of range": {"shard": 5},
                 "step out of range": {"step": 3}, "version out of range": {"version": 10**6},
                 "wrong sender": {"sender": 7}, "wrong end marker": {"end": 42}}
    header = Header(**{**fields, **overrides.get(case, {})}).encode()
    if case == "too long":
        return [torch.cat([header, torch.tensor([7])])]
    if case == "too short":
        return [header[:5]]
    if case == "payload in the header's place":
        return [_wire(payload)]
    if case in ("bad magic", "unknown kind", "server's kind", "wrong end marker"):
        return [header]  # the server believes nothing after such a header: no payload
    if case == "wrong dtype":
        header = Header(**{**fields, "dtype": DTYPE_CODES[torch.float32]}).encode()
        return [header, _wire(payload.float())]
    if case == "wrong length":
        return [Header(**{**fields, "numel": 7}).encode(), _wire(payload[:7])]
    if case == "payload too long":
        return [header, _wire(torch.cat([payload, payload[:5]]))]
    if case == "payload too short":
        return [header, _wire(payload[:-3])]
    if case == BEYOND:  # declared as it is sent, but longer than any slack: never received
        big = torch.zeros(numel + SLACK_BYTES // 8 + (1 << 17), dtype=torch.float64)
        return [Header(**{**fields, "numel": big.numel()}).encode(), _wire(big)]
    if case == "non-finite":
        payload[3], payload[10] = NAN, float("inf")
    return [header, _wire(payload)]


# case -> (Kind in the server's message, what the server says was wrong, status text the
# bad worker reads in the ERROR reply)
CASES = {
    # (the count is a lower bound: "at least 11 int64 fields" unless a byte of the 11th field
    # equals the random canary's; so only the sentence's start is asserted)
    "too long": ("PUSH", "the header is longer than the protocol's (at least ",
                 "longer than the protocol's"),
    "too short": ("PUSH", "the header is shorter than the protocol's", "shorter than"),
    "payload in the header's place": ("message", "the header is longer than the protocol's",
                                      "longer than"),
    "bad magic": ("message", "the header's magic number is 0x1234", "magic number"),
    "wrong end marker": ("PUSH", "the header's end marker is 0x2a", "end marker"),
    "unknown kind": ("message", "unknown message kind 99", "message kind is unknown"),
    "server's kind": ("PARAMS", "a worker does not send PARAMS messages", "kind"),
    "shard out of range": ("PUSH", "it names shard 5; this server holds shard 0", "shard"),
    "step out of range": ("PUSH", "step 3, expected step 0", "step is out of range"),
    "version out of range": ("PUSH", "it was computed on version 1000000 of the shard",
                             "version is out of range"),
    "wrong sender": ("PUSH", "the header names sender 7, not rank 2", "another sender"),
    "wrong dtype": ("PUSH", "its payload is float32; the shard is float64", "dtype"),
    "wrong length": ("PUSH", "its payload has 7 elements; the shard has", "payload size"),
    "payload too long": ("PUSH", "the payload is longer than its header declares",
                         "longer than"),
    "payload too short": ("PUSH", "the payload is shorter than its header declares",
                          "shorter than"),
    # 5 MiB beyond the shard, more than the receive's slack: gloo used to abort the server
    BEYOND: ("PUSH", f"its payload has {NUMEL + SLACK_BYTES // 8 + (1 << 17)} elements; "
                     f"the shard has {NUMEL}", "payload size"),
}


def _session(rank, group, case, consistency, nonfinite):
    """One PS session: server 0; worker 1 trains STEPS steps; worker 2 sends ``case`` at step
    0 (then, if the server still answers, trains on with worker 1)."""
    from gradsync import comm
    from gradsync.ps import PSArchitecture, PSProtocolError

    arch = PSArchitecture(1, consistency, 0, group, nonfinite=nonfinite)
    model = make_model()
    if rank == 0:
        capture = LogCapture()
        logger = logging.getLogger("gradsync.ps.server")
        logger.addHandler(capture)
        try:
            stats = arch.serve(model, _sgd)
            return ("served", stats, capture.lines)
        except PSProtocolError as exc:
            return ("stopped", str(exc), capture.lines)
        finally:
            logger.removeHandler(capture)
    try:
        ps_model, opt = arch.prepare(model, _sgd)
    except comm.CommError as exc:
        return ("lost", str(exc))
    first = 0
    if rank == BAD:
        from gradsync.ps.protocol import PAYLOAD_TAG, TAG

        for i, message in enumerate(_bad_messages(case, ps_model.layout.shard_numel(0))):
            tag = TAG if i == 0 else PAYLOAD_TAG  # a header, then its payload
            if case == BEYOND and i == 1:  # never asked for by the server: never completes
                _UNSENT.append(comm.isend(message, 0, group, tag))
            else:
                comm.send(message, 0, group, tag)
        ps_model._pushed = [True]  # noqa: SLF001 - pushed by hand; wait for the answer
        try:
            opt.step()
        except PSProtocolError as exc:
            return ("rejected", str(exc))
        first = 1
    try:
        for step in range(first, STEPS):
            x, y = global_batch(step, 2 * BATCH)
            w = rank - 1
            opt.zero_grad()
            nn.functional.mse_loss(ps_model(x[w * BATCH:(w + 1) * BATCH]),
                                   y[w * BATCH:(w + 1) * BATCH]).backward()
            opt.step()
        summary = arch.finish()
    except comm.CommError as exc:
        return ("lost", str(exc))
    return ("trained", summary["dropped_workers"],
            [p.detach().numpy().copy() for p in model.parameters()])


def _in_fresh_group(rank, world, *session):
    from gradsync import comm

    return _session(rank, comm.new_group([0, 1, 2]), *session)


# Async: each case drops the bad worker and the good one finishes. Skip (async and sync):
# the bad push updates nothing. A fault that stops a sync server leaves its good worker
# waiting until the server's process is gone (or the comm timeout): such a session ends a
# world, so the two of them run on two.
MALFORMED = [(case, "async", "error") for case in [*CASES, "non-finite"]]
SKIPPED = [("non-finite", "async", "skip"), ("non-finite", "sync", "skip")]
STOPPED = [("too long", "sync", "error"), ("non-finite", "sync", "error")]


def _world(sessions):
    checks = [(" ".join(s), _in_fresh_group, s) for s in sessions]
    return run_checks(checks, 3, timeout=220, comm_timeout=60)


@pytest.fixture(scope="module")
def sessions():
    return _world(MALFORMED + SKIPPED + STOPPED[:1])


@pytest.fixture(scope="module")
def stopped_by_nan():
    return _world(STOPPED[1:])


@pytest.mark.timeout(240)
def test_every_malformed_message_is_rejected_naming_sender_and_fault(sessions):
    """Async: each case drops the bad worker and the good one finishes; under sync the same
    fault stops the run with that error instead of a crash."""
    for session in MALFORMED:
        case = session[0]
        if case == "non-finite":
            kind, fault, status = ("PUSH", "", "NaN or Inf")
            said = "rank 2 pushed a non-finite gradient at step 0: 2 of its"
        else:
            kind, fault, status = CASES[case]
            said = f"rank 2 sent a malformed {kind} at step 0: {fault}"
        server, good, bad = sessions[" ".join(session)]
        role, stats, lines = server
        assert role == "served" and stats.rejected == 1 and stats.dropped == [BAD], (case, stats)
        assert any(said in line and "dropping rank 2" in line for line in lines), (case, lines)
        assert stats.updates == STEPS, (case, stats)  # the good worker's pushes, all applied
        assert good[:2] == ("trained", [BAD]), (case, good[:2])
        assert bad[0] == "rejected" and "rejected rank 2's message" in bad[1] \
            and status in bad[1], (case, bad)
    server, good, bad = sessions["too long sync error"]
    role, message, _ = server
    assert role == "stopped", message
    assert message.startswith("server 0: rank 2 sent a malformed PUSH at step 0: the header is "
                              "longer than the protocol's") \
        and message.endswith("a sync step cannot complete without rank 2"), message
    assert bad[0] == "rejected", bad
    assert good[0] == "lost" and "rank 0" in good[1], good


@pytest.mark.timeout(120)
def test_nonfinite_gradient_skipped_on_request_and_an_error_under_sync(sessions, stopped_by_nan):
    """skip (async and sync): the bad push updates nothing, both workers train on, sync
    replicas stay equal; error (sync, the default): the run stops naming rank and step."""
    for i, session in enumerate(SKIPPED):
        consistency = session[1]
        (role, stats, lines), good, bad = sessions[" ".join(session)]
        assert role == "served" and stats.rejected == 0 and stats.dropped == [], stats
        assert stats.skipped == 1 and stats.updates == (2 * STEPS - 1 if i == 0 else STEPS - 1)
        assert any("rank 2 pushed a non-finite gradient at step 0" in line
                   and "nonfinite='skip'" in line for line in lines), lines
        assert good[:2] == ("trained", []) and bad[:2] == ("trained", []), (good, bad)
        for a, b in zip(good[2], bad[2]):
            assert np.isfinite(a).all() and np.isfinite(b).all()
            if consistency == "sync":
                np.testing.assert_array_equal(a, b)
    (role, message, _), _, bad = stopped_by_nan["non-finite sync error"]
    assert role == "stopped" and "rank 2 pushed a non-finite gradient at step 0: 2 of its" \
        in message, message
    assert bad[0] == "rejected" and "NaN or Inf" in bad[1], bad


def test_validate_names_each_fault():
    from gradsync.ps.protocol import DTYPE_CODES, Header, Kind, Status, validate

    f64 = DTYPE_CODES[torch.float64]
    ok = dict(kind=Kind.PUSH, step=4, shard=1, numel=10, version=3, sender=2, dtype=f64)
    expect = dict(shard=1, numel=10, step=4, dtype=torch.float64, version=5, peer=2,
                  max_steps=6)
    assert validate(Header(**ok), **expect) == (Status.OK, "")
    cases = [({"version": 6}, Status.VERSION_OUT_OF_RANGE, "version 6"),
             ({"version": -1}, Status.VERSION_OUT_OF_RANGE, "version -1"),
             ({"step": 5}, Status.STEP_OUT_OF_RANGE, "step 5, expected step 4"),
             ({"dtype": 77}, Status.WRONG_DTYPE, "unknown dtype code 77"),
             ({"numel": 11}, Status.WRONG_SIZE, "11 elements"),
             ({"kind": Kind.DONE, "numel": 3}, Status.WRONG_SIZE, "it has none"),
             ({"kind": Kind.CHECKPOINT}, Status.BAD_KIND, "takes no checkpoints"),
             ({"sender": 3}, Status.WRONG_SENDER, "sender 3, not rank 2")]
    for change, status, text in cases:
        got = validate(Header(**{**ok, **change}), **expect)
        assert got[0] == status and text in got[1], (change, got)
    late = validate(Header(**ok), **{**expect, "max_steps": 4})
    assert late == (Status.STEP_OUT_OF_RANGE, "step 4 is past the run's 4 steps")


def test_server_config_is_validated():
    from gradsync.ps import ServerConfig

    assert ServerConfig().nonfinite == "error"  # NaN is never trained on silently
    for bad in ({"nonfinite": "ignore"}, {"consistency": "eventual"}, {"staleness": -1}):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
