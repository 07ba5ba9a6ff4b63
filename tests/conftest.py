import os
import tempfile

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
