"""One TCP transfer between two lab hosts, for tests/test_lab.py.

    python -m tests._lab_transfer recv ADDR PORT NBYTES   # prints bytes and seconds as JSON
    python -m tests._lab_transfer send ADDR PORT NBYTES

The receiver times from the accepted connection to the last byte, so start-up of the two
interpreters is not counted. Both ends only talk inside the lab's namespaces.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from tests.distributed import scaled

CHUNK = 1 << 16


def recv(addr: str, port: int, nbytes: int) -> None:
    with socket.create_server((addr, port)) as server:
        print("ready", flush=True)
        server.settimeout(scaled(30))
        conn, _ = server.accept()
        with conn:
            t0 = time.perf_counter()
            got = 0
            buf = bytearray(CHUNK)
            while got < nbytes:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                got += n
            seconds = time.perf_counter() - t0
    print(json.dumps({"bytes": got, "seconds": seconds}), flush=True)


def send(addr: str, port: int, nbytes: int) -> None:
    payload = b"\0" * CHUNK
    deadline = time.monotonic() + scaled(10)
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=scaled(30))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with conn:
        left = nbytes
        while left > 0:
            left -= conn.send(payload[:min(left, CHUNK)])


if __name__ == "__main__":
    mode, addr, port, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    {"recv": recv, "send": send}[mode](addr, port, nbytes)
