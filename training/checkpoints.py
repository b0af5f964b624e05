"""DeepSpeed checkpoints across world sizes.

A ZeRO checkpoint folder is tied to the number of processes that saved it (each holds its
rank's partition of the fp32 master weights and Adam moments). Its *universal* form (DeepSpeed's
``ds_to_universal``: every parameter's fp32 weights and optimizer moments whole, one folder per
parameter) resumes on any number of processes:

    python -m training.checkpoints to-universal OUT/checkpoints/last.ckpt OUT/checkpoints/last.universal
    python -m training.train fit --config ... --trainer.devices N --ckpt_path OUT/checkpoints/last.universal

The universal folder keeps Lightning's layout (``<tag>/`` with the client state: loops,
callbacks such as the EMA, the data module's position) and names its tag in
``latest_universal``; the DeepSpeed strategies (:mod:`training.strategies`) load such a folder
as universal. The data position carries over as the samples consumed globally
(:func:`training.data.datamodule.resume_point`). The conversion runs on CPU, one process, and
reads the checkpoint weights-only (:func:`training.export.deepspeed_loads_weights_only`).
Exit 0 with one JSON line; a folder that is not a DeepSpeed checkpoint, or an output folder that
is not empty, exits 2.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path

from preprocessing.errors import UserError

UNIVERSAL_TAG_FILE = "latest_universal"


def is_universal(checkpoint: str | os.PathLike) -> bool:
    """A folder written by :func:`to_universal` (DeepSpeed loads it with ``load_universal``)."""
    return (Path(checkpoint) / UNIVERSAL_TAG_FILE).is_file()


def to_universal(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a DeepSpeed checkpoint folder (a Lightning ``.ckpt`` folder: ``<tag>/`` + ``latest``)
    into a universal one at ``out`` (``<tag>/`` with ``zero/<parameter>/{fp32,exp_avg,exp_avg_sq}.pt``
    and the model-state files, + ``latest_universal``)."""
    import deepspeed.checkpoint.ds_to_universal as ds_to_universal
    from deepspeed.utils.tensor_fragment import fragment_address

    from training.export import deepspeed_loads_weights_only
    checkpoint, out = Path(checkpoint), Path(out)
    tag = (checkpoint / "latest").read_text().strip() if (checkpoint / "latest").is_file() else "checkpoint"
    source = checkpoint / tag
    if not source.is_dir() or not any(source.glob("*optim_states.pt")):
        raise UserError(f"{checkpoint} is not a DeepSpeed checkpoint folder with optimizer states "
                        f"(expected {source}/*optim_states.pt)", checkpoint=str(checkpoint))
    if is_universal(checkpoint):
        raise UserError(f"{checkpoint} is universal already", checkpoint=str(checkpoint))
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty", out=str(out))
    args = argparse.Namespace(input_folder=str(source), output_folder=str(out / tag), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with deepspeed_loads_weights_only(fragment_address, argparse.Namespace), \
            contextlib.redirect_stdout(io.StringIO()):          # its progress lines; ours is the JSON line
        ds_to_universal.main(args)
    (out / UNIVERSAL_TAG_FILE).write_text(tag)
    return out


def main(argv: list[str] | None = None) -> int:
    from preprocessing.errors import CommandParser, run_command
    parser = CommandParser(prog="python -m training.checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("to-universal", help="a ZeRO checkpoint folder -> a universal one (any world size)")
    convert.add_argument("checkpoint", help="a DeepSpeed checkpoint folder (e.g. OUT/checkpoints/last.ckpt)")
    convert.add_argument("out", help="the universal folder to write (new or empty)")
    args = parser.parse_args(argv)

    def work() -> dict:
        out = to_universal(args.checkpoint, args.out)
        params = sorted(p.name for p in (out / (out / UNIVERSAL_TAG_FILE).read_text() / "zero").iterdir() if p.is_dir())
        return {"universal": str(out), "parameters": len(params)}
    return run_command(work)


if __name__ == "__main__":
    raise SystemExit(main())
