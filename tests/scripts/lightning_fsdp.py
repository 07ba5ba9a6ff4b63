"""Lightning with FSDP and every probe and mitigation: ``ModelParallelStrategy`` (FSDP2 through
``configure_model``) on 2 CPU processes, ``python -m tests.scripts.lightning_fsdp <out_dir>
fsdp2`` (Lightning launches the second process by running this command again), and
``strategy="fsdp"`` (auto-wrapped blocks), which Lightning runs on CUDA devices only
(``tests/test_gpu.py``)."""

import contextlib
import sys

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard

from collapse_monitor._sharding import whole
from collapse_monitor.integrations.lightning import CollapseCallback
from tests.integrations.test_lightning import SaveRankState, ZooData, ZooModule, groups_of, trainer
from tests.zoo import every_mitigation, every_probe


class ShardedZoo(ZooModule):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for block in (self.zoo.attn, self.zoo.vq, self.zoo.sae, self.zoo):
            fully_shard(block, mesh=mesh)


class SaveWholeState(SaveRankState):
    def __init__(self, out, name):
        super().__init__(out)
        self.name = name

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, CollapseCallback))
        holder = trainer.strategy.model
        with FSDP.summon_full_params(holder) if self.name == "fsdp" else contextlib.nullcontext():
            weights = {k: whole(v).clone() for k, v in pl_module.state_dict().items()}
        torch.save(
            {
                "weights": weights,
                "mitigations": dict(cb.monitor.mitigation_counts),
                "sharded": sorted(
                    n for n, p in pl_module.named_parameters() if type(p).__name__ == "DTensor"
                ),
            },
            f"{self.out}/{self.name}{trainer.global_rank}.pt",
        )


def fit(out, name, devices, batch_size, accelerator="cpu"):
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from tests.mitigations.test_reset_dead_codes import VQ
    from tests.probes.test_attention_entropy import SDPAAttention

    torch.set_num_threads(1)
    cb = CollapseCallback(
        every_probe("zoo."),
        log_every_n_steps=3,
        strict=True,
        context=groups_of,
        mitigations=every_mitigation("zoo."),
        observe_every_n_steps=1,
    )
    strategy = {
        "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        "fsdp": lambda: FSDPStrategy(auto_wrap_policy={SDPAAttention, VQ}, use_orig_params=True),
        "single": lambda: "auto",
    }[name]()
    t = trainer(
        out,
        name,
        2,
        devices=devices,
        use_distributed_sampler=False,
        callbacks=[cb, SaveWholeState(out, name)],
        strategy=strategy,
        accelerator=accelerator,
    )
    t.fit(ShardedZoo() if name == "fsdp2" else ZooModule(), datamodule=ZooData(batch_size))


if __name__ == "__main__":
    fit(sys.argv[1], sys.argv[2], 2, 5)
