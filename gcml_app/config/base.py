"""What every config section shares: strict models, the site-name rule, the error that names key paths."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

__all__ = ["CONFIG_ENV", "SITE_NAME_PATTERN", "ConfigError", "IntTriple", "SiteName", "Triple", "check_site_name"]

CONFIG_ENV = "GCML_CONFIG"
SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # site, partner and token names (YAML, manifests, CLI)
_NAME = re.compile(SITE_NAME_PATTERN)


def check_site_name(v: str) -> str:
    """``v`` if it is a valid site name.

    Raises:
        ValueError: what was found and what a name may hold.
    """
    if not _NAME.match(v):
        raise ValueError(f"found {v!r}; expected 1-64 characters of letters, digits, '.', '_' or '-'")
    return v


SiteName = Annotated[str, AfterValidator(check_site_name)]
"""A site or partner name: it appears in URLs, file names and logs."""


class ConfigError(ValueError):
    """A site YAML that cannot be used; the message lists every bad key with what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


