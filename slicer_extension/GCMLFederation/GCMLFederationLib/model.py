"""What the GCML Federation module shows, computed from ``/gcml/status`` and ``/gcml/history`` JSON.

Pure functions of the JSON (and ``now``, in seconds since the epoch, for relative times), so what a
user sees is pinned by tests on recorded answers.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = [
    "active_rows",
    "active_text",
    "dice_series",
    "interactive_text",
    "labels_text",
    "partner_rows",
    "published_how",
    "rollback_choices",
    "round_rows",
    "served_text",
    "working_text",
    "training_text",
]

_CANDIDATES = {"local": "local model", "dcml_local": "our model after DCML", "dcml_incoming": "partner model after DCML",
               "average": "average of both"}
_ARMS = {"mutual": "mutual learning", "teacher": "distilled from it", "alone": "trained alone"}
"""How a round used the partner's model (``dcml.choose``), as the server's ``ARM_WORDS`` says it."""


def _dice(val_dice: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in val_dice.items())


def _mean(val_dice: dict[str, float]) -> float | None:
    return sum(val_dice.values()) / len(val_dice) if val_dice else None


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    s = max(0.0, now - t)
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} days ago"


def published_how(produced_by: str, history: list[dict[str, Any]] | None = None, version: int | None = None,
                  made_by: dict[str, Any] | None = None) -> str:
    """How a version came to be served, in words.

    Args:
        produced_by: the manifest's one-line form, read only when ``made_by`` is missing (servers
            before the structured form).
        made_by: the manifest's structured form, ``{"mode", "candidate", "peer"}``.

    Examples:
        ``{"mode": "local"}`` -> ``"local fine-tune"``; ``{"mode": "dcml", "candidate": "dcml_local",
        "peer": "site-b"}`` -> ``"round with site-b (our model after DCML)"``; ``{"mode": "adopt",
        "peer": "site-b"}`` -> ``"adopted from site-b (unvalidated)"``; served again by a rollback ->
        ``"rollback from v5: <reason>"``.
    """
    if history and version is not None:
        for rec in reversed(history):
            if rec.get("event") == "publish" and rec.get("version") == version:
                break
            if rec.get("event") == "rollback" and rec.get("version") == version:
                reason = f": {rec['reason']}" if rec.get("reason") else ""
                return f"rollback from v{rec.get('previous')}{reason}"
    mode, candidate, peer = _made_by(made_by, produced_by)
    what = _CANDIDATES.get(candidate, candidate)
    if mode == "local":
        return "local fine-tune"
    if mode == "adopt":
        return f"adopted from {peer} (unvalidated)"
    if mode == "dcml" and peer:
        return f"round with {peer} ({what})"
    if mode == "dcml":
        return f"DCML round ({what})"
    return produced_by or mode or "unknown"


def _made_by(made_by: dict[str, Any] | None, produced_by: str) -> tuple[str, str, str | None]:
    """``(mode, candidate, peer)``: from the structured form, else from the one-line form older servers wrote."""
    if made_by:
        return made_by.get("mode") or "", made_by.get("candidate") or "", made_by.get("peer")
    kind, _, rest = produced_by.partition(":")
    if kind == "gossip":
        peer, _, candidate = rest.partition(":")
        return "dcml", candidate, peer
    if kind == "adopted":
        return "adopt", "incoming", rest
    if kind == "dcml":
        return "dcml", rest, None
    return kind, kind, None


def served_text(status: dict[str, Any], history: list[dict[str, Any]] | None = None) -> str:
    """The serving model in two or three lines: version and how, what the site started from (a bundle),
    then validation Dice per label."""
    site, served = status.get("site", "?"), status.get("served")
    if not served:
        return f"{site}: no model published yet (auto-segmentation answers 'no trained model yet')"
    how = published_how(served.get("produced_by", ""), history, served.get("version"), served.get("made_by"))
    head = f"{site} serves v{served['version']}, published {served.get('created', '?')} by {how}"
    start = served.get("start") or {}
    if start.get("bundle") or start.get("checkpoint"):
        origin = (f"bundle {start['bundle']} {start.get('bundle_version') or ''}".rstrip() if start.get("bundle")
                  else f"checkpoint {start['checkpoint']}")
        head += f"\nstarted from {origin}"
    if not served.get("validated", True) or not served.get("val_dice"):
        return head + "\nnot validated on this site's labels yet"
    return head + f"\nvalidation Dice: {_dice(served['val_dice'])} (mean {_mean(served['val_dice']):.3f}, " \
                  f"{served.get('n_val', '?')} held-out cases)"


def dice_series(history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Validation Dice of every published version: ``{label: [(version, dice)], "mean": [...]}``.

    Versions without scores (adopted, unvalidated) are left out.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for rec in history:
        if rec.get("event") != "publish" or not rec.get("val_dice"):
            continue
        for label, d in rec["val_dice"].items():
            series.setdefault(label, []).append((rec["version"], float(d)))
        series.setdefault("mean", []).append((rec["version"], _mean(rec["val_dice"])))
    if "mean" in series:
        series["mean"] = series.pop("mean")  # last, after the labels
    return series


def _result(rec: dict[str, Any]) -> str:
    event, means = rec.get("event"), rec.get("mean") or {}
    if event == "publish" and rec.get("mode") == "adopt":
        return f"adopted v{rec.get('version')} (unvalidated)"
    if event == "publish":
        w = rec.get("winner")
        served = f" > {means['served']:.3f}" if "served" in means else ""
        return f"published v{rec.get('version')} ({_CANDIDATES.get(w, w)} {means.get(w, 0):.3f}{served})"
    if event == "failed":  # the round stopped before its commit (e.g. out of GPU memory): nothing changed
        return f"failed: {rec.get('reason', '')}".strip()
    if event == "superseded":
        return f"superseded: the served model changed during the round (v{rec.get('base_version')} -> v{rec.get('version')})"
    if event == "keep":
        best = max((k for k in means if k != "served"), key=lambda k: means[k], default=None)
        if best is None:
            return f"kept v{rec.get('version')}"
        return f"kept v{rec.get('version')} (best {means[best]:.3f} <= {means.get('served', 0):.3f})"
    attempts = _attempts(rec)
    rejected = [a for a in attempts if a.get("outcome") == "rejected"]
    if rejected:
        return "rejected: " + "; ".join(f"{a['peer']}: {a.get('reason', '')}" for a in rejected)
    if rec.get("outcome") == "no_model":
        return "no new model: " + ", ".join(f"{a['peer']} {a['outcome'].replace('_', ' ')}" for a in attempts)
    return f"{rec.get('outcome', event)}: {rec.get('reason', '')}".strip()


def _attempts(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The partners a gossip round asked: under ``gossip`` (top level in histories of older servers)."""
    return (rec.get("gossip") or {}).get("attempts") or rec.get("attempts") or []


def round_rows(history: list[dict[str, Any]], n: int = 10) -> list[dict[str, str]]:
    """The last ``n`` rounds, newest first: ``{"time", "trigger", "peer", "result", "bytes"}``; with
    ``dcml.choose`` the peer cell says how the partner's model was used and its measured gap on our cases."""
    rounds = [r for r in history if r.get("event") in ("publish", "keep", "gossip", "labels", "superseded", "failed")]
    rows = []
    for rec in reversed(rounds[-n:]):
        g = rec.get("gossip") or {}
        peer = g.get("peer") or (rec.get("incoming") or {}).get("peer")
        if not peer and _attempts(rec):
            peer = ", ".join(a["peer"] for a in _attempts(rec))
        nbytes = g.get("bytes_pulled", rec.get("bytes_pulled", 0)) or 0  # top level: servers before 0.1's layout
        if peer and (arm := rec.get("arm")):  # how the partner's model was used, and its gap on our cases
            peer += f" ({_ARMS.get(arm.get('arm'), arm.get('arm'))}; {100 * arm.get('gain', 0.0):+.1f} Dice points)"
        rows.append({
            "time": rec.get("time", ""),
            "trigger": rec.get("trigger", "train"),
            "peer": peer or "-",
            "result": _result(rec),
            "bytes": f"{nbytes / 1000:.1f} kB" if nbytes else "-",
        })
    return rows


def partner_rows(status: dict[str, Any], now: float | None = None) -> list[dict[str, str]]:
    """One row per partner: ``{"name", "reachable", "last_exchange", "score", "note"}``."""
    now = time.time() if now is None else now
    rows = []
    for p in status.get("partners", []):
        reach = {True: "yes", False: "no", None: "not tried"}[p.get("reachable")]
        note = p.get("last_error") or ""
        if p.get("backed_off_s"):
            note = f"skipped for {p['backed_off_s']:.0f} s more" + (f" ({note})" if note else "")
        elif p.get("last_version") is not None:
            note = note or f"last pulled v{p['last_version']}"
        rows.append({"name": p["name"], "reachable": reach, "last_exchange": _ago(p.get("last_exchange"), now),
                     "score": f"{p.get('score', 0.0):+.3f}", "note": note})
    return rows


def labels_text(status: dict[str, Any]) -> str:
    """How many submitted labels no round has learned from yet; on a PACS site, whether the PACS answers."""
    n, threshold = status.get("pending_labels", 0), status.get("min_new_labels", 0)
    head = f"{n} label{'s' if n != 1 else ''} submitted since the last training"
    head += " (automatic rounds on new labels are off)" if threshold <= 0 else f"; a round starts at {threshold}"
    v = status.get("validation") or {}
    if v and not v.get("strict", True):
        head += (f"\nonly {v['n_val']} held-out validation cases: too few for a strict publish decision "
                 f"(needs {v['strict_cases']}); about {v['more_labels_for_strict']} more labels would make it one")
    pacs = status.get("pacs")
    if pacs and not pacs.get("reachable", True):
        head += (f"\nPACS unreachable ({pacs.get('last_error')}): the {pacs.get('cached_series', 0)} cached series "
                 "still work; new series and label submissions wait until it answers")
    if pacs and pacs.get("skipped"):
        n = len(pacs["skipped"])
        head += f"\n{n} PACS series skipped as unusable (reasons in /gcml/status)"
    return head


def working_text(status: dict[str, Any]) -> str:
    """What rounds keep training between publishes (the working model)."""
    w = status.get("working")
    if not w:
        return "working model: none yet (the first round starts it)"
    n = w.get("rounds_unpublished") or 0
    if n == 0:
        return "working model: the served model (the last round published it)"
    mean = _mean(w.get("val_dice") or {})
    score = f", validation mean Dice {mean:.3f}" if mean is not None else ""
    return (f"working model: {n} round{'s' if n != 1 else ''} of training not yet published{score}; "
            "it is served once it beats the served model on the held-out cases")


def interactive_text(status: dict[str, Any]) -> str:
    """Click to correct (``/gcml/status`` ``interactive``): off, or the served and candidate models' validation Dice
    with no click and after the gate's simulated clicks, from the last round that scored them."""
    it = status.get("interactive") or {}
    if not it.get("enabled"):
        return "click to correct: off (interactive.enabled in the site YAML turns on gcml_edit)"
    last = it.get("last_round")
    if not last:
        return "click to correct: on (gcml_edit); no round has scored clicks yet"
    k = (last.get("click_dice") or {}).get("clicks", it.get("gate_clicks"))
    who = "served" if "served" in (last.get("click_dice") or {}) else last.get("winner")
    zero = (last.get("zero_click_dice") or {}).get(who)
    clicked = (last.get("click_dice") or {}).get(who)
    if zero is None or clicked is None:
        return "click to correct: on (gcml_edit)"
    return (f"click to correct: on (gcml_edit); the {'served' if who == 'served' else who} model's validation mean "
            f"Dice {zero:.3f} with no click, {clicked:.3f} after {k} simulated clicks")


def training_text(status: dict[str, Any]) -> tuple[str, int | None]:
    """``(text, percent)``: the running round's progress, or the gossip schedule when idle."""
    t, g = status.get("training") or {}, status.get("gossip") or {}
    if t.get("running"):
        epoch, total = t.get("epoch") or 0, t.get("total_epochs") or 0
        pct = int(100 * epoch / total) if total else None
        loss = f", loss {t['loss']:.3f}" if isinstance(t.get("loss"), (int, float)) else ""
        return f"round running ({t.get('mode', 'round')}): epoch {epoch}/{total or '?'}{loss}", pct
    if g.get("paused"):
        sched = "gossip paused (Resume restarts scheduled rounds)"
    elif g.get("scheduler") and g.get("next_round_in_s") is not None:
        sched = f"next scheduled round in {max(0, g['next_round_in_s']) / 60:.0f} min"
    else:
        sched = "no scheduled rounds (Sync now starts one)"
    return f"idle; {sched}", None


def rollback_choices(status: dict[str, Any], history: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Versions one can roll back to (all but the served one), newest first, with their Dice and origin."""
    served = (status.get("served") or {}).get("version")
    published = {r["version"]: r for r in history if r.get("event") == "publish"}
    out = []
    for v in sorted(status.get("versions", []), reverse=True):
        if v == served:
            continue
        rec = published.get(v, {})
        mean = _mean(rec.get("val_dice") or {})
        dice = f"mean Dice {mean:.3f}" if mean is not None else "not validated"
        out.append((v, f"v{v}: {dice}, {published_how(rec.get('produced_by', ''), made_by=rec.get('made_by'))}"))
    return out


def active_rows(status: dict[str, Any]) -> list[dict[str, str]]:
    """The top unlabelled cases by disagreement (``/gcml/status`` ``active.disagreement.top``), one row each:
    ``case``, ``score`` and ``partners`` (those that disagree most first, with their ``1 - soft Dice``)."""
    top = (((status.get("active") or {}).get("disagreement") or {}).get("top")) or []
    rows = []
    for t in top:
        parts = sorted((t.get("partners") or {}).items(), key=lambda kv: -kv[1])
        rows.append({"case": str(t.get("id", "?")), "score": f"{float(t.get('score', 0.0)):.3f}",
                     "partners": ", ".join(f"{n} {d:.2f}" for n, d in parts) or "none yet (the model's own doubt)"})
    return rows


def active_text(status: dict[str, Any], now: float | None = None) -> str:
    """How current the Next Sample scores are: images scored and stale per method, when, from which models."""
    now = time.time() if now is None else now
    a = status.get("active")
    if not a:
        return "this server does not rank cases for labelling (GCML app before active learning)"
    lines = []
    partners = ", ".join(f"{n} v{v}" for n, v in sorted((a.get("partners") or {}).items())) or "no partner model yet"
    for m in ("disagreement", "epistemic"):
        s = a.get(m) or {}
        run = s.get("last_run") or {}
        when = _ago(run.get("started"), now) if run else "never"
        lines.append(f"{m}: {s.get('current', 0)} of {a.get('unlabelled', 0)} unlabelled cases scored, "
                     f"{s.get('stale', 0)} waiting; last run {when}")
    head = f"scores from v{a.get('served_version')} and {partners}" if a.get("served_version") else \
        "no model served yet: Next Sample picks at random"
    return head + "\n" + "\n".join(lines)
