"""`gradsync serve` end to end: one server on a checkpoint that `gradsync train` wrote, spoken to
over HTTP (httpx) and by Triton's own client; bad input, a replica SIGKILLed mid-stream,
start-up errors, and SIGTERM.

The tests share one server (starting one imports torch in three processes: ~10 s here) and run
in file order; the last one shuts it down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from gradsync.serve.batcher import split_rows
from tests.distributed import scaled
from tests.helpers import PACKAGE, alive as _alive, children as _children
from tests.helpers import infer_until_stopped, serve_started, stop_serve
from tests.helpers import module_imports as _imports

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MODEL = "digits-mlp"
MAX_ROWS = 400  # the digits test set (360 rows) fits in one request
HUNG_S = 3.0  # --replica-timeout: a replica silent this long is killed and replaced

pytestmark = pytest.mark.timeout(120)


def _gradsync(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gradsync", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)




@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("serve") / "ck"
    run = subprocess.run([sys.executable, "-m", "gradsync", "train", "--arch", "local",
                          "--workers", "1", "--epochs", "2", "--checkpoint-dir", str(directory),
                          "--checkpoint-every", "45", "--no-progress"],
                         capture_output=True, text=True, env=ENV, cwd=REPO,
                         timeout=scaled(60))
    assert run.returncode == 0, run.stderr
    return directory


class Server:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url
        self.port = int(url.rsplit(":", 1)[1])
        self.http = httpx.Client(base_url=url, timeout=scaled(30))

    def infer(self, rows: np.ndarray, **extra) -> httpx.Response:
        body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.reshape(-1).tolist()}], **extra}
        return self.http.post(f"/v2/models/{MODEL}/infer", json=body)


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = _gradsync("serve", "--checkpoint-dir", str(checkpoint), "--port", "0",
                     "--replicas", "2", "--max-request-rows", str(MAX_ROWS),
                     "--replica-timeout", str(scaled(HUNG_S)))
    line = serve_started(proc, lambda: proc.communicate()[1])
    assert f"{MODEL} step 90 on http://127.0.0.1:" in line, line
    served = Server(proc, line.split(" on ")[1].split()[0])
    yield served
    served.http.close()
    stop_serve(proc)  # (a test failed before the last one stopped it)


@pytest.fixture(scope="module")
def evaluated(checkpoint) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, labels, logits) of the digits test set, from the checkpoint in this process."""
    from gradsync.checkpoint import CheckpointReader
    from gradsync.workloads import build_workload

    reader = CheckpointReader(checkpoint)
    state, _, _ = reader.load(reader.latest())
    workload = build_workload(MODEL)
    workload.model.load_state_dict(state["model"])
    x, y = workload.eval_set.tensors
    with torch.inference_mode():
        logits = workload.model.eval()(x)
    return x.numpy(), y.numpy(), logits.numpy()


def test_split_rows_covers_every_row_once():
    for rows in range(1, 30):
        for parts in range(1, 6):
            pieces = split_rows(rows, parts)
            sizes = [b - a for a, b in pieces]
            assert len(pieces) == min(rows, parts)
            assert pieces[0][0] == 0 and pieces[-1][1] == rows and sum(sizes) == rows
            assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))
            assert max(sizes) - min(sizes) <= 1


def test_serve_imports_no_torch_distributed():
    for path in (PACKAGE / "serve").rglob("*.py"):
        found = {m for m in _imports(path)
                 if m.startswith(("torch.distributed", "gradsync.comm", "mpi4py", "pickle"))}
        assert not found, f"{path.name} imports {found}"


@pytest.mark.slow
def test_health_metadata_and_inference(server, evaluated):
    http = server.http
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True, "replicas": 2}
    assert http.get(f"/v2/models/{MODEL}/ready").status_code == 200
    meta = http.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["versions"] == ["90"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == \
        [("logits", "FP32", [-1, 10]), ("class", "INT64", [-1])]
    x, _, logits = evaluated
    one = server.infer(x[:1], id="first")
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["id"] == "first" and body["model_name"] == MODEL
    out = {o["name"]: o for o in body["outputs"]}
    assert out["logits"]["shape"] == [1, 10] and out["class"]["shape"] == [1]
    np.testing.assert_allclose(out["logits"]["data"], logits[0], rtol=1e-5, atol=1e-5)
    assert out["class"]["data"] == [int(logits[0].argmax())]
    # A batch, its data nested, asking for the classes only.
    body = {"inputs": [{"name": "input", "shape": [5, 64], "datatype": "FP32",
                        "data": x[1:6].tolist()}], "outputs": [{"name": "class"}]}
    batch = http.post(f"/v2/models/{MODEL}/infer", json=body).json()
    assert [o["name"] for o in batch["outputs"]] == ["class"]
    assert batch["outputs"][0]["data"] == logits[1:6].argmax(1).tolist()
    body["inputs"][0]["data"] = x[1:6].reshape(-1).tolist()
    assert http.post(f"/v2/models/{MODEL}/versions/90/infer", json=body).json() == batch
    assert http.post(f"/v2/models/{MODEL}/versions/7/infer", json=body).status_code == 404


@pytest.mark.slow
def test_accuracy_over_http_equals_in_process(server, evaluated):
    """The test set in requests of 1 to 23 rows, 8 at a time, so that the server batches
    them together and splits the batches across both replicas: every request gets its own
    rows back."""
    x, y, logits = evaluated
    cuts = np.cumsum([1 + i % 23 for i in range(40)])
    cuts = [0, *cuts[cuts < len(x)].tolist(), len(x)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda ab: server.infer(x[ab[0]:ab[1]]),
                                zip(cuts, cuts[1:])))
    got = []
    for answer in answers:
        assert answer.status_code == 200, answer.text
        out = {o["name"]: o for o in answer.json()["outputs"]}
        got.append(np.asarray(out["logits"]["data"], np.float32).reshape(-1, 10))
    got = np.concatenate(got)
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == y).mean() == (logits.argmax(1) == y).mean() > 0.8
    metrics = server.http.get("/metrics").text
    for replica in ("0", "1"):  # both replicas computed
        assert f'gradsync_serve_replica_rows_total{{model="{MODEL}",replica="{replica}"}}' \
            in metrics


@pytest.mark.slow
def test_tritonclient_speaks_to_it(server, evaluated):
    import tritonclient.http as triton

    x, _, logits = evaluated
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL)
        assert client.get_model_metadata(MODEL)["inputs"][0]["shape"] == [-1, 64]
        for binary in (True, False):  # Triton's binary tensors, and plain JSON
            data = triton.InferInput("input", [4, 64], "FP32")
            data.set_data_from_numpy(x[10:14], binary_data=binary)
            result = client.infer(MODEL, [data])
            np.testing.assert_allclose(result.as_numpy("logits"), logits[10:14],
                                       rtol=1e-5, atol=1e-5)
            assert result.as_numpy("class").tolist() == logits[10:14].argmax(1).tolist()
    finally:
        client.close()


@pytest.mark.slow
def test_bad_input_is_a_4xx_json_error_and_serving_goes_on(server):
    http, url = server.http, f"/v2/models/{MODEL}/infer"
    good = np.zeros((1, 64), np.float32)

    def tensor(**change):
        t = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
        return json.dumps({"inputs": [{**t, **change}]})

    cases = [
        ("not json", url, "{inputs: oops", 400, "not JSON"),
        ("not an object", url, "[1, 2]", 400, "JSON object"),
        ("wrong shape", url, tensor(shape=[1, 63], data=[0.0] * 63), 400, "shape must be"),
        ("too few numbers", url, tensor(data=[0.0] * 10), 400, "holds 10 numbers"),
        ("strings", url, tensor(data=["a"] * 64), 400, "must be numbers"),
        ("wrong datatype", url, tensor(datatype="INT64"), 400, "datatype must be FP32"),
        ("unknown input", url, tensor(name="x"), 400, "unknown input"),
        ("empty", url, tensor(shape=[0, 64], data=[]), 400, "empty"),
        ("oversized", url, tensor(shape=[MAX_ROWS + 1, 64], data=[0.0] * 64 * (MAX_ROWS + 1)),
         413, "over the limit"),
        ("NaN", url, tensor(data=[float("nan")] * 64), 400, "NaN"),
        ("too large for FP32", url, tensor(data=[1e39] * 64), 400, "infinite"),
        ("unknown output", url, json.dumps({**json.loads(tensor()), "outputs": [{"name": "z"}]}),
         400, "unknown output"),
        ("unknown model", "/v2/models/nope/infer", tensor(), 404, "unknown model 'nope'"),
    ]
    for what, path, body, status, needle in cases:
        answer = http.post(path, content=body, headers={"content-type": "application/json"})
        assert answer.status_code == status, (what, answer.text)
        assert needle in answer.json()["error"], (what, answer.text)
    assert http.get("/v2/models/nope").status_code == 404
    assert "error" in http.get("/v2/no/such/route").json()
    assert server.infer(good).status_code == 200  # still serving
    assert 'code="400"' in http.get("/metrics").text


def _metric(server: Server, name: str) -> float:
    """The sum of a metric's series (over its labels)."""
    lines = server.http.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(name) and line[len(name)] in " {")


def _wait_for_replicas(server: Server, count: int, gone: int) -> None:
    deadline = time.monotonic() + scaled(60)
    while time.monotonic() < deadline:
        if server.http.get("/v2/health/ready").json().get("replicas") == count \
                and gone not in _children(server.proc.pid):
            return
        time.sleep(0.1)
    pytest.fail(f"no replacement for replica pid {gone}")


@pytest.mark.slow
def test_bench_serve_load_generator_and_plot(server, tmp_path, capsys):
    from gradsync.bench import serve as bench
    from gradsync.cli import main

    args = argparse.Namespace(clients=2, rows=3, duration=0.3, warmup=0.0)
    cpu = bench.CpuSplit(server.proc.pid)
    assert len(cpu.fronts) == 1 and len(cpu.replicas) == 2
    result = bench.load(server.url, MODEL, [64], args, cpu)
    assert result["requests"] > 0
    split = cpu.report(result["requests"], args.duration)
    assert split["front_cpu_us_per_request"] > 0 and split["loadgen_cores"] > 0, split
    assert result["rows_per_s"] == pytest.approx(3 * result["requests_per_s"])
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert bench._mean_batch(server.url) >= 1
    plot = tmp_path / "serve.png"
    bench.write_plot(str(plot), [{"replicas": 1, **result}, {"replicas": 2, **result}], "t")
    assert plot.stat().st_size > 0
    assert main(["bench", "serve", "--replicas", "1,x"]) == 2
    assert "--replicas '1,x'" in capsys.readouterr().err


@pytest.mark.slow
def test_hung_replica_is_killed_and_its_work_sent_elsewhere(server, evaluated):
    """A 2-row request is split across both replicas; the piece on a stopped one is sent to
    the other after --replica-timeout, and the stopped one is replaced."""
    x, _, logits = evaluated
    replicas = _children(server.proc.pid)
    os.kill(replicas[1], signal.SIGSTOP)
    answer = server.infer(x[20:22])
    assert answer.status_code == 200, answer.text
    got = np.asarray(answer.json()["outputs"][0]["data"]).reshape(-1, 10)
    np.testing.assert_allclose(got, logits[20:22], rtol=1e-5, atol=1e-5)
    _wait_for_replicas(server, 2, replicas[1])
    assert not _alive(replicas[1])
    assert _metric(server, "gradsync_serve_retries_total") == 1
    assert _metric(server, "gradsync_serve_replica_restarts_total") == 1


@pytest.mark.slow
def test_start_up_errors_are_one_line_and_exit_2(server, tmp_path):
    empty = tmp_path / "empty"
    (empty / "step-00000010.tmp").mkdir(parents=True)  # a save that never committed
    runs = [(_gradsync("serve", "--checkpoint-dir", str(empty), "--port", "0"),
             "nothing committed"),
            (_gradsync("serve", "--checkpoint-dir", str(empty), "--port", str(server.port)),
             "address already in use"),
            (_gradsync("serve", "--checkpoint-dir", str(empty), "--replicas", "0"),
             "--replicas must be at least 1")]
    for proc, needle in runs:
        out, err = proc.communicate(timeout=scaled(60))
        assert proc.returncode == 2, err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err


@pytest.mark.slow
def test_replica_sigkilled_mid_stream_every_request_answered(server, evaluated):
    x, _, logits = evaluated
    replicas = _children(server.proc.pid)
    assert len(replicas) == 2
    restarts = _metric(server, "gradsync_serve_replica_restarts_total")
    answered, stop = [], threading.Event()

    def client(offset: int) -> None:
        i = offset
        while not stop.is_set() or i < offset + 10:
            rows = x[i % 300:i % 300 + 3]
            answer = server.infer(rows)
            answered.append((answer.status_code, answer.text, i % 300))
            i += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, k * 50) for k in range(4)]
        deadline = time.monotonic() + scaled(30)
        while len(answered) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(replicas[0], signal.SIGKILL)
        _wait_for_replicas(server, 2, replicas[0])  # the stream goes on meanwhile
        stop.set()
        for f in futures:
            f.result()
    for status, text, i in answered:
        assert status == 200, text
        got = np.asarray(json.loads(text)["outputs"][0]["data"]).reshape(-1, 10)
        np.testing.assert_allclose(got, logits[i:i + 3], rtol=1e-5, atol=1e-5)
    assert not _alive(replicas[0])
    now = _children(server.proc.pid)
    assert len(now) == 2 and replicas[1] in now, now
    assert _metric(server, "gradsync_serve_replica_restarts_total") == restarts + 1


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    """SIGTERM during a stream of requests: each one the server took is answered 200; the
    ones sent after it stopped accepting fail to connect; exit 0, no replica left."""
    replicas = _children(server.proc.pid)
    rows = np.zeros((50, 64), np.float32)
    answers, stop = [], threading.Event()

    def client() -> None:
        infer_until_stopped(server.url, MODEL, rows, answers, stop)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client) for _ in range(4)]
        deadline = time.monotonic() + scaled(30)
        while len(answers) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        out, err = server.proc.communicate(timeout=scaled(30))
        stop.set()
        for f in futures:
            f.result()
    assert server.proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert set(answers) <= {200, None} and answers.count(200) >= 20, answers
    assert not any(_alive(pid) for pid in replicas)
