"""Export the trained digits CNN with torch.export, serve it, and query it as a client would.

After training (examples/digits_ddp.py --save digits_cnn.pt)::

    python examples/export_and_serve.py export digits_cnn.pt digits_cnn.pt2
    gradsync serve --model digits=digits_cnn.pt2 --port 8000 &
    python examples/export_and_serve.py query http://127.0.0.1:8000 digits

``export`` writes a program whose batch dimension is dynamic, so the server batches any
number of rows; the input's name, shape and datatype travel inside the program.
``query`` sends the test images through tritonclient (the Open Inference Protocol, binary
tensors) and prints the served accuracy and the largest difference from the model run here.
"""

import argparse

import numpy as np
import torch

from digits_ddp import DigitsCNN, digits


def export(weights: str, program: str) -> None:
    model = DigitsCNN()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    example = torch.zeros(2, 1, 8, 8)               # (batch, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(exported, program)
    print(f"wrote {program}")


def query(url: str, name: str, weights: str | None) -> None:
    import tritonclient.http as http

    x, y = digits(train=False).tensors
    client = http.InferenceServerClient(url.removeprefix("http://"))
    meta = client.get_model_metadata(name)
    request = http.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
    request.set_data_from_numpy(x.numpy(), binary_data=True)
    reply = client.infer(name, [request])
    logits = reply.as_numpy(meta["outputs"][0]["name"])  # (N, 10)
    print(f"served accuracy {(logits.argmax(1) == y.numpy()).mean():.4f} on {len(y)} images")
    if weights:
        model = DigitsCNN()
        model.load_state_dict(torch.load(weights, weights_only=True))
        with torch.no_grad():
            here = model.eval()(x).numpy()
        print(f"largest difference from the model run here {np.abs(logits - here).max():.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="trained weights -> a torch.export program")
    p.add_argument("weights")
    p.add_argument("program")
    p = sub.add_parser("query", help="ask a running `gradsync serve` about the test images")
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("--weights", help="also compare with these weights run here")
    args = parser.parse_args()
    if args.command == "export":
        export(args.weights, args.program)
    else:
        query(args.url, args.model, args.weights)


if __name__ == "__main__":
    main()
