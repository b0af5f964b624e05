"""One bf16 DeepSpeed ZeRO-2 training step of the generator at a recipe's shape (default
wan1.3b: the wan1.3b flavor, 33 frames at 512²) with random weights: step time, peak memory
and MFU. Not yet measured at that shape: no GPU has been lent to the project's runs; the tests
run it on CPU at a tiny width.

    python benchmarks/gpu_step.py [--recipe wan1.3b] [--steps 3] [--warmup 1]
    python benchmarks/gpu_step.py --width-override 64 --layers-override 2 --frames 5 --size 64   # CPU

The step is the training task's: ``flow_matching_loss`` of ``NormalDrivenWan`` (the recipe's
flavor, gradient checkpointing as the recipe's config sets it) on random latents, reference
latent, driving normals and reference normal of the recipe's window and size, AdamW, under
Lightning's ``DeepSpeedStrategy`` (stage 2, ``bf16-mixed``) on a GPU, or the project's
``CPUDeepSpeedStrategy`` (training/strategies.py) on CPU, one process. The first ``--warmup``
steps are not timed; ``step_s`` is the mean of the next ``--steps``.

- ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` over the run on a GPU; the process's
  peak RSS (``ru_maxrss``) on CPU.
- ``mfu``: the step's analytic model FLOPs (``models/generator/flops.py``: batch x 3 x the
  forward; the recomputed forward of gradient checkpointing is not counted) / ``step_s`` / the
  device's dense bf16 peak (an assumption from NVIDIA's datasheets: H100 and H200 989.4 TF/s,
  A100 312 TF/s); null on CPU or an unknown GPU (no peak to divide by).

Without a GPU the real shape is refused (exit 2 and the JSON line): pass ``--width-override``
(a tiny width) to run on CPU. Last line: one JSON object (``step_s``, ``peak_mem_gb``,
``mfu``, ``device``, ``shape``, ...) via ``_report.report``.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))   # as tests/training

import torch  # noqa: E402
from lightning import pytorch as pl  # noqa: E402

from preprocessing.errors import (EXIT_USER, CommandParser, UserError, error_line, positive_int,  # noqa: E402
                                  print_line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = CommandParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="wan1.3b", help="the recipe whose flavor, window, size and batch to use")
    p.add_argument("--width-override", type=positive_int, default=None,
                   help="model width (num_heads x head_dim, >= 64): a tiny model that runs on CPU")
    p.add_argument("--layers-override", type=positive_int, default=None, help="transformer blocks")
    p.add_argument("--frames", type=positive_int, default=None, help="window frames (4k+1; default the recipe's)")
    p.add_argument("--size", type=positive_int, default=None, help="frame side (default the recipe's)")
    p.add_argument("--batch", type=positive_int, default=None, help="samples per step (default the recipe's)")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    return p.parse_args(argv)


def step_shape(args: argparse.Namespace) -> dict:
    """The flavor (with the overrides), window, size, batch and checkpointing of the step."""
    from expportrait.recipes import load_recipe
    from models.generator import check_video_shape, flavor
    recipe = load_recipe(args.recipe)
    g = recipe.generator_init()
    data = recipe.train_config("generator").get("data", {}).get("init_args") or {}
    overrides = dict(g.get("flavor_overrides") or {})
    if args.width_override:
        head_dim = min(64, args.width_override)
        base = flavor(g["flavor"], **overrides)
        overrides.update(num_heads=max(1, args.width_override // head_dim), head_dim=head_dim,
                         ffn_dim=max(head_dim, round(args.width_override * base.ffn_dim / base.dim)))
    if args.layers_override:
        overrides["num_layers"] = args.layers_override
    frames, size = args.frames or int(g["frames"]), args.size or recipe.training_size()
    try:
        f = flavor(g["flavor"], **overrides)
        check_video_shape(frames, size, size)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return {"recipe": recipe.name, "flavor_name": g["flavor"], "flavor": f, "frames": frames, "size": size,
            "batch": args.batch or int(data.get("batch_size") or 1),
            "checkpointing": bool(g.get("gradient_checkpointing")), "overridden": bool(overrides)}


class RandomStep(pl.LightningModule):
    """The generator's training step on random inputs of one shape (random weights)."""

    def __init__(self, shape: dict) -> None:
        super().__init__()
        from models.generator import NormalDrivenWan
        self.shape = shape
        self.model = NormalDrivenWan(shape["flavor"], flavor_name=shape["flavor_name"])
        if shape["checkpointing"]:
            self.model.enable_gradient_checkpointing()

    def inputs(self) -> tuple[torch.Tensor, dict]:
        from models.generator import latent_shape
        s, f = self.shape, self.shape["flavor"]
        b, frames, size = s["batch"], s["frames"], s["size"]
        t, h, w = latent_shape(frames, size, size, f.latent_space)
        latents = torch.randn(b, f.latent_channels, t, h, w, device=self.device)
        conditions = {"reference_latent": torch.randn(b, f.latent_channels, t, h, w, device=self.device),
                      "driving_normals": torch.rand(b, 3, frames, size, size, device=self.device) * 2 - 1,
                      "reference_normal": torch.rand(b, 3, size, size, device=self.device) * 2 - 1}
        return latents, conditions

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        from models.generator import flow_matching_loss
        latents, conditions = self.inputs()
        loss, _ = flow_matching_loss(self.model, latents, conditions, "shifted", 5.0)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.trainable_parameters(), lr=1e-5, weight_decay=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(10**6), batch_size=1)


class StepTimer(pl.Callback):
    """Wall time of each training step (device synchronised), after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t0 = warmup, [], 0.0

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t0)


def device_peak() -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak (None: CPU or a GPU not in the table)."""
    from models.generator.flops import GPU_PEAK_BF16
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    for key, peak in GPU_PEAK_BF16.items():
        if key in name.lower():
            return name, peak
    return name, None


def run_step(shape: dict, steps: int, warmup: int) -> dict:
    """Train ``warmup + steps`` steps; the timings and the peak memory."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from training.strategies import CPUDeepSpeedStrategy
    gpu = torch.cuda.is_available()
    strategy = (DeepSpeedStrategy if gpu else CPUDeepSpeedStrategy)(stage=2, logging_batch_size_per_gpu=1)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, strategy=strategy, precision="bf16-mixed",
                         max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                         default_root_dir=os.environ.get("TMPDIR", "/tmp"))
    module = RandomStep(shape)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module)
    peak = (torch.cuda.max_memory_allocated() if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params = sum(p.numel() for p in module.model.parameters())
    return {"times": timer.times, "peak_bytes": peak, "params": params}


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    try:
        shape = step_shape(args)
        if not torch.cuda.is_available() and not args.width_override:
            raise UserError(f"the {shape['recipe']} step at its real width needs a GPU (none here): pass "
                            f"--width-override (e.g. 64) to run a tiny width on CPU")
    except UserError as exc:
        print_line(error_line(type(exc).__name__, str(exc), EXIT_USER))
        return EXIT_USER
    from models.generator.flops import training_flops
    torch.manual_seed(0)
    measured = run_step(shape, args.steps, args.warmup)
    step_s = sum(measured["times"]) / len(measured["times"])
    device, peak = device_peak()
    flops = shape["batch"] * training_flops(shape["flavor"], shape["frames"], shape["size"], shape["size"])
    f = shape["flavor"]
    from _report import report
    report({"step_s": step_s, "peak_mem_gb": measured["peak_bytes"] / 1e9,
            "mfu": flops / step_s / peak if peak else None, "device": device,
            "shape": f"{shape['batch']}x{shape['frames']}x{shape['size']}x{shape['size']}",
            "flavor": shape["flavor_name"] + (" (overridden)" if shape["overridden"] else ""),
            "width": f.dim, "layers": f.num_layers, "params": measured["params"],
            "train_tflops_per_step": flops / 1e12, "gradient_checkpointing": shape["checkpointing"],
            "strategy": "deepspeed zero-2 bf16", "timed_steps": len(measured["times"]),
            "peak_bf16_tflops_assumed": peak / 1e12 if peak else None},
           targets={})
    return 0


if __name__ == "__main__":
    sys.exit(main())
