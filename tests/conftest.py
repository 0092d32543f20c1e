"""Shared fixtures: tiny site configs and sample studies."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_studies, write_config

from gcml_app.config import SiteConfig, load_config


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def cfg(config_path: Path) -> SiteConfig:
    return load_config(config_path)


@pytest.fixture
def studies(tmp_path: Path) -> tuple[Path, Path]:
    return make_studies(tmp_path, cases=8, labelled=6)
