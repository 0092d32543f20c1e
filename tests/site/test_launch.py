"""Starting a site's server: the command line, and the app folder made ready before any server starts."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gcml_app.site import launch


def test_the_app_folders_exist_before_any_server_starts(tmp_path, config_path, monkeypatch):
    """MONAI Label checks for each folder and then creates it; several sites starting at once from a fresh
    install (gcml demo, gcml bench) raced on that, and the loser exited with FileExistsError."""
    app = tmp_path / "app"
    app.mkdir()
    monkeypatch.setattr(launch, "app_dir", lambda: str(app))
    cmd = launch.server_command(config_path, tmp_path / "studies", "127.0.0.1", 8123)
    assert sorted(p.name for p in app.iterdir()) == sorted(launch.APP_FOLDERS)
    assert launch.server_command(config_path, tmp_path / "studies", "127.0.0.1", 8123) == cmd  # again: no error
    assert cmd[cmd.index("--app") + 1] == str(app) and cmd[cmd.index("--uvicorn_app") + 1] == "gcml_app.site.server:app"


def test_a_server_that_stands_for_another_machine_and_what_it_starts_get_the_lowest_cpu_weight():
    """The soak's partner: its rounds and scoring must not count as the measured site's load. Its session is
    its own scheduling group (Linux autogroup), where niceness alone would not order it below the site."""
    # a session leader that starts a child once told to (after its weight is set: no race)
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; sys.stdin.readline(); "
                               "subprocess.run(['sleep', '30'])"], stdin=subprocess.PIPE, start_new_session=True)
    try:
        launch.lowest_weight(parent.pid)
        assert psutil.Process(parent.pid).nice() == 19 and os.nice(0) < 19  # it, not this process
        group = Path(f"/proc/{parent.pid}/autogroup")
        if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1":
            assert group.read_text().split()[-1] == "19", group.read_text()
            # ours: untouched. Empty where this process sits in a cgroup's task group, not an autogroup (CI)
            assert Path("/proc/self/autogroup").read_text().split()[-1:] != ["19"]
        parent.stdin.write(b"go\n")
        parent.stdin.flush()
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(parent.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children and children[0].nice() == 19  # what it starts inherits the weight
    finally:
        launch.stop_group(parent, signal.SIGTERM, 5)


@pytest.mark.parametrize("given, policy", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_servers_openmp_threads_sleep_between_regions_unless_site_it_says_otherwise(given, policy):
    """Set before torch (and its OpenMP) is loaded, or it would not apply."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": given} if given else {})
    out = subprocess.run([sys.executable, "-c", "import os, sys; import gcml_app.site.serve_main; "
                          "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"],
                         capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == [policy, "False"]


def test_start_up_objects_leave_the_garbage_collectors_walk():
    """The server's imports and app live as long as it does: frozen, a full collection no longer walks them
    (each such walk held the GIL 0.4 s, stalling gcml_seg)."""
    out = subprocess.run([sys.executable, "-c", "import gc, gcml_app.main; from gcml_app.site.process import "
                          "freeze_startup; n = freeze_startup(); print(n, len(gc.get_objects()))"],
                         capture_output=True, text=True, check=True).stdout.split()
    frozen, tracked = int(out[-2]), int(out[-1])
    assert frozen > 100_000 and tracked < frozen / 20, (frozen, tracked)
