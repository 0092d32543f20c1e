"""The site's DICOMweb client: MONAI Label's, with its credential settings, timeouts and one retry policy; and
a folder of DICOM files stored in a PACS (``gcml pacs-load``, the demo's PACS site)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from urllib3.util.retry import Retry

__all__ = ["TIMEOUT_S", "is_pacs_url", "pacs_client", "stow_folder"]

TIMEOUT_S = (5.0, 60.0)  # connect, read (per socket read, not per series)


def is_pacs_url(studies: str) -> bool:
    """Whether a ``--studies`` argument names a DICOMweb service rather than a folder."""
    return studies.startswith(("http://", "https://"))


class _TimeoutSession(requests.Session):
    """A session whose requests time out (dicomweb-client passes no timeout of its own)."""

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", TIMEOUT_S)
        return super().request(*args, **kwargs)


def pacs_client(url: str, auth: tuple[str, str] | None = None) -> DICOMwebClientX:
    """MONAI Label's DICOMweb client for ``url``, with its credential settings, timeouts and retries.

    Args:
        url: the DICOMweb root, e.g. ``https://pacs.example/dicom-web``.
        auth: ``(user, password)``; default MONAI Label's settings (environment), none if unset.

    Raises:
        ValueError: the URL carries credentials (they belong in the environment).
    """
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValueError(f"PACS URL {parts.scheme}://{parts.hostname}{parts.path} carries credentials; set "
                         "MONAI_LABEL_DATASTORE_USERNAME and MONAI_LABEL_DATASTORE_PASSWORD instead")
    user, password = auth or (settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME,
                              settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    session = _TimeoutSession()
    if user and password:
        session.auth = create_session_from_user_pass(user, password).auth
    retry = Retry(total=2, connect=2, read=1, backoff_factor=0.5, status_forcelist=(502, 503, 504),
                  allowed_methods=frozenset({"GET"}))
    for prefix in ("http://", "https://"):
        session.mount(prefix, requests.adapters.HTTPAdapter(max_retries=retry))
    client = DICOMwebClientX(url=url.rstrip("/"), session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    client.set_http_retry_params(retry=False)  # urllib3's Retry above is the one retry policy (seconds, not minutes)
    return client


def stow_folder(folder: str | Path, client, batch: int = 32) -> int:
    """Store every ``*.dcm`` under ``folder`` in the PACS (STOW-RS), ``batch`` instances per request.

    Returns:
        the number of instances stored.
    """
    files = sorted(Path(folder).rglob("*.dcm"))
    for i in range(0, len(files), batch):
        client.store_instances([pydicom.dcmread(f) for f in files[i:i + batch]])
    return len(files)
