"""``python -m gcml_app.site.serve_main [--ssl-cert-reqs none|optional|required] start_server ...``

MONAI Label's ``start_server`` passes ``--ssl_keyfile/--ssl_certfile/--ssl_ca_certs`` to uvicorn but
not whether clients must present a certificate, so mutual TLS cannot be switched on through it; and
it leaves uvicorn's ``proxy_headers`` on, which rewrites the client address from ``X-Forwarded-For``
sent by any loopback peer. This entry point sets ``ssl_cert_reqs`` and turns ``proxy_headers`` off
(the guard honours forwarding headers only from ``security.trusted_proxies``), then runs MONAI
Label's own CLI unchanged.

Before anything loads OpenMP it also sets ``OMP_WAIT_POLICY=PASSIVE`` (unless site IT set it): the
server's OpenMP threads then sleep between parallel regions instead of spinning. Spinning threads
competed with the request's own other threads (ITK's reader and writer, uvicorn) on a small server, and
one ``gcml_seg`` in four took 0.11-0.15 s in its forward pass instead of 0.01 s on a quiet 2-core machine
(issue 33). The warm trainer, and so every round, goes back to OpenMP's default (``site/warm.py``):
throughput matters there, and under ``train.sched_idle`` its spinning takes only CPU time nobody wants.
"""

from __future__ import annotations

import os
import ssl
import sys

from gcml_app.site.process import OMP_SERVER_ONLY_ENV  # standard library only: no OpenMP loaded yet

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ[OMP_SERVER_ONLY_ENV] = "1"

import uvicorn.config  # noqa: E402

REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def main(argv: list[str]) -> None:
    reqs = "none"
    if argv[:1] == ["--ssl-cert-reqs"]:
        if len(argv) < 2 or argv[1] not in REQS:
            raise SystemExit(f"--ssl-cert-reqs: found {argv[1:2]}; expected one of {list(REQS)}")
        reqs, argv = argv[1], argv[2:]
    original = uvicorn.config.Config.__init__

    def init(self, *args, **kwargs):
        kwargs["ssl_cert_reqs"] = REQS[reqs]  # uvicorn.run passes its own default (CERT_NONE) explicitly
        kwargs["proxy_headers"] = False
        original(self, *args, **kwargs)

    uvicorn.config.Config.__init__ = init
    from monailabel.main import Main

    sys.argv = ["monailabel", *argv]
    Main().run()


if __name__ == "__main__":
    main(sys.argv[1:])
