import multiprocessing
import os
import tempfile
import warnings

import pytest
import torch

# keep every run's temporary files (inductor caches, spawn files) inside one folder
_TMP = os.environ.setdefault("TMPDIR", tempfile.mkdtemp(prefix="collapse-monitor-tests-"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_TMP, "inductor"))
os.environ.setdefault("MPLBACKEND", "Agg")
tempfile.tempdir = None  # re-read TMPDIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


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
