import json
from pathlib import Path

import numpy as np
from PIL import Image

from collapse_monitor.cli import main as report
from tests.integrations.test_lightning import scalars
from tests.integrations.test_tensorboard import read_events
from tests.test_examples import load_example

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "lightning_cli.yaml"


def test_cli_recipe_runs_and_the_report_reads_the_lightning_run_back(tmp_path, capsys):
    cli = load_example("lightning_cli").main(
        [
            "fit",
            "--config",
            str(RECIPE),
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 48
    log_dir = tmp_path / "lightning_cli" / "version_0"
    nc1 = scalars(log_dir, "collapse/head/nc1")
    assert sorted(nc1) == [24, 48]
    images = set(read_events(log_dir).Tags()["images"])
    assert images == {"collapse/head/class_mean_cosines", "collapse/features/eigen_spectrum"}

    capsys.readouterr()  # the training's own output
    png = tmp_path / "dash.png"
    assert report(["report", str(tmp_path), "--json", "--png", str(png)]) in (0, 1)
    (run,) = json.loads(capsys.readouterr().out)["runs"].values()
    assert {r["probe"] for r in run["rows"]} == {"head", "features"}
    for r in run["rows"]:  # every reported value is the logged one (float32 in event files)
        logged = scalars(log_dir, f"collapse/{r['probe']}/{r['metric']}")
        assert r["step"] == 48 and r["latest"] == np.float32(logged[48])
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 300 and img.std() > 10
