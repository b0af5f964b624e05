"""Latent precomputation: VAE latents of a preprocessing output's shards, as sidecar shards.

    python -m pipelines.encode_latents --input PREPROCESS_OUT --output LATENTS_DIR \
        [--codec tiny | WAN_FOLDER [--codec-subfolder vae]] [--workers N] [--num-gpus G] [--batch B]
        [--address RAY_ADDRESS] [--dry-run]

Writes ``LATENTS_DIR/<codec_id>/shards/<name>.tar`` (+ ``.done.json``) per finished source shard
(format: :mod:`preprocessing.latent_schema`), a ``manifest.parquet`` with a row per source shard
and a ``summary.json``. ``codec_id`` hashes the codec's config and weights, so another VAE
writes elsewhere. Resumable: a sidecar whose marker names the same source sha256, codec and
frame rule is skipped; a rerun writes nothing. Real-scale training does this once (encoding
dominates a step otherwise); the reader picks the sidecars up (``ShardDataset(latents=...)``).

Workers are Ray actors that load the codec once (``--num-gpus`` puts them on GPUs: the codec
runs on ``cuda`` there). Exit codes as the preprocessing job: 0 done, 1 a shard failed,
2 bad input, 3 environment fault, 4 internal error; the last line is one JSON object.
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
from .job_io import JobInputError, parquet_bytes, write_if_changed
from .preprocess.config import RayConfig
from .preprocess.job import EnvironmentFault, init_ray

FRAMES_RULE = "first-4k+1"


def load_codec(spec: str, subfolder: str | None = None):
    """``tiny`` (the tiny Wan VAE of ``tiny_cpu``, seed 0: only for tests and the tiny world)
    or a local diffusers folder of a Wan VAE."""
    from models.generator import LatentCodec, WeightsFolderError
    if spec == "tiny":
        return LatentCodec.tiny(seed=0)
    if not Path(spec).is_dir():
        raise JobInputError(f"codec folder {spec} does not exist (a local diffusers folder of a Wan VAE, "
                            "or 'tiny')")
    try:
        return LatentCodec.from_pretrained(spec, subfolder)
    except WeightsFolderError as exc:
        raise JobInputError(f"codec: {exc}") from None


def codec_id_of(codec) -> str:
    from preprocessing.latent_schema import codec_id
    return codec_id(dict(codec.vae.config), codec.vae.state_dict())


def source_shards(source: str | Path) -> list[dict]:
    """The finished shards of a preprocessing output (a path or URL): their done markers."""
    shards = storage.url_join(source, "shards")
    names = storage.listdir(shards)
    if not names and not storage.is_dir(shards):        # (an empty prefix is no folder on S3)
        raise JobInputError(f"{source} is not a preprocessing output (no shards/ folder)")
    markers = []
    for name in (n for n in names if n.endswith(MARKER_SUFFIX)):
        marker = json.loads(storage.get_bytes(storage.url_join(shards, name)))
        if marker.get("tar") and marker["tar"] in names:
            markers.append({"name": marker["name"], "tar": storage.url_join(shards, marker["tar"]),
                            "sha256": marker["sha256"], "samples": marker["samples"]})
    if not markers:
        raise JobInputError(f"no finished shard in {shards}")
    return markers


class LatentEncoder:
    """A Ray actor: loads the codec once, encodes shard after shard."""

    def __init__(self, codec: str, subfolder: str | None, threads: int) -> None:
        import torch
        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.codec = load_codec(codec, subfolder).to(self.device).eval()
        self.codec_id = codec_id_of(self.codec)

    def ready(self) -> str:
        return self.codec_id

    def encode_shard(self, source: dict, out_dir: str, batch: int) -> dict:
        """Encode one source shard into its sidecar (written whole, then committed by its marker)."""
        import numpy as np
        import torch
        import webdataset as wds

        from models.generator import to_unit_video
        from preprocessing.latent_schema import LatentSample, encode_latent_sample, latent_frames
        from preprocessing.sample_schema import decode_sample

        t0 = time.perf_counter()
        with storage.open_url(source["tar"]) as fh:
            raws = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"stream": fh,
                                                                                             "url": source["tar"]}])))
        samples, pending = [], []

        def flush() -> None:
            frames = torch.from_numpy(np.stack([p.frames[:latent_frames(len(p.frames))] for p in pending]))
            video = to_unit_video(frames).to(self.device)
            with torch.no_grad():
                lat = self.codec.encode(video).half().cpu().numpy()
                ref = self.codec.encode_reference(video[:, :, 0], video.shape[2]).half().cpu().numpy()
            for p, v, r in zip(pending, lat, ref):
                samples.append(LatentSample(p.key, v, r, {
                    "source_shard": source["name"], "source_sha256": source["sha256"],
                    "source_schema_version": p.meta.get("schema_version"), "codec_id": self.codec_id,
                    "frames": int(video.shape[2])}))
            pending.clear()

        for raw in raws:
            sample = decode_sample(raw, fields=("frames",))
            if pending and pending[0].frames.shape != sample.frames.shape:
                flush()
            pending.append(sample)
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
        tar_name = f"{source['name']}.tar"
        digest, _ = write_tar(storage.url_join(out_dir, tar_name), (encode_latent_sample(s) for s in samples))
        marker = {"name": source["name"], "tar": tar_name, "sha256": digest, "samples": len(samples),
                  "keys": [s.key for s in samples], "source_sha256": source["sha256"],
                  "codec_id": self.codec_id, "frames_rule": FRAMES_RULE}
        atomic_write(storage.url_join(out_dir, f"{source['name']}{MARKER_SUFFIX}"),
                     json.dumps(marker, indent=1).encode())                    # the commit
        return {"shard": source["name"], "status": "ok", "samples": len(samples),
                "seconds": round(time.perf_counter() - t0, 3), "reason": ""}


def pending_shards(sources: list[dict], out: str, codec_id: str) -> list[dict]:
    """Source shards whose sidecar is missing or stale (another source sha256 or frame rule)."""
    todo = []
    present = set(storage.listdir(out))
    for s in sources:
        try:
            marker = json.loads(storage.get_bytes(storage.url_join(out, f"{s['name']}{MARKER_SUFFIX}")))
            fresh = (marker["source_sha256"] == s["sha256"] and marker["codec_id"] == codec_id
                     and marker["frames_rule"] == FRAMES_RULE and marker["tar"] in present)
        except (OSError, ValueError, KeyError):
            fresh = False
        if not fresh:
            todo.append(s)
    return todo


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    sources = source_shards(args.input)
    codec = load_codec(args.codec, args.codec_subfolder)
    cid = codec_id_of(codec)
    del codec
    base = storage.url_join(args.output, cid)
    out = storage.url_join(base, "shards")
    todo = pending_shards(sources, out, cid)
    summary = {"codec_id": cid, "output": base, "source_shards": len(sources), "pending": len(todo)}
    if args.dry_run or not todo:
        return {**summary, "written": 0, "failed": 0, "dry_run": args.dry_run}
    try:
        storage.makedirs(out)
    except OSError as exc:
        raise EnvironmentFault(f"output {out}: {exc.strerror}") from None
    if storage.local_path(out) is not None:         # a killed local run's temp files
        for orphan in [n for n in storage.listdir(out) if TMP_TAG in n]:
            storage.remove(storage.url_join(out, orphan))
    rows = _encode_on_pool(args, todo, out, cid)
    failed = sum(r["status"] != "ok" for r in rows)
    summary.update(written=len(rows) - failed, failed=failed, samples=sum(r["samples"] for r in rows),
                   seconds=round(time.perf_counter() - started, 2))
    storage.put_bytes(storage.url_join(base, "summary.json"), json.dumps(summary, indent=1).encode())
    return summary


def _encode_on_pool(args: argparse.Namespace, todo: list[dict], out: str, cid: str) -> list[dict]:
    """Encode the pending shards on a pool of :class:`LatentEncoder` actors; a row per shard
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
        pool = ActorPool(LatentEncoder, (args.codec, args.codec_subfolder, max(1, int(args.cpus_per_worker))),
                         ActorResources(num_cpus=args.cpus_per_worker, num_gpus=args.num_gpus, max_restarts=1))
        ids = set(pool.start(min(args.workers, len(todo))))
        if ids != {cid}:
            raise EnvironmentFault(f"the workers loaded another codec ({sorted(ids)}) than the driver ({cid})")
        with tqdm(total=len(todo), desc="shards", unit="shard", file=sys.stdout, disable=args.no_progress) as bar:
            pool.map("encode_shard", todo, lambda src: (src, str(out), args.batch), failed_row,
                     progress=lambda row: (rows.append(row), bar.update(1)))
    finally:
        ray.shutdown()
        if rows:
            import pandas as pd
            write_if_changed(storage.url_join(out.rsplit("/shards", 1)[0], "manifest.parquet"),
                             parquet_bytes(pd.DataFrame(rows)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.encode_latents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a preprocessing job's output folder")
    p.add_argument("--output", required=True, help="folder of latent sidecars (a subfolder per codec)")
    p.add_argument("--codec", default="tiny", help="'tiny' or a local diffusers folder of a Wan VAE")
    p.add_argument("--codec-subfolder", default=None, help="e.g. 'vae' in a Wan Diffusers checkpoint")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per worker")
    p.add_argument("--num-cpus", type=int, default=None, help="embedded Ray only")
    p.add_argument("--batch", type=int, default=4, help="samples encoded together")
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
    from pipelines import encode_latents   # run from the importable module (Ray pickles __main__ by value)

    sys.exit(encode_latents.main())
