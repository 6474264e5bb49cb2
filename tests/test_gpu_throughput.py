"""GPU speed work, tested on CPU: the runtime options (channels_last, bf16 autocast,
torch.compile, cuDNN flags) and their checkpoints, the synthetic CIFAR-shaped dataset, no host
reads per step with the options on, and benchmarks/gpu_throughput.py (its reference-style model,
its overlap arithmetic, its check that a compile row really ran compiled, apart from its
compilation time). Its child processes run in benchmarks/gpu_check.py's CPU version
(tests/test_gpu_check.py); the CUDA side of all this is tests/test_cuda.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import iterand_tune.supermask as supermask
from iterand_tune.config import METHODS, TrialConfig
from iterand_tune.models import create_model
from iterand_tune.supermask import rerandomize_
from iterand_tune.training import Trainer, cudnn_flags

from helpers import SYNCING, count_host_reads, load_benchmark, use_topk_threshold


def digits(method="edgepopup", **kw):
    """A small CPU trial on digits; evaluation capped to one batch unless asked otherwise."""
    base = dict(METHODS[method], dataset="digits", model="conv6x0.25", batch_size=64,
                weight_decay=1e-4, train_augmentation=False, use_cuda=False, debug_max_eval_iters=1)
    base.update(kw)
    return TrialConfig(**base)


def _strip(ms):
    return [{k: v for k, v in m.items() if k not in ("epoch_seconds", "epoch_end_time")} for m in ms]


def _bench():
    return load_benchmark("gpu_throughput")


# ----------------------------------------------------------------------------- channels_last


@pytest.mark.parametrize("model", ["conv6x0.25", "resnet18x0.25"])
def test_channels_last_gives_the_default_outputs(model):
    plain = Trainer(digits(model=model))
    nhwc = Trainer(digits(model=model, channels_last=True))
    convs = [p for p in nhwc.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for a, b in zip(plain.model.state_dict().values(), nhwc.model.state_dict().values()):
        assert torch.equal(a, b)  # same values, only the layout differs
    x, _ = next(iter(plain.loaders.val))
    assert nhwc.to_input(x).is_contiguous(memory_format=torch.channels_last)
    plain.model.eval(), nhwc.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(nhwc.net(nhwc.to_input(x)), plain.net(x), rtol=1e-4, atol=1e-5)


def test_channels_last_trains_like_the_default():
    # IteRand re-draws every 2 iterations: the draws land on the same elements in either layout.
    cfg = dict(method="iterand", epochs=2, debug_max_iters=4, rerand_freq=2, rerand_lambda=0.5)
    plain = list(Trainer(digits(**cfg)).fit())
    nhwc = list(Trainer(digits(**cfg, channels_last=True)).fit())
    for a, b in zip(plain, nhwc):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)


def test_rerandomize_draws_the_same_weights_in_either_layout():
    cfg = TrialConfig(model="conv6x0.25", train_mode="score_only", conv_sparsity=0.5, bn_affine=False)
    torch.manual_seed(0)
    plain = create_model("conv6x0.25", cfg)
    initial = {k: v.clone() for k, v in plain.state_dict().items()}
    nhwc = create_model("conv6x0.25", cfg)
    nhwc.load_state_dict(initial)
    nhwc.to(memory_format=torch.channels_last)
    for model in (plain, nhwc):
        torch.manual_seed(1)
        rerandomize_(model, "bernoulli", 0.5)
        rerandomize_(model, "manual", 0.5, 0.3)
    for (name, a), b in zip(plain.state_dict().items(), nhwc.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(plain.features[0].weight, initial["features.0.weight"])  # it re-drew


def test_resume_is_bit_exact_with_channels_last(tmp_path):
    cfg = digits("iterand", epochs=3, debug_max_iters=4, rerand_freq=3, train_augmentation=True,
                 channels_last=True)
    reference = Trainer(cfg)
    expected = _strip(reference.fit())
    final = reference.model.state_dict()
    for k in (1, 2):
        first = Trainer(cfg)
        got = [first.train_epoch() for _ in range(k)]
        first.save(str(tmp_path / "ckpt.pt"))
        torch.manual_seed(999)
        second = Trainer(cfg)
        second.load(str(tmp_path / "ckpt.pt"))
        assert all(p.is_contiguous(memory_format=torch.channels_last)
                   for p in second.model.parameters() if p.dim() == 4)
        got += list(second.fit())
        assert _strip(got) == expected, f"resume after epoch {k} diverged"
        for name, value in second.model.state_dict().items():
            assert torch.equal(value, final[name]), name


def test_checkpoints_move_between_layouts(tmp_path):
    # A trial may resume with channels_last switched on or off: checkpoints hold plain values.
    cfg = digits("iterand", epochs=2, debug_max_iters=3, rerand_freq=2)
    expected = _strip(Trainer(cfg).fit())
    first = Trainer(cfg.replace(channels_last=True))
    got = [first.train_epoch()]
    first.save(str(tmp_path / "nhwc.pt"))
    second = Trainer(cfg)
    second.load(str(tmp_path / "nhwc.pt"))
    got += list(second.fit())
    assert got[1]["train_loss"] == pytest.approx(expected[1]["train_loss"], rel=1e-4)


# ----------------------------------------------------------------------------- bf16 autocast


def test_bf16_autocast_trains_with_finite_loss_and_fp32_parameters():
    t = Trainer(digits("iterand", autocast="bf16", epochs=2, debug_max_iters=4, rerand_freq=2, lr=0.3))
    dtypes = []
    t.model.features[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    ms = list(t.fit())
    assert dtypes and set(dtypes) == {torch.bfloat16}  # convolutions ran in bf16, train and eval
    for m in ms:
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert math.isfinite(m[key]), key
    assert math.isfinite(ms[-1]["test_loss"])
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # master copies stay fp32
    scores = [k for k in before if k.endswith("scores")]
    assert any(not torch.equal(before[k], t.model.state_dict()[k]) for k in scores)  # it learned


def test_bf16_autocast_is_close_to_fp32():
    fp32 = list(Trainer(digits(epochs=1, debug_max_iters=3)).fit())
    bf16 = list(Trainer(digits(epochs=1, debug_max_iters=3, autocast="bf16")).fit())
    assert bf16[0]["train_loss"] == pytest.approx(fp32[0]["train_loss"], rel=0.05)


def test_no_autocast_is_a_no_op_context():
    t = Trainer(digits(epochs=1))
    assert t.autocast_dtype is None
    with t.autocast():
        assert not torch.is_autocast_enabled("cpu")


# ----------------------------------------------------------------------------- torch.compile


class _FakeCompiled(nn.Module):
    """Stands in for torch.compile's wrapper: counts calls, delegates to the model."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self._orig_mod(x)


def _fake_compile(monkeypatch):
    """torch.compile replaced by _FakeCompiled; returns the wrappers made, the keyword arguments
    passed and the number of compiler resets."""
    compiled, kwargs, resets = [], [], []

    def fake_compile(model, **kw):
        compiled.append(_FakeCompiled(model))
        kwargs.append(kw)
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    return compiled, kwargs, resets


def test_compile_wraps_the_forward_network_only(monkeypatch, tmp_path):
    compiled, kwargs, resets = _fake_compile(monkeypatch)
    t = Trainer(digits("iterand", compile=True, epochs=2, debug_max_iters=3, rerand_freq=2))
    assert len(compiled) == 1 and t.net is compiled[0] and compiled[0]._orig_mod is t.model
    assert kwargs == [{"dynamic": False}] and len(resets) == 1  # a fresh Dynamo for every trial
    ms = list(t.fit())
    assert compiled[0].calls > 6  # training steps and evaluation batches went through it
    # Checkpoints come from the model itself: no wrapper prefix, loadable without compile.
    assert not any(k.startswith("_orig_mod") for k in t.state_dict()["model"])
    t.save(str(tmp_path / "c.pt"))
    plain = Trainer(digits("iterand", epochs=2, debug_max_iters=3, rerand_freq=2))
    plain.load(str(tmp_path / "c.pt"))
    assert plain.epoch == 2
    expected = list(Trainer(digits("iterand", epochs=2, debug_max_iters=3, rerand_freq=2)).fit())
    for got, want in zip(_strip(ms), _strip(expected)):  # the wrapper changes nothing else;
        for key in ("val_loss", "test_loss"):  # the evaluation batch is padded (another shape)
            assert got.pop(key, 0.0) == pytest.approx(want.pop(key, 0.0), rel=1e-5)
        assert got == want


def test_compiled_trials_keep_one_batch_shape_for_training_and_one_for_evaluation(monkeypatch):
    # digits: 1,257 training images = 4 x 256 + 233; 180 validation images = 128 + 52.
    compiled, _, _ = _fake_compile(monkeypatch)
    shapes = []
    cfg = dict(epochs=1, batch_size=256, batch_size_eval=128, debug_max_eval_iters=None,
               evaluate_test=False)
    t = Trainer(digits(compile=True, **cfg))
    t.model.register_forward_pre_hook(lambda m, args: shapes.append((m.training, args[0].shape[0])))
    (m,) = list(t.fit())
    assert t.iters_per_epoch == 4 and m["iterations"] == 4  # the partial batch of 233 is left out
    assert sorted(set(shapes)) == [(False, 128), (True, 256)]  # the 52 are padded to 128
    assert Trainer(digits(**cfg)).iters_per_epoch == 5
    t.compiled = False  # the same model, evaluated without padding: the same figures
    loss, acc = t.evaluate("val")
    assert m["val_loss"] == pytest.approx(loss, rel=1e-5) and m["val_acc"] == pytest.approx(acc)
    # Without running statistics BatchNorm normalises by the batch: no padding then.
    shapes.clear()
    t = Trainer(digits("sgd", model="resnet18x0.25", compile=True, bn_track_running_stats=False, **cfg))
    t.model.register_forward_pre_hook(lambda m, args: shapes.append((m.training, args[0].shape[0])))
    t.evaluate("val")
    assert shapes == [(False, 128), (False, 52)]


def test_compile_off_by_default(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    t = Trainer(digits(epochs=1))
    assert t.net is t.model


@pytest.mark.slow
def test_compile_traces_the_supermask_network(monkeypatch):
    # Inductor takes minutes on a CPU; AOTAutograd's eager backend traces the same graph
    # (forward and backward of the mask function, threshold by topk) and runs it in seconds.
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="aot_eager", **kw))
    torch.compiler.reset()
    cfg = dict(method="iterand", epochs=1, debug_max_iters=3, rerand_freq=2)
    compiled = list(Trainer(digits(**cfg, compile=True)).fit())
    eager = list(Trainer(digits(**cfg)).fit())
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-5)
    assert compiled[0]["val_acc"] == pytest.approx(eager[0]["val_acc"], abs=1.0)
    # The benchmark's compile row: Dynamo's counters say it ran compiled, with no recompile.
    row = _bench().ours("conv6x0.25", dict(compile=True), 16, 2, 2, torch.device("cpu"), 64)
    assert row["compiled"] and row["images_per_s"] > 0, row
    # Compilation is timed apart: the first step less a steady one.
    assert row["first_step_s"] > row["compile_s"] > 0 and row["compile_threads"] >= 1
    torch.compiler.reset()


def test_threshold_under_compile_uses_torch_not_numpy(monkeypatch):
    scores = torch.randn(4, 3, 3, 3)
    k = supermask.mask_k(scores.numel(), 0.5)
    expected = supermask._threshold(scores, k)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(supermask.np, "partition", lambda *a: pytest.fail("numpy under compile"))
    assert torch.equal(supermask._threshold(scores, k), expected)


# ----------------------------------------------------------------------------- cuDNN


def test_cudnn_flags():
    assert cudnn_flags(TrialConfig()) == (True, False)  # the paper: deterministic cuDNN, no autotuning
    assert cudnn_flags(TrialConfig(deterministic=False)) == (False, True)
    assert cudnn_flags(TrialConfig(deterministic=False, cudnn_benchmark=False)) == (False, False)
    assert cudnn_flags(TrialConfig(deterministic=False, cudnn_benchmark=True)) == (False, True)


def test_cpu_trainer_leaves_cudnn_alone():
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    Trainer(digits(epochs=1, deterministic=False))
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == before


# ----------------------------------------------------------------------------- host syncs

def test_no_host_sync_per_step_with_channels_last_and_bf16(monkeypatch):
    opts = dict(channels_last=True, autocast="bf16")
    few, many = count_host_reads(monkeypatch, 2, **opts), count_host_reads(monkeypatch, 8, **opts)
    assert few == many and few["item"] > 0


def test_train_step_reads_nothing_back(monkeypatch):
    t = Trainer(digits("iterand", rerand_freq=1, epochs=1))
    use_topk_threshold(monkeypatch)
    x, y = next(iter(t.loaders.train))
    with monkeypatch.context() as m:
        for name in SYNCING:
            m.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host read in a step"))
        loss, correct = t.train_step(x, y)  # re-randomises too (rerand_freq 1)
    assert loss.device == x.device and correct.dtype == torch.long and t.iteration == 1


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_cifar10_trains_with_cifar_augmentation():
    cfg = TrialConfig(**{**METHODS["edgepopup"], "dataset": "synthetic_cifar10", "model": "conv6x0.25",
                         "epochs": 1, "batch_size": 32, "debug_max_iters": 2, "debug_max_eval_iters": 1,
                         "max_train_dataset_size": 64, "use_cuda": False})
    t = Trainer(cfg)
    assert t.loaders.train.augment.pad == 4 and t.loaders.train.augment.hflip
    (m,) = list(t.fit())
    assert m["iterations"] == 2 and math.isfinite(m["train_loss"]) and "test_acc" in m


# ----------------------------------------------------------------------------- the benchmark


def test_compile_row_that_ran_eagerly_is_not_reported_as_compiled(monkeypatch):
    # torch.compile that compiles nothing (as past Dynamo's recompile limit): no figure.
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    row = _bench().ours("conv6x0.25", dict(compile=True), 16, 1, 1, torch.device("cpu"), 32)
    assert row["compiled"] is False and row["images_per_s"] is None
    assert "no graph" in row["compile_note"]


def test_compile_verdict_from_dynamo_counters():
    verdict = _bench().compile_verdict
    zero = dict(graphs=0, frames=0, frames_ok=0, graph_breaks=0)
    warm = dict(graphs=2, frames=2, frames_ok=2, graph_breaks=0)
    assert verdict(zero, warm, warm) == (True, "2 graph(s), no recompile while timing")
    assert not verdict(zero, dict(warm, graph_breaks=1), dict(warm, graph_breaks=1))[0]
    assert not verdict(zero, dict(warm, frames=3), dict(warm, frames=3))[0]  # a frame failed
    ok, why = verdict(zero, warm, dict(warm, frames=3, frames_ok=3))
    assert not ok and "while timing" in why
    assert not verdict(warm, warm, warm)[0]  # nothing new compiled in the warm-up


def test_reference_style_model_matches_ours():
    bench = _bench()
    cfg = TrialConfig(**bench.edgepopup("conv6x0.25"))
    torch.manual_seed(0)
    ours = create_model("conv6x0.25", cfg)
    torch.manual_seed(0)
    ref = create_model("conv6x0.25", cfg, layers=bench.RefLayers.from_config(cfg))
    assert isinstance(ref.features[0], bench.RefConv2d) and isinstance(ref.classifier[-1], bench.RefLinear)
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(ref(x), ours(x))
    ref(x).sum().backward()
    ours(x).sum().backward()
    torch.testing.assert_close(ref.features[0].scores.grad, ours.features[0].scores.grad)


def _rows(start, epoch_seconds, pause=0.2, iters=10, batch=100):
    """A trial's epoch rows, as its process reports them, starting at `start` (s) on the
    trial's clock with the given epoch lengths."""
    rows, t = [], start
    for e, sec in enumerate(epoch_seconds, 1):
        t += sec
        rows.append(dict(epoch_end_time=t, epoch_seconds=sec, iterations=e * iters, batch_size=batch))
        t += pause
    return rows


def test_epochs_are_placed_by_the_trials_own_clock():
    spans = _bench().epoch_spans(_rows(1000.0, [5, 2, 2], pause=0.5, batch=50))
    # the first epoch (start-up) is left out; each later one ends at its epoch_end_time
    assert [x for span in spans for x in span] == pytest.approx([1005.5, 1007.5, 500, 1008, 1010, 500])


def test_aggregate_counts_only_the_window_where_all_trials_run():
    bench = _bench()
    # One trial alone: images over the wall time of its epochs after the first, pauses included.
    total, rates, overlapped = bench.aggregate_rate([_rows(100.3, [5, 2, 2, 2], pause=0.0)])
    assert overlapped and total == pytest.approx(1000 / 2) and rates == [total]
    # Two trials, the second starting 3 s late at the same speed: counted only while both run.
    both = [_rows(100.0, [1.0] * 10, pause=0.0), _rows(103.0, [1.0] * 10, pause=0.0)]
    total, rates, overlapped = bench.aggregate_rate(both)
    assert overlapped and rates == pytest.approx([1000, 1000]) and total == pytest.approx(2000)
    # No overlap at all: each trial's own rate, and said so.
    apart = [_rows(100.0, [1.0, 1.0]), _rows(200.0, [1.0, 1.0])]
    total, _, overlapped = bench.aggregate_rate(apart)
    assert not overlapped and total == pytest.approx(2000)


def test_throughput_without_torchvision_still_measures_ours(monkeypatch):
    # A bare GPU box may lack torchvision or Pillow: the reference row says so, ours still run.
    bench = _bench()
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None if name == "PIL" else real(name))
    rows = []
    threads = torch.get_num_threads()
    try:
        bench.throughput_rows(rows.append, "conv6x0.25", "cpu", 1, batch=8, steps=1, warmup=1, max_train=16)
    finally:
        torch.set_num_threads(threads)
    assert [r["pipeline"] for r in rows] == [bench.REFERENCE_LABEL, *bench.CPU_VARIANTS]
    assert rows[0]["images_per_s"] is None and rows[0]["note"] == "not measured: PIL not importable here"
    assert all(r["images_per_s"] > 0 and r["vs_reference"] is None for r in rows[1:])
