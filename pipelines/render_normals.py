"""Driving-normal precomputation: the generator's driving normal maps, rendered once through the
frozen expression-transfer module, as sidecar shards.

    python -m pipelines.render_normals --input PREPROCESS_OUT --output NORMALS_DIR \
        --transfer-module EXPORT_DIR [--head-model SMPLX.npz] [--subdivision 1] [--size S]
        [--workers N] [--cpus-per-worker C] [--address RAY_ADDRESS] [--dry-run]

Writes ``NORMALS_DIR/<render_id>/shards/<name>.tar`` (+ ``.done.json``; a path or an object-store
URL, ``s3://bucket/prefix``, as ``encode_latents``) per finished source shard
(format: :mod:`preprocessing.normal_schema`), a ``manifest.parquet`` with a row per source
shard and a ``summary.json``. ``render_id`` hashes the transfer module's config and weights, the
head model's sha1, the subdivision and the generator's ``--size`` (the task's ``size``: it sets
the render side, :func:`models.generator.frames.normal_render_size`), so another module writes
elsewhere. Every frame of every sample is rendered by
:func:`models.generator.frames.transfer_normal_maps`, the function the generator task renders
its windows with, and stored as a lossless video stream. Resumable: a sidecar whose marker names
the same source sha256 and render id is skipped; a rerun writes nothing. Training reads the
sidecars with ``data.init_args.normals`` (``ShardDataset(normals=...)``): the step then renders
nothing.

Workers are Ray actors that load the head model and the module once (rendering is CPU work).
Exit codes as the latent job: 0 done, 1 a shard failed, 2 bad input, 3 environment fault,
4 internal error; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from preprocessing import storage
from preprocessing.clip_records import is_environment_fault
from preprocessing.shard_format import MARKER_SUFFIX, TMP_TAG, atomic_write, write_tar

from .actor_pool import ActorPool, ActorResources, CallFailure
from .encode_latents import source_shards
from .job_io import JobInputError, parquet_bytes, write_if_changed
from .preprocess.config import RayConfig
from .preprocess.job import EnvironmentFault, init_ray

#: the members of a source sample the render reads
RENDER_FIELDS = ("smplx", "static_offsets")


def load_renderer(transfer: str, head_model: str | None, subdivision: int):
    """(head, transfer module, render-id parts) for a transfer export folder and a head model
    (None: ``$EXPPORTRAIT_SMPLX_PATH``, else the synthetic one, as training resolves it)."""
    from models.head.head_model import PersonalizedHead
    from models.head.resolve import head_model_path
    from models.transfer import ExpressionTransfer
    from preprocessing.files import file_digest
    from preprocessing.latent_schema import codec_id

    if not (Path(transfer) / "config.json").is_file():
        raise JobInputError(f"transfer module {transfer} is not an exported transfer folder (no config.json)")
    path = head_model_path(head_model)
    if not Path(path).is_file():
        raise JobInputError(f"head model {path} does not exist")
    module = ExpressionTransfer.from_pretrained(transfer).eval().requires_grad_(False)
    head = PersonalizedHead.from_file(path, subdivision_levels=subdivision)
    return head, module, (codec_id(dict(module.config), module.state_dict()), file_digest(path))


def render_id_of(args: argparse.Namespace) -> str:
    from preprocessing.normal_schema import render_id
    _, _, (transfer_id, head_sha1) = load_renderer(args.transfer_module, args.head_model, args.subdivision)
    return render_id(transfer_id, head_sha1, args.subdivision, args.size)


class NormalRenderer:
    """A Ray actor: loads the head model and the transfer module once, renders shard after shard."""

    def __init__(self, transfer: str, head_model: str | None, subdivision: int, size: int | None,
                 threads: int) -> None:
        import torch

        from preprocessing.normal_schema import render_id
        torch.set_num_threads(threads)
        self.head, self.module, (transfer_id, head_sha1) = load_renderer(transfer, head_model, subdivision)
        self.size = size
        self.render_id = render_id(transfer_id, head_sha1, subdivision, size)

    def ready(self) -> str:
        return self.render_id

    def render_sample(self, raw: dict[str, bytes], source: dict):
        """One source sample's :class:`NormalSample` (every frame)."""
        import torch

        from models.generator.frames import transfer_normal_maps
        from preprocessing.normal_schema import NormalSample
        from preprocessing.sample_schema import decode_frames, decode_sample

        sample = decode_sample(raw, fields=RENDER_FIELDS)
        crop = int(decode_frames(raw["rgb.mp4"], 1).shape[1])
        smplx = {k: torch.from_numpy(v).float() for k, v in sample.smplx.items()}
        maps = transfer_normal_maps(self.head, self.module, smplx, torch.from_numpy(sample.static_offsets),
                                    crop, self.size)
        return NormalSample(sample.key, maps.numpy(), {
            "source_shard": source["name"], "source_sha256": source["sha256"], "render_id": self.render_id,
            "crop_size": crop, "render_size": int(maps.shape[1]), "frames": int(maps.shape[0])})

    def render_shard(self, source: dict, out_dir: str) -> dict:
        """Render one source shard into its sidecar (written whole under its name, path or URL,
        then committed by its marker), as ``encode_latents`` writes its sidecars."""
        import webdataset as wds

        from preprocessing.normal_schema import encode_normal_sample

        t0 = time.perf_counter()
        keys: list[str] = []

        def samples():
            with storage.open_url(source["tar"]) as fh:
                for raw in wds.tariterators.group_by_keys(
                        wds.tariterators.tar_file_expander([{"stream": fh, "url": source["tar"]}])):
                    keys.append(raw["__key__"])
                    yield encode_normal_sample(self.render_sample(raw, source))

        tar_name = f"{source['name']}.tar"
        digest, _ = write_tar(storage.url_join(out_dir, tar_name), samples())
        marker = {"name": source["name"], "tar": tar_name, "sha256": digest, "samples": len(keys),
                  "keys": keys, "source_sha256": source["sha256"], "render_id": self.render_id}
        atomic_write(storage.url_join(out_dir, f"{source['name']}{MARKER_SUFFIX}"),
                     json.dumps(marker, indent=1).encode())                    # the commit
        return {"shard": source["name"], "status": "ok", "samples": len(keys),
                "seconds": round(time.perf_counter() - t0, 3), "reason": ""}


def pending_shards(sources: list[dict], out: str, rid: str) -> list[dict]:
    """Source shards whose sidecar is missing or stale (another source sha256 or render id)."""
    todo = []
    present = set(storage.listdir(out))
    for s in sources:
        try:
            marker = json.loads(storage.get_bytes(storage.url_join(out, f"{s['name']}{MARKER_SUFFIX}")))
            fresh = (marker["source_sha256"] == s["sha256"] and marker["render_id"] == rid
                     and marker["tar"] in present)
        except (OSError, ValueError, KeyError):
            fresh = False
        if not fresh:
            todo.append(s)
    return todo


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.size is not None and (args.size <= 0 or args.size % 16):
        raise JobInputError(f"--size {args.size}: the generator's side, a positive multiple of 16 (or omit it)")
    sources = source_shards(args.input)
    rid = render_id_of(args)
    base = storage.url_join(args.output, rid)
    out = storage.url_join(base, "shards")
    todo = pending_shards(sources, out, rid)
    summary = {"render_id": rid, "output": base, "source_shards": len(sources), "pending": len(todo)}
    if args.dry_run or not todo:
        return {**summary, "written": 0, "failed": 0, "dry_run": args.dry_run}
    try:
        storage.makedirs(out)
    except OSError as exc:
        raise EnvironmentFault(f"output {out}: {exc.strerror}") from None
    if storage.local_path(out) is not None:         # a killed local run's temp files
        for orphan in [n for n in storage.listdir(out) if TMP_TAG in n]:
            storage.remove(storage.url_join(out, orphan))
    rows = _render_on_pool(args, todo, out, rid)
    failed = sum(r["status"] != "ok" for r in rows)
    summary.update(written=len(rows) - failed, failed=failed, samples=sum(r["samples"] for r in rows),
                   seconds=round(time.perf_counter() - started, 2))
    storage.put_bytes(storage.url_join(base, "summary.json"), json.dumps(summary, indent=1).encode())
    return summary


def _render_on_pool(args: argparse.Namespace, todo: list[dict], out: str, rid: str) -> list[dict]:
    """Render the pending shards on a pool of :class:`NormalRenderer` actors; a row per shard
    (also ``manifest.parquet``, written even when the job stops on an environment fault)."""
    from tqdm import tqdm

    def failed_row(failure: CallFailure) -> dict:
        cause = failure.cause
        if is_environment_fault(cause):
            raise EnvironmentFault(f"{cause.strerror}: {getattr(cause, 'filename', '')}") from None
        return {"shard": failure.item["name"], "status": failure.status, "samples": 0, "seconds": 0.0,
                "reason": f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"}

    init_ray(RayConfig(address=args.address, num_cpus=args.num_cpus))
    import ray
    rows: list[dict] = []
    try:
        threads = max(1, int(args.cpus_per_worker))
        pool = ActorPool(NormalRenderer, (args.transfer_module, args.head_model, args.subdivision, args.size, threads),
                         ActorResources(num_cpus=args.cpus_per_worker, num_gpus=0.0, max_restarts=1))
        ids = set(pool.start(min(args.workers, len(todo))))
        if ids != {rid}:
            raise EnvironmentFault(f"the workers loaded another module or head model ({sorted(ids)}) than the "
                                   f"driver ({rid})")
        with tqdm(total=len(todo), desc="shards", unit="shard", file=sys.stdout, disable=args.no_progress) as bar:
            pool.map("render_shard", todo, lambda src: (src, str(out)), failed_row,
                     progress=lambda row: (rows.append(row), bar.update(1)))
    finally:
        ray.shutdown()
        if rows:
            import pandas as pd
            write_if_changed(storage.url_join(out.rsplit("/shards", 1)[0], "manifest.parquet"),
                             parquet_bytes(pd.DataFrame(rows)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.render_normals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a preprocessing job's output folder or URL")
    p.add_argument("--output", required=True, help="folder or URL of normal sidecars (a subfolder per render id)")
    p.add_argument("--transfer-module", required=True, help="an exported transfer module folder (frozen)")
    p.add_argument("--head-model", default=None, help="SMPL-X-format .npz (default: as training resolves it)")
    p.add_argument("--subdivision", type=int, default=1, help="the generator task's subdivision")
    p.add_argument("--size", type=int, default=None, help="the generator task's size (default: the crop's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--num-cpus", type=int, default=None, help="embedded Ray only")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """The job in the one command wrapper (preprocessing/errors.py): 0 done, 1 a shard failed,
    2 bad input, 3 environment fault, 4 a bug; the last line is one JSON object."""
    from preprocessing.errors import run_command
    args = build_parser().parse_args(argv)

    def work() -> dict:
        summary = run(args)
        return {**summary, "exit_code": 1 if summary.get("failed") else 0}
    return run_command(work, user_errors=(JobInputError,), environment_errors=(EnvironmentFault,))


if __name__ == "__main__":
    from pipelines import render_normals   # run from the importable module (Ray pickles __main__ by value)

    sys.exit(render_normals.main())
