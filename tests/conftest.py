"""Shared fixtures: the synthetic SMPL-X-format model, built once per test session."""
from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
warnings.filterwarnings("ignore", message=".*[Ss]parse.*")


@pytest.fixture(scope="session")
def synthetic_model_path(tmp_path_factory):
    from expportrait.assets import synthetic_model_file
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
