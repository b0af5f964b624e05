"""Tiny untrained transfer module + generator + codec exports and an MLflow run holding them,
for the registry, reenactment and evaluation tests (real classes, random weights)."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_exports(out: Path, head) -> dict[str, Path]:
    """``out/export/{transfer,generator,codec}`` as the training platform exports them."""
    from models.generator import LatentCodec, NormalDrivenWan
    from models.transfer import ExpressionTransfer
    from models.transfer.inputs import canonical_face
    torch.manual_seed(0)
    export = Path(out) / "export"
    m = ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor="tiny_cpu")
    m.set_canonical(canonical_face(head))
    m.save_pretrained(export / "transfer")
    NormalDrivenWan("tiny_z16").save_pretrained(export / "generator")
    LatentCodec.tiny(seed=0, base_dim=8).save_pretrained(export / "codec")
    return {p.name: p for p in export.iterdir()}


def log_training_run(tracking_uri: str, export_root: Path, data: str = "synthetic-test-corpus") -> str:
    """An MLflow run with params like a LightningCLI run's and the exports under ``export/``."""
    import mlflow
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    from expportrait.registry import experiment_in_store
    experiment_in_store("generator")              # artifacts beside the store, not ./mlruns
    with mlflow.start_run(run_name="dit_tiny_cpu_test") as run:
        mlflow.log_params({"flavor": "tiny_cpu", "head_model": "None", "subdivision": 1, "root": data,
                           "frames": 5, "frame_stride": 1, "size": "None", "shift": 1.0, "sample_steps": 10})
        mlflow.log_dict({"window": 5, "frame_stride": 1, "size": None, "shift": 1.0, "steps": 10, "guidance": 1.0},
                        "sampling.json")                  # as GeneratorTask.on_fit_start logs it
        mlflow.log_metric("train_loss", 0.5, step=10)
        mlflow.log_artifacts(str(Path(export_root) / "export"), artifact_path="export")
        return run.info.run_id


def tiny_corpus(out: Path, model_path: Path, frames: int = 9, identities: int = 2) -> Path:
    from preprocessing.synthetic.world import WorldConfig, generate_corpus
    generate_corpus(out, WorldConfig(identities=identities, clips_per_identity=1, frames=frames, size=64),
                    model_path, progress=False)
    return out


def tiny_package(root: Path, head, **settings) -> Path:
    """A package folder (expportrait/reenactment.py) of the tiny exports."""
    from expportrait.reenactment import InferenceSettings, write_package
    from models.head.resolve import head_model_reference
    ex = tiny_exports(root, head)
    return write_package(Path(root) / "package", ex["generator"], ex["codec"], ex["transfer"],
                         head_model_reference(None), InferenceSettings(**settings))
