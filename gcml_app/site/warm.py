"""The warm trainer: a round starts in a fork of an already-imported process, not a fresh interpreter.

MONAI Label runs every train task as a new ``python -m monailabel.interfaces.utils.app -m train -r JSON``
process. Importing torch, MONAI, MONAI Label and the app there is most of what a round pays before its
first step (about 6 s of a 9 s overhead on a 2-core machine); building the app itself takes 30 ms.

So the server starts one *warm trainer* per site (:class:`WarmTrainer`, from
``GCMLApp.on_init_complete``): a process at the training priority that does those imports once and
then waits on a Unix socket in a private (0700) folder. MONAI Label still starts its train subprocess,
so Slicer's Train button, ``/train``, its status, its log lines and its stop all work as before. But the
first thing that subprocess imports, through ``main.py``, is :mod:`gcml_app.site.train_entry`, which finds the
socket in the environment (``GCML_WARM_TRAINER``, inherited from the server) and calls :func:`relay`:

1. the subprocess sends its command line and connects its stdout to the socket;
2. the warm trainer forks a child that runs exactly what that subprocess would have run
   (MONAI Label's ``run_main`` with the same ``argv``: the app is built afresh, so the YAML, the
   datastore and the labels are read at the round's start, as before);
3. the child's output streams back line by line, and its exit status becomes the subprocess's own.

If the subprocess is killed (Slicer's Stop), the socket closes and the child exits at once. Anything
that prevents a warm start (the warm trainer still importing or gone, another GPU selection, other
arguments) makes :func:`relay` return ``None``, and the subprocess starts cold as before. Weights,
labels and peers never pass through the socket: only a command line in, log lines and a status out.

The price is the warm trainer's memory (the imports, shared copy-on-write with each round's child),
held while the server runs; ``train.warm: false`` in the site YAML turns it off.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import traceback
from pathlib import Path

from gcml_app.site.process import OMP_SERVER_ONLY_ENV, STARTED_ENV, lower_priority, started_at

__all__ = ["ENV", "WarmTrainer", "drained", "relay"]

logger = logging.getLogger(__name__)

ENV = "GCML_WARM_TRAINER"  # the socket's path, in the server's environment (its subprocesses inherit it)
_EXIT = b"\0gcml-exit "  # then the child's exit status and a newline; NUL never occurs in log text
_COLD = b"\0cold\n"  # the warm trainer declines: start cold
_GPU_ENV = "CUDA_VISIBLE_DEVICES"  # MONAI Label sets it per request; a round must see the same value
_MAX_REQUEST = 1 << 20


# ---------------------------------------------------------------- the server side
class WarmTrainer:
    """Starts, restarts and stops one site's warm trainer process (in the server process).

    If it exits while the server runs (killed, out of memory), rounds start cold and it is started
    again after :attr:`RESTART_S` seconds (a minute when it did not last a minute, so a process that
    cannot start does not spin).

    Args:
        nice: its CPU niceness (``train.nice``); rounds forked from it inherit it.
        idle: whether it runs under ``SCHED_IDLE`` (``train.sched_idle``); rounds inherit that too.
        env: extra environment for it (MONAI Label's train subprocess settings).
    """

    RESTART_S = 5.0

    def __init__(self, nice: int, env: dict[str, str] | None = None, idle: bool = False):
        self.nice, self.idle = nice, idle
        self.env = env or {}
        # mode 0700; a Unix socket's path has at most 107 bytes, so a long TMPDIR is passed over for /tmp
        short = None if len(tempfile.gettempdir()) < 80 else "/tmp"
        self.folder = Path(tempfile.mkdtemp(prefix="gcml-train-", dir=short))
        self.path = self.folder / "sock"
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start it, supervised, and publish its socket in this process's environment (MONAI Label's
        train subprocesses inherit it)."""
        self._spawn()
        os.environ[ENV] = str(self.path)
        threading.Thread(target=self._supervise, daemon=True, name="warm-trainer").start()

    def _spawn(self) -> None:
        self.path.unlink(missing_ok=True)  # a dead one's socket: ready() must not see it
        env = {k: v for k, v in {**os.environ, **self.env}.items() if k != ENV}
        if env.pop(OMP_SERVER_ONLY_ENV, None):  # gcml_app.site.serve_main's, for serving alone
            env.pop("OMP_WAIT_POLICY", None)
        # torch.cuda.is_available() then asks NVML instead of initialising the CUDA driver, which a forked
        # round could not use: the warm trainer must reach every fork with CUDA untouched
        env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "gcml_app.site.warm", str(self.path), str(self.nice),
                                      "idle" if self.idle else "normal"], env=env)
        self._spawned = time.monotonic()
        logger.info(f"warm trainer starting (pid {self.proc.pid}, socket {self.path}); rounds start cold until "
                    "it has imported")

    def _supervise(self) -> None:
        while True:
            rc = self.proc.wait()
            if self._stopping.is_set():
                return
            delay = self.RESTART_S if time.monotonic() - self._spawned > 60 else 60.0
            logger.warning(f"warm trainer (pid {self.proc.pid}) exited with code {rc}; rounds start cold; "
                           f"restarting it in {delay:g} s")
            if self._stopping.wait(delay):
                return
            self._spawn()

    def ready(self) -> bool:
        """Whether rounds start warm now (it has imported and listens)."""
        return self.proc is not None and self.proc.poll() is None and self.path.exists()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        self._stopping.set()
        if os.environ.get(ENV) == str(self.path):
            del os.environ[ENV]
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------- the train subprocess side
def _send(sock: socket.socket, obj: object) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv(sock: socket.socket) -> object:
    head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) != 4:
        raise ConnectionError("request truncated")
    (n,) = struct.unpack("!I", head)
    if n > _MAX_REQUEST:
        raise ConnectionError(f"request of {n} bytes refused")
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) != n:
        raise ConnectionError("request truncated")
    return json.loads(data)


def relay(path: str, argv: list[str], out=None) -> int | None:
    """Run this train subprocess's work in the warm trainer at ``path``; its exit status, or ``None`` to start cold.

    Args:
        path: the warm trainer's socket.
        argv: this process's ``sys.argv`` (MONAI Label's ``-m train -r JSON``).
        out: where the round's output goes (default: this process's stdout, which MONAI Label reads).
    """
    out = out or sys.stdout.buffer
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
            _send(sock, {"argv": argv, _GPU_ENV: os.environ.get(_GPU_ENV)})
            chunk = sock.recv(65536)
        except OSError:
            return None  # not listening yet (still importing) or gone
        if not chunk or chunk.startswith(_COLD):
            return None
        try:
            while chunk:
                text, nul, rest = chunk.partition(b"\0")
                out.write(text)
                out.flush()
                if nul:
                    rest = b"\0" + rest + b"".join(iter(lambda: sock.recv(65536), b""))
                    status = rest.removeprefix(_EXIT).strip()
                    return int(status) if status.lstrip(b"-").isdigit() else 1
                chunk = sock.recv(65536)
        except OSError as e:
            out.write(f"warm trainer: lost the round's output ({e})\n".encode())
            return 1
        out.write(b"warm trainer: the round's process ended without an exit status (killed?)\n")
        out.flush()
        return 1
    finally:
        sock.close()


def drained(stream, timeout: float = 10.0, settle: float = 0.2) -> None:
    """Return once the reader of the pipe behind ``stream`` has taken everything written to it.

    MONAI Label reads a train subprocess's output line by line only while the process runs, so lines
    still in the pipe (or in its reader's buffer) when the process exits never reach the task's
    details: the last ones, with the error, would be lost.
    """
    stream.flush()
    pending = bytearray(4)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(stream.fileno(), termios.FIONREAD, pending)
        except OSError:
            return  # not a pipe
        if not int.from_bytes(pending, sys.byteorder):
            break
        time.sleep(0.02)
    time.sleep(settle)  # for the lines its reader has buffered but not yet handled


# ---------------------------------------------------------------- the warm trainer process
def _import_everything() -> None:
    """What a train subprocess imports: MONAI Label's runner and the app's ``main.py`` with its dependencies."""
    import monailabel.interfaces.utils.app  # noqa: F401
    from monailabel.config import settings
    from monailabel.utils.others.class_utils import get_class_of_subclass_from_file

    get_class_of_subclass_from_file("main", os.path.join(settings.MONAI_LABEL_APP_DIR, "main.py"), "MONAILabelApp")


def _run_round(conn: socket.socket, argv: list[str], relay_pid: int) -> None:
    """In the forked child: MONAI Label's ``run_main`` on ``argv``, output to ``conn``; never returns."""
    from monailabel.interfaces.utils import app as ml_app

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # when MONAI Label started the round's process: the round reports its start-up from there
        os.environ[STARTED_ENV] = repr(started_at(relay_pid))
    except (OSError, IndexError, ValueError):
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(conn.fileno(), 1)
    os.dup2(conn.fileno(), 2)
    sys.stdout.reconfigure(line_buffering=True)

    def watchdog() -> None:  # the relay was killed (Slicer's Stop, a server shutdown): stop with it
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os._exit(143)

    threading.Thread(target=watchdog, daemon=True, name="relay-watchdog").start()
    rc = 0
    sys.argv = argv
    try:
        ml_app.run_main()
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
        rc = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, _EXIT + b"%d\n" % rc)
    finally:
        os._exit(rc)


def _serve(path: Path, nice: int, idle: bool = False) -> None:
    lower_priority(nice, idle)
    parent = os.getppid()
    t0 = time.monotonic()
    _import_everything()
    import gc

    import torch

    # a CUDA context made before a fork is unusable in the child: if the imports made one, every round starts cold
    cuda_touched = torch.cuda.is_initialized()
    if cuda_touched:
        logger.warning("warm trainer: the imports initialised CUDA, so rounds forked from it could not use the GPU; "
                       "every round starts cold")

    gc.collect()
    gc.freeze()  # objects from the imports stay in pages that rounds share copy-on-write
    tmp = path.with_suffix(".tmp")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)  # the path appears only when it accepts: until then rounds start cold
    srv.listen(4)
    srv.settimeout(1.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # rounds are reaped by the kernel
    logger.info(f"warm trainer ready in {time.monotonic() - t0:.1f} s (pid {os.getpid()}, nice {os.nice(0)}"
                f"{', SCHED_IDLE' if idle else ''})")
    while os.getppid() == parent:  # the server is gone: so are we
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        try:
            conn.settimeout(10.0)
            pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                raise ConnectionError(f"connection from uid {uid} refused")
            req = _recv(conn)
            argv = req.get("argv") if isinstance(req, dict) else None
            if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
                raise ConnectionError("request without a command line")
            if cuda_touched or req.get(_GPU_ENV) != os.environ.get(_GPU_ENV):
                conn.sendall(_COLD)  # another GPU selection needs a process started with it
                continue
            conn.settimeout(None)
            if os.fork() == 0:
                srv.close()
                _run_round(conn, argv, pid)
        except (OSError, ValueError) as e:
            logger.warning(f"warm trainer: request refused ({e})")
        finally:
            conn.close()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C or a stop of the server's process group: just end
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s] [%(process)s] [%(threadName)s] [%(levelname)s] (%(name)s:%(lineno)d) - "
                               "%(message)s")
    _serve(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:4] == ["idle"])
