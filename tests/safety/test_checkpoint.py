"""Checkpoints: resuming is indistinguishable from never stopping; bad files are loud errors."""

import hashlib
import io
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile import checkpoint as ckpt

D = torch.float64
N, BATCH = 40, 8  # q = 0.2, 5 logical batches per epoch


def make_run(model_seed=0, *, noise_multiplier=1.0, secure=False, physical=None, hidden=8,
             adaptive=False, workers=0):
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2)).to(D)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N, 4, generator=g, dtype=D), torch.randint(0, 2, (N,), generator=g))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    private, opt, dl = dpcompile.dp_compile(
        model, opt, DataLoader(data, batch_size=BATCH, num_workers=workers), noise_multiplier=noise_multiplier,
        max_grad_norm=0.5, accountant="rdp", backend="eager", secure_mode=secure,
        noise_generator=None if secure else torch.Generator().manual_seed(model_seed + 1),
        max_physical_batch_size=physical, clipping="adaptive" if adaptive else "flat",
        adaptive_clipping={"count_noise_std": 2.0} if adaptive else None,
    )
    return model, private, opt, dl


def train(private, opt, dl, steps, record, save_at=None, path=None):
    """Run epochs until ``steps`` optimizer steps; record every batch and every epoch end (None);
    maybe save mid-epoch."""
    done = 0
    while done < steps:
        if done:
            record.append(None)
        for x, y in dl:
            opt.zero_grad()
            F.cross_entropy(private(x), y).backward()
            opt.step()
            record.append((x.clone(), y.clone()))
            if dl.signal.end_of_logical_batch:
                done += 1
                if done == save_at:
                    dpcompile.save_checkpoint(path, private, opt, dl, extra={"step": done})
                if done == steps:
                    return


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert (batch_a is None) == (batch_b is None)  # epoch ends at the same places
        if batch_a is not None:
            assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])


@pytest.mark.parametrize("physical, adaptive, workers",
                         [(None, False, 0), (3, False, 0), (None, True, 0), (None, False, 2)])
def test_resume_equals_a_run_that_never_stopped(tmp_path, physical, adaptive, workers):
    """Workers draw batches ahead of use: the checkpoint holds the state after the last used."""
    path = tmp_path / "run.ckpt"
    k, n = 7, 9  # save mid-epoch (epoch 2, batch 2); continue past two epoch ends
    model_a, private_a, opt_a, dl_a = make_run(physical=physical, adaptive=adaptive, workers=workers)
    torch.manual_seed(11)
    seen_a: list = []
    train(private_a, opt_a, dl_a, k + n, seen_a, save_at=k, path=path)

    model_b, private_b, opt_b, dl_b = make_run(model_seed=5, physical=physical, adaptive=adaptive,
                                               workers=workers)
    torch.manual_seed(999)  # the global seed no longer matters after loading
    extra = dpcompile.load_checkpoint(path, private_b, opt_b, dl_b)
    assert extra == {"step": k}
    assert private_b.privacy.steps == k
    seen_b: list = []
    train(private_b, opt_b, dl_b, n, seen_b)

    # Same ε, same batches, same parameters (the noise generator was restored), same optimizer.
    assert private_b.privacy.steps == private_a.privacy.steps == k + n
    assert private_b.privacy.epsilon() == private_a.privacy.epsilon()
    assert private_b.privacy.accountant.state_dict() == private_a.privacy.accountant.state_dict()
    assert_same_batches(seen_a[len(seen_a) - len(seen_b):], seen_b)  # A's batches after step k
    for (n_a, p_a), (_, p_b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(p_b, p_a, rtol=0, atol=0, msg=n_a)
    if adaptive:
        assert private_b.privacy.max_grad_norm == private_a.privacy.max_grad_norm != 0.5
    for key, value in opt_a.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(opt_b.state_dict()["state"][key][name], tensor)


def test_resume_at_an_epoch_boundary_starts_a_full_epoch(tmp_path):
    path = tmp_path / "run.ckpt"
    _, private_a, opt_a, dl_a = make_run()
    seen_a: list = []
    train(private_a, opt_a, dl_a, 10, seen_a, save_at=5, path=path)
    _, private_b, opt_b, dl_b = make_run(model_seed=3)
    dpcompile.load_checkpoint(path, private_b, opt_b, dl_b)
    assert dl_b.position == 0 and len(list(iter(dl_b))) == N // BATCH


def test_checkpoint_is_atomic_when_the_write_crashes(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    _, private, opt, dl = make_run()
    train(private, opt, dl, 2, [])
    dpcompile.save_checkpoint(path, private, opt, dl)
    good = path.read_bytes()
    train(private, opt, dl, 2, [])

    def crash(handle, data):
        handle.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write_all", crash)
    with pytest.raises(OSError, match="simulated"):
        dpcompile.save_checkpoint(path, private, opt, dl)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["run.ckpt"]  # no temporary file left behind

    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash at rename")))
    with pytest.raises(OSError, match="crash at rename"):
        dpcompile.save_checkpoint(path, private, opt, dl)
    assert path.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["run.ckpt"]
    assert (os.stat(path).st_mode & 0o777) == 0o600


def saved_run(tmp_path, **kwargs):
    path = tmp_path / "run.ckpt"
    model, private, opt, dl = make_run()
    train(private, opt, dl, 3, [])
    dpcompile.save_checkpoint(path, private, opt, dl, **kwargs)
    return path


def fresh_and_snapshot(**kwargs):
    model, private, opt, dl = make_run(model_seed=4, **kwargs)
    snap = ({k: v.clone() for k, v in model.state_dict().items()}, private.privacy.state_dict())
    return model, private, opt, dl, snap


def assert_untouched(model, private, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[0][k])
    assert private.privacy.state_dict() == snap[1]


def test_truncated_and_tampered_files_are_refused(tmp_path):
    path = saved_run(tmp_path)
    data = path.read_bytes()
    model, private, opt, dl, snap = fresh_and_snapshot()
    bad = tmp_path / "bad.ckpt"
    cases = {
        "truncated": data[: len(data) - 100],
        "integrity": data[:-50] + bytes([data[-50] ^ 1]) + data[-49:],
        "not a dpcompile checkpoint": b"garbage" + data,
        "header is truncated": data[:30],
        "trailing bytes": data + b"\0",
    }
    for match, content in cases.items():
        bad.write_bytes(content)
        with pytest.raises(dpcompile.CheckpointError, match=match):
            dpcompile.load_checkpoint(bad, private, opt, dl)
        assert_untouched(model, private, snap)
    assert private.privacy.steps == 0  # never a silent reset, never a partial restore


def test_a_forged_payload_is_caught_by_hmac_not_by_sha256(tmp_path):
    """Anyone can recompute an unkeyed SHA-256; only a keyed HMAC detects a forgery."""
    path = saved_run(tmp_path, key=b"secret")
    model, private, opt, dl, snap = fresh_and_snapshot()
    with pytest.raises(dpcompile.CheckpointError, match="pass key="):
        dpcompile.load_checkpoint(path, private, opt, dl)
    with pytest.raises(dpcompile.CheckpointError, match="key is wrong"):
        dpcompile.load_checkpoint(path, private, opt, dl, key=b"guess")
    dpcompile.load_checkpoint(path, private, opt, dl, key=b"secret")
    assert private.privacy.steps == 3

    # Forge: shorten the privacy history, re-hash with SHA-256 and with a guessed key.
    payload = dpcompile.read_checkpoint(path, key=b"secret")
    payload["privacy"]["accountant"]["history"] = []
    for digest_key in (None, b"guess"):
        forged = tmp_path / "forged.ckpt"
        write_raw(forged, payload, digest_key)
        with pytest.raises(dpcompile.CheckpointError):
            dpcompile.load_checkpoint(forged, private, opt, dl, key=b"secret")
    assert private.privacy.steps == 3


def write_raw(path, payload, key=None):
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "length": len(body),
              "digest": ckpt._digest(body, key)}
    path.write_bytes(ckpt.MAGIC + json.dumps(header).encode() + b"\n" + body)


def test_invalid_contents_with_a_valid_digest_are_refused(tmp_path):
    path = saved_run(tmp_path)
    payload = dpcompile.read_checkpoint(path)
    model, private, opt, dl, snap = fresh_and_snapshot()
    broken = dict(payload, privacy=dict(payload["privacy"]))
    broken["privacy"]["accountant"] = dict(payload["privacy"]["accountant"], history=[[1.0, 2.0, 3]])
    write_raw(tmp_path / "x.ckpt", broken)
    with pytest.raises(dpcompile.CheckpointError, match="accountant history is invalid"):
        dpcompile.load_checkpoint(tmp_path / "x.ckpt", private, opt, dl)
    header = json.dumps({"format": ckpt.FORMAT, "version": 99, "length": 0,
                         "digest": "sha256:" + hashlib.sha256(b"").hexdigest()})
    (tmp_path / "y.ckpt").write_bytes(ckpt.MAGIC + header.encode() + b"\n")
    with pytest.raises(dpcompile.CheckpointError, match="version 99 is not supported"):
        dpcompile.load_checkpoint(tmp_path / "y.ckpt", private, opt, dl)
    assert_untouched(model, private, snap)


def test_mismatches_are_refused_and_change_nothing(tmp_path):
    path = saved_run(tmp_path)
    cases = [
        (dict(noise_multiplier=2.0), "noise_multiplier: checkpoint 1.0, this run 2.0"),
        (dict(hidden=6), "is .* in the checkpoint"),
        (dict(adaptive=True), "other privacy settings"),
    ]
    for kwargs, match in cases:
        model, private, opt, dl, snap = fresh_and_snapshot(**kwargs)
        with pytest.raises(dpcompile.CheckpointMismatchError, match=match):
            dpcompile.load_checkpoint(path, private, opt, dl)
        assert_untouched(model, private, snap)

    model, private, opt, dl, snap = fresh_and_snapshot()
    plain = tmp_path / "noloader.ckpt"
    _, p2, o2, _ = make_run()
    dpcompile.save_checkpoint(plain, p2, o2)  # saved without the loader
    with pytest.raises(dpcompile.CheckpointMismatchError, match="no Poisson sampler state"):
        dpcompile.load_checkpoint(plain, private, opt, dl)
    dpcompile.load_checkpoint(plain, private, opt)  # accepted without a loader
    with pytest.raises(TypeError, match="PrivateModule"):
        dpcompile.load_checkpoint(path, model, opt, dl)


def test_no_checkpoint_in_the_middle_of_a_logical_batch(tmp_path):
    _, private, opt, dl = make_run(physical=2)
    x, y = next(iter(dl))
    F.cross_entropy(private(x), y).backward()
    opt.step()  # a virtual step: the logical batch continues
    assert not dl.signal.end_of_logical_batch
    with pytest.raises(RuntimeError, match="not noised yet"):
        dpcompile.save_checkpoint(tmp_path / "x.ckpt", private, opt, dl)
    assert not (tmp_path / "x.ckpt").exists()


def test_secure_mode_writes_no_generator_state(tmp_path):
    path = tmp_path / "secure.ckpt"
    _, private, opt, dl = make_run(secure=True)
    train(private, opt, dl, 3, [])
    dpcompile.save_checkpoint(path, private, opt, dl)
    payload = dpcompile.read_checkpoint(path)
    assert payload["sampler"]["generator_state"] is None and payload["noise"]["generators"] == {}
    assert payload["sampler"]["position"] == 3 and payload["summary"]["steps"] == 3
    _, private_b, opt_b, dl_b = make_run(model_seed=2, secure=True)
    dpcompile.load_checkpoint(path, private_b, opt_b, dl_b)
    assert private_b.privacy.epsilon() == private.privacy.epsilon()
    assert len(list(iter(dl_b))) == N // BATCH - 3
