"""Two processes over gloo and loopback: one private step for the whole job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dpcompile
from dpcompile.distributed import ShardedPoissonBatchSampler
from tests.distributed.harness import run_ranks, values
from tests.distributed.workers import NUM_SAMPLES, build_data, build_model
from tests.reference import clipped_reference

pytestmark = pytest.mark.slow


def _reference_updates(indices: list[list[int]], lr: float, max_grad_norm: float,
                       expected_batch_size: float) -> list[np.ndarray]:
    """One process, sample by sample: SGD on Σ clip(g_i) / (qN) over each step's union batch."""
    model = build_model()
    x, y, _ = build_data().tensors
    out = []
    for batch in indices:
        rows = torch.tensor(sorted(batch), dtype=torch.long)
        if len(rows):
            _, clipped = clipped_reference(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                           [x[rows]], [y[rows]], max_grad_norm)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if len(rows):
                    p -= lr * clipped[name] / expected_batch_size
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy())
    return out


def test_sigma0_update_equals_single_process_on_the_union() -> None:
    ranks = values(run_ranks("train", 2, steps=3, noise_multiplier=0.0, lr=0.5, max_grad_norm=0.7))
    first, second = ranks
    for a, b in zip(first["indices"], second["indices"]):
        assert not set(a) & set(b), "the ranks' shards overlap"
        assert all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)
    union = [sorted(a + b) for a, b in zip(first["indices"], second["indices"])]
    assert sum(map(len, union)) > 0
    # The global stream depends on the job's seed only: one rank alone draws the same batches.
    single = ShardedPoissonBatchSampler(NUM_SAMPLES, 12 / NUM_SAMPLES, rank=0, world_size=1,
                                        seed=first["seed"])
    assert union == [sorted(single.draw()) for _ in union]
    assert first["expected_batch_size"] == pytest.approx(12.0)
    expected = _reference_updates(union, 0.5, 0.7, 12.0)
    for step, (a, b, ref) in enumerate(zip(first["params"], second["params"], expected)):
        assert np.array_equal(a, b), f"ranks differ after step {step}"
        np.testing.assert_allclose(a, ref, rtol=0, atol=1e-12, err_msg=f"step {step}")
    assert first["steps"] == second["steps"] == 3
    assert first["epsilon"] == second["epsilon"]


def test_noise_is_added_once_for_the_whole_job() -> None:
    # A loss with zero gradient: each update is −lr·noise/(qN), noise ~ N(0, σ²C²) per coordinate.
    sigma, clip, lr = 1.5, 0.8, 1.0
    ranks = values(run_ranks("train", 2, steps=2, noise_multiplier=sigma, max_grad_norm=clip,
                             lr=lr, zero_loss=True, hidden=1500))
    first, second = ranks
    before = first["initial"]
    deltas = np.concatenate([first["params"][0] - before, first["params"][1] - first["params"][0]])
    measured = deltas.std() * first["expected_batch_size"] / lr
    # Noise once: σ·C. Each rank adding its own would give √2·σ·C; none would give 0.
    assert measured == pytest.approx(sigma * clip, rel=0.05)
    assert abs(deltas.mean()) < 4 * sigma * clip / first["expected_batch_size"] / np.sqrt(deltas.size)
    assert np.array_equal(first["params"][1], second["params"][1])


def test_parameters_stay_bit_identical_with_noise_adam_and_physical_batches() -> None:
    ranks = values(run_ranks("train", 2, steps=4, noise_multiplier=0.9, optimizer="adam",
                             max_physical_batch_size=2, clipping="adaptive"))
    first, second = ranks
    for step, (a, b) in enumerate(zip(first["params"], second["params"])):
        assert np.array_equal(a, b), f"parameters differ across ranks after step {step}"
    assert first["bounds"] == second["bounds"]
    assert len(set(first["bounds"])) > 1, "adaptive clipping never moved the bound"
    assert not np.array_equal(first["params"][0], first["initial"])


def test_ranks_that_disagree_fail_before_any_step() -> None:
    ranks = values(run_ranks("bad_setups", 2))
    for errors in ranks:
        assert "rank 1's parameter or buffer values differ" in errors["values"]
        assert "other parameters or buffers" in errors["shapes"]
        assert "noise_multiplier=2.0" in errors["settings"]
    assert ranks[0] == ranks[1], "the ranks must raise the same error"


def test_a_refusing_rank_stops_every_rank_and_nothing_moves() -> None:
    first, second = values(run_ranks("failing_rank", 2))
    assert first["error"].startswith("DistributedStepRefused") and "rank(s) 1" in first["error"]
    assert second["error"].startswith("NonFiniteGradientError")
    assert first["unchanged"] and second["unchanged"]
    assert first["steps"] == second["steps"] == 0


def test_a_dead_rank_fails_the_step_instead_of_hanging() -> None:
    first, second = run_ranks("dead_rank", 2, timeout=150)
    assert second.error_type == "Exited"
    assert first.error is not None, "rank 0 stepped although rank 1 was gone"


def test_checkpoint_written_once_resumes_on_any_world_size(tmp_path) -> None:
    path = str(tmp_path / "job.ckpt")
    first, second = values(run_ranks("train", 2, steps=2, noise_multiplier=1.0, checkpoint=path))
    assert first["wrote_checkpoint"]
    (one,) = values(run_ranks("resume", 1, checkpoint=path))
    assert one["steps"] == 2 and one["epsilon"] == pytest.approx(first["epsilon"], rel=1e-12)
    np.testing.assert_array_equal(one["params"], first["params"][-1])
    # The job's global stream continues at step 2, whatever the world size.
    stream = ShardedPoissonBatchSampler(NUM_SAMPLES, 12 / NUM_SAMPLES, rank=0, world_size=1,
                                        seed=first["seed"])
    stream.next_draw = 2
    assert sorted(one["next_indices"]) == sorted(stream.draw())

    # And in a plain single process (no process group): same ε and steps.
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(build_data(), batch_size=12)
    model, opt, loader = dpcompile.dp_compile(model, opt, loader, noise_multiplier=1.0,
                                              max_grad_norm=0.7, backend="eager")
    dpcompile.load_checkpoint(path, model, opt, loader)
    assert model.privacy.steps == 2
    assert model.privacy.epsilon(1e-5) == pytest.approx(first["epsilon"], rel=1e-12)


def test_an_opacus_distributed_script_runs_with_one_changed_import() -> None:
    first, second = values(run_ranks("opacus_script", 2))
    assert first["sample_rate"] == pytest.approx(12 / NUM_SAMPLES)
    assert first["steps"] == second["steps"] == 4  # one epoch: 1/q logical steps
    assert np.array_equal(first["params"], second["params"])
    assert first["epsilon"] == second["epsilon"] > 0


def test_fixed_batches_need_a_partition_of_the_data() -> None:
    first, second = values(run_ranks("fixed_batches", 2))
    for rank in (first, second):
        assert "needs a DistributedSampler" in rank["refused"]
        assert rank["steps"] == 4 and rank["sample_rate"] == pytest.approx(12 / NUM_SAMPLES)
    assert not set(first["seen"]) & set(second["seen"])
    assert sorted(first["seen"] + second["seen"]) == list(range(NUM_SAMPLES))
    assert np.array_equal(first["params"], second["params"])
