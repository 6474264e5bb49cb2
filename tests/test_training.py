"""Trainer (docs/method.md section 6): schedules, re-randomisation timing, what is trained,
learning, resume, checkpoints moved between devices, and the process-wide switches of CUDA
trials (tested on CPU with stand-ins; the CUDA side is in test_cuda.py)."""
import copy
import math
import os
import threading
import warnings

import pytest
import torch

import iterand_tune.training as training
from iterand_tune.config import METHODS, TrialConfig
from iterand_tune.data import DeviceJpegLoader
from iterand_tune.models import SplitBatchNorm2d, create_model
from iterand_tune.training import (AutocastForward, Trainer, data_parallel, lr_at,
                                   replica_bn_splits, resolve_device, use_deterministic_cuda)

from helpers import count_host_reads

# Reported every epoch (docs/experiments.md, "Metrics").
EPOCH_METRICS = {"epoch", "train_acc", "train_loss", "val_acc", "best_val_acc", "best_epoch", "lr",
                 "iterations", "epoch_seconds", "epoch_end_time", "params_before_pruning",
                 "params_after_pruning"}
TIMES = ("epoch_seconds", "epoch_end_time")  # wall-clock figures: differ between runs


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
    assert _strip(ep) == _strip(r0)


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
    assert EPOCH_METRICS <= set(ms[0]) and "test_acc" not in ms[0]
    assert ms[0]["epoch_end_time"] <= ms[1]["epoch_end_time"] and "peak_gpu_reserved_mb" not in ms[0]
    assert {"test_acc", "test_loss"} <= set(ms[1])
    assert ms[1]["best_val_acc"] == max(m["val_acc"] for m in ms)
    assert ms[1]["best_epoch"] == 1 + max(range(2), key=lambda i: ms[i]["val_acc"])
    assert ms[0]["params_after_pruning"] < ms[0]["params_before_pruning"]
    assert 0 <= ms[1]["test_acc"] <= 100
    assert t.done
    with pytest.raises(RuntimeError):
        t.train_epoch()


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("method,lr", [("sgd", 0.01), ("edgepopup", 0.3), ("iterand", 0.3)])
def test_short_digits_run_learns(method, lr):
    # Batches of 32: 160 steps in 4 epochs, well past the plateau that dense Conv6 sits on at
    # first. Under ATen's default, avx2 and avx512 kernels every method ends at 86-98%
    # validation accuracy; with batches of 64 (80 steps) the CPU's vector unit decided whether
    # SGD or IteRand had left the plateau (60-89%).
    # One thread, as a trial on one CPU trains: the same numerics on any machine's core count,
    # and no contention with the other test worker (the run takes about 6 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms = list(Trainer(digits(method, epochs=4, lr=lr, rerand_freq=10, batch_size=32)).fit())
    finally:
        torch.set_num_threads(threads)
    assert ms[-1]["val_acc"] > 70 and ms[-1]["test_acc"] > 70  # chance is 10%
    assert ms[-1]["train_loss"] < ms[0]["train_loss"]


# ----------------------------------------------------------------------------- resume


def _strip(ms):
    return [{k: v for k, v in m.items() if k not in TIMES} for m in ms]


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


# ----------------------------------------------------------------------------- epochs and loaders


def test_train_loader_is_told_each_epoch_before_it_runs(tmp_path):
    # ImageNet's loader re-seeds its sampler from (seed, epoch) in set_epoch.
    cfg = digits(epochs=3, batch_size=16, batch_size_eval=16, debug_max_iters=1, debug_max_eval_iters=1)
    t = Trainer(cfg)
    calls = []
    t.loaders.train.set_epoch = lambda e: calls.append((e, t.iteration))
    list(t.fit())
    assert calls == [(0, 0), (1, 1), (2, 2)]  # epoch e announced before its first iteration
    resumed = Trainer(cfg)
    t.epoch, t.diverged = 1, False
    resumed.load_state_dict(copy.deepcopy(t.state_dict()))
    calls.clear()
    resumed.loaders.train.set_epoch = lambda e: calls.append((e, resumed.iteration))
    resumed.train_epoch()
    assert calls == [(1, 3)]


# ----------------------------------------------------------------------------- devices of a checkpoint


def _next_epoch_after_load(cfg, state):
    """Metrics of the next epoch of a fresh trainer loading `state` (a deep copy: the optimizer
    adopts loaded tensors), and the warnings the load gave."""
    t = Trainer(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.load_state_dict(copy.deepcopy(state))
    return _strip([t.train_epoch()])[0], [str(w.message) for w in caught]


def test_checkpoints_say_on_which_device_their_data_rng_was(tmp_path):
    # IteRand with augmentation: data order, crops, flips and re-draws all draw from RNGs.
    cfg = digits("iterand", epochs=3, batch_size=16, batch_size_eval=16, debug_max_iters=2,
                 rerand_freq=2, train_augmentation=True, debug_max_eval_iters=1)
    t = Trainer(cfg)
    t.train_epoch()
    state = copy.deepcopy(t.state_dict())
    assert state["rng"]["data_device"] == "cpu"
    continued = _strip([t.train_epoch()])[0]  # the uninterrupted run's next epoch
    # A checkpoint from before the tag still resumes bit-exactly.
    old = copy.deepcopy(state)
    del old["rng"]["data_device"]
    nxt, said = _next_epoch_after_load(cfg, old)
    assert nxt == continued and said == []
    # From a GPU: a CUDA generator's state is 16 bytes, which a CPU generator refuses. The
    # trial continues from a data stream seeded by (seed, epoch), says so, and every such resume
    # draws the same.
    gpu = copy.deepcopy(state)
    gpu["rng"].update(data=torch.arange(16, dtype=torch.uint8), data_device="cuda")
    torch.save(gpu, tmp_path / "gpu.pt")
    gpu = torch.load(tmp_path / "gpu.pt", weights_only=True)
    first, said = _next_epoch_after_load(cfg, gpu)
    second, said_again = _next_epoch_after_load(cfg, gpu)
    assert first == second and first["epoch"] == continued["epoch"] == 2
    assert len(said) == 1 and "cuda" in said[0] and "(seed 1, epoch 1)" in said[0] and said == said_again
    # Untagged and GPU-sized (an old checkpoint from a GPU): found out by the state's size.
    del gpu["rng"]["data_device"]
    untagged, said = _next_epoch_after_load(cfg, gpu)
    assert untagged == first and len(said) == 1


def test_only_as_many_cuda_states_as_visible_gpus_are_restored(monkeypatch):
    # torch.cuda.set_rng_state_all fails with more saved states than visible GPUs.
    cfg = digits(epochs=2, debug_max_iters=1, debug_max_eval_iters=1)
    t = Trainer(cfg)
    state = t.state_dict()
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((int(s[0]), i)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("all states"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the data state is the CPU's
        Trainer.load_state_dict(t, state)
    assert restored == [(0, 0)]


# ----------------------------------------------------------------------------- CUDA-only switches


def test_cuda_determinism_switches(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, warn_only: calls.append((on, warn_only)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    use_deterministic_cuda(False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    use_deterministic_cuda(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's choice is kept
    use_deterministic_cuda(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert calls == [(False, True), (True, True), (True, True)]


def test_cpu_trainer_leaves_deterministic_algorithms_alone(monkeypatch):
    monkeypatch.setattr(training, "use_deterministic_cuda", lambda *a: pytest.fail("CUDA switches"))
    before = torch.are_deterministic_algorithms_enabled()
    Trainer(digits(epochs=1))
    assert torch.are_deterministic_algorithms_enabled() == before


def test_autocast_forward_keeps_bf16_where_a_replica_thread_says_otherwise():
    # DataParallel's replica threads re-enter autocast without a dtype, which is float16 in a new
    # CUDA thread. Here a thread opens float16 autocast on CPU, as such a replica would: the
    # wrapper's own autocast must win.
    torch.manual_seed(11)
    cfg = TrialConfig(model="conv6x0.25", train_mode="score_only", conv_sparsity=0.5, bn_affine=False)
    model = create_model("conv6x0.25", cfg)
    dtypes = []
    model.features[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    wrapped = AutocastForward(model, "cpu", torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)

    errors = []

    def replica():
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                wrapped(x)
            with torch.autocast("cpu", dtype=torch.float16):
                model(x)  # unwrapped, the thread's dtype rules: what went wrong before
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    thread = threading.Thread(target=replica)
    thread.start()
    thread.join()
    assert not errors and dtypes == [torch.bfloat16, torch.float16]
    net = data_parallel(model, 1, torch.bfloat16)
    assert isinstance(net, torch.nn.DataParallel) and isinstance(net.module, AutocastForward)
    assert net.module.module is model and net.module.dtype == torch.bfloat16
    assert net.module.device_type == "cuda"
    assert data_parallel(model, 1, None).module is model  # fp32: nothing to re-enter


# ----------------------------------------------------------------------------- BatchNorm over parts


def test_bn_splits_build_split_batchnorm_and_train():
    t = Trainer(digits("edgepopup", model="resnet18x0.125", bn_splits=2, epochs=1, debug_max_iters=2))
    bns = [m for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SplitBatchNorm2d) and m.splits == 2 for m in bns)
    (metrics,) = list(t.fit())
    assert metrics["iterations"] == 2 and int(bns[0].num_batches_tracked) == 2
    plain = Trainer(digits("edgepopup", model="resnet18x0.125", epochs=1))
    assert not any(isinstance(m, SplitBatchNorm2d) for m in plain.model.modules())


@pytest.mark.parametrize("bn_splits, replicas, per_replica", [
    (2, 1, 2), (1, 1, 1), (2, 2, 1), (4, 2, 2), (1, 2, 1),  # bn_splits 1 on 2 GPUs: as before
])
def test_each_data_parallel_replica_normalises_its_share_of_the_splits(bn_splits, replicas, per_replica):
    assert replica_bn_splits(bn_splits, replicas) == per_replica


def test_splits_that_do_not_divide_over_the_gpus_are_refused():
    with pytest.raises(ValueError, match="bn_splits = 3 cannot be spread over 2 GPUs"):
        replica_bn_splits(3, 2)


def test_an_imagenet_trial_on_the_device_path_with_split_batchnorm(tmp_path):
    from test_data_loaders import make_jpeg_folder

    make_jpeg_folder(tmp_path, odd_files=False)
    cfg = TrialConfig(**{**METHODS["iterand"], "rerand_freq": 3}, model="resnet18x0.125", dataset="imagenet",
                      dataset_dir=str(tmp_path), batch_size=4, batch_size_eval=4, num_workers=0, epochs=2,
                      debug_max_iters=2, imagenet_decode="device", bn_splits=2, use_cuda=False)
    t = Trainer(cfg)
    assert isinstance(t.loaders.train, DeviceJpegLoader) and t.model.fc.out_features == 2
    assert isinstance(t.model.stem[1], SplitBatchNorm2d) and t.model.stem[1].splits == 2
    ms = list(t.fit())
    assert [m["iterations"] for m in ms] == [2, 4] and all(math.isfinite(m["train_loss"]) for m in ms)
    assert "test_acc" in ms[-1] and int(t.model.stem[1].num_batches_tracked) == 4
