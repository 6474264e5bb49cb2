"""The resource policy of a run, decided in the driver: the GPU share 1/k of a trial, what each
trial asks Ray for, and the checks that refuse an impossible request, an unreachable cluster or
storage some node cannot see before anything starts. What runs inside a trial is in trial_setup.
"""
from __future__ import annotations

import functools
import math
import os
import socket
import uuid
from typing import Any, Callable, Optional, Sequence

from . import gpu_shares
from .storage import RunError, absolute, is_uri
from .vocabulary import DATASETS


def check_gpus(value: Optional[float], what: str) -> Optional[float]:
    """GPUs per trial must be a whole number or 1/k: fractions that pack a GPU exactly.
    Raises ValueError naming `what`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{what} = {value!r}: needs a number >= 0")
    value = float(value)
    if value >= 1 or value == 0:
        if value != int(value):
            raise ValueError(f"{what} = {value:g}: above 1 it must be a whole number of GPUs")
        return value
    k = round(1 / value)
    if abs(1 / k - value) > 1e-9:
        raise ValueError(f"{what} = {value:g}: a GPU share must be 1/k (0.5, 0.25, 0.125, ...) "
                         "so that k trials fill a GPU exactly")
    return 1 / k


# Forward GMACs per image -> GPU share. Conv6 up to x1.0 and ResNet18 up to x0.5 (<= 0.2 GMAC)
# leave most of a GPU idle at batch 128, so four share one; the widest CIFAR nets get a GPU.
GPU_SHARES = ((0.2, 0.25), (1.2, 0.5), (math.inf, 1.0))


@functools.lru_cache(maxsize=None)
def _gmacs(model: str, dataset: str) -> float:
    from .models import estimate_macs  # torch: a run's requests need it, --help and --dry-run not
    info = DATASETS[dataset]
    return estimate_macs(model, info.image_size, info.num_classes) / 1e9


def gpu_share(model: str, dataset: str) -> float:
    """The GPU fraction 1/k a trial of `model` on `dataset` gets by default: its entry in the
    table iterand_tune/gpu_shares.json (measured by `benchmarks/gpu_check.py --write-shares`,
    or estimated by the rule below), else by the network's forward MACs (GPU_SHARES)."""
    share = gpu_shares.lookup(model, dataset)
    if share is not None:
        return share
    gmacs = _gmacs(model, dataset)
    return next(share for limit, share in GPU_SHARES if gmacs <= limit)


def trial_request(trial: dict[str, Any], have_gpus: bool, gpus: Optional[float] = None,
                  cpus: Optional[float] = None, forced_gpus: Optional[float] = None) -> tuple[float, float]:
    """(CPUs, GPUs) one trial asks for. `gpus`/`cpus` are its experiment's choice (None: by the
    model's size; 1 CPU, ImageNet 1 + num_workers); `forced_gpus` (--gpus-per-trial) wins even
    without GPUs in the cluster (then the resource check refuses the run), while without GPUs
    trials otherwise run on CPUs."""
    if cpus is None:  # device-resident data needs one core; ImageNet's DataLoader workers need their own
        cpus = 1 + trial["num_workers"] if trial["dataset"] == "imagenet" else 1
    if forced_gpus is not None:
        share = forced_gpus
    elif not have_gpus or not trial["use_cuda"]:
        share = 0.0
    elif gpus is not None:
        share = gpus
    else:
        share = gpu_share(trial["model"], trial["dataset"])
    return float(cpus), float(share)


def describe_request(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")


def check_cluster(requests: dict[str, tuple[float, float]], nodes: Sequence[dict[str, float]]) -> None:
    """Refuse requests no single node can ever satisfy (Ray would wait for them forever)."""
    if not nodes:
        raise RunError("the Ray cluster has no live nodes")
    for experiment, (cpus, gpus) in requests.items():
        if any(n.get("CPU", 0) >= cpus - 1e-9 and n.get("GPU", 0) >= gpus - 1e-9 for n in nodes):
            continue
        total_cpu = sum(n.get("CPU", 0) for n in nodes)
        total_gpu = sum(n.get("GPU", 0) for n in nodes)
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
        raise RunError(
            f"{experiment} asks for {describe_request(cpus, gpus)} per trial, but no node has that "
            f"(cluster: {len(nodes)} node(s), {total_cpu:g} CPUs, {total_gpu:g} GPUs; largest node "
            f"{biggest.get('CPU', 0):g} CPUs, {biggest.get('GPU', 0):g} GPUs); "
            "lower --gpus-per-trial / --cpus-per-trial or add a bigger node")


# ------------------------------------------------------------------ the cluster

# Named, not imported: Ray imports it in each worker of a quiet run, and the driver needs neither
# the module nor torch for that.
QUIET_WORKER = "iterand_tune.trial_setup.quiet_worker"


def _ray() -> Any:
    import ray  # optional here: a GPU box without Ray still uses gpu_share and the checks
    import ray.util.scheduling_strategies  # noqa: F401 - loads the submodule nodes_missing_path uses
    return ray


def connect(address: Optional[str], quiet: bool = False) -> bool:
    """Start or join Ray; True when this process started it (and should shut it down). With
    `quiet`, the INFO lines of Ray's own loggers (e.g. a resumed trial's "Restored on ... from
    checkpoint") stay in the workers' log files instead of reaching this terminal."""
    ray = _ray()
    address = check_address(address)
    if ray.is_initialized():  # e.g. a notebook or a test that started Ray itself
        return False
    options: dict = {"runtime_env": {"worker_process_setup_hook": QUIET_WORKER}} if quiet else {}
    try:
        if address:
            ray.init(address=address, log_to_driver=True, **options)
        else:  # "local": a new instance, never a `ray start` cluster that happens to run here
            ray.init(address="local", include_dashboard=False, **options)
    except ConnectionError as err:
        raise RunError(f"cannot connect to a Ray cluster at {address!r}: "
                       f"{str(err).splitlines()[0]}; start one with `ray start --head` or "
                       "check --address") from None
    return True


def check_address(address: Optional[str]) -> Optional[str]:
    """The cluster address to join (--address, else RAY_ADDRESS, else None for a local Ray),
    checked to answer when it names a host."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        _check_reachable(address)
    return address


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's long connection retries, when nothing listens there."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RunError(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise RunError(f"cannot reach a Ray cluster at {address} ({err.strerror or err}); "
                       "is `ray start --head` running there, and is the port open?") from None


def live_nodes() -> list[dict[str, float]]:
    """The resources of every live node of the connected cluster."""
    return [dict(n["Resources"]) for n in _ray().nodes() if n.get("Alive")]


def live_node_ids() -> list[str]:
    return [n["NodeID"] for n in _ray().nodes() if n.get("Alive")]


def check_storage(storage_path: str, node_ids: Sequence[str],
                  missing: Optional[Callable[[str, Sequence[str]], list[str]]] = None) -> None:
    """On a cluster of several nodes, refuse a local --storage-path that some node cannot see
    (its trials would write results where the driver never finds them)."""
    if is_uri(storage_path) or len(node_ids) < 2:
        return
    blind = (missing or nodes_missing_path)(storage_path, node_ids)
    if blind:
        raise RunError(
            f"--storage-path {storage_path} is not visible on {len(blind)} of the cluster's "
            f"{len(node_ids)} nodes ({', '.join(b[:8] for b in blind)}): use a shared filesystem "
            "mounted at the same path on every node, or a URI such as s3://bucket/folder")


def nodes_missing_path(storage_path: str, node_ids: Sequence[str], timeout: float = 60.0) -> list[str]:
    """Ids of the nodes that cannot see a probe file written here under `storage_path`'s nearest
    existing folder; the probe is removed again."""
    ray = _ray()
    NodeAffinitySchedulingStrategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy  # noqa: N806
    folder = absolute(storage_path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    probe = os.path.join(folder, f".iterand_tune_probe_{uuid.uuid4().hex}")
    try:
        with open(probe, "w"):
            pass
    except OSError as err:
        raise RunError(f"--storage-path {storage_path} is not writable here ({err.strerror})") from None
    try:
        sees = ray.remote(num_cpus=0)(os.path.exists)
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                .remote(probe) for n in node_ids]
        try:
            answers = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RunError(f"nodes of the cluster did not answer within {timeout:.0f} s whether "
                           f"they see --storage-path {storage_path}") from None
        return [n for n, ok in zip(node_ids, answers) if not ok]
    finally:
        os.remove(probe)
