"""Shared fixtures: tiny site configs and sample studies."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from helpers import make_studies, write_config

from gcml_app.config import SiteConfig, load_config


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory):
    """This process's temporary files (the stock MONAI Label client's saved results, torch's rank error files)
    go under pytest's base folder, which pytest prunes, not the system's; the servers the tests start keep
    theirs, so a client's copy of a result never shares a path with the server's own."""
    before, tempfile.tempdir = tempfile.tempdir, str(tmp_path_factory.mktemp("tmp"))
    yield
    tempfile.tempdir = before


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def cfg(config_path: Path) -> SiteConfig:
    return load_config(config_path)


@pytest.fixture
def studies(tmp_path: Path) -> tuple[Path, Path]:
    return make_studies(tmp_path, cases=8, labelled=6)
