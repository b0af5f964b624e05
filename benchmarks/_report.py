"""Shared benchmark output: a readable table, then one JSON line of headline figures."""
from __future__ import annotations

import json


def report(results: dict, targets: dict, digits: int = 3) -> None:
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:10.2f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>10}")
    headline = {k: round(v, digits) if isinstance(v, float) else v for k, v in results.items()}
    headline["targets"] = targets
    print(json.dumps(headline))


def synthetic_corpus(work, identities: int, clips: int, frames: int, size: int, seed: int,
                     stale: tuple = (), log=print):
    """The benchmark's synthetic corpus in ``work/corpus``, reused when its config matches;
    otherwise regenerated, and the ``stale`` folders under ``work`` (outputs of another corpus)
    removed first."""
    import shutil
    import time
    from pathlib import Path

    from models.head.resolve import synthetic_model_file
    from preprocessing.synthetic.world import WorldConfig, generate_corpus
    corpus = Path(work) / "corpus"
    config = WorldConfig(identities=identities, clips_per_identity=clips, frames=frames, size=size, seed=seed)
    meta = corpus / "world.json"
    if meta.is_file():
        saved = json.loads(meta.read_text())["config"]
        if all(saved[k] == getattr(config, k) for k in ("identities", "clips_per_identity", "frames", "size", "seed")):
            log(f"corpus: reusing {corpus}")
            return corpus
    for folder in (corpus, *(Path(work) / s for s in stale)):
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    generate_corpus(corpus, config, synthetic_model_file(0), progress=False)
    log(f"corpus: {identities} identities x {clips} clips x {frames} frames at {size}² in "
        f"{time.perf_counter() - t0:.0f} s")
    return corpus
