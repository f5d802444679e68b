"""First-step compile time of the private backward: trace + analysis + rewrite + Inductor.

    python bench/compile_time.py [--seq 32 64 128] [--backend inductor|eager]

Runs each model in a fresh process with an empty Inductor cache so the numbers are cold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODELS = ["mnist_cnn", "transformer_layer", "lstm"]


def build(name: str, seq: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mnist_cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 8, 2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
        )
        return model, torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    if name == "transformer_layer":
        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
                self.head = nn.Linear(128, 10)

            def forward(self, x):
                return self.head(self.layer(x).mean(1))

        return Encoder(), torch.randn(64, 32, 128), torch.randint(0, 10, (64,))
    if name == "lstm":
        class TextLSTM(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(10000, 100)
                self.lstm = nn.LSTM(100, 100, batch_first=True)
                self.head = nn.Linear(100, 2)

            def forward(self, x):
                out, _ = self.lstm(self.embed(x))
                return self.head(out[:, -1])

        return TextLSTM(), torch.randint(0, 10000, (64, seq)), torch.randint(0, 2, (64,))
    raise ValueError(name)


def measure(name: str, seq: int, backend: str) -> dict:
    import torch.nn.functional as F

    from passes import analyze, capture, lower, private_backward
    from passes.rewrite import example_private_inputs

    model, x, y = build(name, seq)

    def loss(out, target):
        return F.cross_entropy(out, target, reduction="none")

    t0 = time.perf_counter()
    cap = capture(model, (x,), loss, (y,))
    t1 = time.perf_counter()
    analysis = analyze(cap)
    t2 = time.perf_counter()
    private = private_backward(cap, analysis)
    t3 = time.perf_counter()
    run = lower(private.graph_module, backend)
    inputs = example_private_inputs(cap)
    run(*inputs)
    t4 = time.perf_counter()
    run(*inputs)
    t5 = time.perf_counter()
    return {
        "model": name, "seq": seq, "nodes": len(cap.graph_module.graph.nodes),
        "trace_s": t1 - t0, "analysis_s": t2 - t1, "rewrite_s": t3 - t2,
        "lower_first_call_s": t4 - t3, "total_s": t4 - t0, "second_call_s": t5 - t4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.backend)))
        return
    runs = [(m, 0) for m in MODELS if m != "lstm"] + [("lstm", s) for s in args.seq]
    print("| model | seq | graph nodes | trace s | analysis s | rewrite s | Inductor + first run s | total s |")
    print("|---|---|---|---|---|---|---|---|")
    for model, seq in runs:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            out = subprocess.run(
                [sys.executable, __file__, "--backend", args.backend, "--child", model, str(seq)],
                capture_output=True, text=True, env=env, check=True,
            ).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"| {r['model']} | {r['seq'] or ''} | {r['nodes']} | {r['trace_s']:.1f} | {r['analysis_s']:.2f} | "
              f"{r['rewrite_s']:.1f} | {r['lower_first_call_s']:.1f} | {r['total_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
