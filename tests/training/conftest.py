"""The training tests' environment (the tiny corpus and its exact-truth shards are in tests/conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
