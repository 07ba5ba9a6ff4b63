import lightning as L
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from collapse_monitor.integrations.lightning import CollapseCallback
from tests.integrations.test_lightning import Classifier, dataset, scalars

CONFIG = """
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: "{out}", name: cli, version: 0}}
  callbacks:
    - class_path: collapse_monitor.integrations.lightning.CollapseCallback
      init_args:
        log_every_n_steps: 2
        targets: 1
        probes:
          - class_path: collapse_monitor.probes.NeuralCollapse
            init_args: {{module: head, num_classes: 4, min_class_count: 3}}
        rules:
          - metric: collapse/head/samples
            threshold: 0
            mode: above
            name: seen
            repeat: true
"""


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(dataset(64), batch_size=16)


def test_callback_configured_from_a_lightning_cli_yaml(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path))
    cli = LightningCLI(
        Classifier, Data, args=["fit", "--config", str(cfg)], save_config_callback=None
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, CollapseCallback)]
    assert cb.probes[0].min_class_count == 3 and cb.targets == 1
    log_dir = tmp_path / "cli" / "version_0"
    assert sorted(scalars(log_dir, "collapse/head/nc1")) == [2, 4]
    assert scalars(log_dir, "collapse/alerts/seen") == {2: 1.0, 4: 2.0}
