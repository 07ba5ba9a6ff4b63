import multiprocessing
import os
import shutil
import tempfile
import warnings

import pytest
import torch

# keep every run's temporary files (inductor caches, spawn files) inside one folder
_OWN_TMP = "TMPDIR" not in os.environ
_TMP = os.environ.setdefault("TMPDIR", tempfile.mkdtemp(prefix="collapse-monitor-tests-"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_TMP, "inductor"))
os.environ.setdefault("MPLBACKEND", "Agg")
tempfile.tempdir = None  # re-read TMPDIR


def pytest_sessionfinish(session, exitstatus):
    """Remove the run's temporary folder after a passing run (a failing run keeps it: the
    files of a failed test are evidence)."""
    if _OWN_TMP and exitstatus == 0:
        shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_rendezvous_port():
    """Lightning's ``ddp_spawn`` writes the port it picked into this process's ``MASTER_PORT``,
    and every later spawn reads it back: a port a finished run's ranks may still hold. Each
    test starts with the environment it was given."""
    keys = ("MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """Kill child processes a failed or timed-out test left behind.

    A non-daemonic child still alive at exit makes the interpreter wait for it forever, so one
    hung DDP rank would otherwise stall the whole run after its test had already failed.
    """
    yield
    for child in multiprocessing.active_children():
        warnings.warn(
            f"killing leftover child process {child.name} (pid {child.pid})", stacklevel=1
        )
        child.kill()
        child.join()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, writing under ``tmp_path``; its process-wide state (settings fixed at the
    first ``wandb.init``, the active run) is torn down after the test, so that tests using
    W&B do not depend on their order."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb.teardown()
    yield wandb
    wandb.finish()
    wandb.teardown()
