"""dpcompile.explain and `dpcompile explain`: the table reports what the compiler really did."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpcompile
from dpcompile.cli import main
from tests.dpcompile.models import dataset_for, model_for
from tests.export.helpers import compiled


class EinsumHeads(nn.Module):
    """A per-head weight: a bmm whose gradient is then permuted (no form-level rule)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3, 4))

    def forward(self, x):  # (B, T, H, d)
        return torch.einsum("bthd,hdp->bthp", x, self.w).flatten(1)


class WideAndLong(nn.Module):
    """The same linear shapes at T=1 (ghost), and a long sequence of narrow rows (materialized)."""

    def __init__(self):
        super().__init__()
        self.short = nn.Linear(64, 64)
        self.long = nn.Linear(2, 3)

    def forward(self, x, seq):  # (B, 64), (B, 30, 2)
        return self.short(x).sum(1) + self.long(seq).sum((1, 2))


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq", "embedding", "transformer", "lstm", "tied", "twice"])
def test_table_matches_the_plans_of_a_real_training_step(name):
    private, optimizer, (x, y) = compiled(name)
    optimizer.zero_grad()
    F.cross_entropy(private(x[:8]), y[:8]).backward()  # the step training really runs
    optimizer.step()
    used = {n: (p.strategy, p.uses, p.rules) for n, p in private._engine.plans().items()}
    count = private.compiled_graph_count
    explanation = dpcompile.explain(private, x[:8])
    assert private.compiled_graph_count == count  # the same compiled step, not a new one
    assert {r.name: (r.strategy, r.uses, r.rules) for r in explanation if r.name in used} == used
    assert explanation.strategies() == {n: s for n, (s, _, _) in used.items()}
    for row in explanation:
        assert row.name in str(explanation)


def test_strategies_follow_the_shapes():
    torch.manual_seed(0)
    explanation = dpcompile.explain(WideAndLong(), (torch.randn(4, 64), torch.randn(4, 30, 2)))
    assert explanation["short.weight"].strategy == "ghost"  # T=1: ‖a‖²‖g‖²
    assert explanation["long.weight"].strategy == "materialized"  # T=30 rows of 2x3
    assert explanation["short.weight"].rules == ["mm"]
    assert explanation["short.bias"].strategy == "dense" and explanation["short.bias"].rules == ["sum"]
    ghost = explanation["short.weight"]
    assert ghost.flops == ghost.ghost_flops < ghost.materialized_flops
    long = explanation["long.weight"]
    assert long.flops == long.materialized_flops < long.ghost_flops
    assert long.memory_bytes == 4 * 3 * 2 * 4  # B·p·d float32 per-sample gradients


def test_tied_shared_frozen_and_fallback():
    tied = dpcompile.explain(model_for("tied"), dataset_for("tied")[0][:8])
    row = tied["embed.weight"]
    assert row.shared_with == ["out.weight"] and row.uses == 2
    assert sorted(row.rules) == ["embedding", "mm"] and "embedding" in row.strategy
    assert len(tied) == 1  # one tensor, one row

    twice = dpcompile.explain(model_for("twice"), dataset_for("twice")[0][:8])
    assert twice["lin.weight"].uses == 2 and twice["lin.weight"].shared_with == []

    frozen = dpcompile.explain(model_for("frozen"), dataset_for("frozen")[0][:8])
    assert frozen["net.0.weight"].strategy == "frozen"
    assert "net.0.weight" not in frozen.strategies()

    fallback = dpcompile.explain(EinsumHeads(), torch.randn(3, 4, 2, 3))
    row = fallback["w"]
    assert row.fallback and row.strategy == "dense"
    assert row.rules == ["bmm>vmap:aten.permute.default"]
    assert "bmm -> vmap (permute)" in str(fallback) and "(vmap fallback)" in str(fallback)


def test_code_on_request():
    x = dataset_for("mlp")[0][:8]
    assert dpcompile.explain(model_for("mlp"), x).code is None
    code = dpcompile.explain(model_for("mlp"), x, code=True).code
    assert "private backward" in code and "def forward" in code and "aten.mm" in code


def test_explain_the_exported_step():
    private, _, (x, y) = compiled("tied")
    explanation = dpcompile.explain(private, (x[:8], y[:8]), loss_fn=nn.CrossEntropyLoss(), code=True)
    program = dpcompile.export(private, (x[:8], y[:8]), loss_fn=nn.CrossEntropyLoss())
    meta = dpcompile.artifact.metadata(program)
    assert explanation.graph == "exported step"
    assert explanation.strategies() == meta["step"]["norm_strategies"]
    assert "private step" in explanation.code


def test_padding_bucket_is_reported():
    private, _, (x, _) = compiled("mlp")
    explanation = dpcompile.explain(private, x[:5])
    assert explanation.batch_size == 5 and explanation.compiled_batch_size == 8
    assert "compiled at 8 rows" in str(explanation)


def test_to_dict_is_json():
    data = dpcompile.explain(model_for("cnn"), dataset_for("cnn")[0][:4]).to_dict()
    again = json.loads(json.dumps(data))
    assert again["rows"][0]["name"] == "conv.weight" and again["rows"][0]["shape"] == [4, 1, 3, 3]


def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        dpcompile.explain(lambda x: x, torch.randn(3, 2))
    with pytest.raises(TypeError, match="input tensors"):
        dpcompile.explain(nn.Linear(2, 2), [torch.randn(3, 2), "text"])


# ---- the command line ---------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(x)


def make_small_net():
    return SmallNet()


def test_cli_demo_table(capsys):
    assert main(["explain", "mnist-cnn", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "conv1.weight" in out and "fc2.bias" in out and "strategy" in out


def test_cli_factory_json_and_code(capsys):
    assert main(["explain", "tests.export.test_explain:make_small_net", "--input-shape", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data["rows"]] == ["fc.weight", "fc.bias"]
    assert data["rows"][0]["strategy"] == "ghost"
    assert main(["explain", "tests.export.test_explain:SmallNet", "--input-shape", "5", "--code"]) == 0
    assert "def forward" in capsys.readouterr().out


def test_cli_file_and_tokens(tmp_path, capsys):
    source = tmp_path / "tokens_model.py"
    source.write_text(
        "from torch import nn\n"
        "class Bag(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.embed = nn.EmbeddingBag(50, 4)\n"
        "        self.head = nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.embed(x))\n"
    )
    argv = ["explain", f"{source}:Bag", "--input-shape", "6", "--dtype", "int64", "--vocab-size", "50"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "embed.weight" in out and "embedding_bag" in out


def test_cli_errors(capsys):
    assert main(["explain", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["explain", "tests.export.test_explain:SmallNet"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["explain", "tests.export.test_explain:missing", "--input-shape", "5"]) == 2
    assert main(["explain", "mlp", "--input-shape", "a,b"]) == 2
    assert main(["explain", "--list"]) == 0
    assert "transformer" in capsys.readouterr().out


def test_cli_reports_models_that_cannot_be_private(capsys):
    assert main(["explain", "tests.export.test_explain:make_batchnorm", "--input-shape", "3"]) == 1
    assert "cannot be trained privately" in capsys.readouterr().err


def make_batchnorm():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
