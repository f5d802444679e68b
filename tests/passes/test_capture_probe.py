"""capture learns its outputs' structure from a forward on fake tensors, not an eager forward."""

import importlib

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from passes import capture
from passes.errors import UnsupportedOpError

capture_module = importlib.import_module("passes.capture")


class CountsEagerCalls(nn.Module):
    """A small CNN that counts the forwards it runs on real tensors (computing activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        self.eager_calls = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if type(x) is torch.Tensor:
            self.eager_calls += 1
        out = self.net(x)
        return out, {"scores": out.softmax(-1), "index": out.argmax(-1)}


def test_capture_computes_no_activation_while_compiling():
    model = CountsEagerCalls()
    cap = capture(model, [torch.randn(6, 3, 8, 8)])
    assert model.eager_calls == 0
    seeds = cap.example_inputs[-cap.num_outputs:]
    assert [type(s) for s in seeds] == [torch.Tensor, torch.Tensor]  # real values, the integer output has none
    assert [tuple(s.shape) for s in seeds] == [(6, 5), (6, 5)] and all(bool((s == 1).all()) for s in seeds)
    assert cap.output_is_differentiable == [True, True, False]  # out, scores, index


def test_a_tensor_held_as_a_plain_attribute_is_named_with_its_fix():
    class Scaled(nn.Module):
        def __init__(self, as_buffer: bool) -> None:
            super().__init__()
            self.net = nn.Linear(4, 3)
            if as_buffer:
                self.register_buffer("scale", torch.tensor(0.5), persistent=False)
            else:
                self.scale = torch.tensor(0.5)  # neither a parameter nor a buffer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * self.scale

    with pytest.raises(UnsupportedOpError, match=r"\(Scaled\) reads a tensor that is neither a parameter nor a buffer.*register_buffer"):
        capture(Scaled(as_buffer=False), [torch.randn(6, 4)])
    assert capture(Scaled(as_buffer=True), [torch.randn(6, 4)]).num_outputs == 1


def test_a_forward_fake_tensors_cannot_run_runs_eagerly(monkeypatch):
    class Unfakeable(FakeTensorMode):
        def from_tensor(self, *args, **kwargs):
            raise RuntimeError("no fake kernel")

    monkeypatch.setattr(capture_module, "FakeTensorMode", Unfakeable)
    model = CountsEagerCalls()
    cap = capture(model, [torch.randn(6, 3, 8, 8)])
    assert model.eager_calls == 1
    assert [tuple(s.shape) for s in cap.example_inputs[-cap.num_outputs:]] == [(6, 5), (6, 5)]


def test_seeds_are_laid_out_as_ones_like_lays_out_the_output():
    real = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    mode = FakeTensorMode()
    for output in (real, real.transpose(0, 1), real.expand(2, 3, 4, 5)[:, :1].expand(2, 3, 4, 5)):
        seed = capture_module._ones_like(mode.from_tensor(output))
        assert type(seed) is torch.Tensor and seed.stride() == torch.ones_like(output).stride()
        assert bool((seed == 1).all())
