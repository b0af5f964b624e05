"""`expportrait preflight --recipe NAME --data SHARDS_DIR`: do these shards fit this recipe?
Checked before a launch, from the tar members' headers (no video is decoded):

- frames per sample >= the recipe's training window span (shorter ones the reader would drop);
- crop size = the recipe's preprocessing crop size; frame rate = its fps;
- the members the recipe's training reads are there (``data.init_args.fields``), and the
  schema version is one the reader decodes;
- the head model: every sample names one (``head_model_sha1``), that of the recipe's head model
  file (``--head-model``, else the recipe's path, else the job's ``summary.json``); for the
  ``synthetic`` head its arrays must be those of the synthetic model of seed 0;
- when the recipe trains on latent sidecars (``data.init_args.latents``, or ``--latents``):
  every shard has one made from its bytes, by one codec (``codec_id``), the recipe's when its
  codec folder is here;
- when the recipe trains on driving-normal sidecars (``data.init_args.normals``, or
  ``--normals``): every shard has one made from its bytes, by one render id, the recipe's
  (transfer module, head model, subdivision, size) when its transfer module is here. The
  summary says where the driving normals come from (``driving_normals``: ``sidecar``,
  ``rendered in the step`` or ``the shards' own``).

Exit 0 with one JSON summary line when they fit; exit 2 with one line per mismatch, then the
JSON error line.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class PreflightMismatch(ValueError):
    """The shards do not fit the recipe (the lines name each mismatch)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preflight", help="check shards against a recipe before a training launch")
    p.add_argument("--recipe", required=True, help="a recipe name (configs/recipes/NAME.yaml) or a recipe YAML")
    p.add_argument("--data", required=True, type=Path, help="the preprocessing output (or its shards folder)")
    p.add_argument("--head-model", default=None, help="the head model file the shards were made with "
                                                      "(default: the recipe's, else the job summary's)")
    p.add_argument("--latents", default=None, help="the latent sidecar folder (default: the recipe's, if it uses one)")
    p.add_argument("--normals", default=None,
                   help="the driving-normal sidecar folder (default: the recipe's, if it uses one)")
    p.set_defaults(func=run)


@dataclass
class ShardStats:
    """What the samples' headers say, gathered over every shard."""
    samples: int = 0
    frames: Counter = field(default_factory=Counter)       # frame count -> samples
    sizes: Counter = field(default_factory=Counter)        # (h, w) -> samples
    versions: Counter = field(default_factory=Counter)
    fps: Counter = field(default_factory=Counter)
    head_sha1: Counter = field(default_factory=Counter)
    missing: Counter = field(default_factory=Counter)      # member or array -> samples lacking it


def _npy_shape(npz: bytes, name: str) -> tuple[int, ...] | None:
    """The shape of array ``name`` in an ``.npz``, from its header only."""
    import numpy as np
    with zipfile.ZipFile(io.BytesIO(npz)) as z:
        if f"{name}.npy" not in z.namelist():
            return None
        with z.open(f"{name}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(fh)
    return tuple(shape)


def _wanted(fields: list[str]) -> dict[str, list[str]]:
    """member -> arrays in it that training reads (``cond.npz``: normals, ...)."""
    from preprocessing.sample_schema import FIELDS
    out: dict[str, list[str]] = {"meta.json": [], "cond.npz": ["normals"]}
    for f in fields:
        member = FIELDS[f]
        out.setdefault(member, [])
        if member.endswith(".npz") and member != "smplx.npz":
            out[member].append(f)
    return out


def _read_sample(members: dict[str, bytes], wanted: dict[str, list[str]], stats: ShardStats) -> None:
    stats.samples += 1
    for member, arrays in wanted.items():
        if member not in members:
            stats.missing[member] += 1
            continue
        for name in arrays:
            if _npy_shape(members[member], name) is None:
                stats.missing[f"{member}:{name}"] += 1
    if "meta.json" in members:
        meta = json.loads(members["meta.json"])
        stats.versions[meta.get("schema_version")] += 1
        stats.fps[meta.get("fps")] += 1
        stats.head_sha1[meta.get("head_model_sha1")] += 1
    if "cond.npz" in members:
        shape = _npy_shape(members["cond.npz"], "normals")
        if shape is not None:
            stats.frames[shape[0]] += 1
            stats.sizes[tuple(shape[1:3])] += 1


def scan_shards(urls: list[str], fields: list[str]) -> ShardStats:
    """Headers of every sample of ``urls`` (members grouped by key, as the reader groups them)."""
    stats, wanted = ShardStats(), _wanted(fields)
    for url in urls:
        with tarfile.open(url) as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                k, _, ext = info.name.partition(".")
                if k != key and key is not None:
                    _read_sample(members, wanted, stats)
                    members = {}
                key = k
                if ext in wanted:
                    members[ext] = tar.extractfile(info).read()
            if key is not None:
                _read_sample(members, wanted, stats)
    return stats


def _frames_and_size(recipe, stats: ShardStats) -> list[str]:
    out = []
    span = recipe.window_span()
    g = recipe.generator_init()
    short = sum(n for t, n in stats.frames.items() if t < span)
    if short:
        counts = ", ".join(f"{n} with {t}" for t, n in sorted(stats.frames.items()))
        out.append(f"frames: {short} of {stats.samples} samples have fewer frames than the {recipe.name} window "
                   f"spans ({span} = ({g['frames']} - 1) x {g['frame_stride']} + 1); samples by frame count: {counts}")
    stages = recipe.preprocess_config().stages
    crop = stages.crop_size
    wrong = {s: n for s, n in stats.sizes.items() if s != (crop, crop)}
    if wrong:
        found = ", ".join(f"{n} at {h}x{w}" for (h, w), n in sorted(wrong.items()))
        out.append(f"crop size: the {recipe.name} recipe crops {crop}x{crop}; samples: {found}")
    other_fps = {f: n for f, n in stats.fps.items() if f is not None and float(f) != float(stages.fps or f)}
    if other_fps:
        out.append(f"fps: the {recipe.name} recipe decodes at {stages.fps} fps; samples: "
                   + ", ".join(f"{n} at {f}" for f, n in sorted(other_fps.items())))
    return out


def _schema_and_fields(stats: ShardStats) -> list[str]:
    from preprocessing.sample_schema import READABLE_VERSIONS
    out = []
    bad = {v: n for v, n in stats.versions.items() if v not in READABLE_VERSIONS}
    if bad:
        out.append(f"schema version: the reader decodes {list(READABLE_VERSIONS)}; samples: "
                   + ", ".join(f"{n} with {v}" for v, n in bad.items()))
    for member, n in sorted(stats.missing.items()):
        out.append(f"fields: {n} of {stats.samples} samples lack {member} (the recipe's training reads it)")
    return out


def _head_model(recipe, stats: ShardStats, data: Path, given: str | None) -> tuple[list[str], str | None]:
    """Mismatch lines, and the head model file checked."""
    from models.head.resolve import head_model_hash
    from preprocessing.files import file_digest
    hashes = sorted(str(h) for h in stats.head_sha1)
    if len(hashes) != 1 or hashes == ["None"]:
        return [f"head model: the samples name {len(hashes)} head models ({', '.join(hashes)}); one is needed"], None
    path = given or (recipe.head_model if recipe.head_model != "synthetic" else None)
    summary = _summary(data)
    path = path or summary.get("head_model")
    if not path or not Path(path).is_file():
        return [f"head model: {path or 'no file'} is not here to check against the samples' sha1 {hashes[0]} "
                f"(give --head-model FILE)"], None
    out = []
    digest = file_digest(path)
    if digest != hashes[0]:
        out.append(f"head model: {path} has sha1 {digest}, the samples were made with {hashes[0]}")
    elif recipe.head_model == "synthetic":
        from models.head.resolve import synthetic_model_file
        if head_model_hash(path) != head_model_hash(synthetic_model_file(seed=0)):
            out.append(f"head model: the {recipe.name} recipe uses the synthetic model (seed 0); {path} is another")
    elif given and Path(recipe.head_model).is_file() and file_digest(recipe.head_model) != digest:
        out.append(f"head model: the {recipe.name} recipe names {recipe.head_model}, not {path}")
    return out, str(path)


def _summary(data: Path) -> dict:
    for folder in (data, data.parent):
        if (folder / "summary.json").is_file():
            return json.loads((folder / "summary.json").read_text())
    return {}


def _sidecar_shards(kind: str, folder: str, urls: list[str], job: str) -> tuple[list[str], str | None]:
    """(mismatch lines, the sidecar shards folder) for a ``kind`` folder: the shards folder itself,
    its id folder or the job's ``--output`` (``training.data.sidecars``: one resolution for both)."""
    from preprocessing.errors import UserError
    from training.data.sidecars import sidecar_folder
    try:
        found = sidecar_folder(folder, urls)
    except UserError as exc:
        return [f"{kind}: {exc}"], None
    except OSError as exc:
        return [f"{kind}: {folder} cannot be listed: {exc}"], None
    if found is None:
        return [f"{kind}: the recipe trains on {kind} sidecars; {folder} holds none ({job})"], None
    return [], found


def _latents(recipe, urls: list[str], latents: str | None) -> tuple[list[str], str | None]:
    """Sidecar lines (when the recipe trains on latents), and the codec id found."""
    from training.data.shards import matching_sidecars
    folder = latents or recipe.sidecar_folders()["latents"]
    if not folder:
        if not recipe.generator_fields():
            return ["latents: the recipe decodes no frames (data fields: []) and names no latent sidecars"], None
        return [], None
    out, folder = _sidecar_shards("latents", folder, urls, "python -m pipelines.encode_latents")
    if folder is None:
        return out, None
    found = matching_sidecars(urls, folder)
    if len(found) < len(urls):
        out.append(f"latents: {len(urls) - len(found)} of {len(urls)} shards have no sidecar made from their bytes "
                   f"in {folder}")
    ids = _sidecar_ids(found, "codec_id")
    if len(ids) > 1:
        out.append(f"latents: sidecars of {len(ids)} codecs: {sorted(map(str, ids))}")
    codec_id = next(iter(ids)) if len(ids) == 1 else None
    init = recipe.generator_init()
    if codec_id and init.get("codec") and Path(init["codec"]).is_dir():
        from models.generator import LatentCodec
        from pipelines.encode_latents import codec_id_of
        expected = codec_id_of(LatentCodec.from_pretrained(init["codec"], init.get("codec_subfolder")))
        if expected != codec_id:
            out.append(f"latents: the sidecars' codec id {codec_id} is not the recipe codec's {expected}")
    return out, codec_id


def _sidecar_ids(found: dict[str, str], key: str) -> set:
    from preprocessing import storage
    return {json.loads(storage.get_bytes(side[:-len(".tar")] + ".done.json")).get(key) for side in found.values()}


def _normals(recipe, urls: list[str], normals: str | None, head_path: str | None) -> tuple[list[str], dict]:
    """Driving-normal sidecar lines, and the summary's ``driving_normals`` / ``normals_render_id``."""
    from training.data.shards import matching_sidecars
    folder = normals or recipe.sidecar_folders()["normals"]
    init = recipe.generator_init()
    if not folder:
        source = "rendered in the step" if init.get("transfer_module") else "the shards' own"
        return [], {"driving_normals": source, "normals_render_id": None}
    out, folder = _sidecar_shards("normals", folder, urls, "python -m pipelines.render_normals")
    if folder is None:
        return out, {}
    found = matching_sidecars(urls, folder)
    if len(found) < len(urls):
        out.append(f"normals: {len(urls) - len(found)} of {len(urls)} shards have no sidecar made from their bytes "
                   f"in {folder}")
    ids = _sidecar_ids(found, "render_id")
    if len(ids) > 1:
        out.append(f"normals: sidecars of {len(ids)} render ids: {sorted(map(str, ids))}")
    rid = next(iter(ids)) if len(ids) == 1 else None
    if rid and init.get("transfer_module") and Path(init["transfer_module"]).is_dir() and head_path:
        from pipelines.render_normals import load_renderer
        from preprocessing.normal_schema import render_id
        _, _, (transfer_id, head_sha1) = load_renderer(init["transfer_module"], head_path, int(init["subdivision"]))
        expected = render_id(transfer_id, head_sha1, int(init["subdivision"]), init.get("size"))
        if expected != rid:
            out.append(f"normals: the sidecars' render id {rid} is not the recipe's {expected} (transfer module, "
                       f"head model, subdivision, size)")
    return out, {"driving_normals": "sidecar", "normals_render_id": rid}


def check(recipe_name: str, data: Path, head_model: str | None = None, latents: str | None = None,
          normals: str | None = None) -> dict:
    """The summary when the shards fit the recipe; :class:`PreflightMismatch` (its ``lines``)
    otherwise."""
    from expportrait.recipes import load_recipe
    from training.data.shards import shard_urls
    recipe = load_recipe(recipe_name)
    if not Path(data).is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    urls = shard_urls(data, None)
    if not urls:
        raise FileNotFoundError(f"no finished shards (tar + done marker) under {data}")
    stats = scan_shards(urls, recipe.generator_fields())
    lines = _frames_and_size(recipe, stats) + _schema_and_fields(stats)
    head_lines, head_path = _head_model(recipe, stats, Path(data), head_model)
    latent_lines, codec_id = _latents(recipe, urls, latents)
    normal_lines, normal_summary = _normals(recipe, urls, normals, head_path)
    lines += head_lines + latent_lines + normal_lines
    if not stats.frames:
        lines.append(f"samples: none of the {stats.samples} samples has a normal map to count frames from")
    if lines:
        err = PreflightMismatch(f"{len(lines)} mismatch(es) between {data} and the {recipe.name} recipe: "
                                + "; ".join(line.split(":")[0] for line in lines))
        err.lines = lines
        raise err
    return {"recipe": recipe.name, "data": str(data), "shards": len(urls), "samples": stats.samples,
            "frames": {"min": min(stats.frames), "max": max(stats.frames)}, "window_span": recipe.window_span(),
            "crop_size": recipe.preprocess_config().stages.crop_size,
            "schema_versions": sorted(stats.versions), "head_model": head_path,
            "head_model_sha1": next(iter(stats.head_sha1)), "latents_codec_id": codec_id, **normal_summary,
            "fits": True}


def run(args: argparse.Namespace) -> dict:
    try:
        return check(args.recipe, args.data, args.head_model, args.latents, getattr(args, "normals", None))
    except PreflightMismatch as exc:
        for line in exc.lines:
            print(line)
        raise
