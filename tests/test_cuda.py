"""CUDA tests: what the GPU path computes, checked against the CPU path and by value. Every test
is marked `cuda` and skipped where there is no CUDA device; run them on a GPU machine with
`make gpu-check` (which runs `pytest -m cuda tests/test_cuda.py` and writes the results into its
report) or `python -m pytest -m cuda tests/test_cuda.py`.

Covered: the top-k threshold against the CPU's for every layer size of Conv6x1.0 and
ResNet18x1.0 (ties, constant scores, exact half ranks); masked forward and score gradients
against the CPU; re-randomisation on CUDA; the device loader on CUDA; no host synchronisation
in training steps with each runtime option; compile without recompiles; bit-exact resume;
checkpoints moving between CPU and GPU; autocast in DataParallel replicas; deterministic
algorithms; memory caps of fractional GPU shares; several trial processes sharing one GPU.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import threading
import warnings
from itertools import islice

import pytest
import torch
import torch.nn.functional as F

from iterand_tune.config import METHODS, TrialConfig
from iterand_tune.data import AugmentSpec, DeviceLoader, make_loaders, resized_crop_flip, sample_crop_params
from iterand_tune.models import create_model
from iterand_tune.supermask import (SparseConv2d, _kth_smallest_topk, _threshold, mask_k, masked_weight,
                                    rerandomize_, sparse_layers, supermask)
from iterand_tune.training import AutocastForward, Trainer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine: make gpu-check)")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")
TIMES = ("epoch_seconds", "epoch_end_time", "peak_gpu_memory_mb", "peak_gpu_reserved_mb")


def synthetic(method: str = "edgepopup", **kw) -> TrialConfig:
    """A short CUDA trial on synthetic CIFAR-10: 1,024 training images, one evaluation batch."""
    base = dict(METHODS[method], dataset="synthetic_cifar10", model="conv6x0.25", batch_size=64,
                batch_size_eval=256, max_train_dataset_size=1024, debug_max_eval_iters=1,
                weight_decay=5e-4, lr=0.1, epochs=2, debug_max_iters=4)
    base.update(kw)
    return TrialConfig(**base)


def _strip(ms):
    return [{k: v for k, v in m.items() if k not in TIMES} for m in ms]


def _score_shapes(model: str, p: float) -> list[tuple[int, ...]]:
    cfg = TrialConfig(model=model, train_mode="score_only", conv_sparsity=p, bn_affine=False)
    with torch.device("meta"):
        net = create_model(model, cfg)
    return sorted({tuple(layer.scores.shape) for layer in sparse_layers(net)})


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("model", ["conv6x1.0", "resnet18x1.0"])
def test_topk_threshold_equals_the_cpu_threshold_for_every_layer_size(model):
    # CPU: numpy's introselect; CUDA: torch.topk. Same k-th value, same mask, whatever the
    # scores: distinct, heavily tied, constant, and ranks at an exact half (p = 0.7 and 0.5).
    gen = torch.Generator().manual_seed(0)
    for shape in _score_shapes(model, 0.5):
        n = math.prod(shape)
        patterns = {
            "distinct": torch.randperm(n, generator=gen).float().reshape(shape),
            "normal": torch.randn(shape, generator=gen),
            "ties": torch.randint(0, 5, shape, generator=gen).float(),
            "constant": torch.full(shape, 0.25),
        }
        for name, cpu in patterns.items():
            gpu = cpu.to(CUDA)
            for p in (0.0, 0.3, 0.5, 0.6, 0.7, 0.999):
                k = mask_k(n, p)
                expected = _threshold(cpu, k)
                got = _threshold(gpu, k)
                assert got.device.type == "cuda" and got.item() == expected.item(), (shape, name, p)
                assert torch.equal(supermask(gpu, p).cpu(), supermask(cpu, p)), (shape, name, p)
            if len(shape) == 4:  # channels_last scores are flattened in memory order
                nhwc = gpu.contiguous(memory_format=torch.channels_last)
                k = mask_k(n, 0.7)
                assert _kth_smallest_topk(nhwc.permute(0, 2, 3, 1).reshape(-1), k).item() == \
                    _threshold(cpu, k).item()
                assert _threshold(nhwc, k).item() == _threshold(cpu, k).item()


def test_exact_half_rank_on_cuda_keeps_44237_of_a_128x128x3x3_layer():
    torch.manual_seed(1)
    conv = SparseConv2d(128, 128, 3, padding=1, sparsity=0.7).to(CUDA)
    with torch.no_grad():
        conv.scores.copy_(torch.randperm(conv.scores.numel(), device=CUDA).float().reshape(conv.scores.shape))
        conv.weight.fill_(1.0)
    assert int((conv.effective_weight() != 0).sum()) == 147456 - (103220 - 1) == 44237


# ----------------------------------------------------------------------------- forward and gradients


def test_masked_forward_and_score_gradients_equal_the_cpu_in_float64():
    torch.manual_seed(2)
    cfg = TrialConfig(model="conv6x0.25", train_mode="score_only", conv_sparsity=0.5, bn_affine=False)
    cpu = create_model("conv6x0.25", cfg).double()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x, y = torch.randn(16, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (16,))
    out_cpu = cpu(x)
    out_gpu = gpu(x.to(CUDA))
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-10, atol=1e-10)
    F.cross_entropy(out_cpu, y).backward()
    F.cross_entropy(out_gpu, y.to(CUDA)).backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        if name.endswith("scores"):
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_masked_weight_in_float32_equals_the_cpu_within_tolerance():
    torch.manual_seed(3)
    w, s = torch.randn(256, 128, 3, 3), torch.randn(256, 128, 3, 3)
    g = torch.randn_like(w)
    results = []
    for device in ("cpu", "cuda"):
        wd = w.to(device).requires_grad_(True)
        sd = s.to(device).requires_grad_(True)
        masked_weight(wd, sd, 0.6).backward(g.to(device))
        results.append((masked_weight(wd, sd, 0.6).detach().cpu(), sd.grad.cpu(), wd.grad.cpu()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)  # elementwise products: the same in fp32


# ----------------------------------------------------------------------------- re-randomisation


def test_rerandomize_on_cuda_replaces_about_p_r_and_keeps_the_rest():
    torch.manual_seed(4)
    layer = SparseConv2d(64, 128, 3, sparsity=0.5).to(CUDA)
    w0, s0 = layer.weight.detach().clone(), layer.scores.detach().clone()
    kept = supermask(s0, 0.5).bool()
    r = 0.3
    rerandomize_(layer, "bernoulli", r)
    w1 = layer.weight.detach()
    assert torch.equal(w1[kept], w0[kept]) and torch.equal(layer.scores.detach(), s0)
    n = w0.numel()
    changed = int((w1 != w0).sum())
    pruned = int((~kept).sum())
    assert pruned == mask_k(n, 0.5) - 1
    sd = math.sqrt(pruned * r * (1 - r))
    assert abs(changed - pruned * r) <= 5 * sd + 1  # about p * r of all weights
    # init_ draws U(-b, b) in float32 from the float64 bound b: the draw may round up to the
    # float32 value nearest b, which can lie just above b itself.
    bound = torch.tensor(math.sqrt(2) * math.sqrt(3 / (64 * 9)), dtype=torch.float32)
    assert w1.abs().max() <= torch.nextafter(bound, torch.tensor(math.inf))
    assert layer._rerand_draw.device.type == "cuda"
    # The scratch is no buffer: it follows the weight to another device on the next draw.
    layer.cpu()
    rerandomize_(layer, "bernoulli", r)
    assert layer._rerand_draw.device.type == "cpu"
    layer.to(CUDA)
    rerandomize_(layer, "bernoulli", r)
    assert layer._rerand_draw.device.type == "cuda" and "_rerand_draw" not in dict(layer.named_buffers())


# ----------------------------------------------------------------------------- the device loader


def test_device_loader_on_cuda_shapes_dtypes_and_normalisation():
    cfg = synthetic(batch_size=128, batch_size_eval=500, train_augmentation=True)
    gen = torch.Generator(device=CUDA).manual_seed(5)
    loaders = make_loaders(cfg, CUDA, gen)
    x, y = next(iter(loaders.train))
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and x.device.type == "cuda"
    assert y.shape == (128,) and y.dtype == torch.int64 and y.device.type == "cuda"
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    val = loaders.val
    xv, _ = next(iter(val))
    mean = torch.tensor(loaders.info.mean, device=CUDA).view(1, 3, 1, 1)
    std = torch.tensor(loaders.info.std, device=CUDA).view(1, 3, 1, 1)
    expected = val.x[:500].float() / 255.0  # no augmentation: the images, normalised
    torch.testing.assert_close(xv * std + mean, expected, rtol=0, atol=1e-5)
    batches = list(loaders.train)
    assert sum(len(b[1]) for b in batches) == 1024 and len(batches) == len(loaders.train)


def test_device_loader_crops_and_flips_have_torchvisions_statistics():
    # Flips: half of the images, and exactly mirrored (full-image crops leave nothing else).
    n = 4096
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[..., 16:] = 255  # bright right half
    gen = torch.Generator(device=CUDA).manual_seed(6)
    loader = DeviceLoader(x, torch.zeros(n, dtype=torch.long), 512, device=CUDA, mean=(0, 0, 0),
                          std=(1, 1, 1), shuffle=True, generator=gen, out_size=32,
                          augment=AugmentSpec(pad=0, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True))
    flipped = torch.cat([(b[:, 0, 0, 0] > 0.5) for b, _ in loader]).float()
    assert abs(flipped.mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)
    # Crops: CIFAR's policy (pad 4, scale 0.08-1, ratio 3/4-4/3) drawn on CUDA and on CPU from
    # the same distribution: the mean area and aspect of 20,000 boxes agree.
    spec = AugmentSpec(pad=4)
    stats = []
    for device, g in ((CUDA, torch.Generator(device=CUDA).manual_seed(7)), ("cpu", torch.Generator().manual_seed(7))):
        top, left, h, w = sample_crop_params(20000, 32, 32, spec, g, device)
        assert bool(((top >= 0) & (left >= 0) & (top + h <= 40) & (left + w <= 40)).all())
        area = (h * w).float() / 40**2
        assert area.min().item() >= 0.06 and area.max().item() <= 1.0  # 0.08 before rounding w, h
        stats.append((area.mean().item(), (w.float() / h.float()).log().mean().item()))
    # Two independent samples of 20,000: standard errors of the difference about 0.003.
    assert abs(stats[0][0] - stats[1][0]) < 0.015 and abs(stats[0][1] - stats[1][1]) < 0.015
    # The same boxes and flips give the same pixels on both devices.
    imgs = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    top, left, h, w = sample_crop_params(64, 32, 32, spec, torch.Generator().manual_seed(8), "cpu")
    flip = torch.rand(64, generator=torch.Generator().manual_seed(9)) < 0.5
    cpu = resized_crop_flip(imgs, top, left, h, w, flip, 4, 32)
    gpu = resized_crop_flip(imgs.to(CUDA), top.to(CUDA), left.to(CUDA), h.to(CUDA), w.to(CUDA),
                            flip.to(CUDA), 4, 32)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- no host sync


@pytest.mark.parametrize("options", [{}, dict(channels_last=True), dict(autocast="bf16")],
                         ids=["defaults", "channels_last", "bf16"])
def test_training_steps_never_synchronise_with_the_host(options):
    # set_sync_debug_mode("error") raises at any synchronising CUDA call: batches drawn and
    # augmented on the device, forward, masks, backward, optimizer and IteRand's re-draws
    # (every 2 iterations) must all run without one.
    t = Trainer(synthetic("iterand", rerand_freq=2, **options), device=CUDA)
    batches = iter(t.loaders.train)
    t.train_step(*next(batches))  # the first step's lazy initialisation (cuBLAS, cuDNN) may sync
    torch.cuda.synchronize()
    loss_sum = torch.zeros((), device=CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in islice(batches, 5):
            loss, correct = t.train_step(x, y)
            loss_sum += loss
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert t.iteration == 6 and math.isfinite(loss_sum.item())


def test_compiled_trial_has_two_graphs_never_recompiles_and_does_not_synchronise():
    # One training and one evaluation shape (the last partial training batch dropped, the last
    # evaluation batch padded), Dynamo reset at the trial's start, no host sync in a step.
    from torch._dynamo.utils import counters

    cfg = synthetic("iterand", rerand_freq=2, compile=True, max_train_dataset_size=700,
                    debug_max_iters=None, batch_size=128, batch_size_eval=512,
                    debug_max_eval_iters=None, epochs=3)
    t = Trainer(cfg, device=CUDA)
    assert t.compiled and t.iters_per_epoch == 5  # 700 // 128: the 60-image batch is left out

    def counts():
        return dict(graphs=counters["stats"]["unique_graphs"], frames=counters["frames"]["total"],
                    ok=counters["frames"]["ok"], breaks=sum(counters["graph_break"].values()))

    before = counts()
    t.train_epoch()  # compiles the training graph, then the evaluation one (5,000 = 9 x 512 + 392)
    after = counts()
    new = {k: after[k] - before[k] for k in after}
    assert new["graphs"] == 2 and new["ok"] == new["frames"] and new["breaks"] == 0, new
    t.train_epoch()
    assert counts() == after  # a second epoch compiles nothing
    batches = iter(t.loaders.train)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in islice(batches, 3):
            t.train_step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counts() == after
    # Padding the evaluation batch changes nothing: the eager model gives the same loss.
    loss, acc = t.evaluate("val")
    t.net = t.model
    eager_loss, eager_acc = t.evaluate("val")
    assert loss == pytest.approx(eager_loss, rel=1e-3) and acc == pytest.approx(eager_acc, abs=0.1)


# ----------------------------------------------------------------------------- determinism and resume


def test_resume_on_cuda_is_bit_exact_with_deterministic_algorithms(tmp_path):
    cfg = synthetic("iterand", epochs=3, rerand_freq=3, deterministic=True)
    reference = Trainer(cfg, device=CUDA)
    assert torch.are_deterministic_algorithms_enabled() and os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    expected = _strip(reference.fit())
    final = {k: v.cpu() for k, v in reference.model.state_dict().items()}
    first = Trainer(cfg, device=CUDA)
    got = [first.train_epoch()]
    first.save(str(tmp_path / "ckpt.pt"))
    torch.manual_seed(999)
    torch.cuda.manual_seed_all(999)
    second = Trainer(cfg, device=CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # same device: nothing is re-seeded
        second.load(str(tmp_path / "ckpt.pt"))
    got += list(second.fit())
    assert _strip(got) == expected
    for name, value in second.model.state_dict().items():
        assert torch.equal(value.cpu(), final[name]), name


@pytest.mark.parametrize("method", ["sgd", "iterand"])
def test_a_resnet_epoch_uses_only_deterministic_kernels(method):
    # warn_only=True turns an op without a deterministic CUDA kernel into a warning, not a failed
    # trial. A ResNet epoch has none: its global pooling (adaptive_avg_pool2d to 1x1) is computed
    # as a mean, and cross_entropy on (N, C) logits is not the spatial NLL loss PyTorch flags.
    cfg = synthetic(method, model="resnet18x0.25", deterministic=True, rerand_freq=2)
    t = Trainer(cfg, device=CUDA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = t.train_epoch()
    flags = ("does not have a deterministic implementation", "is not deterministic")  # op; cuBLAS
    flagged = [str(w.message) for w in caught if any(f in str(w.message) for f in flags)]
    assert not flagged, flagged
    assert math.isfinite(m["train_loss"]) and m["peak_gpu_reserved_mb"] >= m["peak_gpu_memory_mb"] > 0


def test_checkpoints_move_between_cpu_and_cuda(tmp_path):
    cfg = synthetic("iterand", epochs=3, rerand_freq=2, use_cuda=True)
    cpu = Trainer(cfg, device="cpu")
    cpu.train_epoch()
    cpu.save(str(tmp_path / "cpu.pt"))
    nexts = []
    for _ in range(2):  # CPU -> CUDA, twice: a warning, then the same next epoch both times
        gpu = Trainer(cfg, device=CUDA)
        with pytest.warns(UserWarning, match="seeded by"):
            gpu.load(str(tmp_path / "cpu.pt"))
        for name, value in cpu.model.state_dict().items():
            assert torch.equal(gpu.model.state_dict()[name].cpu(), value), name
        nexts.append(_strip([gpu.train_epoch()])[0])
    assert nexts[0] == nexts[1] and math.isfinite(nexts[0]["train_loss"]) and nexts[0]["epoch"] == 2
    gpu.save(str(tmp_path / "gpu.pt"))  # and back: CUDA -> CPU
    back = Trainer(cfg, device="cpu")
    with pytest.warns(UserWarning, match="seeded by"):
        back.load(str(tmp_path / "gpu.pt"))
    assert back.epoch == 2 and math.isfinite(back.train_epoch()["train_loss"])


# ----------------------------------------------------------------------------- bf16 replicas


def test_autocast_forward_keeps_data_parallel_replicas_in_bf16():
    # parallel_apply runs each replica in its own thread and re-enters autocast there without
    # the dtype: float16 by default on CUDA. Two replicas on one GPU reproduce it.
    from torch.nn.parallel import parallel_apply

    cfg = TrialConfig(model="conv6x0.25", train_mode="score_only", conv_sparsity=0.5, bn_affine=False)
    model = create_model("conv6x0.25", cfg).to(CUDA)
    dtypes, lock = [], threading.Lock()

    def hook(module, inputs, out):
        with lock:
            dtypes.append(out.dtype)

    model.features[0].register_forward_hook(hook)
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        parallel_apply([model, model], [(x,), (x,)], devices=[0, 0])
    print("replicas without the wrapper ran in", dtypes)  # float16 where the defect is present
    dtypes.clear()
    wrapped = AutocastForward(model, "cuda", torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        parallel_apply([wrapped, wrapped], [(x,), (x,)], devices=[0, 0])
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    if torch.cuda.device_count() > 1:  # a real split over two GPUs
        t = Trainer(synthetic(autocast="bf16"), device=CUDA, num_gpus=2)
        dtypes.clear()
        t.model.features[0].register_forward_hook(hook)
        t.train_step(*next(iter(t.loaders.train)))
        assert dtypes and set(dtypes) == {torch.bfloat16}


# ----------------------------------------------------------------------------- GPU shares


def _python(code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_quarter_share_cannot_allocate_more_than_its_cap():
    # In its own process (the cap is per process): an allocation past the cap fails at once
    # with CUDA's out-of-memory error, not a hang, and one inside it succeeds.
    proc = _python(
        "import torch\n"
        "from iterand_tune.trial_setup import claim_resources\n"
        "assert claim_resources(1, 0.25) == ('cuda', 1)\n"
        "total = torch.cuda.get_device_properties(0).total_memory\n"
        "get = getattr(torch.cuda, 'get_per_process_memory_fraction', None)\n"
        "fraction = get(0) if get else 0.25 - 2**30 / total\n"
        "assert 0.125 <= fraction < 0.25, fraction  # a GiB left for the CUDA context\n"
        "small = torch.empty(2**28, dtype=torch.uint8, device='cuda')\n"
        "try:\n"
        "    torch.empty(int(0.26 * total), dtype=torch.uint8, device='cuda')\n"
        "    print('allocated past the cap')\n"
        "except torch.OutOfMemoryError as err:\n"
        "    print('refused:', str(err).splitlines()[0])\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("refused:"), proc.stdout + proc.stderr[-2000:]


def test_k_trial_processes_at_1_over_k_share_one_gpu_and_fit_their_shares(tmp_path):
    # Four trial processes as gpu_check packs them (a common start, claim_resources at 1/4 each):
    # all finish, and each takes at most its quarter of the card as NVML sees it, CUDA context
    # included, where the allocator's cap alone leaves that context out.
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
        import gpu_throughput
    finally:
        sys.path.pop(0)
    k = 4
    plan = dict(gpu_check.PLANS["cuda"], max_train=2048)
    config = gpu_throughput.trial_config("conv6x0.25", "iterand", plan, 2, 8, "cuda", eval_iters=1)
    config["rerand_freq"] = 4
    specs = [dict(config=dict(config, seed=s), share=1 / k, device="cuda") for s in range(1, k + 1)]
    nvml, handle, why = gpu_check.open_nvml()
    sampler = None if nvml is None else gpu_check.MemorySampler(
        nvml, handle, torch.cuda.get_device_properties(0).total_memory / 2**20).start()
    children = gpu_check.Children()
    try:
        results = list(gpu_check.trial_processes(children, specs, str(tmp_path), 240,
                                                 gpu_check.child_env("cuda-test"), barrier=True,
                                                 sampler=sampler))
    finally:
        children.kill_all()
        if sampler is not None:
            sampler.stop()
    assert all("error" not in r for r in results), [r.get("error") for r in results]
    for r in results:
        assert r["device"] == "cuda" and [m["epoch"] for m in r["epochs"]] == [1, 2]
        # 2 epochs of 8 iterations, and the one step each trial takes before the common start
        assert r["epochs"][-1]["iterations"] == 17 and math.isfinite(r["epochs"][-1]["train_loss"])
        assert r["cap_mb"] < r["total_mb"] / k and r["peak_reserved_mb"] <= r["cap_mb"], json.dumps(r)[:500]
    if sampler is None:
        pytest.skip(f"trials ran; their memory is not judged without NVML ({why})")
    gpu_check.judge_memory(results, sampler.others({os.getpid(), *children.started}, 0.0))
    assert all(r.get("within_share") for r in results), [
        (r.get("gpu_peak_mb") or r.get("gpu_peak_unmatched_mb"), r.get("gpu_share_mb")) for r in results]
