"""The default GPU share of a trial by model and input size, read from gpu_shares.json beside this
module, and the rule that turns a measured packing curve into a share (docs/gpu.md, "Packing and
GPU shares"). Torch-free and Ray-free: the driver and a bare GPU machine both read it.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Mapping, Optional

from .vocabulary import DATASETS, split_model_name

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_shares.json")
# A share keeps at least this fraction of the best aggregate images/s measured for its model.
KEEP = 0.9
ESTIMATED = "estimated (no GPU measurement yet)"


def _key(model: str, input_size: int) -> tuple[str, float, int]:
    family, width = split_model_name(model)  # resnet18 and resnet18x1.0 are one model
    return family, width, int(input_size)


def check_share(share: Any) -> float:
    """A share a GPU can be split into exactly: 1/k, or a whole number of GPUs."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not share > 0 \
            or not math.isfinite(share):
        raise ValueError(f"GPU share {share!r}: needs a number > 0")
    if share >= 1:
        if share != int(share):
            raise ValueError(f"GPU share {share:g}: above 1 it must be a whole number of GPUs")
        return float(share)
    k = round(1 / share)
    if abs(1 / k - share) > 1e-9:
        raise ValueError(f"GPU share {share:g}: must be 1/k so that k trials fill a GPU exactly")
    return 1 / k


def read_table(path: str = TABLE) -> dict[str, Any]:
    """The table as stored: {"rule", "keep", "shares": [{"model", "input", "share", "source",
    ...}]}; every share checked."""
    with open(path) as f:
        table = json.load(f)
    for entry in table["shares"]:
        check_share(entry["share"])
    return table


@functools.lru_cache(maxsize=None)
def _index(path: str, mtime: float) -> dict[tuple[str, float, int], float]:
    # keyed by the file's mtime too: `gpu_check.py --write-shares` may rewrite it in a session
    return {_key(e["model"], e["input"]): float(e["share"]) for e in read_table(path)["shares"]}


def lookup(model: str, dataset: str, path: str = TABLE) -> Optional[float]:
    """The table's share for `model` on `dataset` (by the dataset's input size), or None when the
    table has no entry for it (or no table is there)."""
    info = DATASETS.get(dataset)
    if info is None or not os.path.exists(path):
        return None
    return _index(path, os.path.getmtime(path)).get(_key(model, info.image_size))


def choose_share(rates: Mapping[Any, Optional[float]], keep: float = KEEP) -> float:
    """The smallest share 1/k whose aggregate images/s (k trials at 1/k each) is at least `keep`
    times the best aggregate of the curve `rates` {k: images/s}; k without a rate (failed, not
    measured) are left out."""
    curve = {int(k): float(r) for k, r in rates.items() if r is not None and r > 0}
    if not curve or min(curve) < 1:
        raise ValueError(f"no usable packing curve: {dict(rates)!r}")
    best = max(curve.values())
    return 1.0 / max(k for k, r in curve.items() if r >= keep * best)


def with_measured(table: Mapping[str, Any], model: str, input_size: int,
                  rates: Mapping[Any, Optional[float]], gpu: str, date: str,
                  keep: float = KEEP, **facts: Any) -> dict[str, Any]:
    """A copy of `table` whose entry for (model, input) holds the share `choose_share` picks from
    `rates`, the curve itself, the GPU, the date and any other `facts` (e.g. mps=True); other
    entries unchanged."""
    entry = {"model": model, "input": int(input_size), "share": choose_share(rates, keep),
             "source": "measured", "gpu": gpu, "date": date, **facts,
             "images_per_s": {str(k): (None if r is None else round(float(r), 1))
                              for k, r in sorted(rates.items(), key=lambda kv: int(kv[0]))}}
    key = _key(model, input_size)
    shares = [entry if _key(e["model"], e["input"]) == key else e for e in table["shares"]]
    if entry not in shares:  # a model the table did not have yet goes last
        shares.append(entry)
    return {**table, "shares": shares}


def write_table(table: Mapping[str, Any], path: str = TABLE) -> None:
    """Write `table`, one entry a line, atomically (a reader never sees half a file)."""
    for entry in table["shares"]:
        check_share(entry["share"])
    lines = [json.dumps(e, sort_keys=False) for e in table["shares"]]
    head = {k: v for k, v in table.items() if k != "shares"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "shares": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"
    json.loads(text)  # what is written must read back
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
