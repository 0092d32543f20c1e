import json
import subprocess
import sys
import textwrap

import pytest
import torch

from gcml_app.store import ModelStore, StoreError, Superseded


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 1, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)}


def publish(store: ModelStore, seed: int, dice: float = 0.5):
    return store.publish(weights(seed), arch="sha256:test", val_dice={"lesion": dice}, n_train=4, n_val=1,
                         produced_by="local", site="s")


def test_publish_serves_new_version_with_manifest(tmp_path):
    store = ModelStore(tmp_path)
    assert store.served_version() is None and store.served() is None
    m1 = publish(store, 1, 0.4)
    m2 = publish(store, 2, 0.6)
    assert (m1.version, m2.version, m2.parent) == (1, 2, 1)
    assert store.served_version() == 2 and store.versions() == [1, 2]
    man = json.loads((tmp_path / "v000002.json").read_text())
    for key in ("version", "parent", "created", "sha256", "bytes", "arch", "val_dice", "n_train", "n_val",
                "produced_by"):
        assert key in man
    assert man["bytes"] == (tmp_path / "v000002.safetensors").stat().st_size
    torch.testing.assert_close(store.load(2), weights(2))
    assert [r["event"] for r in store.history()] == ["publish", "publish"]


def test_weights_are_safetensors_not_pickle(tmp_path):
    store = ModelStore(tmp_path)
    publish(store, 1)
    head = (tmp_path / "v000001.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # neither pickle nor torch zip


def test_rollback_serves_earlier_version_and_is_recorded(tmp_path):
    store = ModelStore(tmp_path)
    publish(store, 1)
    publish(store, 2)
    store.rollback(1, reason="radiologist report")
    assert store.served_version() == 1
    torch.testing.assert_close(store.load(store.served_version()), weights(1))
    assert store.history()[-1] | {"time": None} == {
        "time": None, "event": "rollback", "version": 1, "previous": 2, "reason": "radiologist report"}
    assert publish(store, 3).parent == 1


def test_rollback_to_unknown_or_corrupt_version_fails_and_keeps_serving(tmp_path):
    store = ModelStore(tmp_path)
    publish(store, 1)
    publish(store, 2)
    with pytest.raises(StoreError, match=r"version 7 does not exist; known versions: \[1, 2\]"):
        store.rollback(7)
    (tmp_path / "v000001.safetensors").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="version 1: weights do not match the manifest sha256"):
        store.rollback(1)
    assert store.served_version() == 2


CRASH = textwrap.dedent(
    """
    import os, signal, sys, torch
    from gcml_app.store import ModelStore
    root, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = ModelStore(root)
    real, calls = getattr(os, target), [0]
    def crash_on_nth(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(os, target, crash_on_nth)
    store.publish({"w": torch.full((64, 64), 2.0)}, arch="sha256:test", val_dice={"lesion": 0.9},
                  n_train=4, n_val=1, produced_by="local")
    print("completed")
    """
)

# kill -9 just before the n-th call of os.<target> inside publish: 3 replaces (weights, manifest, pointer),
# 6 fsyncs (file + folder for each), and mid-write of the weights' temporary file. Only the last fsync
# comes after the pointer moved: there the new version is complete and served.
CRASH_POINTS = [("replace", n, 1) for n in (1, 2, 3)] + [("fsync", n, 1) for n in range(1, 6)] + [
    ("fdopen", 1, 1), ("fsync", 6, 2)]


@pytest.mark.parametrize("target, n, served", CRASH_POINTS)
def test_kill_9_mid_publish_leaves_a_complete_version_served(tmp_path, target, n, served):
    store = ModelStore(tmp_path)
    publish(store, 1)
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path), target, str(n)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert "completed" not in proc.stdout

    store = ModelStore(tmp_path)
    assert store.served_version() == served
    if served == 1:
        torch.testing.assert_close(store.load(1), weights(1))
    else:
        torch.testing.assert_close(store.load(2), {"w": torch.full((64, 64), 2.0)})
    # The next publish works and never reuses the number of the interrupted one.
    used = max(int(p.name[1:7]) for p in tmp_path.glob("v0*"))
    assert publish(store, 3).version == used + 1
    assert store.served_version() == used + 1


# ---------------------------------------------------------------- races and torn lines (issue: store races)
PUBLISHER = textwrap.dedent("""
    import sys, torch
    from gcml_app.store import ModelStore
    store = ModelStore(sys.argv[1])
    for i in range(int(sys.argv[2])):
        w = {"conv.weight": torch.full((4, 1, 3, 3, 3), float(i)), "conv.bias": torch.zeros(4)}
        store.publish(w, arch="sha256:test", val_dice={"lesion": 0.5}, n_train=1, n_val=1, produced_by=sys.argv[3])
""")


def test_concurrent_publishers_get_distinct_versions_and_the_served_one_verifies(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, str(tmp_path), "15", name]) for name in ("p1", "p2")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = ModelStore(tmp_path)
    assert store.versions() == list(range(1, 31))
    for v in store.versions():
        store.load(v)  # every manifest matches its weights
    assert store.load(store.served_version())["conv.bias"].shape == (4,)
    published = [r for r in store.history() if r["event"] == "publish"]
    assert sorted(r["version"] for r in published) == list(range(1, 31))
    assert sorted(r["parent"] or 0 for r in published) == list(range(30))  # a chain: no two share a parent


def test_publish_with_a_stale_parent_is_refused_and_changes_nothing(tmp_path):
    store = ModelStore(tmp_path)
    publish(store, 1)
    publish(store, 2)
    store.rollback(1)
    with pytest.raises(Superseded, match="served version is now 1, not 2"):
        store.publish(weights(3), arch="sha256:test", val_dice={}, n_train=1, n_val=1, produced_by="local",
                      expected_parent=2)
    assert store.served_version() == 1 and store.versions() == [1, 2]
    assert store.publish(weights(3), arch="sha256:test", val_dice={}, n_train=1, n_val=1, produced_by="local",
                         expected_parent=1).parent == 1


@pytest.mark.parametrize("junk", [b'{"event": "publish", "vers', b"\x00\xff\xfe", b"[1, 2]", b"{" * 5000 + b"\n"])
def test_a_torn_history_line_is_skipped_and_counted(tmp_path, junk):
    store = ModelStore(tmp_path)
    publish(store, 1)
    with open(tmp_path / "history.jsonl", "ab") as f:
        f.write(junk + b"\n")
    publish(store, 2)
    assert [r["version"] for r in store.history()] == [1, 2]
    assert store.skipped_history_lines == 1


def test_history_never_holds_non_finite_numbers(tmp_path):
    store = ModelStore(tmp_path)
    store.record("keep", losses=[{"total": float("nan")}], mean={"served": float("inf")})
    line = (tmp_path / "history.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert store.history()[-1]["losses"] == [{"total": None}]


def test_pruning_keeps_every_rollback_target_and_frees_the_rest(tmp_path):
    store = ModelStore(tmp_path)
    for seed in range(8):
        publish(store, seed)  # v1..v8, each the parent of the next
    store.rollback(3, reason="bad versions")
    for seed in range(8, 11):
        publish(store, seed)  # v9..v11 on top of v3
    before = {v: store.read_bytes(v) for v in store.versions()}
    out = store.prune(3)
    kept = store.versions()
    # served v11 and its 3 ancestors v10, v9, v3 (what it was built on), the newest 3, the first
    assert kept == [1, 3, 9, 10, 11] and out["removed"] == [2, 4, 5, 6, 7, 8]
    assert out["freed_bytes"] > 0 and all(store.read_bytes(v) == before[v] for v in kept)
    for v in (9, 3, 1):
        store.rollback(v)  # every kept target still rolls back
    assert store.served_version() == 1
    publish(store, 99)
    assert store.served_version() == 12  # pruned numbers are never claimed again


def test_publish_prunes_to_keep_versions(tmp_path):
    store = ModelStore(tmp_path, keep_versions=3)
    for seed in range(6):
        publish(store, seed)
    assert store.versions() == [1, 3, 4, 5, 6]  # first, and the served v6 with 3 ancestors (= the newest)
    assert json.loads((tmp_path / "pruned.jsonl").read_text().splitlines()[-1])["removed"] == [2]


def test_sweep_removes_what_an_interrupted_publish_left_and_never_reuses_its_number(tmp_path):
    store = ModelStore(tmp_path)
    publish(store, 0)
    (tmp_path / "v000002.safetensors").write_bytes(b"")  # claimed, then killed before the manifest
    (tmp_path / ".v000003.json.abc.tmp").write_bytes(b"{")  # an atomic write cut short
    assert sorted(store.sweep()) == [".v000003.json.abc.tmp", "v000002.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("v")) == ["v000001.json", "v000001.safetensors"]
    assert publish(store, 1).version == 3 and store.served_version() == 3


def _replace_working_model(root, stop) -> None:
    """Another process (a round) replacing the working model, its header a different length each time."""
    store, i = ModelStore(root), 0
    while not stop.is_set():
        i += 1
        store.save_working(weights(0), note="x" * (i % 17), rounds_unpublished=i)


def test_the_working_model_read_while_a_round_replaces_it_is_the_old_or_the_new_whole(tmp_path):
    # safe_open mapped the file twice by path: a replace in between raised RuntimeError, and /gcml/status
    # answered HTTP 500 (CI at 94c11b9). 40,000 reads like these raced 43 times before the fix.
    import multiprocessing as mp

    store = ModelStore(tmp_path / "models")
    store.save_working(weights(0), note="", rounds_unpublished=0)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    writer = ctx.Process(target=_replace_working_model, args=(tmp_path / "models", stop))
    writer.start()
    try:
        while store.working_info()["rounds_unpublished"] == 0:  # the writer is importing torch
            assert writer.is_alive()
        seen = set()
        for _ in range(5000):
            info = store.working_info()
            working, full = store.working()
            assert set(info) >= {"note", "rounds_unpublished", "updated"} and len(info["note"]) < 17
            torch.testing.assert_close(working, weights(0))
            assert full["note"] == "x" * (full["rounds_unpublished"] % 17)  # header and weights of one file
            seen.add(info["rounds_unpublished"])
    finally:
        stop.set()
        writer.join(30)
    assert len(seen) > 100  # the reads did race the writer


@pytest.mark.parametrize("data, why", [
    (b"", "shorter than a safetensors header"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"", "header cut short: 4 of 16 bytes"),
    ((2**40).to_bytes(8, "little"), "header of 1099511627776 bytes, above"),
    (b"\x02\x00\x00\x00\x00\x00\x00\x00[]", "not a safetensors header"),
    (b"\x29\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__": {"gcml_working": "[1]"}}', "is not a JSON object"),
    (b"\x03\x00\x00\x00\x00\x00\x00\x00{x}", "Expecting property name"),
])
def test_an_unreadable_working_header_is_named_and_treated_as_absent(tmp_path, caplog, data, why):
    store = ModelStore(tmp_path / "models")
    store.working_path.write_bytes(data)
    with caplog.at_level("WARNING"):
        assert store.working_info() is None and store.working() is None
    assert f"working model {store.working_path}: unreadable header (" in caplog.text and why in caplog.text
    assert f"working model {store.working_path} is unreadable (" in caplog.text
