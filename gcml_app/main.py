"""The GCML MONAI Label app: wires config, datastore, model store, infer and train tasks together.

Start it with::

    monailabel start_server --app gcml_app --studies DIR --conf gcml_config site.yaml \
        --host 127.0.0.1 --uvicorn_app gcml_app.server:app
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import gcml_app
from gcml_app.config import CONFIG_ENV, load_config
from gcml_app.datastore import GCMLDatastore
from gcml_app.infer import GCMLSegInfer
from gcml_app.store import ModelStore
from gcml_app.trainer import GCMLTrain

logger = logging.getLogger(__name__)


class GCMLApp(MONAILabelApp):
    """One site's app: serves its personalized model, trains it on local labels through the gate.

    Args:
        app_dir: this package's folder (MONAI Label's ``--app``).
        studies: the site's studies folder.
        conf: MONAI Label ``--conf`` pairs; ``gcml_config`` is the site YAML (else env ``GCML_CONFIG``).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]):
        self.cfg = load_config(conf.get("gcml_config") or os.environ.get(CONFIG_ENV))
        self.store = ModelStore(self.cfg.state_dir / "models")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"GCML ({self.cfg.site})",
            description="Decentralized personalized segmentation (gossip contrastive mutual learning)",
            version=gcml_app.__version__,
            labels=self.cfg.labels,
        )

    def init_datastore(self) -> GCMLDatastore:
        return GCMLDatastore(
            self.studies,
            labels=self.cfg.labels,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {"gcml_seg": GCMLSegInfer(self.cfg, self.store)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"gcml": GCMLTrain(self.cfg, self.store)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
