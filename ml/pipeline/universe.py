"""A run over a universe: one training per symbol, each in its own run folder, each stage on record.

    plan -> per target: load -> validate -> track -> folds -> train (per fold) -> evaluate
    -> export -> register -> summary (all targets)

A target is one model: a symbol of ``data.universe``, or the config's own symbol or portfolio.
The DAG maps every stage over the targets. A stage runs only when the stage before it finished
for the same target, and records how it ended (``status/<stage>.json`` in the target's folder),
so a failing symbol stops only itself and the summary can say per symbol what happened and why.

A target whose curated data (dataset hash) and training settings (``training_fingerprint``)
match the newest version registered under its model name is skipped after loading: retraining
it would register an identical model again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from ml.config import ConfigError, PipelineConfig, first_line
from ml.data.schema import DataError
from ml.data.validation import DataValidationError
from ml.pipeline.rundir import (RunFolder, read_config, read_json, save_config, training_fingerprint,
                                write_json)
from ml.release import registry
from ml.release.tracking import prepare_store, resolve_tracking

log = logging.getLogger(__name__)
# Each stage and the one that must have finished before it, for the same target.
REQUIRES = {"load": "plan", "validate": "load", "track": "validate", "folds": "track", "train": "folds",
            "evaluate": "train", "export": "evaluate", "register": "export"}
UNIVERSE_FILE, SUMMARY_FILE = "universe.json", "summary.json"
# Errors of the input (bars, settings), not of the machine: retrying them cannot help.
BAD_INPUT = (DataError, DataValidationError, ConfigError)


class NotRun(Exception):
    """The stage does not run for this target: its data is unchanged, or an earlier stage did not finish."""


def target_configs(config: PipelineConfig) -> list[PipelineConfig]:
    """One config per model: each symbol of ``data.universe``, else the config itself."""
    if not config.data.universe:
        return [config]
    return [replace(config, data=replace(config.data, symbol=symbol, universe=())).check()
            for symbol in config.data.universe]


def target_name(config: PipelineConfig) -> str:
    """The target's folder name: its symbols, as a file name ('^GSPC' -> 'GSPC')."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "", "_".join(config.symbols)) or "target"


def plan(run_root: Path, configs: list[PipelineConfig], force: bool = False) -> list[dict]:
    """A folder per target with its config; returns ``{target, run_dir}`` per target, one mapped task each.

    ``force`` retrains targets whose data and settings are unchanged.
    """
    run_root = Path(run_root)
    targets: dict[str, dict] = {}
    for config in configs:
        name = target_name(config)
        if name in targets:  # the same symbol twice (events of one symbol coalesce): train it once
            continue
        run = RunFolder(run_root / name)
        save_config(run, config)
        _record(run, "plan", "done", force=force)
        targets[name] = {"target": name, "run_dir": str(run.root)}
    write_json(run_root / UNIVERSE_FILE, list(targets.values()))
    log.info("universe of %d: %s", len(targets), ", ".join(targets))
    return list(targets.values())


def unchanged_since(run_dir: Path) -> str | None:
    """Why this target need not be retrained, or None: the newest registered version of its model
    was trained on the same dataset hash with the same training settings."""
    run = RunFolder(run_dir)
    if read_json(run.status("plan")).get("force"):
        return None
    config = read_config(run)
    uri, _ = resolve_tracking(config.registry.tracking_uri, config.registry.artifact_root, run.root)
    prepare_store(uri)
    latest = registry.latest_version(uri, config.model_name)
    if latest is None:
        return None
    version, tags = latest
    dataset_hash, settings = read_json(run.data)["dataset_hash"], training_fingerprint(config)
    if tags.get("dataset_hash") != dataset_hash or tags.get("config_hash") != settings:
        return None
    champion = registry.alias_version(uri, config.model_name, registry.CHAMPION)
    standing = "the champion" if champion == version else f"not promoted (champion: {champion or 'none'})"
    return (f"{config.model_name} v{version} ({standing}) was trained on the same data "
            f"(dataset hash {dataset_hash[:12]}) with the same training settings")


def skip_if_unchanged(run_dir: Path) -> None:
    reason = unchanged_since(run_dir)
    if reason:
        raise NotRun(f"unchanged: {reason}")


@contextmanager
def stage(run_dir: Path, name: str, fold: int | None = None) -> Iterator[None]:
    """Run the body as stage ``name`` of this target: only after the stage it requires finished,
    and with how it ended (done, skipped and why, failed and the error's first line) on record."""
    run = RunFolder(run_dir)
    key = name if fold is None else f"train_fold_{fold}"
    _require(run, name)
    try:
        yield
    except NotRun as reason:
        _record(run, key, "skipped", reason=str(reason))
        log.info("%s: %s skipped: %s", run.root.name, key, reason)
        raise
    except BaseException as exc:
        _record(run, key, "failed", error=_one_line(exc))
        raise
    _record(run, key, "done")


def fold_tasks(targets: list[dict]) -> list[dict]:
    """``{target, run_dir, fold}`` for every fold of every target whose folds were laid out."""
    tasks = []
    for target in targets:
        run = RunFolder(target["run_dir"])
        if _state(run, "folds") == "done":
            tasks += [target | {"fold": fold["index"]} for fold in read_json(run.folds)]
    return tasks


def summarize(run_root: Path) -> dict:
    """Per target: trained, skipped or failed; the version, whether it is champion, and why."""
    run_root = Path(run_root)
    rows = [_outcome(RunFolder(target["run_dir"]), target["target"])
            for target in read_json(run_root / UNIVERSE_FILE)]
    counts = {outcome: sum(row["outcome"] == outcome for row in rows) for outcome in ("trained", "skipped", "failed")}
    summary = {"targets": rows, "counts": counts}
    write_json(run_root / SUMMARY_FILE, summary)
    log.info("universe: %d trained, %d skipped, %d failed", counts["trained"], counts["skipped"], counts["failed"])
    for row in rows:
        version = f"v{row['version']}" if row.get("version") else "-"
        log.info("  %-12s %-8s %-5s %-9s %s", row["target"], row["outcome"], version,
                 "champion" if row.get("champion") else "", row["why"])
    return summary


def _outcome(run: RunFolder, name: str) -> dict:
    if run.registration.exists():
        registration = read_json(run.registration)
        gate = registration["gate"]
        failed = [reason for reason in gate["reasons"] if reason.startswith("FAIL")]
        if failed:
            why = "gate failed: " + "; ".join(failed)
        elif registration["champion"]:
            why = "gate passed, promoted"
        else:
            why = "gate passed, not promoted" + ("" if registration.get("promote_requested", True)
                                                 else " (registry.promote is off)")
        return {"target": name, "outcome": "trained", "model_name": registration["model_name"],
                "version": registration["version"], "champion": registration["champion"], "why": why}
    for key in _stage_keys(run):
        status = read_json(run.status(key))
        if status["state"] == "skipped" and key == "load":
            return {"target": name, "outcome": "skipped", "why": status["reason"]}
        if status["state"] == "failed":
            return {"target": name, "outcome": "failed", "why": f"{key}: {status['error']}"}
    finished = [key for key in _stage_keys(run) if _state(run, key) == "done"]
    last = finished[-1] if finished else "plan"
    return {"target": name, "outcome": "failed",
            "why": f"stopped after {last}: the next task left no record (killed, timed out or never ran)"}


def _stage_keys(run: RunFolder) -> list[str]:
    """The target's recorded stages, in pipeline order."""
    order = ["plan", "load", "validate", "track", "folds"]
    folds = [f"train_fold_{fold['index']}" for fold in read_json(run.folds)] if run.folds.exists() else []
    return [key for key in order + folds + ["evaluate", "export", "register"] if run.status(key).exists()]


def _require(run: RunFolder, name: str) -> None:
    needed = REQUIRES[name]
    if needed == "train":
        folds = read_json(run.folds) if run.folds.exists() else []
        missing = [fold["index"] for fold in folds if _state(run, f"train_fold_{fold['index']}") != "done"]
        if not folds or missing:
            raise NotRun(f"{run.root.name}: {name} needs every fold trained; not trained: folds {missing}")
        return
    state = _state(run, needed)
    if state != "done":
        raise NotRun(f"{run.root.name}: {name} needs {needed}, which " + ("did not run" if state is None else state))


def _state(run: RunFolder, key: str) -> str | None:
    path = run.status(key)
    return read_json(path)["state"] if path.exists() else None


def _record(run: RunFolder, key: str, state: str, **details) -> None:
    write_json(run.status(key), {"state": state, "at": datetime.now(timezone.utc).isoformat(), **details})


def _one_line(exc: BaseException) -> str:
    """The error's type and first line."""
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
