import numpy as np
import pytest
import smplx
import torch

from models.head.smplx_file import (DEFAULT_FILENAME, ENV_VAR, HeadModelFileError,
                                    load_smplx_model, resolve_model_path, save_smplx_model)


def test_synthetic_file_loads_unmodified_in_smplx(synthetic_model_path):
    model = smplx.SMPLX(model_path=str(synthetic_model_path), num_betas=300,
                        num_expression_coeffs=100, use_pca=False, use_face_contour=True)
    out = model()
    assert out.vertices.shape == (1, 10475, 3)
    # 55 joints + 21 vertex joints + 51 static + 17 contour landmarks
    assert out.joints.shape == (1, 144, 3)
    assert model.num_betas == 300 and model.num_expression_coeffs == 100
    assert torch.isfinite(out.vertices).all()


def test_folder_resolves_to_neutral_file(tmp_path, synthetic_data):
    save_smplx_model(synthetic_data, tmp_path / DEFAULT_FILENAME)
    assert resolve_model_path(tmp_path) == tmp_path / DEFAULT_FILENAME


def test_env_var_is_used_when_config_empty(tmp_path, monkeypatch, synthetic_model_path):
    monkeypatch.setenv(ENV_VAR, str(synthetic_model_path))
    assert resolve_model_path(None) == synthetic_model_path


def test_missing_model_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(HeadModelFileError, match=ENV_VAR):
        resolve_model_path(None)
    with pytest.raises(HeadModelFileError, match=f"{tmp_path}/{DEFAULT_FILENAME}"):
        resolve_model_path(tmp_path)
    with pytest.raises(HeadModelFileError, match="not found"):
        load_smplx_model(tmp_path / "nope.npz")


def _write(path, arrays):
    np.savez(path, **arrays)
    return path


def test_malformed_files_get_clear_errors(tmp_path, synthetic_data):
    good = synthetic_data.arrays()
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    with pytest.raises(HeadModelFileError, match="not a valid .npz"):
        load_smplx_model(text)

    missing = {k: v for k, v in good.items() if k != "posedirs"}
    with pytest.raises(HeadModelFileError, match="posedirs"):
        load_smplx_model(_write(tmp_path / "missing.npz", missing))

    bad_shape = dict(good, shapedirs=good["shapedirs"][:, :, :20])
    with pytest.raises(HeadModelFileError, match="300 shape"):
        load_smplx_model(_write(tmp_path / "short.npz", bad_shape))

    bad_rows = dict(good, weights=good["weights"][:-5])
    with pytest.raises(HeadModelFileError, match="'weights' has shape"):
        load_smplx_model(_write(tmp_path / "rows.npz", bad_rows))

    pickled = dict(good, f=np.array([object()] * 3, dtype=object))
    with pytest.raises(HeadModelFileError, match="'f' is not a plain array"):
        load_smplx_model(_write(tmp_path / "pickled.npz", pickled))

    nan = dict(good, v_template=np.full_like(good["v_template"], np.nan))
    with pytest.raises(HeadModelFileError, match="non-finite"):
        load_smplx_model(_write(tmp_path / "nan.npz", nan))
