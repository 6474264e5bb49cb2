"""Shared fixtures: one local Ray cluster for the whole session (2 CPUs, one logical GPU)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance with a logical GPU, so fractional GPU packing is testable on CPU.
    Yields its GCS address, which subprocess drivers join with --address."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
