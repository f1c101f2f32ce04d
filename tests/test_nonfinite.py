"""A non-finite loss stops training before it reaches a checkpoint; gradient clipping works."""

from __future__ import annotations

import json
import logging
import math
import sys

import pytest
import torch

from tests.conftest import FAST, REPO_ROOT, train_run
from tests.test_cli import run_cli
from vae_experiments import load_run
from vae_experiments.models.autoencoder import Autoencoder
from vae_experiments.training import LitModel, NonFiniteLossError
from vae_experiments.training.module import NEVER, TermMeans

# digits: 1294 training images, 40 full batches of 32 per epoch (steps 0-39, then 40-79).
STEPS_PER_EPOCH = 1294 // 32
AE = ["model=ae", "model/network=mlp", "model.network.hidden_dims=[32]", "logger=none"]


def break_loss_from(monkeypatch, first_step: int, term: str = "recon", training: bool = True):
    """Makes the autoencoder's ``term`` nan in training from ``first_step`` on (``training``), or
    in evaluation. ``recon`` is the loss, so it makes ``loss`` nan too."""
    original = Autoencoder.loss

    def loss(self, x, y=None, step=None, monitor=True):
        terms = original(self, x, y, step, monitor)
        broken = (step is not None and step >= first_step) if training else not self.training
        if broken:
            terms[term] = terms[term] * math.nan
            if term == "recon":
                terms["loss"] = terms["recon"]
        return terms

    monkeypatch.setattr(Autoencoder, "loss", loss)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    break_loss_from(monkeypatch, 45)
    with pytest.raises(NonFiniteLossError) as error:
        train_run(tmp_path / "run", AE)
    message = str(error.value)
    assert "step 45 (epoch 1" in message
    assert "train/loss and train/recon became nan" in message
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"{last} (epoch 0, step 40)" in message
    assert "optimizer.lr" in message and "trainer.gradient_clip_val=1.0" in message

    # Both checkpoints are from the end of the first epoch, with finite weights.
    for name in ("last", "best"):
        ckpt = torch.load(last.parent / f"{name}.ckpt", weights_only=True)
        assert ckpt["global_step"] == STEPS_PER_EPOCH
    model, _ = load_run(tmp_path / "run", checkpoint="last")
    assert all(torch.isfinite(value).all() for value in model.state_dict().values())
    x = torch.rand(4, 1, 8, 8)
    assert torch.isfinite(model.reconstruct(x)).all()


@pytest.mark.parametrize("fault", ["loss", "weights"])
def test_a_fault_in_the_last_batch_writes_no_checkpoint(tmp_path, monkeypatch, fault):
    # No logging interval in the epoch: only the checks before checkpointing can catch it.
    last_step = STEPS_PER_EPOCH - 1
    if fault == "loss":
        break_loss_from(monkeypatch, last_step)
    else:  # every loss is finite, then a weight is not: as after an overflowing update

        def on_train_batch_end(self, outputs, batch, batch_idx):
            # global_step, not batch_idx: batches come in groups (steps_per_group).
            if self.global_step == last_step + 1:
                with torch.no_grad():
                    next(self.model.decoder.parameters())[0] = math.inf

        monkeypatch.setattr(LitModel, "on_train_batch_end", on_train_batch_end)
    with pytest.raises(NonFiniteLossError) as error:
        train_run(tmp_path / "run", [*AE, "trainer.log_every_n_steps=100"])
    message = str(error.value)
    expected = "loss at step 39" if fault == "loss" else "weights at step 40"
    assert f"non-finite {expected} (epoch 0" in message
    if fault == "weights":
        assert "model.decoder." in message
    assert "No checkpoint was written yet" in message
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


def test_non_finite_validation_terms_are_logged(tmp_path, monkeypatch, caplog):
    break_loss_from(monkeypatch, 0, term="recon_mse", training=False)
    with caplog.at_level(logging.WARNING, logger="vae_experiments.training.module"):
        train_run(tmp_path / "run", AE)
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert any(
        "non-finite val terms in epoch 1 (step 80): val/recon_mse=nan" in w for w in warnings
    )
    assert any("non-finite test terms" in w for w in warnings)
    # The monitored val/loss stayed finite, so the best checkpoint is chosen as usual.
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()


def test_a_nan_val_loss_never_replaces_the_best_checkpoint(tmp_path, monkeypatch, caplog):
    original = LitModel.validation_step

    def validation_step(self, batch, batch_idx):  # the second epoch's val/loss is nan
        if self.current_epoch == 1:
            batch = [batch[0] * math.nan, batch[1]]
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LitModel, "validation_step", validation_step)
    with caplog.at_level(logging.WARNING, logger="vae_experiments.training.module"):
        train_run(tmp_path / "run", AE)
    assert any(
        "val/loss=nan does not replace an earlier checkpoints/best.ckpt" in r.getMessage()
        for r in caplog.records
    )
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == STEPS_PER_EPOCH


@pytest.mark.slow  # the command in a subprocess; the message is tested in process above
def test_an_absurd_learning_rate_fails_the_cli_run_with_the_message(tmp_path):
    # Adam moves every weight by about lr in its first step: the VAE's loss is nan at step 1.
    run_dir = tmp_path / "run"
    args = [*FAST, "model.network.channels=[8,16]", "logger=none"]
    command = [sys.executable, str(REPO_ROOT / "train.py"), *args, "optimizer.lr=1e6"]
    result = run_cli([*command, f"hydra.run.dir={run_dir}"], tmp_path, expect_success=False)
    assert result.returncode != 0
    assert "NonFiniteLossError: non-finite loss at step" in result.stderr, result.stderr[-3000:]
    assert "No checkpoint was written yet" in result.stderr
    assert "optimizer.lr (now 1e+06)" in result.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed"
    assert status["error"].startswith("NonFiniteLossError: non-finite loss at step")
    assert "optimizer.lr (now 1e+06)" in status["error"]
    assert not list(run_dir.glob("checkpoints/*.ckpt"))


def test_gradient_clipping_is_passed_to_the_trainer_and_clips(tmp_path, monkeypatch):
    norms = []  # (clip value the hook got, the trainer's, norm before, norm after)
    original = LitModel.configure_gradient_clipping

    def clip(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        before = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        original(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        after = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        norms.append((gradient_clip_val, self.trainer.gradient_clip_val, before, after))

    monkeypatch.setattr(LitModel, "configure_gradient_clipping", clip)
    train_run(tmp_path / "run", [*AE, "trainer.max_epochs=1", "trainer.gradient_clip_val=0.5"])
    assert len(norms) == STEPS_PER_EPOCH
    assert all(hook == trainer == 0.5 for hook, trainer, _, _ in norms)
    assert max(before for *_, before, _ in norms) > 1.0  # clipping had something to do
    assert all(after <= 0.5 * (1 + 1e-5) for *_, after in norms)


def test_term_means_record_the_first_non_finite_step_and_terms():
    nan, inf = math.nan, math.inf

    def terms(loss: float, recon: float, kl: float) -> dict[str, torch.Tensor]:
        return {"loss": torch.tensor(loss), "recon": torch.tensor(recon), "kl": torch.tensor(kl)}

    means = TermMeans()
    assert means.first_nonfinite() is None
    means.add(terms(1.0, 1.0, 0.0), 4, step=0)
    means.add(terms(2.0, 2.0, 0.0), 4, step=1)
    assert means.first_nonfinite() is None
    means.reset()  # a new epoch: the means start afresh, a fault is kept
    means.add(terms(nan, nan, inf), 4, step=2)
    means.add(terms(nan, 3.0, -inf), 4, step=3)
    means.reset()
    fault = means.first_nonfinite()
    assert fault.step == 2
    assert list(fault.values) == ["loss", "recon", "kl"]
    assert math.isnan(fault.values["loss"]) and fault.values["kl"] == inf
    assert fault.describe("train/") == "train/loss and train/recon became nan, train/kl became inf"

    # A term that goes bad later is recorded at its own first step.
    later = TermMeans()
    later.add(terms(1.0, 1.0, 0.0), 4, step=5)
    later.add(terms(1.0, 1.0, inf), 4, step=6)
    later.add(terms(nan, nan, nan), 4, step=7)
    assert later.first_nonfinite().values == {"kl": inf}
    assert later._first_bad_step.tolist() == [7, 7, 6]

    # Adding reads nothing back to the host: meta tensors have no values to read.
    on_meta = TermMeans()
    for step in range(3):
        on_meta.add({"loss": torch.empty((), device="meta")}, 4, step=step)
    with pytest.raises(NotImplementedError):
        on_meta.first_nonfinite()  # reading the record is the one sync

    # Without a step (evaluation) nothing is recorded.
    evaluation = TermMeans()
    evaluation.add(terms(nan, nan, nan), 4)
    assert evaluation.first_nonfinite() is None

    class TwoProcesses:  # the other process saw kl become -inf earlier, at step 1
        def all_gather(self, tensor):
            if tensor.is_floating_point():
                return torch.stack([tensor, torch.tensor([0.0, 0.0, -inf])])
            return torch.stack([tensor, torch.tensor([NEVER, NEVER, 1])])

    fault = means.first_nonfinite(TwoProcesses())
    assert fault.step == 1 and fault.values == {"kl": -inf}
