"""dpcompile.export / save / load: the exported private step equals the live one."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile.artifact import FORMAT_VERSION, METADATA_FILE, ArtifactError, metadata
from tests.export.helpers import D, compiled, max_difference

CE = nn.CrossEntropyLoss()


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def export_save_load(private, batch, tmp_path, loss_fn=CE):
    program = dpcompile.export(private, batch, loss_fn=loss_fn)
    path = dpcompile.save(tmp_path / "step.pt2", program)
    return program, dpcompile.load(path)


@pytest.mark.parametrize("name", ["mlp", "cnn", "embedding", "transformer", "lstm", "tied", "twice", "frozen", "raw"])
def test_loaded_step_equals_live_step(name, tmp_path):
    private, _, (x, y) = compiled(name)
    batch = (x[:8], y[:8])
    program, step = export_save_load(private, batch, tmp_path)
    live = private.private_step(batch, loss_fn=CE, seed=11)
    loaded = step(batch, seed=11)
    direct = program.module()(*step.example_inputs()[:5], torch.tensor(11))
    trainable = [n for n, p in private.named_parameters() if p.requires_grad]
    assert list(live["update"]) == trainable
    assert max_difference(live["update"], loaded["update"]) < 1e-12
    assert max_difference(loaded["update"], direct["update"]) == 0
    torch.testing.assert_close(loaded["per_sample_loss"], live["per_sample_loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loaded["loss"], live["loss"], rtol=1e-12, atol=1e-12)
    # a different seed gives different noise, the same clipped sums
    other = step(batch, seed=12)
    assert max_difference(other["update"], loaded["update"]) > 1e-3


def test_float32_step(tmp_path):
    private, _, (x, y) = compiled("mlp", dtype=torch.float32)
    batch = (x[:8], y[:8])
    _, step = export_save_load(private, batch, tmp_path, loss_fn=ce)
    assert max_difference(step(batch, seed=3)["update"], private.private_step(batch, loss_fn=ce, seed=3)["update"]) < 1e-6


@pytest.mark.parametrize("options", [
    {"max_grad_norm": [0.3, 0.2, 0.4, 0.1]},
    {"clipping": "adaptive", "adaptive_clipping": {"count_noise_std": 4.0}},
    {"loss_reduction": "sum"},
])
def test_clipping_modes_and_reductions(options, tmp_path):
    private, _, (x, y) = compiled("mlp", **options)
    batch = (x[:8], y[:8])
    _, step = export_save_load(private, batch, tmp_path)
    live = private.private_step(batch, loss_fn=CE, seed=5)
    assert max_difference(step(batch, seed=5)["update"], live["update"]) < 1e-12
    privacy = step.metadata["privacy"]
    assert privacy["noise_std"] == pytest.approx(private.privacy.noise_std)
    assert privacy["clipping"] == private.privacy.clipping
    assert step.metadata["step"]["denominator"] == (1.0 if options.get("loss_reduction") == "sum" else 8.0)


def test_sigma_zero_update_equals_one_optimizer_step(tmp_path):
    lr = 0.5
    private, optimizer, (x, y) = compiled("cnn", sigma=0.0, lr=lr)
    program = dpcompile.export(private, (x[:8], y[:8]), loss_fn=ce)
    # 6 real rows, padded with 2 copies masked out
    padded = (torch.cat([x[:6], x[:2]]), torch.cat([y[:6], y[:2]]))
    mask = torch.tensor([1.0] * 6 + [0.0] * 2, dtype=D)
    params = {n: p.detach().clone() for n, p in private.named_parameters()}
    buffers = dict(private.module.named_buffers())
    exported = program.module()(params, buffers, (padded[0],), (padded[1],), mask, torch.tensor(0))

    optimizer.zero_grad()
    F.cross_entropy(private(x[:6]), y[:6]).backward()
    optimizer.step()
    for name, p in private.named_parameters():
        torch.testing.assert_close((params[name] - p.detach()) / lr, exported["update"][name], rtol=1e-9, atol=1e-12)
    assert private.privacy.steps == 1


def test_mask_equals_dropping_rows():
    private, _, (x, y) = compiled("embedding")
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1])
    live_masked = private.private_step((x[:8], y[:8]), loss_fn=CE, seed=4, mask=mask)
    keep = mask.bool()
    live_dropped = private.private_step((x[:8][keep], y[:8][keep]), loss_fn=CE, seed=4)
    assert max_difference(live_masked["update"], live_dropped["update"]) < 1e-12
    program = dpcompile.export(private, (x[:8], y[:8]), loss_fn=CE)
    params = {n: p.detach() for n, p in private.named_parameters()}
    exported = program.module()(params, {}, (x[:8],), (y[:8],), mask.to(D), torch.tensor(4))
    assert max_difference(exported["update"], live_dropped["update"]) < 1e-12


def test_live_step_changes_nothing():
    private, optimizer, (x, y) = compiled("mlp")
    before = {n: p.detach().clone() for n, p in private.named_parameters()}
    private.private_step((x[:8], y[:8]), loss_fn=CE, seed=0)
    assert all(p.grad is None for p in private.parameters())
    assert all(torch.equal(before[n], p) for n, p in private.named_parameters())
    assert private.privacy.steps == 0 and not private._engine.accumulator


def test_metadata_round_trips(tmp_path):
    private, optimizer, (x, y) = compiled("mlp", accountant="rdp", target_delta=1e-6)
    for _ in range(3):  # some history for the accountant
        optimizer.zero_grad()
        F.cross_entropy(private(x[:8]), y[:8]).backward()
        optimizer.step()
    program = dpcompile.export(private, (x[:8], y[:8]), loss_fn=CE)
    meta = metadata(program)
    path = dpcompile.save(tmp_path / "step.pt2", program)
    step = dpcompile.load(path)
    assert step.metadata == meta
    with zipfile.ZipFile(path) as archive:  # also next to the program, readable without torch
        name = next(n for n in archive.namelist() if n.endswith("extra/" + METADATA_FILE))
        assert json.loads(archive.read(name)) == meta
    privacy = meta["privacy"]
    state = private.privacy
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["dpcompile_version"] == dpcompile.__version__
    assert meta["torch_version"] == torch.__version__
    assert privacy["noise_multiplier"] == 1.3
    assert privacy["max_grad_norm"] == 0.5
    assert privacy["sample_rate"] == state.sample_rate == 0.2
    assert privacy["delta"] == 1e-6
    assert privacy["accountant"] == "rdp"
    assert privacy["accountant_history"] == [[1.3, 0.2, 3]]
    assert privacy["steps"] == 3
    assert privacy["epsilon"] == pytest.approx(state.epsilon())
    assert privacy["clipping"] == "flat"
    assert meta["step"]["batch_size"] == 8
    assert meta["step"]["norm_strategies"] == {n: p.strategy for n, p in private._engine.plans().items()}
    rebuilt = step.privacy_state()
    assert rebuilt.epsilon() == pytest.approx(state.epsilon())
    assert rebuilt.steps == 3
    # the program's own buffers hold the numbers the graph uses
    assert float(program.state_dict["max_grad_norm"]) == 0.5
    assert float(program.state_dict["noise_std"]) == pytest.approx(1.3 * 0.5)
    assert "ExportedStep(batch_size=8" in repr(step)


def test_saved_parameters_are_the_exported_ones(tmp_path):
    private, _, (x, y) = compiled("mlp")
    _, step = export_save_load(private, (x[:8], y[:8]), tmp_path)
    for name, p in private.named_parameters():
        torch.testing.assert_close(step.params[name], p.detach(), rtol=0, atol=0)
    shifted = {n: p + 0.1 for n, p in step.params.items()}
    live_params = {n: p.detach().clone() for n, p in private.named_parameters()}
    with torch.no_grad():
        for p in private.parameters():
            p.add_(0.1)
    try:
        live = private.private_step((x[:8], y[:8]), loss_fn=CE, seed=9)
    finally:
        with torch.no_grad():
            for n, p in private.named_parameters():
                p.copy_(live_params[n])
    assert max_difference(step((x[:8], y[:8]), seed=9, params=shifted)["update"], live["update"]) < 1e-12


PLAIN_TORCH = textwrap.dedent("""
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("dpcompile", "passes"):
                raise ImportError("dpcompile is not installed here: " + name)
            return None

    sys.meta_path.insert(0, Block())
    import json
    import torch

    program = torch.export.load(sys.argv[1])
    params, buffers, inputs, targets, mask, _ = program.example_inputs[0]
    out = program.module()(params, buffers, inputs, targets, mask, torch.tensor(int(sys.argv[3])))
    meta = json.loads(bytes(program.state_dict["dpcompile_metadata"].tolist()).decode())
    torch.save({"update": out["update"], "sigma": meta["privacy"]["noise_multiplier"]}, sys.argv[2])
    assert not [m for m in sys.modules if m.split(".")[0] in ("dpcompile", "passes")]
""")


def test_runs_with_plain_torch_without_dpcompile(tmp_path):
    private, _, (x, y) = compiled("cnn")
    _, step = export_save_load(private, (x[:8], y[:8]), tmp_path)
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TORCH)
    result = tmp_path / "out.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "step.pt2"), str(result), "21"],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    out = torch.load(result)
    assert out["sigma"] == 1.3
    live = private.private_step((x[:8], y[:8]), loss_fn=CE, seed=21)
    assert max_difference(out["update"], live["update"]) < 1e-12


def test_unfolded_window_convolution_exports_aten_ops_only(tmp_path):
    """A first layer with few input channels gets its per-sample gradients from unfolded windows
    through a dpcompile kernel when trained, and from plain aten ops in the exported program."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 36, 3)).to(D)
    x, y = torch.randn(16, 1, 6, 6, dtype=D), torch.randint(0, 3, (16,))
    private, _, _ = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=0.5),
                                         DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.3,
                                         max_grad_norm=0.5, backend="eager")
    private(x[:8])
    assert any("samples at a time" in n for n in private._engine.plans()["0.weight"].notes)
    program, step = export_save_load(private, (x[:8], y[:8]), tmp_path)
    assert metadata(program)["step"]["custom_op_namespaces"] == []
    live = private.private_step((x[:8], y[:8]), loss_fn=CE, seed=5)
    assert max_difference(step((x[:8], y[:8]), seed=5)["update"], live["update"]) < 1e-12


class Scaled(nn.Module):
    """A buffer the forward reads, and dropout (random only in training mode)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 6))

    def forward(self, x):
        return self.lin(F.dropout(x * self.scale, 0.5, self.training))


def test_eval_mode_and_buffers(tmp_path):
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = Scaled().to(D)
    x, y = torch.randn(16, 6, dtype=D), torch.randint(0, 3, (16,))
    private, _, _ = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                         DataLoader(TensorDataset(x, y), batch_size=4),
                                         noise_multiplier=0.7, backend="eager")
    with pytest.warns(UserWarning, match="random numbers"):
        dpcompile.export(private, (x[:4], y[:4]), loss_fn=CE)
    private.eval()  # the step is traced in the model's current mode, as training traces it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, step = export_save_load(private, (x[:4], y[:4]), tmp_path)
    assert step.metadata["step"]["training_mode"] is False
    assert [b["name"] for b in step.metadata["step"]["buffers"]] == ["scale"]
    live = private.private_step((x[:4], y[:4]), loss_fn=CE, seed=8)
    assert max_difference(step((x[:4], y[:4]), seed=8)["update"], live["update"]) < 1e-12
    doubled = step((x[:4], y[:4]), seed=8, buffers={"scale": 2 * model.scale})
    assert max_difference(doubled["update"], live["update"]) > 1e-6


# ---- bad input ----------------------------------------------------------------------------------


def test_export_refuses_a_model_that_was_not_dp_compiled():
    with pytest.raises(TypeError, match="dp_compile"):
        dpcompile.export(nn.Linear(3, 2), (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), loss_fn=CE)
    with pytest.raises(TypeError, match="dp_compile"):
        dpcompile.private_step(nn.Linear(3, 2), (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), loss_fn=CE, seed=0)


def test_export_checks_the_batch():
    private, _, (x, y) = compiled("mlp")
    with pytest.raises(TypeError, match=r"pair \(inputs, targets\)"):
        dpcompile.export(private, x[:8], loss_fn=CE)
    with pytest.raises(ValueError, match="at least 2 rows"):
        dpcompile.export(private, (x[:1], y[:1]), loss_fn=CE)
    with pytest.raises(ValueError, match="rows"):
        dpcompile.export(private, (x[:8], y[:5]), loss_fn=CE)


def test_loaded_step_checks_its_inputs(tmp_path):
    private, _, (x, y) = compiled("mlp")
    _, step = export_save_load(private, (x[:8], y[:8]), tmp_path)
    with pytest.raises(ValueError, match="batches of 8 rows"):
        step((x[:6], y[:6]), seed=0)
    with pytest.raises(ValueError, match="mask"):
        step((x[:8], y[:8]), seed=0, mask=torch.ones(5))
    with pytest.raises(TypeError, match="seed"):
        step((x[:8], y[:8]), seed=1.5)
    with pytest.raises(ValueError, match="missing"):
        step((x[:8], y[:8]), seed=0, params={})


def test_load_refuses_files_that_are_not_artifacts(tmp_path):
    with pytest.raises(FileNotFoundError):
        dpcompile.load(tmp_path / "missing.pt2")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ArtifactError, match="not a .pt2 archive"):
        dpcompile.load(text)
    plain = torch.export.export(nn.Linear(3, 2), (torch.randn(2, 3),))
    torch.export.save(plain, tmp_path / "plain.pt2")
    with pytest.raises(ArtifactError, match="not a dpcompile artifact"):
        dpcompile.load(tmp_path / "plain.pt2")
    with pytest.raises(ArtifactError, match="not made by dpcompile.export"):
        dpcompile.save(tmp_path / "again.pt2", plain)


def _rewrite_metadata(src, dst, change):
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename.endswith("extra/" + METADATA_FILE):
                meta = json.loads(data)
                change(meta)
                data = json.dumps(meta).encode()
            new.writestr(item, data)


def test_load_refuses_incompatible_versions(tmp_path):
    private, _, (x, y) = compiled("mlp")
    program = dpcompile.export(private, (x[:8], y[:8]), loss_fn=CE)
    path = dpcompile.save(tmp_path / "step.pt2", program)

    def newer(meta):
        meta["format_version"] = FORMAT_VERSION + 1
        meta["dpcompile_version"] = "9.0"

    _rewrite_metadata(path, tmp_path / "newer.pt2", newer)
    with pytest.raises(ArtifactError, match=r"format version 2 \(written by dpcompile 9.0"):
        dpcompile.load(tmp_path / "newer.pt2")
    _rewrite_metadata(path, tmp_path / "other.pt2", lambda meta: meta.update(format="something.else"))
    with pytest.raises(ArtifactError, match="not a dpcompile artifact"):
        dpcompile.load(tmp_path / "other.pt2")
    _rewrite_metadata(path, tmp_path / "edited.pt2", lambda meta: meta["privacy"].update(noise_multiplier=0.1))
    with pytest.raises(ArtifactError, match="disagree"):
        dpcompile.load(tmp_path / "edited.pt2")


@pytest.mark.inductor
@pytest.mark.slow
def test_aot_inductor_package(tmp_path):
    private, _, (x, y) = compiled("mlp", dtype=torch.float32)
    program = dpcompile.export(private, (x[:8], y[:8]), loss_fn=CE)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "step_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(package)
    args = list(program.example_inputs[0])
    args[5] = torch.tensor(17)
    out = runner(*args)
    live = private.private_step((x[:8], y[:8]), loss_fn=CE, seed=17)
    assert max_difference(out["update"], live["update"]) < 1e-5
