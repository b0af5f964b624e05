"""Reenactment: a source portrait (image or video) driven by a driving video, end to end.

    fit source + driver -> transfer (expression through the transfer module, head pose
    retargeted) -> the source identity's driving normal maps -> generator in overlapping
    windows -> frames [-> pasted back into the source's full frame]

**Package** (what ``expportrait register`` packs and :class:`Reenactor` loads), one folder::

    package.json   head-model reference (sha256 of its arrays, kind, subdivision; never the
                   file), preprocessing settings, inference settings, provenance
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
trained on strided windows) and the video is written at fps / n.

Subjects: a raw image or video (tracked and fitted on the fly, the aligned crops are the
frames, the crop boxes allow paste-back) or a synthetic corpus clip ``clips/<id>.npz`` with its
``.mp4`` (exact parameters, no fitting; tracked and cropped like a raw video, the exact
cameras moved into the crops). Either way subjects are framed as the preprocessing job frames
training samples (``PreprocessSettings``: the training data's crop size and field of view,
packed at register): a generator trained on aligned crops is not shown full frames.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
PACKAGE_FILE = "package.json"


class HeadModelMismatchError(ValueError):
    """The local head-model file is not the one the packaged models were trained with."""


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


@dataclass
class PreprocessSettings:
    """How subjects are tracked and fitted (as the preprocessing job does)."""

    crop_size: int = 256
    fov_deg: float = 20.0
    fit_seed: int = 0


# -- head-model reference -----------------------------------------------------------------------
def head_model_hash(path: str | os.PathLike) -> str:
    """sha256 of an SMPL-X-format ``.npz``'s arrays (names, dtypes, shapes, bytes; sorted), so
    re-saving the same arrays (zip timestamps) keeps the hash."""
    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as z:
        for k in sorted(z.files):
            a = np.ascontiguousarray(z[k])
            h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def head_model_reference(path: str | os.PathLike | None, subdivision: int = 1) -> dict:
    """The package's reference to a head model: its hash and kind (``synthetic`` when ``path`` is
    None: the project's synthetic model, rebuilt from code), never the file."""
    from expportrait.assets import synthetic_model_file
    kind = "synthetic" if path is None else "smplx"
    path = Path(path) if path is not None else synthetic_model_file(0)
    return {"kind": kind, "synthetic_seed": 0 if kind == "synthetic" else None, "file_name": path.name,
            "sha256": head_model_hash(path), "subdivision": subdivision}


def resolve_head_model(reference: dict, local: str | os.PathLike | None = None) -> Path:
    """The local head-model file for a package, checked against its hash: ``local``, else
    ``$EXPPORTRAIT_SMPLX_PATH``, else (synthetic packages) the synthetic model rebuilt from code.
    Raises :class:`HeadModelMismatchError` naming both hashes when the file differs."""
    from expportrait.assets import synthetic_model_file
    from models.head.smplx_file import ENV_VAR, resolve_model_path
    if local is not None or os.environ.get(ENV_VAR):
        path = resolve_model_path(local)
    elif reference["kind"] == "synthetic":
        path = synthetic_model_file(reference.get("synthetic_seed") or 0)
    else:
        path = resolve_model_path(None)          # raises: names the expected file
    digest = head_model_hash(path)
    if digest != reference["sha256"]:
        raise HeadModelMismatchError(
            f"head model {path} (sha256 {digest[:16]}…) is not the one this model was trained with "
            f"({reference['kind']} {reference['file_name']}, sha256 {reference['sha256'][:16]}…): set "
            f"${ENV_VAR} to that file; a model driven by another head model's normals renders wrong faces")
    return path


# -- subjects -----------------------------------------------------------------------------------
@dataclass
class Subject:
    """A fitted subject: parameters per frame, its frames (crops the fit's camera sees), and
    (raw inputs) the full frames and crop boxes for paste-back."""

    clip: object                                # commands.transfer.FittedClip
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


def read_frames(path: str | os.PathLike, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """RGB frames (T, H, W, 3) and fps of an image or a video; :class:`SubjectError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SubjectError(f"not found: {path}", "file_not_found", str(path))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))[None], 25.0
        except Exception as exc:  # noqa: BLE001 - any decoder failure
            raise SubjectError(f"image {path}: cannot decode: {exc}", "not_an_image", str(path)) from exc
    from preprocessing.ingest import open_video
    reader = open_video(path, max_side=1280, min_frames=1)
    if not reader.probe.ok:
        raise SubjectError(f"video {path}: {reader.probe.reason}", reader.status.value, str(path))
    frames = []
    for i, _, f in reader:
        if max_frames and i >= max_frames:
            break
        frames.append(f)
    if not frames:
        raise SubjectError(f"video {path}: no frame could be decoded", "too_few_frames", str(path))
    return np.stack(frames), float(reader.plan.fps)


def load_subject(path: str | os.PathLike, head, prep: PreprocessSettings | None = None,
                 max_frames: int | None = None, stride: int = 1) -> Subject:
    """A corpus clip (``.npz`` beside its ``.mp4``) or a raw image/video, fitted (see module doc);
    the first ``max_frames`` frames, every ``stride``-th of them (fps / stride)."""
    from expportrait.commands.transfer import FittedClip, load_fitted
    prep = prep or PreprocessSettings()
    path = Path(path)
    if path.suffix == ".npz":
        clip = load_fitted(path)
        video = path.with_suffix(".mp4")
        if not video.is_file():
            raise SubjectError(f"{path}: a fitted clip is used with its frames, {video} is missing (give the "
                               f"image or video itself: it is fitted here)", "file_not_found", str(video))
        frames, fps = read_frames(video, max_frames)
        t = min(len(frames), clip.num_frames, max_frames or 10**9)
        clip.arrays = {k: v[:t:stride] for k, v in clip.arrays.items()}
        # framed as the preprocessing job frames training samples: the tracker's aligned crops
        # (the exact cameras moved into them), not the full frames
        from preprocessing.clip_fit import crop_camera_matrices
        from preprocessing.tracking import FaceTracker
        full = frames[:t:stride]
        track = FaceTracker(crop_size=prep.crop_size).track(full)
        if not track.ok:
            raise SubjectError(f"{video}: {track.status.value}" + (f": {track.reason}" if track.reason else ""),
                               track.status.value, str(path))
        clip.arrays["camera_K"] = crop_camera_matrices(clip.arrays["camera_K"], track.boxes, prep.crop_size)
        clip.image_size = prep.crop_size
        return Subject(clip, track.crops, str(path), full_frames=full, boxes=track.boxes, fps=fps / stride)
    full, fps = read_frames(path, max_frames)
    full, fps = full[::stride], fps / stride                  # fitted as the generator will see it
    from preprocessing.clip_fit import fit_frames
    from preprocessing.fitting import FitConfig
    from preprocessing.tracking import FaceTracker
    res = fit_frames(full, head, FaceTracker(crop_size=prep.crop_size), config=FitConfig(seed=prep.fit_seed),
                     fov_deg=prep.fov_deg)
    if res.fit is None:
        raise SubjectError(f"{path}: {res.status}" + (f": {res.reason}" if res.reason else ""), res.status, str(path))
    fit, t = res.fit, len(full)
    arrays = {k: v.detach().numpy().astype(np.float32) for k, v in fit.params.to_dict().items() if k != "betas"}
    arrays.update(camera_K=fit.camera.K.numpy(), camera_R=fit.camera.R.numpy(), camera_t=fit.camera.t.numpy())
    arrays = {k: np.broadcast_to(v.reshape(-1, *v.shape[1:]), (t, *v.shape[1:])).copy() if v.shape[0] == 1 else v
              for k, v in arrays.items()}
    clip = FittedClip(arrays, fit.params.betas.detach().numpy().reshape(-1).astype(np.float32),
                      fit.static_offsets.detach().numpy().astype(np.float32), prep.crop_size, str(path))
    return Subject(clip, res.track.crops, str(path), full_frames=full, boxes=res.track.boxes, fps=fps,
                   fit_summary=res.summary())


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


# -- the reenactor ------------------------------------------------------------------------------
def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    import cv2
    if frames.shape[1:3] == (size, size):
        return frames
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


def _unit(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) in [-1, 1]."""
    return torch.as_tensor(frames).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1)


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

    def __init__(self, head, generator, codec, transfer=None, settings: InferenceSettings | None = None,
                 prep: PreprocessSettings | None = None, device: str | torch.device = "cpu") -> None:
        self.head, self.generator, self.codec, self.transfer = head, generator, codec, transfer
        self.settings = settings or InferenceSettings()
        self.settings.check()
        self.prep = prep or PreprocessSettings()
        self.device = torch.device(device)

    @classmethod
    def from_package(cls, folder: str | os.PathLike, head_model: str | os.PathLike | None = None,
                     device: str | None = None) -> "Reenactor":
        """Load a package folder (module doc); the head model is checked against its hash first."""
        from models.generator import LatentCodec, NormalDrivenWan
        from models.head.head_model import PersonalizedHead
        from models.transfer import ExpressionTransfer
        folder = Path(folder)
        meta = read_package_meta(folder)
        path = resolve_head_model(meta["head_model"], head_model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        head = PersonalizedHead.from_file(path, subdivision_levels=meta["head_model"].get("subdivision", 1))
        transfer = ExpressionTransfer.from_pretrained(folder / "transfer").eval() if (folder / "transfer").is_dir() else None
        if transfer is not None and transfer.num_face_vertices != head.num_face_vertices:
            raise HeadModelMismatchError(f"the transfer module has {transfer.num_face_vertices} face vertices, "
                                         f"the head model {head.num_face_vertices}")
        generator = NormalDrivenWan.from_pretrained(folder / "generator").eval()
        codec = LatentCodec.from_pretrained(folder / "codec").eval()
        return cls(head.to(device), generator.to(device), codec.to(device),
                   transfer.to(device) if transfer is not None else None,
                   InferenceSettings(**meta.get("inference", {})), PreprocessSettings(**meta.get("preprocessing", {})),
                   device)

    def subject(self, path: str | os.PathLike, max_frames: int | None = None, stride: int = 1) -> Subject:
        """A source (or any subject): its first ``max_frames`` frames, every ``stride``-th."""
        return load_subject(path, self.head.cpu() if self.device.type != "cpu" else self.head, self.prep,
                            max_frames, stride)

    def driving_subject(self, path: str | os.PathLike, max_frames: int | None = None) -> Subject:
        """A driver at the generator's frame stride (``settings.frame_stride``): every n-th of its
        first ``max_frames`` frames, fitted after subsampling."""
        return self.subject(path, max_frames, self.settings.frame_stride)

    @torch.no_grad()
    def driving_normals(self, source: Subject, driving: Subject) -> tuple[np.ndarray, np.ndarray]:
        """(driving normal maps (T, S, S, 3), the source's reference normal map (S, S, 3))."""
        from expportrait.commands.transfer import transfer
        from models.render.camera import Camera
        from models.transfer.inputs import render_normal_maps
        s = self.settings.size
        head = self.head.cpu()
        model = self.transfer.cpu() if self.transfer is not None else None

        def camera(cam: Camera, image_size: int) -> Camera:
            """The same camera for the image resized to s² (pixel centres at integers)."""
            r = s / image_size
            K = cam.K.clone()
            K[:, :2, :2] *= r
            K[:, :2, 2] = (K[:, :2, 2] + 0.5) * r - 0.5
            return Camera.from_matrices(K, cam.R, cam.t, (s, s))

        res = transfer(driving.clip, source.clip, head, model, "both")
        normals = render_normal_maps(head, res["params"], res["static_offsets"], res["dynamic_offsets"],
                                     camera(res["camera"], source.clip.image_size)).numpy()
        # the source's reference frame driven by itself: its own expression through the same
        # module, so the reference normal map and the driving ones share one Δf source (as trained)
        first = dataclasses.replace(source.clip, arrays={k: v[:1] for k, v in source.clip.arrays.items()})
        own = transfer(first, first, head, model, "both")
        ref = render_normal_maps(head, own["params"], own["static_offsets"], own["dynamic_offsets"],
                                 camera(own["camera"], source.clip.image_size)).numpy()[0]
        if self.transfer is not None:
            self.transfer.to(self.device)
        self.head.to(self.device)
        return normals, ref

    @torch.no_grad()
    def generate(self, reference: np.ndarray, reference_normal: np.ndarray, normals: np.ndarray,
                 progress: bool = False) -> tuple[np.ndarray, list[int]]:
        """Frames (T, S, S, 3) uint8 from the reference image, its normal map and driving normals,
        in overlapping windows (module doc). Each generator call is Wan I2V's layout as trained:
        frame 0 is the reference (image + its normal map), frames 1..F-1 are driven; the driven
        frames of overlapping windows are cross-faded. Returns the windows' first driven frames."""
        from models.generator import sample
        st = self.settings
        span = st.window - 1                                # driven frames per call
        t = len(normals)
        if t < span:                                        # pad with the last frame, trimmed later
            normals = np.concatenate([normals, np.repeat(normals[-1:], span - t, 0)])
        dev = self.device
        ref_img = _unit(_resize(reference[None], st.size))[:, :, 0].to(dev)
        ref_latent = self.codec.encode_reference(ref_img, st.window)
        ref_normal_u8 = _resize(reference_normal[None], st.size)
        ref_normal = _unit(ref_normal_u8)[:, :, 0].to(dev)
        shape = (1, *ref_latent.shape[1:])
        generator = self.generator

        def window(start: int) -> np.ndarray:
            drive = _unit(np.concatenate([ref_normal_u8, normals[start:start + span]])).to(dev)
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
        reference = _resize(source.frames[:1], s)[0]
        t0 = time.perf_counter()
        frames, starts = self.generate(reference, ref_normal, normals)
        sec["generate"] = time.perf_counter() - t0
        return Reenactment(frames, normals, reference, _resize(driving.frames, s), starts, sec)


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
    folder = Path(folder)
    path = folder / PACKAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an expportrait package (no {PACKAGE_FILE})")
    meta = json.loads(path.read_text())
    for part in ("generator", "codec"):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"package {folder}: {part}/ is missing")
    return meta


def write_package(out: str | os.PathLike, generator: str | os.PathLike, codec: str | os.PathLike,
                  transfer: str | os.PathLike | None, head_reference: dict,
                  inference: InferenceSettings | None = None, prep: PreprocessSettings | None = None,
                  provenance: dict | None = None) -> Path:
    """Assemble a package folder from exported model folders (copied) and settings."""
    import shutil
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inference = inference or InferenceSettings()
    inference.check()
    for name, src in (("generator", generator), ("codec", codec), ("transfer", transfer)):
        if src is None:
            continue
        if not Path(src).is_dir():
            raise FileNotFoundError(f"{name} folder not found: {src}")
        shutil.copytree(src, out / name, dirs_exist_ok=True)
    meta = {"format": "expportrait-package/1", "head_model": head_reference, "inference": asdict(inference),
            "preprocessing": asdict(prep or PreprocessSettings()), "provenance": provenance or {},
            "parts": sorted(p.name for p in out.iterdir() if p.is_dir())}
    (out / PACKAGE_FILE).write_text(json.dumps(meta, indent=2))
    return out
