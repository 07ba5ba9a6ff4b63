"""Neural collapse on the digits data set (scikit-learn ships it; nothing is downloaded).

An MLP is trained far past 100% training accuracy, into the terminal phase of training (Papyan,
Han & Donoho 2020). The monitor streams NC1-NC4 and CDNV into TensorBoard; at the end the script
prints how far NC1 fell, takes a validation snapshot on held-out digits, and draws the curves from
the logged event files.

    python examples/neural_collapse.py --out runs/neural_collapse
    tensorboard --logdir runs/neural_collapse
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm.auto import tqdm

from collapse_monitor import CollapseMonitor, Rule, probes
from collapse_monitor.integrations.tensorboard import TensorBoardSink


def digits(seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:297], perm[297:]
    return x[train], y[train], x[test], y[test]


def make_model() -> nn.Module:
    layers, width = [], 64
    for i, out in enumerate((256, 256, 128), 1):
        layers += [
            (f"fc{i}", nn.Linear(width, out)),
            (f"bn{i}", nn.BatchNorm1d(out)),
            (f"act{i}", nn.ReLU()),
        ]
        width = out
    return nn.Sequential(OrderedDict(layers + [("head", nn.Linear(width, 10))]))


def plot(log_dir: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()

    def series(tag):
        events = acc.Scalars(tag)
        return [e.step for e in events], [e.value for e in events]

    panels = [
        ("collapse/head/nc1", "NC1  tr(Σ_W Σ_B⁺)/C", True),
        ("collapse/head/cdnv", "CDNV (Galanti)", True),
        ("collapse/head/equiangular", "NC2  avg |cos + 1/(C-1)|", True),
        ("collapse/head/self_duality", "NC3  ‖W/‖W‖ − M/‖M‖‖", True),
        ("collapse/head/ncc_mismatch_lagged", "NC4  NCC mismatch (lagged)", False),
        ("train/accuracy", "train accuracy", False),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), constrained_layout=True)
    for ax, (tag, title, logy) in zip(axes.flat, panels):
        steps, values = series(tag)
        ax.plot(steps, values, color="tab:blue" if tag.startswith("collapse") else "tab:green")
        if logy:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("Neural collapse of an MLP on digits, streamed by collapse-monitor")
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=350)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--log-every", type=int, default=12, help="steps per window (12 = one epoch)"
    )
    parser.add_argument("--out", default="runs/neural_collapse")
    parser.add_argument(
        "--png", default=None, help="figure path (default: <out>/neural_collapse.png)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-pictures", action="store_true", help="no TensorBoard pictures (a render per log)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    x, y, x_test, y_test = digits(args.seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * -(-len(y) // args.batch_size)
    # Papyan et al.: SGD with momentum and weight decay, learning rate divided by 10 twice
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, [steps // 3, 2 * steps // 3], 0.1)
    sink = TensorBoardSink(out)
    mon = CollapseMonitor(
        model,
        [probes.NeuralCollapse("head", num_classes=10)],
        log_every_n_steps=args.log_every,
        # a 10-class problem on 1,500 images: every step is cheap to record exactly here
        observe_every_n_steps=1,
        sinks=[sink],
        pictures=not args.no_pictures,
        pictures_every_n_logs=10,  # a heatmap every 10 epochs (a render costs ~0.1 s)
        rules=[
            Rule(
                "collapse/head/nc1",
                1e-2,
                "below",
                name="strong_nc1",
                message="terminal phase: within-class variability has collapsed (informational)",
            )
        ],
    )
    first = last = None
    start = time.time()
    for epoch in tqdm(range(args.epochs), desc=out.name, unit="epoch", leave=False):
        perm = torch.randperm(len(y))
        correct = 0
        for idx in perm.split(args.batch_size):
            with mon.observe(targets=y[idx]):
                logits = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            correct += (logits.argmax(1) == y[idx]).sum().item()
            metrics = mon.step(optimizer=opt)
            if metrics is not None:
                sink.writer.add_scalar("train/accuracy", correct / len(y), mon.global_step)
                first = first or metrics
                last = metrics
        if epoch % 50 == 0 or epoch == args.epochs - 1:
            print(
                f"epoch {epoch:4d}  loss {loss.item():.2e}  train acc {correct / len(y):.4f}  "
                f"NC1 {last['collapse/head/nc1'] if last else float('nan'):.3e}  "
                f"({time.time() - start:.0f}s)",
                flush=True,
            )
    model.eval()
    with torch.no_grad(), mon.snapshot("val") as val:
        with mon.observe(targets=y_test):
            test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    mon.close()
    png = Path(args.png) if args.png else out / "neural_collapse.png"
    plot(out, png)
    nc1_first, nc1_last = first["collapse/head/nc1"], last["collapse/head/nc1"]
    print(f"\nNC1 fell {nc1_first / nc1_last:.1f}x: {nc1_first:.3e} -> {nc1_last:.3e}")
    print(
        f"CDNV {first['collapse/head/cdnv']:.3e} -> {last['collapse/head/cdnv']:.3e}; "
        f"NC4 mismatch (lagged) {last['collapse/head/ncc_mismatch_lagged']:.4f}"
    )
    print(
        f"held-out accuracy {test_acc:.4f}; held-out NC1 (eval-mode snapshot) "
        f"{val['val/collapse/head/nc1']:.3e}"
    )
    print(f"logs: {out}  figure: {png}  view: tensorboard --logdir {out}")
    return {"first": first, "last": last, "val": val, "test_accuracy": test_acc}


if __name__ == "__main__":
    main()
