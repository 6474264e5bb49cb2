"""Shared fixtures: one local Ray instance for the whole session (2 CPUs, one logical GPU), one
small real run on digits that several test modules read, and a guard that no run starts.

Tests that use `ray_cluster` (directly or through `digits_run`) get the `ray` marker here, and
pytest-xdist schedules their modules together (SESSION_RAY_MODULES below)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
from types import SimpleNamespace

import pytest

from helpers import ITERAND, trial_dirs, write_digits

RAY_FIXTURES = ("ray_cluster", "digits_run")

# `make test` runs the suite in two pytest-xdist workers (`-n 2`). The modules that use the
# session's Ray instance (RAY_FIXTURES) form one unit of work, so that only one worker starts it
# and the shared run; every other module is a unit of its own. The units are handed out in this
# order, the longest first (the session-Ray unit to one worker; the simulated cluster, the S3 run
# and the GPU check, which start processes of their own, to the other), then the other modules in their usual order. A worker is handed its
# next unit while its last two tests run, so the units that come last are the short ones.
SESSION_RAY_MODULES = ("tests/test_analysis.py", "tests/test_ray_assumptions.py", "tests/test_report.py",
                       "tests/test_resume_loops.py", "tests/test_search.py", "tests/test_tracking.py",
                       "tests/test_tune.py", "tests/test_tune_interrupts.py")
FIRST = (*SESSION_RAY_MODULES, "tests/test_cluster.py", "tests/test_storage_s3.py",
         "tests/test_gpu_check.py", "tests/test_training.py", "tests/test_models.py",
         "tests/test_gpu_throughput.py", "tests/test_cli.py", "tests/test_data_readers.py")


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_configure(config):
    # Under `make test` two workers share the machine's CPUs with the Ray trials they start: one
    # torch thread per worker keeps their OpenMP threads from spinning against each other.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch  # the controller process (no worker) needs no torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in item.fixturenames for name in RAY_FIXTURES):
            item.add_marker(pytest.mark.ray)
            if _module(item.nodeid) not in SESSION_RAY_MODULES:
                raise pytest.UsageError(f"{_module(item.nodeid)} uses the session's Ray: add it to "
                                        "SESSION_RAY_MODULES in tests/conftest.py")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the order in which the units are handed out
        first = {module: i for i, module in enumerate(FIRST)}
        items.sort(key=lambda item: first.get(_module(item.nodeid), len(first)))  # stable


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduling by module, with the session-Ray modules as one unit."""
    from xdist.scheduler import LoadScopeScheduling

    class SessionRayTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return "session-ray" if module in SESSION_RAY_MODULES else module

    config.option.loadscopereorder = False  # in the order of the collection
    return SessionRayTogether(config, log)


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


# Dummy credentials: the driver's environment, which the Ray workers it starts inherit.
AWS = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
           AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")


@pytest.fixture
def s3_storage(monkeypatch, tmp_path):
    """`s3://bucket/runs?endpoint_override=127.0.0.1:PORT&scheme=http` on a moto server."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    # No credentials or settings of this machine's user reach the test.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        query = f"endpoint_override={host}:{port}&scheme=http"
        fs, _ = pafs.FileSystem.from_uri(f"s3://bucket?{query}&allow_bucket_creation=true")
        fs.create_dir("bucket")
        yield f"s3://bucket/runs?{query}"
    finally:
        server.stop()


# The shared run: two methods (edge-popup with KU weights, IteRand with SC weights) x two
# widths x two seeds on digits, 0.25 GPU + 0.5 CPU per trial, so that four trials run at once
# on the session's 2 CPUs and one logical GPU, in two waves of four. Narrow networks and short
# epochs: the tests check the mechanics, not what is learnt.
DIGITS_RUN = SimpleNamespace(
    models=("conv6x0.125", "conv6x0.25"), seeds=(1, 2), epochs=2,
    experiments={"tiny_ku_edgepopup": dict(init_mode="kaiming_uniform"),
                 "tiny_sc_iterand": dict(ITERAND, init_mode="signed_constant", rerand_freq=2)},
    values=dict(debug_max_iters=8))


@pytest.fixture(scope="session")
def digits_run(ray_cluster, tmp_path_factory):
    """One small real run through the CLI in this process (`python -m iterand_tune FILE
    --storage-path results --name packing --cpus-per-trial 0.5`, the storage path relative to
    the run's folder), shared by the tests that only read a finished run: quarter-GPU
    packing, the end-of-run summary, the analysis tables and figures, the notebook. Yields the
    run's `path`, what the CLI printed (`out`), its exit code (`rc`), the experiment file
    (`file`), the folder it ran in (`cwd`) and the DIGITS_RUN settings."""
    from iterand_tune.cli import main

    folder = tmp_path_factory.mktemp("digits_run")
    exp = write_digits(str(folder), DIGITS_RUN.experiments,
                       grid=dict(model=list(DIGITS_RUN.models), seed=list(DIGITS_RUN.seeds)),
                       epochs=DIGITS_RUN.epochs, **DIGITS_RUN.values)
    out, here = io.StringIO(), os.getcwd()
    os.chdir(folder)  # the relative --storage-path is made absolute against this
    try:
        with contextlib.redirect_stdout(out):
            rc = main([exp, "--storage-path", "results", "--name", "packing",
                       "--cpus-per-trial", "0.5"])
    finally:
        os.chdir(here)
    run = SimpleNamespace(path=str(folder / "results" / "packing"), out=out.getvalue(), rc=rc,
                          file=exp, cwd=str(folder), **vars(DIGITS_RUN))
    run.trials = len(run.experiments) * len(run.models) * len(run.seeds)
    assert rc == 0, run.out
    assert len(trial_dirs(run.path)) == run.trials
    return run


@pytest.fixture
def no_run(monkeypatch):
    """Any attempt of the CLI to start a run (or Ray) fails the test instead."""
    import iterand_tune.cli as cli
    import iterand_tune.resources as resources

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI tried to start a run")

    monkeypatch.setattr(cli, "_tune", refuse)
    monkeypatch.setattr(resources, "connect", refuse)
