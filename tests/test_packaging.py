"""The installed package is ``collapse_monitor``; the repository's folder names never leak."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_public_api_imports_from_outside_the_checkout(tmp_path):
    proc = python(
        "from collapse_monitor import CollapseMonitor, probes, mitigations, functional\n"
        "from collapse_monitor.integrations.lightning import CollapseCallback\n"
        "from collapse_monitor.integrations.tensorboard import TensorBoardSink\n"
        "import collapse_monitor.outlets as m, logging\n"
        "assert m.log.name == 'collapse_monitor.outlets'\n"
        "print(CollapseCallback.__module__)",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "collapse_monitor.integrations.lightning"


@pytest.mark.parametrize("name", ["monitor", "integrations"])
def test_the_folder_names_are_not_importable_from_outside(name, tmp_path):
    proc = python(f"import {name}", tmp_path)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


@pytest.mark.parametrize("name", ["monitor", "integrations"])
def test_importing_a_folder_under_its_own_name_fails_loudly(name):
    proc = python(f"import {name}", ROOT)  # inside a checkout the folder is on sys.path
    assert proc.returncode != 0
    assert f"it was imported as '{name}'" in proc.stderr and "collapse_monitor" in proc.stderr


def test_the_wheel_holds_one_top_level_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "monitor", "integrations"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy(ROOT / item, src / item)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("collapse_monitor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"collapse_monitor"}
    for module in ("integrations/lightning.py", "probes/attention/sdpa.py", "stats/window.py"):
        assert f"collapse_monitor/{module}" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "collapse_monitor.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # torch, numpy and TensorBoard (the default sink) come with it; trainers and trackers are extras
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    requires = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    base = {re.split(r"[<>=;\[ ]", r)[0] for r in requires if "extra ==" not in r}
    assert base == {"torch", "numpy", "tensorboard"}
    for extra, package in [("lightning", "lightning"), ("transformers", "transformers")]:
        assert any(r.startswith(package) and f'extra == "{extra}"' in r for r in requires)


@pytest.mark.parametrize("package", ["lightning", "transformers", "wandb"])
def test_an_integration_without_its_package_says_which_extra_to_install(package, tmp_path):
    use = {
        "lightning": "import collapse_monitor.integrations.lightning",
        "transformers": "import collapse_monitor.integrations.transformers",
        "wandb": "from collapse_monitor.integrations.wandb import WandbSink; WandbSink()",
    }[package]
    code = f"import sys; sys.modules[{package!r}] = None\n{use}"
    proc = python(code, tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and f"collapse-monitor[{package}]" in last
    assert "During handling" not in proc.stderr  # one error, not a chain
