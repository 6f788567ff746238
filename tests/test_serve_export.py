"""`gradsync serve` for any model (issue 23): torch.export programs (a CNN on images, FP32; a
small transformer on token ids, INT64), a user's module:factory filled from a checkpoint, and
the built-in stdlib-gpt, all four in one server; queried by Triton's own client (binary and
JSON tensors) and compared with the models' in-process outputs. Then every bad input kind,
and --frontends 2.

The end-to-end tests share one server (module-scoped, 1 replica per model) and run in file
order; the first tests need no server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

from tests.distributed import scaled
from tests.helpers import ENV, REPO, alive, children, in_process, serve_started, stop_serve

pytestmark = pytest.mark.timeout(120)

VOCAB, CONTEXT = 32, 8


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, image):  # (b, 1, 8, 8) -> (b, 10)
        h = nn.functional.max_pool2d(torch.relu(self.conv(image)), 2)  # (b, 4, 4, 4)
        return self.head(h.flatten(1))


def _lm() -> nn.Module:
    from gradsync.models.gpt import TinyGPT

    torch.manual_seed(1)
    return TinyGPT(vocab_size=VOCAB, context=CONTEXT, d_model=16, n_heads=2, n_layers=1).eval()


FACTORY = textwrap.dedent("""
    import torch

    def build():
        model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 10))
        model.example_input = torch.zeros(1, 64)  # one row: 64 FP32 numbers
        return model
""")


def _commit(directory: Path, workload: str, model: nn.Module, settings=None) -> None:
    from gradsync.checkpoint import CheckpointManager, CheckpointMeta, model_fingerprint

    meta = CheckpointMeta(5, 0, workload, 1, "local", model_fingerprint(model), settings)
    CheckpointManager(directory).save(5, {"model": model.state_dict()}, meta)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """The models, saved as a user would (programs, a factory's module and checkpoint, a
    stdlib-gpt checkpoint), and each one in process as the reference."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    cnn, lm = SmallCNN().eval(), _lm()
    batch = Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(cnn, (torch.randn(3, 1, 8, 8),),
                                          dynamic_shapes={"image": {0: batch}}),
                      root / "cnn.pt2")
    torch.export.save(torch.export.export(lm, (torch.randint(0, VOCAB, (3, CONTEXT)),),
                                          dynamic_shapes={"x": {0: batch}}), root / "lm.pt2")
    (root / "userpkg_serve.py").write_text(FACTORY)
    sys.path.insert(0, str(root))
    try:
        import userpkg_serve
        user = userpkg_serve.build()
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(2)
    for p in user.parameters():
        nn.init.normal_(p)
    _commit(root / "ck-user", "script", user)
    from gradsync.workloads import build_workload

    gpt = build_workload("stdlib-gpt").model.eval()
    _commit(root / "ck-gpt", "stdlib-gpt", gpt,
            {"workload": "stdlib-gpt", "hidden": 1024, "dtype": "float32", "seed": 0})
    return {"root": root, "cnn": cnn, "lm": lm, "user": user.eval(), "stdlib-gpt": gpt}


def _reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).float().numpy()


# --- no server ----------------------------------------------------------------------------

def test_program_signature_static_batch_in_chunks_and_refusals(models, tmp_path):
    from gradsync.serve.export import load_program
    from gradsync.serve.model import ServeError

    served = load_program(models["root"] / "lm.pt2")
    assert (served.input.name, served.input.datatype, served.input.shape) == \
        ("x", "INT64", (CONTEXT,))
    assert (served.output.name, served.output.datatype, served.output.shape) == \
        ("output", "FP32", (CONTEXT, VOCAB))
    # A program exported with a static batch of 2 computes 5 rows in chunks of 2, padded.
    cnn = models["cnn"]
    torch.export.save(torch.export.export(cnn, (torch.zeros(2, 1, 8, 8),)), tmp_path / "s.pt2")
    static = load_program(tmp_path / "s.pt2")
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(static.forward(x), cnn(x), rtol=1e-5, atol=1e-5)
    # A dynamic dimension other than the batch cannot be batched: refused, one line.
    lm = torch.export.export(models["lm"], (torch.zeros(2, 4, dtype=torch.int64),),
                             dynamic_shapes={"x": {0: Dim("b"), 1: Dim("s", max=CONTEXT)}})
    torch.export.save(lm, tmp_path / "d.pt2")
    with pytest.raises(ServeError, match="dim 1 of input 'x' is dynamic"):
        load_program(tmp_path / "d.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ServeError, match="cannot load program"):
        load_program(tmp_path / "junk.pt2")


def test_model_flags_parsed_once_and_bad_ones_are_one_line_exit_2(models, tmp_path, capfd):
    from gradsync.serve.model import ServeError
    from gradsync.serve.sources import ModelSource, parse_model

    root = models["root"]
    program = parse_model(f"vision={root / 'cnn.pt2'}", None, (), None)
    assert (program.kind, program.name) == ("program", "vision")
    factory = parse_model("pkg.models:build@ck", None, (1, 28, 28), "FP32")
    assert (factory.kind, factory.name, factory.path, factory.factory) == \
        ("factory", "build", "ck", "pkg.models:build")
    assert ModelSource.from_json(factory.to_json()) == factory
    with pytest.raises(ServeError, match="a factory's weights come from a checkpoint"):
        parse_model("pkg.models:build", None, (), None)
    cases = [(["--model", str(tmp_path / "none.pt2")], "no such file"),
             (["--model", "not a model"], "expected FILE.pt2"),
             (["--model", f"a={root / 'cnn.pt2'}", "--model", f"a={root / 'lm.pt2'}"],
              "two models are named 'a'"),
             ([], "nothing to serve"),
             (["--model", "m:f", "--input-shape", "1,x"], "--input-shape must be"),
             (["--model", "m:f", "--input-dtype", "FLOAT"], "--input-dtype must be one of")]
    for args, needle in cases:
        run = in_process(capfd, "serve", "--port", "0", *args)
        assert run.returncode == 2, (args, run.stderr)
        last = run.stderr.strip().splitlines()
        assert len(last) == 1 and needle in last[0], (args, run.stderr)


# --- one server, four models ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(models):
    root = models["root"]
    env = {**ENV, "PYTHONPATH": f"{REPO}{os.pathsep}{root}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradsync", "serve", "--port", "0", "--replicas", "1",
         "--model", f"cnn={root / 'cnn.pt2'}", "--model", f"lm={root / 'lm.pt2'}",
         "--model", f"user=userpkg_serve:build@{root / 'ck-user'}",
         "--checkpoint-dir", str(root / "ck-gpt"), "--max-request-rows", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    line = serve_started(proc, lambda: proc.communicate()[1])
    url = line.split(" on ")[1].split()[0]
    http = httpx.Client(base_url=url, timeout=scaled(30))
    yield proc, url, http, line
    http.close()
    stop_serve(proc)


@pytest.mark.slow
def test_index_metadata_and_readiness_per_model(server):
    proc, _, http, line = server
    assert "cnn version 1, lm version 1, user step 5, stdlib-gpt step 5" in line, line
    index = http.post("/v2/repository/index").json()
    assert [(m["name"], m["version"], m["state"]) for m in index] == \
        [("cnn", "1", "READY"), ("lm", "1", "READY"), ("user", "5", "READY"),
         ("stdlib-gpt", "5", "READY")]
    assert http.get("/v2/models").json() == {"models": ["cnn", "lm", "user", "stdlib-gpt"]}
    assert http.get("/v2/health/ready").json() == {"ready": True, "replicas": 4}
    meta = {name: http.get(f"/v2/models/{name}").json() for name in ("cnn", "lm", "user")}
    assert meta["cnn"]["inputs"] == [{"name": "image", "datatype": "FP32",
                                      "shape": [-1, 1, 8, 8]}]
    assert meta["cnn"]["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["lm"]["inputs"] == [{"name": "x", "datatype": "INT64", "shape": [-1, CONTEXT]}]
    assert meta["lm"]["outputs"][0]["shape"] == [-1, CONTEXT, VOCAB]
    assert meta["user"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    for name in ("cnn", "lm", "user", "stdlib-gpt"):
        assert http.get(f"/v2/models/{name}/ready").json() == {"ready": True, "replicas": 1}
    assert len(children(proc.pid)) == 4  # one replica per model


@pytest.mark.slow
def test_tritonclient_binary_and_json_equal_in_process(server, models):
    import tritonclient.http as triton

    rng = np.random.default_rng(0)
    inputs = {"cnn": ("image", rng.standard_normal((5, 1, 8, 8)).astype(np.float32), "FP32"),
              "lm": ("x", rng.integers(0, VOCAB, (4, CONTEXT)), "INT64"),
              "user": ("input", rng.standard_normal((3, 64)).astype(np.float32), "FP32")}
    client = triton.InferenceServerClient(url=server[1].split("//")[1])
    try:
        for name, (input_name, x, datatype) in inputs.items():
            expected = _reference(models[name], x)
            for binary in (True, False):
                tensor = triton.InferInput(input_name, list(x.shape), datatype)
                tensor.set_data_from_numpy(x, binary_data=binary)
                got = client.infer(name, [tensor]).as_numpy("output")
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5,
                                           err_msg=f"{name}, binary={binary}")
    finally:
        client.close()


@pytest.mark.slow
def test_stdlib_gpt_token_ids_in_logits_and_next_tokens_out(server, models):
    from gradsync.workloads import GPT_CONTEXT

    http = server[2]
    meta = http.get("/v2/models/stdlib-gpt").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "INT64",
                               "shape": [-1, GPT_CONTEXT]}]
    assert [(o["name"], o["shape"]) for o in meta["outputs"]] == \
        [("logits", [-1, GPT_CONTEXT, 256]), ("class", [-1, GPT_CONTEXT])]
    ids = np.frombuffer(b"def serve(self):\n    return 42\n" * 8, np.uint8)[:2 * GPT_CONTEXT]
    ids = ids.astype(np.int64).reshape(2, GPT_CONTEXT)
    answer = http.post("/v2/models/stdlib-gpt/infer", json={"inputs": [
        {"name": "input", "shape": [2, GPT_CONTEXT], "datatype": "INT64",
         "data": ids.tolist()}]})
    assert answer.status_code == 200, answer.text
    out = {o["name"]: o for o in answer.json()["outputs"]}
    expected = _reference(models["stdlib-gpt"], ids)
    got = np.asarray(out["logits"]["data"], np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert out["class"]["data"] == expected.argmax(-1).reshape(-1).tolist()


@pytest.mark.slow
def test_each_bad_input_kind_is_a_4xx_json_error(server):
    http = server[2]

    def post(model: str, body, headers=None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return http.post(f"/v2/models/{model}/infer", content=content,
                         headers={"content-type": "application/json", **(headers or {})})

    def ids(**change):
        return {"inputs": [{"name": "x", "shape": [1, CONTEXT], "datatype": "INT64",
                            "data": [1] * CONTEXT, **change}]}

    header = json.dumps({"inputs": [{"name": "x", "shape": [1, CONTEXT], "datatype": "INT64",
                                     "parameters": {"binary_data_size": 8 * CONTEXT}}]})
    short = header.encode() + b"\0" * (8 * CONTEXT - 8)
    cases = [
        ("unknown model", "nope", ids(), {}, 404, "unknown model 'nope'"),
        ("wrong datatype", "lm", ids(datatype="FP32"), {}, 400, "datatype must be INT64"),
        ("wrong shape", "lm", ids(shape=[1, CONTEXT + 1]), {}, 400, "shape must be"),
        ("element count", "lm", ids(data=[1] * 3), {}, 400, f"needs {CONTEXT}"),
        ("floats for ids", "lm", ids(data=[0.5] * CONTEXT), {}, 400, "must be integers"),
        ("beyond INT64", "lm", ids(data=[2 ** 64] * CONTEXT), {}, 400, "must be integers"),
        ("bad JSON", "lm", b"{inputs: oops", {}, 400, "not JSON"),
        ("binary size", "lm", short, {"inference-header-content-length": str(len(header))},
         400, f"must be {8 * CONTEXT} bytes of INT64"),
        ("unknown input", "cnn", {"inputs": [{"name": "x", "shape": [1, 1, 8, 8],
                                              "datatype": "FP32", "data": [0.0] * 64}]},
         {}, 400, "the model's input is 'image'"),
        ("unknown output", "lm", {**ids(), "outputs": [{"name": "class"}]}, {}, 400,
         "unknown output 'class'"),
    ]
    for what, model, body, headers, status, needle in cases:
        answer = post(model, body, headers)
        assert answer.status_code == status, (what, answer.text)
        assert needle in answer.json()["error"], (what, answer.text)
    # A token id past the vocabulary fails the model: 500 for that request alone.
    bad = post("lm", ids(data=[VOCAB + 5] * CONTEXT))
    assert bad.status_code == 500 and "the model failed" in bad.json()["error"], bad.text
    assert post("lm", ids()).status_code == 200  # still serving


@pytest.mark.slow
def test_metrics_are_labelled_by_model_and_sigterm_stops_all(server):
    proc, _, http, _ = server
    text = http.get("/metrics").text
    for name in ("cnn", "lm", "user", "stdlib-gpt"):
        assert f'gradsync_serve_rows_total{{model="{name}"}}' in text, name
        assert f'gradsync_serve_replicas_live{{model="{name}"}} 1.0' in text, name
    assert 'gradsync_serve_replica_rows_total{model="lm",replica="0"}' in text
    replicas = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=scaled(30))
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert not any(alive(pid) for pid in replicas)


@pytest.mark.slow
def test_two_fronts_share_one_port(models):
    """--frontends 2: a forked front beside the first, each with its own replica; many
    connections are all answered right; SIGTERM to the first stops both, nothing left."""
    root = models["root"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradsync", "serve", "--port", "0", "--replicas", "1",
         "--frontends", "2", "--model", f"cnn={root / 'cnn.pt2'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        line = serve_started(proc, lambda: proc.communicate()[1])
        assert "(1 replicas, 2 fronts)" in line, line
        url = line.split(" on ")[1].split()[0]
        kids = children(proc.pid)
        fronts = [pid for pid in kids if b"gradsync.serve.replica" not in
                  Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(kids) == 2 and len(fronts) == 1, kids  # a front and the first's replica
        every = [proc.pid, *kids, *children(fronts[0])]
        x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
        expected = _reference(models["cnn"], x)
        body = {"inputs": [{"name": "image", "shape": [2, 1, 8, 8], "datatype": "FP32",
                            "data": x.reshape(-1).tolist()}]}
        for _ in range(20):  # a new connection each: the kernel spreads them over fronts
            answer = httpx.post(f"{url}/v2/models/cnn/infer", json=body, timeout=scaled(30))
            got = np.asarray(answer.json()["outputs"][0]["data"]).reshape(2, 10)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=scaled(30))
        assert proc.returncode == 0 and "Traceback" not in err, err
        assert not any(alive(pid) for pid in every), every
    finally:
        stop_serve(proc)
