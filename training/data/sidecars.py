"""Where a training run's precomputed sidecars are, and whether they cover what it decodes.

The precompute jobs write under a folder per id (``pipelines.encode_latents``:
``LATENTS_DIR/<codec_id>/shards``; ``pipelines.render_normals``: ``NORMALS_DIR/<render_id>/shards``).
A config cannot know the id before the job ran, so ``data.init_args.latents`` / ``normals`` may
name any of:

- the sidecar shards folder itself (``.../<id>/shards``: it holds ``*.done.json`` markers);
- the id folder (``.../<id>``, which holds ``shards/``);
- the job's ``--output`` (``LATENTS_DIR``): its ``<id>/shards`` folder whose sidecars were made
  from the bytes of the most training shards is taken; two ids that cover as many (another
  codec, a retrained transfer module) are a mistake to resolve by naming one.

:func:`resolve_sidecars` also refuses (``UserError``: exit 2 before any model is built) a run
that could not train from what it reads: a sidecar folder with no sidecar in it; ``fields: []``
(no RGB decoded) without latent sidecars; and, when the shards' own member is not decoded
(``frames`` for latents, ``normals`` for driving normals), a shard of the training or
validation split without its sidecar (its samples would reach the step with nothing to encode
or to drive with).
"""
from __future__ import annotations

import os

from preprocessing import storage
from preprocessing.errors import UserError
from preprocessing.shard_format import MARKER_SUFFIX

from .shards import matching_sidecars, shard_urls

#: sidecar kind -> (the shards' member that stands in for it, the job that writes it)
KINDS = {"latents": ("frames", "python -m pipelines.encode_latents"),
         "normals": ("normals", "python -m pipelines.render_normals")}


def _has_markers(folder: str) -> bool:
    return any(n.endswith(MARKER_SUFFIX) for n in storage.listdir(folder))


def sidecar_folder(folder: str | os.PathLike, urls: list[str]) -> str | None:
    """The sidecar shards folder that ``folder`` names (module docstring) for the shards
    ``urls``; None when it holds no sidecar. ``UserError`` when two ids cover as many shards."""
    folder = os.fspath(folder)
    if _has_markers(folder):
        return folder
    names = storage.listdir(folder)
    if "shards" in names and _has_markers(storage.url_join(folder, "shards")):
        return storage.url_join(folder, "shards")
    candidates = {n: storage.url_join(folder, n, "shards") for n in names
                  if _has_markers(storage.url_join(folder, n, "shards"))}        # id -> its shards folder
    if not candidates:
        return None
    cover = {n: len(matching_sidecars(urls, c)) for n, c in candidates.items()}
    best = max(cover.values())
    top = sorted(n for n, k in cover.items() if k == best)
    if len(top) > 1:
        raise UserError(f"sidecar folder {folder} holds {len(top)} ids that each cover {best} of {len(urls)} "
                        f"shards ({', '.join(top)}): name one, {folder}/<id>/shards", folder=folder, ids=top)
    return candidates[top[0]]


def resolve_sidecars(root: str | os.PathLike | list[str], fields: tuple[str, ...] | None,
                     folders: dict[str, str | os.PathLike | None],
                     splits: tuple[str | None, ...] = ("train", "val")) -> dict[str, str | None]:
    """kind -> the sidecar shards folder to read (None where none is given) for the shards of
    ``root`` (``splits``: training first), checked as the module docstring says."""
    decoded = set(fields) if fields is not None else None          # None: every member
    # a generator configured to train on sidecars (normals given) that decodes no frames needs latents;
    # fields [] alone (no sidecar) is a metadata-only reader (positions, counts)
    if decoded is not None and not decoded and folders.get("normals") and not folders.get("latents"):
        raise UserError("data.init_args.fields is [] (no RGB frames decoded) and no latent sidecar folder is "
                        "given: set data.init_args.latents (python -m pipelines.encode_latents) or decode frames")
    if isinstance(root, (list, tuple)):
        by_split = {None: list(root)}
    else:
        by_split = {s: shard_urls(root, s) for s in splits if s}
    every = [u for urls in by_split.values() for u in urls]
    out: dict[str, str | None] = {}
    for kind, given in folders.items():
        if not given:
            out[kind] = None
            continue
        member, job = KINDS[kind]
        found = sidecar_folder(given, every)
        if found is None:
            raise UserError(f"data.init_args.{kind} {given}: no {kind} sidecar there (run {job} --input "
                            f"{root} --output {given})", **{kind: str(given)})
        out[kind] = found
        if decoded is None or member in decoded:
            continue                          # the step falls back to the shards' own member
        for split, urls in by_split.items():
            have = matching_sidecars(urls, found)
            if len(have) < len(urls):
                missing = [storage.url_name(u) for u in urls if u not in have]
                raise UserError(
                    f"data.init_args.{kind} {found}: {len(missing)} of {len(urls)} {split or ''} shards have no "
                    f"sidecar made from their bytes ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}), "
                    f"and data.init_args.fields {sorted(decoded)} does not decode '{member}' to fall back on: "
                    f"run {job} on {root} (it resumes: only the missing ones are made)",
                    **{kind: str(found)}, missing=len(missing))
    return out


__all__ = ["resolve_sidecars", "sidecar_folder"]
