"""Starting a site's server: the command line, and the app folder made ready before any server starts."""

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
