"""Two gloo processes for distributed tests: a process group that fails instead of hanging, and a
runner that kills a hung run and fails with both ranks' stacks."""

import faulthandler
import gc
import os
import signal
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from a server that has imported these once (spawning imports torch and the monitor
# again in every rank, seconds per run on this machine); each rank then takes the caller's
# environment (_entry), though what those modules read from it at import was read when the
# server started. (A process-wide setting, made when this module is imported.)
mp.set_forkserver_preload(["torch", "torch.distributed", "collapse_monitor", "tests.dist"])


@contextmanager
def process_group(rank, init, world=2):
    """A gloo group of ``world`` ranks; a mismatched collective fails after 60 s instead of
    hanging."""
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        yield
    finally:
        # A DDP Reducer freed after destroy_process_group() holds the last reference to the gloo
        # group and destroys it with the GIL held; that deadlocks with a gloo worker thread still
        # freeing a work launched during backward (its captured thread-local state holds a
        # Python object, so it needs the GIL). Workers `del` their DDP wrapper inside the block;
        # collecting here frees any Reducer kept by a reference cycle while the group still lives.
        gc.collect()
        dist.destroy_process_group()


def _entry(rank, worker, init, out_dir, environ):
    os.environ.clear()
    os.environ.update(environ)
    tempfile.tempdir = None  # re-read TMPDIR
    # SIGUSR1 dumps this rank's Python stacks: run_two asks for them before killing a hung run.
    # The file gets its name only once the handler is in place: its existence means "started".
    path = os.path.join(out_dir, f"stacks{rank}.txt")
    with open(path + ".part", "w") as stacks:
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
        os.rename(path + ".part", path)
        worker(rank, init, out_dir)


def run_two(worker, tmp_path, name, deadline=300.0, world=2):
    """Run ``worker(rank, init, out_dir)`` on ``world`` processes (2); load what each saved as
    ``<name><rank>.pt``.

    A run still going ``deadline`` seconds after both ranks started (the gloo timeout turns
    mismatched collectives into errors after 60 s, so this is a hang elsewhere) is killed and
    fails with both ranks' Python stacks, instead of leaving processes that keep pytest from
    exiting. The clock starts once both ranks run (spawning them can take many seconds on a
    loaded machine).
    """
    init = (tmp_path / "store").as_uri()  # a file store: no port to race for
    args = (worker, init, str(tmp_path), dict(os.environ))
    ctx = mp.start_processes(_entry, args=args, nprocs=world, join=False, start_method="forkserver")
    stacks = [tmp_path / f"stacks{r}.txt" for r in range(world)]
    started = time.monotonic()
    while not all(p.exists() for p in stacks) and time.monotonic() - started < 600:
        if ctx.join(timeout=0.2):  # finished (or failed) before we saw it start
            return [
                torch.load(tmp_path / f"{name}{r}.pt", weights_only=False) for r in range(world)
            ]
    start = time.monotonic()
    while not ctx.join(timeout=1.0):
        if time.monotonic() - start > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGUSR1)
            time.sleep(2.0)
            for p in ctx.processes:
                p.kill()
                p.join()
            dumps = "\n".join(
                f"--- rank {r} ---\n" + (p.read_text() if p.exists() else "(not started)")
                for r, p in enumerate(stacks)
            )
            pytest.fail(f"{worker.__name__} still running after {deadline:.0f} s:\n{dumps}")
    return [torch.load(tmp_path / f"{name}{r}.pt", weights_only=False) for r in range(world)]
