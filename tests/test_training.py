"""Trainer (SPEC 6): schedules, re-randomisation timing, what is trained, learning, resume."""
import math

import pytest
import torch

import iterand_tune.training as training
from iterand_tune.config import METHODS, TrialConfig
from iterand_tune.training import Trainer, lr_at, resolve_device

from helpers import count_host_reads

DESIGN_METRICS = {"epoch", "train_acc", "train_loss", "val_acc", "best_val_acc", "best_epoch", "lr",
                  "iterations", "epoch_seconds", "params_before_pruning", "params_after_pruning"}


def digits(method="edgepopup", **kw):
    base = dict(METHODS[method], dataset="digits", model="conv6x0.25", batch_size=64,
                weight_decay=1e-4, train_augmentation=False, use_cuda=False)
    base.update(kw)
    return TrialConfig(**base)


# ----------------------------------------------------------------------------- schedules


def test_cosine_schedule_values():
    cfg = TrialConfig(lr=0.1, epochs=100)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 50) == pytest.approx(0.05)
    assert lr_at(cfg, 25) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr_at(cfg, 99) == pytest.approx(0.05 * (1 + math.cos(math.pi * 99 / 100)))


def test_imagenet_schedule_with_warmup_and_finetuning():
    cfg = TrialConfig(lr=0.1, epochs=105, warmup_epochs=5, finetuning_epochs=5, finetuning_lr=1e-5)
    assert [lr_at(cfg, e) for e in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lr_at(cfg, 5) == pytest.approx(0.1)                       # cosine starts at lr
    assert lr_at(cfg, 52) == pytest.approx(0.05 * (1 + math.cos(math.pi * 47 / 95)))
    assert lr_at(cfg, 99) == pytest.approx(0.05 * (1 + math.cos(math.pi * 94 / 95)))
    assert [lr_at(cfg, e) for e in range(100, 105)] == [1e-5] * 5


def test_multistep_and_constant_schedules():
    cfg = TrialConfig(lr=0.1, lr_scheduler="MultiStepLR", lr_milestones=[2, 4], multisteplr_gamma=0.1)
    assert [lr_at(cfg, e) for e in range(6)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert lr_at(TrialConfig(lr=0.3, lr_scheduler=None), 77) == 0.3


def test_device_is_cpu_without_cuda():
    assert resolve_device(TrialConfig(use_cuda=False)).type == "cpu"
    assert resolve_device(TrialConfig(), "cpu").type == "cpu"


@pytest.mark.parametrize("unit,freq,expected", [
    ("iteration", 3, [2, 5, 8, 11]),        # before iteration it when (it + 1) % 3 == 0
    ("iteration", 7, [6]),
    ("epoch", 2, [2, 5, 8, 11]),            # twice an epoch of 6 iterations -> every 3
])
def test_rerandomisation_timing(monkeypatch, unit, freq, expected):
    calls = []
    monkeypatch.setattr(training, "rerandomize_", lambda model, *a: calls.append(trainer.iteration))
    trainer = Trainer(digits("iterand", rerand_freq=freq, rerand_freq_unit=unit, epochs=2,
                             debug_max_iters=6))
    list(trainer.fit())
    assert trainer.iteration == 12
    assert calls == expected


@pytest.mark.parametrize("rerand", [{}, dict(rerand_mode="bernoulli", rerand_lambda=0.0)])
def test_edgepopup_never_rerandomises(monkeypatch, rerand):
    # Also edge-popup written as IteRand with r = 0 (the original configs): no wasted draws.
    monkeypatch.setattr(training, "rerandomize_", lambda *a: pytest.fail("re-randomised"))
    list(Trainer(digits("edgepopup", epochs=1, debug_max_iters=4, rerand_freq=1, **rerand)).fit())


def test_debug_max_eval_iters_caps_evaluation():
    # digits has 180 validation images; one batch of 50 gives accuracies in steps of 2%.
    full = Trainer(digits(epochs=1, debug_max_iters=1, batch_size_eval=50))
    capped = Trainer(digits(epochs=1, debug_max_iters=1, batch_size_eval=50, debug_max_eval_iters=1))
    _, acc_full = full.evaluate("val")
    _, acc_capped = capped.evaluate("val")
    assert round(acc_full * 180 / 100, 6).is_integer()
    assert round(acc_capped * 50 / 100, 6).is_integer()
    seen = []
    capped.net = lambda x: (seen.append(len(x)), torch.zeros(len(x), 10))[1]
    capped.evaluate("test")
    assert seen == [50]  # one batch of the test set, not all 360 images


# ----------------------------------------------------------------------------- what is trained


def test_score_only_trains_scores_and_never_weights():
    t = Trainer(digits("edgepopup", epochs=1, debug_max_iters=3))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    list(t.fit())
    after = t.model.state_dict()
    for k in before:
        if k.endswith("scores"):
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k  # weights and biases frozen
    trained = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for n, p in t.model.named_parameters() if n.endswith("scores")}


def test_iterand_changes_only_pruned_weights_and_r_zero_is_edgepopup():
    t = Trainer(digits("iterand", epochs=1, debug_max_iters=4, rerand_freq=2, rerand_lambda=0.5))
    w0 = t.model.features[0].weight.detach().clone()
    list(t.fit())
    assert not torch.equal(t.model.features[0].weight, w0)
    ep = [m for m in Trainer(digits("edgepopup", epochs=2, debug_max_iters=4)).fit()]
    r0 = [m for m in Trainer(digits("iterand", epochs=2, debug_max_iters=4, rerand_freq=2,
                                    rerand_lambda=0.0)).fit()]
    strip = lambda ms: [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in ms]  # noqa: E731
    assert strip(ep) == strip(r0)


def test_sgd_trains_weights_with_bn_affine():
    t = Trainer(digits("sgd", model="resnet18x0.25", epochs=1, debug_max_iters=2, lr=0.01))
    names = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert "stem.1.weight" in names and "stem.0.weight" in names
    assert not any(n.endswith("scores") for n in names)


def test_optimizer_follows_config():
    sgd = Trainer(digits("edgepopup", epochs=1, sgd_momentum=0.8, weight_decay=3e-4))
    assert isinstance(sgd.optimizer, torch.optim.SGD)
    assert sgd.optimizer.defaults["momentum"] == 0.8 and sgd.optimizer.defaults["weight_decay"] == 3e-4
    adamw = Trainer(digits("sgd", optimizer="AdamW", lr=1e-3, epochs=2, debug_max_iters=2))
    assert isinstance(adamw.optimizer, torch.optim.AdamW)
    ms = list(adamw.fit())
    assert [m["lr"] for m in ms] == pytest.approx([1e-3, 5e-4])  # the schedule drives AdamW too
    assert adamw.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_metrics_every_epoch_and_test_after_the_last():
    t = Trainer(digits("iterand", epochs=2, debug_max_iters=3, rerand_freq=2))
    ms = list(t.fit())
    assert [m["epoch"] for m in ms] == [1, 2] and [m["iterations"] for m in ms] == [3, 6]
    assert DESIGN_METRICS <= set(ms[0]) and "test_acc" not in ms[0]
    assert {"test_acc", "test_loss"} <= set(ms[1])
    assert ms[1]["best_val_acc"] == max(m["val_acc"] for m in ms)
    assert ms[1]["best_epoch"] == 1 + max(range(2), key=lambda i: ms[i]["val_acc"])
    assert ms[0]["params_after_pruning"] < ms[0]["params_before_pruning"]
    assert 0 <= ms[1]["test_acc"] <= 100
    assert t.done
    with pytest.raises(RuntimeError):
        t.train_epoch()


@pytest.mark.slow
@pytest.mark.parametrize("method,lr", [("sgd", 0.01), ("edgepopup", 0.3), ("iterand", 0.3)])
def test_short_digits_run_learns(method, lr):
    ms = list(Trainer(digits(method, epochs=6, lr=lr, rerand_freq=10)).fit())
    assert ms[-1]["val_acc"] > 70 and ms[-1]["test_acc"] > 70  # chance is 10%
    assert ms[-1]["train_loss"] < ms[0]["train_loss"]


# ----------------------------------------------------------------------------- resume


def _strip(ms):
    return [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in ms]


def test_resume_after_any_epoch_is_bit_exact(tmp_path):
    # IteRand with augmentation exercises every RNG: data order, crops, flips, re-draws.
    cfg = digits("iterand", epochs=4, debug_max_iters=4, rerand_freq=3, train_augmentation=True,
                 lr_scheduler="CustomCosineLR", warmup_epochs=1)
    reference = Trainer(cfg)
    expected = _strip(reference.fit())
    final = reference.model.state_dict()
    for k in range(1, cfg.epochs):
        first = Trainer(cfg)
        got = [first.train_epoch() for _ in range(k)]
        path = tmp_path / f"after{k}.pt"
        first.save(str(path))
        torch.manual_seed(999)  # disturb every RNG before resuming in a fresh trainer
        second = Trainer(cfg)
        second.load(str(path))  # torch.load(weights_only=True)
        got += list(second.fit())
        assert _strip(got) == expected, f"resume after epoch {k} diverged"
        for name, value in second.model.state_dict().items():
            assert torch.equal(value, final[name]), name


def test_checkpoint_of_another_model_is_refused(tmp_path):
    t = Trainer(digits("edgepopup", epochs=1, debug_max_iters=1))
    t.save(str(tmp_path / "a.pt"))
    other = Trainer(digits("edgepopup", model="conv6x0.5", epochs=1, debug_max_iters=1))
    with pytest.raises(ValueError, match="model"):
        other.load(str(tmp_path / "a.pt"))


# ----------------------------------------------------------------------------- host syncs

def test_no_host_sync_per_training_step(monkeypatch):
    # Reads happen once per epoch (metrics, evaluation), never per step: the counts do not
    # grow with the number of steps (forward, mask, backward, re-draws, batching, augmentation).
    few, many = count_host_reads(monkeypatch, 2), count_host_reads(monkeypatch, 8)
    assert few == many
    assert few["item"] > 0  # the counter works: epoch metrics are read once
