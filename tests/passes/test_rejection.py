"""Models and losses that cannot be trained privately are rejected at compile time, by name."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes import (
    BatchDimensionError,
    LossError,
    OutputError,
    PerSampleGradients,
    SampleMixingError,
    UnsupportedOpError,
)
from tests.passes.harness import sum_loss

D = torch.float64


def compile_and_run(model, x, loss=sum_loss, targets=(), **kwargs):
    return PerSampleGradients(model.to(D), loss, backend="eager", **kwargs)(x, targets, max_grad_norm=1.0)


def test_batchnorm_in_training_names_module_op_and_fix():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
    with pytest.raises(SampleMixingError) as info:
        compile_and_run(model, torch.randn(4, 1, 5, 5, dtype=D))
    message = str(info.value)
    assert "`1` (BatchNorm2d)" in message
    assert "batch_norm" in message
    assert "GroupNorm" in message


def test_batch_mean_inside_the_model():
    class Center(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            return h - h.mean(0, keepdim=True)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.center = Center()

        def forward(self, x):
            return self.center(x)

    with pytest.raises(SampleMixingError) as info:
        compile_and_run(Outer(), torch.randn(4, 3, dtype=D))
    assert "`center` (Center)" in str(info.value)
    assert "mean" in str(info.value)


def test_attention_across_the_batch_is_rejected():
    class WrongLayout(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 1)  # expects (T, B, E); given (B, T, E)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    with pytest.raises(SampleMixingError):
        compile_and_run(WrongLayout(), torch.randn(3, 5, 4, dtype=D))


def test_batch_statistics_in_a_custom_layer():
    class Whiten(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            return h / h.std(0)

    with pytest.raises(SampleMixingError, match="var"):
        compile_and_run(Whiten(), torch.randn(4, 3, dtype=D))


def test_scalar_loss_is_rejected():
    model = nn.Linear(3, 2)
    with pytest.raises(LossError, match="reduction='none'"):
        compile_and_run(model, torch.randn(4, 3, dtype=D), lambda out, y: F.cross_entropy(out, y),
                        torch.randint(0, 2, (4,)))


def test_loss_mixing_samples_is_rejected():
    model = nn.Linear(3, 2)

    def centered(out):
        per = out.pow(2).sum(1)
        return per - per.mean()

    with pytest.raises(SampleMixingError):
        compile_and_run(model, torch.randn(4, 3, dtype=D), centered)


def test_non_tensor_output_is_rejected():
    class Labels(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.lin(x), "name": "not a tensor"}

    # A model may return anything its loss can read...
    PerSampleGradients(Labels().to(D), lambda out: out["logits"].sum(1), backend="eager")(
        torch.randn(4, 3, dtype=D), max_grad_norm=1.0
    )
    # ...but what is differentiated must be tensors.
    with pytest.raises(OutputError, match="str"):
        PerSampleGradients(Labels().to(D), lambda out: (out["logits"].sum(1), out["name"]), backend="eager")(
            torch.randn(4, 3, dtype=D), max_grad_norm=1.0
        )


def test_inputs_disagreeing_on_batch_size():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, z):
            return self.lin(x) + z.sum()

    with pytest.raises(BatchDimensionError, match="batch"):
        compile_and_run(Two(), (torch.randn(4, 3, dtype=D), torch.randn(5, dtype=D)))


def test_input_without_batch_dimension():
    with pytest.raises(BatchDimensionError, match="batch dimension"):
        compile_and_run(nn.Linear(3, 2), torch.randn(4, 3, dtype=D), batch_dim=2)


def test_slicing_the_batch_is_rejected():
    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return h + h[:1]

    with pytest.raises(SampleMixingError, match="slice"):
        compile_and_run(First(), torch.randn(4, 3, dtype=D))


def test_unknown_op_on_batch_data_is_named():
    from passes import sample_dims

    saved = sample_dims.SAMPLE_RULES.pop(torch.ops.aten.cumsum.default)
    try:
        class Cum(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(3, 3)

            def forward(self, x):
                return torch.cumsum(self.lin(x), 1)

        with pytest.raises(UnsupportedOpError, match="cumsum"):
            compile_and_run(Cum(), torch.randn(4, 3, dtype=D))
    finally:
        sample_dims.SAMPLE_RULES[torch.ops.aten.cumsum.default] = saved


def test_ragged_embedding_bag_offsets_are_rejected():
    class Ragged(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 3)

        def forward(self, x):
            flat = x.reshape(-1)
            offsets = torch.tensor([0, 1, 5, 6])
            return self.bag(flat, offsets)

    with pytest.raises(SampleMixingError, match="offsets"):
        compile_and_run(Ragged(), torch.randint(0, 10, (4, 2)))


def test_scale_grad_by_freq_is_rejected():
    model = nn.Sequential(nn.Embedding(10, 3, scale_grad_by_freq=True), nn.Flatten())
    with pytest.raises(SampleMixingError, match="scale_grad_by_freq"):
        compile_and_run(model, torch.randint(0, 10, (4, 2)))


def test_no_trainable_parameters():
    model = nn.Linear(3, 2)
    model.requires_grad_(False)
    with pytest.raises(OutputError, match="no trainable"):
        compile_and_run(model, torch.randn(4, 3, dtype=D))


def test_bad_clipping_arguments():
    model = nn.Linear(3, 2).to(D)
    with pytest.raises(ValueError, match="max_grad_norm"):
        PerSampleGradients(model, sum_loss, backend="eager")(torch.randn(4, 3, dtype=D), max_grad_norm=0.0)
    with pytest.raises(ValueError, match="one max_grad_norm per trainable"):
        PerSampleGradients(model, sum_loss, clipping="per_layer", backend="eager")(
            torch.randn(4, 3, dtype=D), max_grad_norm=[1.0]
        )
    with pytest.raises(ValueError, match="clipping"):
        PerSampleGradients(model, sum_loss, clipping="adaptive")


class _Gate(nn.Module):
    """Branches on the batch's values: one trace cannot stand for every batch."""

    def __init__(self, read):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.read = read

    def forward(self, x):
        return self.lin(x) if self.read(x) else self.lin(-x)


@pytest.mark.parametrize("read", [lambda x: x.sum() > 0, lambda x: int((x > 0).sum()) > 3, lambda x: x.nonzero().shape[0] > 2])
def test_data_dependent_control_flow_names_module_and_fix(read):
    model = nn.Sequential(nn.Identity(), _Gate(read))
    with pytest.raises(UnsupportedOpError) as info:
        compile_and_run(model, torch.randn(4, 3, dtype=D))
    message = str(info.value)
    assert "module `1` (_Gate)" in message
    assert "torch.where" in message
