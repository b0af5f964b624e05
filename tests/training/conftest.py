"""Fixtures of the training tests: a tiny synthetic corpus and its exact-truth shards."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, synthetic_model_path):
    """4 identities (train 2, val 1, test 1) x 1 clip x 8 frames at 64²."""
    from preprocessing.synthetic.world import WorldConfig, generate_corpus
    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, WorldConfig(identities=4, clips_per_identity=1, frames=8, size=64, seed=0),
                    synthetic_model_path, progress=False)
    return out


@pytest.fixture(scope="session")
def truth_shards(tmp_path_factory, tiny_corpus):
    """Exact-truth shards of the tiny corpus, 4-frame samples."""
    from training.data.truth_shards import write_truth_shards
    out = tmp_path_factory.mktemp("truth")
    write_truth_shards(tiny_corpus, out, segment_frames=4, clips_per_shard=1)
    return out
