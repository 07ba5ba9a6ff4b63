import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    """The example script ``examples/<name>.py`` as a module (it is not an installed package)."""
    spec = importlib.util.spec_from_file_location(
        f"examples_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the monitor's pictures cost a matplotlib render per log (most of these examples' time); they are
# tested in tests/integrations/test_pictures.py and rendered by the grokking example here
FAST = ["--no-pictures"]


def test_neural_collapse_example_reaches_the_terminal_phase(tmp_path):
    result = load_example("neural_collapse").main(["--out", str(tmp_path), *FAST])
    first, last = result["first"], result["last"]
    assert first["collapse/head/nc1"] / last["collapse/head/nc1"] >= 10
    assert last["collapse/head/ncc_mismatch_lagged"] < 0.01
    assert result["test_accuracy"] > 0.95
    assert (tmp_path / "neural_collapse.png").stat().st_size > 10_000


def test_vq_example_collapses_without_a_fix_and_not_with_resets_or_simvq(tmp_path):
    runs = load_example("vq_dead_codes").main(["--out", str(tmp_path), *FAST])
    plain, reset = runs["monitored only"], runs["with ResetDeadCodes"]
    assert plain["usage"] < 0.3 and plain["resets"] == 0
    assert reset["usage"] > 0.9 and reset["resets"] > 0
    # once the resets have done their work (second half of training), usage stays above 90%
    late = [m["collapse/vq/usage"] for _, m, _ in reset["history"][len(reset["history"]) // 2 :]]
    assert min(late) > 0.9
    assert reset["test_mse"] <= plain["test_mse"]
    # SimVQ on SimVQ's Gaussian basis: usage high without a single reset, above the same
    # codebook trained plainly
    gauss, simvq = runs["Gaussian codebook"], runs["Gaussian codebook, SimVQ"]
    assert simvq["resets"] == 0 and simvq["usage"] > 0.9 > gauss["usage"] + 0.1
    assert simvq["test_mse"] <= gauss["test_mse"]
    assert (tmp_path / "vq_dead_codes.png").stat().st_size > 10_000


def test_vae_example_loses_active_units_without_free_bits(tmp_path):
    runs = load_example("vae_posterior_collapse").main(["--out", str(tmp_path), *FAST])
    plain, free = runs["plain"], runs["free bits 0.5"]
    assert plain["active_units"] <= 8 and free["active_units"] >= 14
    assert free["test_mse"] <= plain["test_mse"]
    assert (tmp_path / "vae_posterior_collapse.png").exists()


def test_simsiam_example_collapses_without_stop_gradient(tmp_path):
    runs = load_example("simsiam_collapse").main(["--out", str(tmp_path), *FAST])
    healthy, collapsed = runs["with stop-gradient"], runs["without stop-gradient"]
    assert min(m["collapse/proj/norm_std"] for _, m, _ in healthy["history"]) > 0.7
    assert collapsed["norm_std"] < 0.2 and collapsed["rankme"] < healthy["rankme"] / 2
    assert (tmp_path / "simsiam_collapse.png").exists()


def test_attention_example_collapses_without_sigma_reparam(tmp_path):
    # 200 steps (of the default 400): the plain run has collapsed by then (min entropy_norm
    # 0.002, max logit 6636; σReparam 0.66 and 21), in half the test's time
    runs = load_example("attention_entropy_collapse").main(
        ["--out", str(tmp_path), *FAST, "--steps", "200"]
    )
    plain, sigma = runs["plain"], runs["σReparam"]
    assert plain["min_entropy_norm"] < 0.05 and plain["max_logit"] > 1000
    assert sigma["min_over_run"] > 0.2 and sigma["max_logit"] < 200
    assert sigma["loss"] < plain["loss"] - 0.3
    assert (tmp_path / "attention_entropy_collapse.png").exists()


def test_grpo_example_alerts_on_entropy_collapse_and_not_with_the_bonus(tmp_path):
    pytest.importorskip("trl")
    runs = load_example("grpo_entropy_collapse").main(["--out", str(tmp_path)])
    collapsed, bonus = runs["no bonus"], runs["entropy bonus 0.2"]
    assert min(collapsed["entropy"].values()) < 0.05 and max(collapsed["identical"].values()) > 0.9
    assert max(collapsed["zero_adv"].values()) > 0.5
    assert [rule for _, rule in collapsed["alerts"]] == ["entropy/policy_entropy_collapse"]
    assert min(bonus["entropy"].values()) > 1.0 and bonus["alerts"] == []
    assert (tmp_path / "grpo_entropy_collapse.png").exists()


def test_grokking_example_softmax_collapses_and_stablemax_does_not(tmp_path):
    runs = load_example("grokking_softmax_collapse").main(["--out", str(tmp_path)])
    soft, stable = runs["softmax"], runs["stablemax"]
    late = [m["collapse/logits/softmax_collapse"] for _, m, _, _ in soft["history"][-10:]]
    assert min(late) > 0.4 and soft["test_acc"] < 0.05  # collapsed, and test accuracy stalls
    assert max(m["collapse/logits/softmax_collapse"] for _, m, _, _ in stable["history"]) == 0.0
    assert (tmp_path / "grokking_softmax_collapse.png").exists()


def readme_snippets():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    starts = ("CollapseMonitor(", "CollapseCallback(", "CollapseTrainerCallback(")
    return [b for b in blocks if any(s in b for s in starts)]


@pytest.mark.parametrize("index", range(4))
def test_readme_quick_starts_run(index, tmp_path):
    snippets = readme_snippets()
    assert len(snippets) == 4, (
        "README should hold the PyTorch, Lightning, Trainer and TRL quick starts"
    )
    code = snippets[index]
    assert sum(bool(line.strip()) for line in code.splitlines()) <= 20
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard event file written"
