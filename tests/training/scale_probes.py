"""Test-only callbacks for the scale tests (training subprocesses load them by class path;
tests/training is on their PYTHONPATH)."""
from __future__ import annotations

import json
import resource
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def rss_bytes() -> int:
    """This process's resident memory now."""
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB


class ConstructionMemory(Callback):
    """Each rank writes ``<folder>/rank<r>.json``: the resident memory before ``configure_model``,
    the highest resident memory sampled (every 5 ms) while it runs, and after setup its local and total parameter
    bytes (ZeRO-3: ``ds_tensor`` is the rank's partition, ``ds_numel`` the full size)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.record: dict = {}

    def setup(self, trainer, pl_module, stage) -> None:
        build = pl_module.configure_model

        def measured() -> None:
            import threading
            self.record["rss_before_build"] = rss_bytes()
            highest, done = [rss_bytes()], threading.Event()

            def sample() -> None:                   # resident memory every 5 ms while the model is built
                while not done.wait(0.005):
                    highest[0] = max(highest[0], rss_bytes())
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                build()
            finally:
                done.set()
                sampler.join()
            # the peak *during* the build (ru_maxrss is the process's high-water mark: an earlier
            # peak, e.g. while importing or compiling, would hide the build's own)
            self.record["peak_after_build"] = max(highest[0], rss_bytes())
            self.record["process_peak_rss"] = peak_rss_bytes()
        pl_module.configure_model = measured

    def on_fit_start(self, trainer, pl_module) -> None:
        local = total = 0
        for p in pl_module.parameters():
            size = p.element_size()
            if hasattr(p, "ds_tensor"):
                local += p.ds_tensor.numel() * size
                total += p.ds_numel * size
            else:
                local += p.numel() * size
                total += p.numel() * size
        self.record.update(local_param_bytes=local, model_param_bytes=total, rank=trainer.global_rank,
                           world_size=trainer.world_size)
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
