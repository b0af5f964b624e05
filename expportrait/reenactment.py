"""Reenactment: a source portrait (image or video) driven by a driving video, end to end.

    fit source + driver -> transfer (expression through the transfer module, head pose
    retargeted) -> the source identity's driving normal maps -> generator in overlapping
    windows -> frames [-> pasted back into the source's full frame]

**Package** (what ``expportrait register`` packs and :class:`Reenactor` loads), one folder::

    package.json   format (PACKAGE_FORMAT), head-model reference (sha256 of its arrays, kind,
                   subdivision; never the file), the preprocessing stage spec (whole), inference
                   settings, provenance
    transfer/      ExpressionTransfer (save_pretrained: config.json + safetensors); optional
    generator/     NormalDrivenWan (generator.json, transformer/, conditioning/)
    codec/         the latent codec (AutoencoderKLWan folder)

**Windows.** The generator makes ``window`` = 4k+1 frames per call in Wan I2V's layout, as it
was trained: frame 0 is the reference (the source image and its normal map), frames 1..4k are
driven. A longer driving video is cut into spans of 4k driven frames overlapping by
``overlap``; every call is conditioned on the same source reference and starts from the same
noise (anchored to the reference, not to the previous window's output, so errors do not
accumulate: no drift); overlapping frames are cross-faded with linear weights, so no window
boundary is a hard cut. ``frame_stride`` n drives with every n-th frame (the tiny generator is
trained on strided windows, so it runs at fps / n as trained); :func:`resample_frames` puts the
generated frames back on the driving video's own timeline (every driving frame present, at the
driving frame rate: frames between two generated ones are blended linearly in time).

Subjects go through the preprocessing job's own stages (:mod:`preprocessing.clip_stages`),
built from the stage spec the package carries (``package.json`` ``preprocessing``: what the job
that made the training data wrote into its ``summary.json``: frame rate, crop size, field of
view, landmark embedding and its weights, the fitter's settings): a raw image or video is
decoded at the spec's frame rate, tracked, cropped and fitted exactly as a training clip was
(then every ``stride``-th frame kept, as training windows take them); a synthetic corpus clip
``clips/<id>.npz`` with its ``.mp4`` keeps its exact parameters (no fitting; decoded at its own
rate, which its parameters follow) and is tracked and cropped by the same tracker, the exact
cameras moved into the crops. Frames and normal maps reach the generator through the training
task's transform (:mod:`models.generator.frames`).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from models.head.resolve import HeadModelMismatchError, resolve_head_model
from preprocessing.clip_records import ClipItem, StageConfig
from preprocessing.clip_stages import IMAGE_SUFFIXES, StageContext, StageFailure, decode_clip, decode_image, fit_clip
from preprocessing.fitted_clip import FittedClip, fitted_from_clip, load_fitted

PACKAGE_FILE = "package.json"
#: the package layout this code reads; 2: ``preprocessing`` is the job's whole stage spec
PACKAGE_FORMAT = "expportrait-package/2"


@dataclass
class InferenceSettings:
    """How the generator is run (saved in the package; overridable per call). The defaults are
    the ``tiny_cpu`` recipe's (``expportrait.recipes``; a test keeps them equal)."""

    size: int = 32              # generated frame size (multiple of 16)
    window: int = 5             # frames per generator call (4k+1): the reference + window-1 driven
    overlap: int = 2            # driven frames shared by consecutive windows (cross-faded)
    frame_stride: int = 4       # drive with every n-th frame (as trained); output fps = fps / n
    steps: int = 4              # sampler steps
    guidance: float = 1.0       # classifier-free guidance over the normal conditions (1: off)
    shift: float = 10.0         # flow-matching sigma shift
    seed: int = 0
    fps: float = 25.0

    def check(self) -> None:
        from models.generator.flavors import check_video_shape
        check_video_shape(self.window, self.size, self.size)
        if self.window < 5:
            raise ValueError(f"window {self.window}: needs at least 5 frames (a reference + 4 driven)")
        if not 0 <= self.overlap < self.window - 1:
            raise ValueError(f"overlap {self.overlap} must be in [0, window - 1 = {self.window - 1}) "
                             f"(frame 0 of a window is the reference)")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride {self.frame_stride} must be >= 1")


class PackageFormatError(ValueError):
    """A package written by another version of the package layout (:data:`PACKAGE_FORMAT`)."""


# -- subjects -----------------------------------------------------------------------------------
@dataclass
class Subject:
    """A fitted subject: parameters per frame, its frames (crops the fit's camera sees), and
    (raw inputs) the full frames and crop boxes for paste-back."""

    clip: FittedClip
    frames: np.ndarray                          # (T, S, S, 3) uint8
    source: str
    full_frames: np.ndarray | None = None       # (T, H, W, 3) uint8, raw inputs only
    boxes: np.ndarray | None = None             # (T, 3) x0, y0, side
    fps: float = 25.0
    fit_summary: dict = field(default_factory=dict)


class SubjectError(ValueError):
    """An input that cannot be used (unreadable, no usable face); ``status`` says why."""

    def __init__(self, message: str, status: str, source: str) -> None:
        super().__init__(message)
        self.status = status
        self.details = {"status": status, "source": source}


def read_frames(path: str | os.PathLike, max_frames: int | None = None,
                config: StageConfig | None = None) -> tuple[np.ndarray, float]:
    """RGB frames (T, H, W, 3) and fps of an image or a video through the job's decode stage with
    ``config``'s frame rate and size cap (None: the source's rate, at most 1280 px), the first
    ``max_frames`` of them; :class:`SubjectError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SubjectError(f"not found: {path}", "file_not_found", str(path))
    config = config or StageConfig(fps=None, max_side=1280)
    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return decode_image(path), float(config.fps or 25.0)
        frames, fps, _ = decode_clip(ClipItem(path.stem, str(path), "subject"),
                                     config.model_copy(update={"min_frames": 1, "max_frames": max_frames}))
    except StageFailure as exc:
        kind = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
        raise SubjectError(f"{kind} {path}: {exc.reason}", exc.status, str(path)) from None
    return frames, float(fps)


def load_subject(path: str | os.PathLike, stages: StageContext, max_frames: int | None = None,
                 stride: int = 1) -> Subject:
    """A corpus clip (``.npz`` beside its ``.mp4``) or a raw image/video through the job's stages
    ``stages`` (module doc); the first ``max_frames`` frames, every ``stride``-th of them (fps /
    stride)."""
    path = Path(path)
    if path.suffix == ".npz":
        return _corpus_subject(path, stages, max_frames, stride)
    full, fps = read_frames(path, max_frames, stages.config)
    return fitted_subject(full, stages, str(path), fps, stride)


def fitted_subject(full: np.ndarray, stages: StageContext, source: str, fps: float = 25.0,
                   stride: int = 1) -> Subject:
    """Decoded frames (T, H, W, 3) of a raw image or video tracked, cropped and fitted whole by the
    job's stages (:func:`preprocessing.clip_stages.fit_clip`), then every ``stride``-th frame kept
    (fps / stride); :class:`SubjectError` when no usable face is fitted."""
    try:
        res = fit_clip(full, stages)
    except StageFailure as exc:
        raise SubjectError(f"{source}: {exc.status}" + (f": {exc.reason}" if exc.reason else ""), exc.status,
                           source) from None
    every = slice(None, None, stride)                       # fitted whole, then strided as training windows
    return Subject(fitted_from_clip(res, source).select(every), res.track.crops[every], source,
                   full_frames=full[every], boxes=res.track.boxes[every], fps=fps / stride,
                   fit_summary=res.summary())


def in_full_frame(subject: Subject, size: int | None = None) -> Subject:
    """A raw subject's fit seen in its whole (square) frames instead of its crops: the crop
    cameras moved back out of the tracker's boxes (:func:`preprocessing.clip_fit.frame_camera_matrices`),
    for the frames resized to ``size`` (None: their own side); its frames are the full frames."""
    from preprocessing.clip_fit import frame_camera_matrices
    if subject.full_frames is None or subject.boxes is None:
        raise ValueError(f"{subject.source}: no full frames and crop boxes (a corpus clip keeps its own cameras)")
    h, w = subject.full_frames.shape[1:3]
    if h != w:
        raise ValueError(f"{subject.source}: in_full_frame needs square frames, not {w}x{h}")
    clip = subject.clip.select(slice(None))
    clip.arrays["camera_K"] = frame_camera_matrices(clip.arrays["camera_K"], subject.boxes, clip.image_size, w,
                                                    size or w)
    clip.image_size = size or w
    boxes = np.tile(np.array([0.0, 0.0, float(w)]), (len(subject.boxes), 1))
    return replace(subject, clip=clip, frames=subject.full_frames, boxes=boxes)


def _corpus_subject(path: Path, stages: StageContext, max_frames: int | None, stride: int) -> Subject:
    """A synthetic corpus clip: its exact parameters, its frames tracked and cropped by the
    stages' tracker (the exact cameras moved into the crops); decoded at its own rate (its
    parameters are per frame of it)."""
    from preprocessing.clip_fit import crop_camera_matrices
    clip = load_fitted(path)
    video = path.with_suffix(".mp4")
    if not video.is_file():
        raise SubjectError(f"{path}: a fitted clip is used with its frames, {video} is missing (give the "
                           f"image or video itself: it is fitted here)", "file_not_found", str(video))
    frames, fps = read_frames(video, max_frames, stages.config.model_copy(update={"fps": None}))
    t = min(len(frames), clip.num_frames, max_frames or 10**9)
    clip = clip.select(slice(0, t, stride))
    full = frames[:t:stride]
    track = stages.tracker.track(full)
    if not track.ok:
        raise SubjectError(f"{video}: {track.status.value}" + (f": {track.reason}" if track.reason else ""),
                           track.status.value, str(path))
    crop = stages.config.crop_size
    clip.arrays["camera_K"] = crop_camera_matrices(clip.arrays["camera_K"], track.boxes, crop)
    clip.image_size = crop
    return Subject(clip, track.crops, str(path), full_frames=full, boxes=track.boxes, fps=fps / stride)


# -- windows ------------------------------------------------------------------------------------
def window_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    """Start frames of overlapping windows covering ``num_frames`` (the last aligned to the end)."""
    if num_frames <= window:
        return [0]
    step = window - overlap
    starts = list(range(0, num_frames - window + 1, step))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


def generate_windows(generate_window, num_frames: int, window: int, overlap: int) -> np.ndarray:
    """Run ``generate_window(start) -> (window, H, W, 3) float`` over overlapping windows and
    cross-fade them into (num_frames, H, W, 3) float; a video shorter than a window is padded
    (by the caller's driving frames) and trimmed here."""
    starts = window_starts(num_frames, window, overlap)
    acc = wsum = None
    for i, s in enumerate(starts):
        frames = generate_window(s)
        n = min(window, num_frames - s)
        prev_end = starts[i - 1] + window if i else 0
        ov = max(0, prev_end - s) if i else 0       # actual overlap with the previous window
        nxt_ov = max(0, s + window - starts[i + 1]) if i + 1 < len(starts) else 0
        w = np.ones(window)
        if ov:
            w[:ov] = np.arange(1, ov + 1) / (ov + 1)
        if nxt_ov:
            w[window - nxt_ov:] = np.minimum(w[window - nxt_ov:], (np.arange(1, nxt_ov + 1) / (nxt_ov + 1))[::-1])
        if acc is None:
            acc = np.zeros((num_frames, *frames.shape[1:]), np.float64)
            wsum = np.zeros(num_frames)
        acc[s:s + n] += frames[:n] * w[:n, None, None, None]
        wsum[s:s + n] += w[:n]
    return acc / wsum[:, None, None, None]


def resample_frames(frames: np.ndarray, fps: float, num_out: int, fps_out: float) -> np.ndarray:
    """``frames`` (T, H, W, 3) uint8 made at ``fps`` put on another timeline: ``num_out`` frames
    at ``fps_out`` (frame i at time i / fps_out), each a linear blend of the two generated frames
    around its time (held at the ends)."""
    if num_out < 1 or not len(frames):
        raise ValueError(f"resample_frames: {len(frames)} frames to {num_out}")
    pos = np.clip(np.arange(num_out) / float(fps_out) * float(fps), 0, len(frames) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(frames) - 1)
    w = (pos - lo)[:, None, None, None]
    out = frames[lo].astype(np.float32) * (1 - w) + frames[hi].astype(np.float32) * w
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# -- the reenactor ------------------------------------------------------------------------------
def _video(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> the generator's (1, 3, T, size, size) (the training transform)."""
    from models.generator.frames import generator_video
    return generator_video(torch.as_tensor(np.ascontiguousarray(frames))[None], size)


def _shown(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) as the generator sees them, back in uint8 (T, size, size, 3) for display."""
    from models.generator.frames import to_uint8
    return to_uint8(_video(frames, size))[0].numpy()


@dataclass
class Reenactment:
    frames: np.ndarray              # (T, S, S, 3) uint8 generated
    normals: np.ndarray             # (T, S, S, 3) driving normals of the source identity
    reference: np.ndarray           # (S, S, 3) the source reference frame
    driving: np.ndarray             # (T, S, S, 3) the driving frames
    windows: list[int]
    seconds: dict[str, float]


class Reenactor:
    """The packaged models on one device; :meth:`reenact` does the whole loop."""

    def __init__(self, generator, codec, stages: StageContext, transfer=None,
                 settings: InferenceSettings | None = None, device: str | torch.device = "cpu") -> None:
        """``stages``: the preprocessing stages subjects go through (its head renders the normals)."""
        self.stages, self.generator, self.codec, self.transfer = stages, generator, codec, transfer
        self.head = stages.head
        self.settings = settings or InferenceSettings()
        self.settings.check()
        self.device = torch.device(device)

    @classmethod
    def from_package(cls, folder: str | os.PathLike, head_model: str | os.PathLike | None = None,
                     device: str | None = None) -> "Reenactor":
        """Load a package folder (module doc); the head model is checked against its hash first,
        the stages are built from the packed stage spec."""
        from models.generator import LatentCodec, NormalDrivenWan
        from models.transfer import ExpressionTransfer
        folder = Path(folder)
        meta = read_package_meta(folder)
        path = resolve_head_model(meta["head_model"], head_model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        stages = StageContext.from_spec(meta["preprocessing"], path, meta["head_model"].get("subdivision", 1))
        head = stages.head
        has_transfer = (folder / "transfer").is_dir()
        transfer = ExpressionTransfer.from_pretrained(folder / "transfer").eval() if has_transfer else None
        if transfer is not None and transfer.num_face_vertices != head.num_face_vertices:
            raise HeadModelMismatchError(f"the transfer module has {transfer.num_face_vertices} face vertices, "
                                         f"the head model {head.num_face_vertices}")
        generator = NormalDrivenWan.from_pretrained(folder / "generator").eval()
        codec = LatentCodec.from_pretrained(folder / "codec").eval()
        head.to(device)
        return cls(generator.to(device), codec.to(device), stages,
                   transfer.to(device) if transfer is not None else None,
                   InferenceSettings(**meta.get("inference", {})), device)

    def with_settings(self, **overrides) -> "Reenactor":
        """The same loaded models with a copy of the settings, ``overrides`` (None: kept) applied
        and checked: one call's settings never reach the shared ones."""
        settings = replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})
        settings.check()
        clone = copy.copy(self)
        clone.settings = settings
        return clone

    def subject(self, path: str | os.PathLike, max_frames: int | None = None, stride: int = 1) -> Subject:
        """A source (or any subject): its first ``max_frames`` frames, every ``stride``-th."""
        self.head.cpu()                                   # the stages fit on the CPU
        try:
            return load_subject(path, self.stages, max_frames, stride)
        finally:
            self.head.to(self.device)

    def driving_subject(self, path: str | os.PathLike, max_frames: int | None = None) -> Subject:
        """A driver at the generator's frame stride (``settings.frame_stride``): every n-th of its
        first ``max_frames`` frames, fitted whole first (as the training data was)."""
        return self.subject(path, max_frames, self.settings.frame_stride)

    @torch.no_grad()
    def driving_normals(self, source: Subject, driving: Subject) -> tuple[np.ndarray, np.ndarray]:
        """(driving normal maps (T, R, R, 3), the source's reference normal map (R, R, 3)) uint8,
        rendered as training renders them (:mod:`models.generator.frames`: R = twice the
        generator's size, at most the crop's; :meth:`generate` takes them down to its size)."""
        from models.generator.frames import generator_normal_maps
        from preprocessing.fitted_clip import transfer
        head = self.head.cpu()
        model = self.transfer.cpu() if self.transfer is not None else None

        def normal_maps(res: dict) -> np.ndarray:
            return generator_normal_maps(head, res["params"], res["static_offsets"], res["dynamic_offsets"],
                                         res["camera"], self.settings.size).numpy()

        normals = normal_maps(transfer(driving.clip, source.clip, head, model, "both"))
        # the source's reference frame driven by itself: its own expression through the same
        # module, so the reference normal map and the driving ones share one Δf source (as trained)
        first = source.clip.select(slice(0, 1))
        ref = normal_maps(transfer(first, first, head, model, "both"))[0]
        if self.transfer is not None:
            self.transfer.to(self.device)
        self.head.to(self.device)
        return normals, ref

    @torch.no_grad()
    def generate(self, reference: np.ndarray, reference_normal: np.ndarray, normals: np.ndarray,
                 progress: bool = False) -> tuple[np.ndarray, list[int]]:
        """Frames (T, S, S, 3) uint8 from the reference image, its normal map and driving normals
        (uint8 at any size: the training transform takes them to S), in overlapping windows (module
        doc). Each generator call is Wan I2V's layout as trained: frame 0 is the reference (image +
        its normal map), frames 1..F-1 are driven; the driven frames of overlapping windows are
        cross-faded. Returns the windows' first driven frames."""
        from models.generator import sample
        st = self.settings
        span = st.window - 1                                # driven frames per call
        t = len(normals)
        if t < span:                                        # pad with the last frame, trimmed later
            normals = np.concatenate([normals, np.repeat(normals[-1:], span - t, 0)])
        dev = self.device
        ref_img = _video(reference[None], st.size)[:, :, 0].to(dev)
        ref_latent = self.codec.encode_reference(ref_img, st.window)
        ref_normal = _video(reference_normal[None], st.size)[:, :, 0].to(dev)
        shape = (1, *ref_latent.shape[1:])
        generator = self.generator

        def window(start: int) -> np.ndarray:
            drive = _video(np.concatenate([reference_normal[None], normals[start:start + span]]), st.size).to(dev)
            g = torch.Generator(device=dev).manual_seed(st.seed)       # same noise in every window
            x0 = sample(generator, shape, {"reference_latent": ref_latent, "driving_normals": drive,
                                           "reference_normal": ref_normal},
                        steps=st.steps, guidance=st.guidance, shift=st.shift, generator=g, device=dev,
                        progress=progress)
            video = self.codec.decode(x0)[0, :, 1:]                    # driven frames (3, F-1, S, S)
            return video.clamp(-1, 1).add(1).mul(127.5).permute(1, 2, 3, 0).cpu().numpy()

        n = max(t, span)
        starts = window_starts(n, span, st.overlap)
        frames = generate_windows(window, n, span, st.overlap)[:t]
        return np.clip(np.rint(frames), 0, 255).astype(np.uint8), starts

    def reenact(self, source: Subject, driving: Subject) -> Reenactment:
        """The whole loop for two loaded subjects (the source's reference is its frame 0; the
        driver as loaded by :meth:`driving_subject`)."""
        s = self.settings.size
        sec = {}
        t0 = time.perf_counter()
        normals, ref_normal = self.driving_normals(source, driving)
        sec["normals"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        frames, starts = self.generate(source.frames[0], ref_normal, normals)
        sec["generate"] = time.perf_counter() - t0
        return Reenactment(frames, _shown(normals, s), _shown(source.frames[:1], s)[0], _shown(driving.frames, s),
                           starts, sec)


def side_by_side(result: Reenactment) -> np.ndarray:
    """[source reference | driving | driving normals | generated] per frame."""
    t = len(result.frames)
    ref = np.repeat(result.reference[None], t, 0)
    return np.concatenate([ref, result.driving[:t], result.normals[:t], result.frames], axis=2)


def paste_back(result: Reenactment, source: Subject, feather: float = 0.1) -> np.ndarray:
    """Generated crops put back into the source's full reference frame (feathered square edge)."""
    import cv2
    if source.full_frames is None or source.boxes is None:
        raise ValueError(f"--paste-back needs a raw image or video source (crop boxes); {source.source} has none")
    base = source.full_frames[0].astype(np.float32)
    x0, y0, side = (float(v) for v in source.boxes[0])
    side_px = int(round(side))
    h, w = base.shape[:2]
    ramp = np.minimum(np.arange(side_px) + 1, np.arange(side_px)[::-1] + 1) / max(1.0, feather * side_px)
    alpha = np.clip(np.minimum(ramp[:, None], ramp[None, :]), 0, 1)[..., None]
    xs, ys = int(round(x0)), int(round(y0))
    ax0, ay0 = max(0, xs), max(0, ys)
    ax1, ay1 = min(w, xs + side_px), min(h, ys + side_px)
    out = []
    for f in result.frames:
        crop = cv2.resize(f, (side_px, side_px), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        frame = base.copy()
        c = crop[ay0 - ys:ay1 - ys, ax0 - xs:ax1 - xs]
        a = alpha[ay0 - ys:ay1 - ys, ax0 - xs:ax1 - xs]
        frame[ay0:ay1, ax0:ax1] = a * c + (1 - a) * frame[ay0:ay1, ax0:ax1]
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(out)


# -- package I/O --------------------------------------------------------------------------------
def read_package_meta(folder: str | os.PathLike) -> dict:
    """``package.json`` of a package folder; :class:`PackageFormatError` for a package of another
    layout (an older one carries no stage spec: register the model again)."""
    folder = Path(folder)
    path = folder / PACKAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an expportrait package (no {PACKAGE_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != PACKAGE_FORMAT:
        raise PackageFormatError(
            f"package {folder} has format {meta.get('format')!r}; this version reads {PACKAGE_FORMAT!r} (since "
            f"format 2 a package carries the preprocessing job's whole stage spec): register the training run "
            f"again with `expportrait register` (or re-run write_package)")
    for part in ("generator", "codec"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"package {folder}: {part}/ is missing")
    return meta


def default_stage_spec(head_reference: dict, head_model: str | os.PathLike | None = None) -> dict:
    """The stage spec of the job's defaults (``StageConfig()``) for the package's head model, for
    models whose training data has no preprocessing summary; says so in ``source``."""
    from preprocessing.clip_stages import stage_spec
    path = resolve_head_model(head_reference, head_model)
    return {**stage_spec(StageConfig(), path, head_reference.get("subdivision", 1)),
            "source": "defaults (no preprocessing summary with the training data)"}


def write_package(out: str | os.PathLike, generator: str | os.PathLike, codec: str | os.PathLike,
                  transfer: str | os.PathLike | None, head_reference: dict,
                  inference: InferenceSettings | None = None, stage_spec: dict | None = None,
                  provenance: dict | None = None, head_model: str | os.PathLike | None = None) -> Path:
    """Assemble a package folder from exported model folders (copied) and settings. ``stage_spec``:
    the preprocessing job's (``summary.json`` ``stage_spec``), packed whole; None:
    :func:`default_stage_spec` (``head_model``: the local head-model file, checked by hash)."""
    import shutil
    from preprocessing.clip_stages import read_stage_spec
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inference = inference or InferenceSettings()
    inference.check()
    stage_spec = stage_spec or default_stage_spec(head_reference, head_model)
    read_stage_spec(stage_spec)                               # a spec inference can read back
    for name, src in (("generator", generator), ("codec", codec), ("transfer", transfer)):
        if src is None:
            continue
        if not Path(src).is_dir():
            raise FileNotFoundError(f"{name} folder not found: {src}")
        shutil.copytree(src, out / name, dirs_exist_ok=True)
    meta = {"format": PACKAGE_FORMAT, "head_model": head_reference, "inference": asdict(inference),
            "preprocessing": stage_spec, "provenance": provenance or {},
            "parts": sorted(p.name for p in out.iterdir() if p.is_dir())}
    (out / PACKAGE_FILE).write_text(json.dumps(meta, indent=2))
    return out
