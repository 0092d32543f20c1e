"""Site configuration: one YAML per site, loaded once into a validated :class:`SiteConfig`.

A bad value fails at start-up with its key path, the value found and what was expected::

    gcml config error in site.yaml:
      - network.channels: found [8, 16] with strides [2, 2]; expected len(strides) == len(channels) - 1

The sections live in :mod:`.learning` (what the site learns and how) and :mod:`.partners` (whom it
talks to and how); :mod:`.site` assembles them into :class:`SiteConfig` and loads the YAML.

Example:
    >>> cfg = load_config("sample_configs/site_a.yaml")
    >>> cfg.labels
    {'organ': 1, 'lesion': 2}
"""

from gcml_app.config.base import CONFIG_ENV, SITE_NAME_PATTERN, ConfigError, check_site_name
from gcml_app.config.learning import (
    ActiveConfig,
    BundleNetConfig,
    DCMLConfig,
    DistributedConfig,
    FinetuneConfig,
    IntensityConfig,
    InteractiveConfig,
    NetworkConfig,
    SegResNetConfig,
    TrainConfig,
    UNetConfig,
    ValidationConfig,
)
from gcml_app.config.partners import GossipConfig, PeerConfig, PeerTokenConfig, SecurityConfig, ServeConfig, TLSConfig
from gcml_app.config.site import SiteConfig, StoreConfig, load_config

__all__ = [
    "ActiveConfig",
    "BundleNetConfig",
    "CONFIG_ENV",
    "SITE_NAME_PATTERN",
    "ConfigError",
    "DCMLConfig",
    "DistributedConfig",
    "FinetuneConfig",
    "GossipConfig",
    "IntensityConfig",
    "InteractiveConfig",
    "NetworkConfig",
    "PeerConfig",
    "PeerTokenConfig",
    "SecurityConfig",
    "SegResNetConfig",
    "ServeConfig",
    "SiteConfig",
    "StoreConfig",
    "TLSConfig",
    "TrainConfig",
    "UNetConfig",
    "ValidationConfig",
    "check_site_name",
    "load_config",
]
