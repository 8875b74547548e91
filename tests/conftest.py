"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The `small` synthetic_pedestrians set built once as TFDS array_record; tests only read it."""
    from reid_jax.data import build

    d = tmp_path_factory.mktemp("tfds")
    build.build("synthetic_pedestrians", d, config="small")
    return d
