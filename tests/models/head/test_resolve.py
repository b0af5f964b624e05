"""The one head-model resolver: the order a command picks its file in, and the reference a
package records (a model trained on the synthetic head loads with no SMPL-X file)."""
import shutil

import numpy as np
import pytest

from models.head.resolve import (HeadModelMismatchError, head_model_hash, head_model_path, head_model_reference,
                                 resolve_head_model, synthetic_model_file)
from models.head.smplx_file import ENV_VAR, HeadModelFileError


@pytest.fixture
def cache(tmp_path, monkeypatch, synthetic_model_path):
    """An empty ``$EXPPORTRAIT_CACHE`` holding only the (session's) synthetic model, no env path."""
    monkeypatch.setenv("EXPPORTRAIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    (tmp_path / "cache" / "models").mkdir(parents=True)
    shutil.copy(synthetic_model_path, tmp_path / "cache" / "models" / synthetic_model_path.name)
    return tmp_path / "cache"


def _other_model(path, out):
    """Another model with the same layout (its shape basis scaled)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["shapedirs"] = arrays["shapedirs"] * 1.01
    np.savez(out, **arrays)
    return out


def test_a_command_picks_given_then_config_then_env_then_synthetic(cache, tmp_path, monkeypatch, synthetic_model_path):
    given = _other_model(synthetic_model_path, tmp_path / "given.npz")
    configured = shutil.copy(synthetic_model_path, tmp_path / "configured.npz")
    env = tmp_path / "env_folder"
    env.mkdir()
    shutil.copy(synthetic_model_path, env / "SMPLX_NEUTRAL.npz")
    assert head_model_path() == synthetic_model_file(0) and head_model_path().parent == cache / "models"
    monkeypatch.setenv(ENV_VAR, str(env))
    assert head_model_path() == env / "SMPLX_NEUTRAL.npz"                  # a folder: its SMPLX_NEUTRAL.npz
    assert head_model_path(None, configured) == configured
    assert head_model_path(given, configured) == given
    with pytest.raises(HeadModelFileError, match="missing.npz"):
        head_model_path(tmp_path / "missing.npz")                           # named, absent: no fallback


def test_a_copy_of_the_synthetic_model_is_referenced_as_synthetic(cache, tmp_path, synthetic_model_path):
    """The demo trains on a copy of the synthetic model in its own folder: the package records
    it as synthetic (seed 0), so reenact needs no $EXPPORTRAIT_SMPLX_PATH; another file is smplx."""
    copy = shutil.copy(synthetic_model_path, tmp_path / "demo_models.npz")
    ref = head_model_reference(copy, subdivision=1)
    assert ref["kind"] == "synthetic" and ref["synthetic_seed"] == 0
    assert ref["sha256"] == head_model_hash(synthetic_model_path)
    assert resolve_head_model(ref) == synthetic_model_file(0)              # rebuilt from the seed, checked
    other = head_model_reference(_other_model(synthetic_model_path, tmp_path / "SMPLX_NEUTRAL.npz"))
    assert other["kind"] == "smplx" and other["synthetic_seed"] is None
    with pytest.raises(HeadModelFileError, match=ENV_VAR):
        resolve_head_model(other)                                           # a real model needs its file
    assert resolve_head_model(other, tmp_path) == tmp_path / "SMPLX_NEUTRAL.npz"


def test_a_different_local_file_refuses_with_both_hashes(cache, tmp_path, monkeypatch, synthetic_model_path):
    ref = head_model_reference(None)
    monkeypatch.setenv(ENV_VAR, str(_other_model(synthetic_model_path, tmp_path / "other.npz")))
    with pytest.raises(HeadModelMismatchError, match=ref["sha256"][:16]):
        resolve_head_model(ref)


def test_the_job_and_the_transfer_task_honour_the_environment(cache, tmp_path, monkeypatch, synthetic_model_path):
    """``$EXPPORTRAIT_SMPLX_PATH`` reaches every command, not only ``fit``: the preprocessing
    job's driver check and the transfer task's head; a config value still wins."""
    from pipelines.preprocess.config import PreprocessConfig
    from pipelines.preprocess.job import ConfigError, check_head_model
    from training.tasks.transfer import build_head
    env_file = shutil.copy(synthetic_model_path, tmp_path / "SMPLX_NEUTRAL.npz")
    assert check_head_model(PreprocessConfig())[0] == str(synthetic_model_file(0).resolve())
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert check_head_model(PreprocessConfig())[0] == str(env_file.resolve())
    assert check_head_model(PreprocessConfig(head_model=str(synthetic_model_path)))[0] == str(synthetic_model_path)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere.npz"))
    with pytest.raises(ConfigError, match="nowhere.npz"):
        check_head_model(PreprocessConfig())                                # named in the error, before any work
    with pytest.raises(HeadModelFileError, match="nowhere.npz"):
        build_head(None, 1)
