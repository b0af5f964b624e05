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
