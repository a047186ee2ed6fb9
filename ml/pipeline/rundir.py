"""The run folder: where pipeline stages hand over to each other. This module owns its file names.

One folder per pipeline run holds config.json, the bar snapshot, folds.json,
per-fold and per-seed checkpoints, report.json and model.onnx. JSON is written
without NaN/Infinity (as null), so every file is standard JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path

import pandas as pd
import torch

from ml.agent.policy import ActorCritic, load_policy
from ml.config import PipelineConfig, config_from_dict
from ml.evaluation.splits import CPCVFold, Fold
from ml.market.series import MarketSeries, align_bars, prepare_series


class RunFolder:
    """Paths of everything a pipeline run writes, under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    config = property(lambda self: self.root / "config.json")
    bars = property(lambda self: self.root / "bars.parquet")
    data = property(lambda self: self.root / "data.json")
    validation = property(lambda self: self.root / "validation.json")
    tracking = property(lambda self: self.root / "tracking.json")
    folds = property(lambda self: self.root / "folds.json")
    cpcv_folds = property(lambda self: self.root / "cpcv_folds.json")  # splits.method: cpcv
    cpcv_curves = property(lambda self: self.root / "cpcv_paths.csv")
    report = property(lambda self: self.root / "report.json")
    report_html = property(lambda self: self.root / "report.html")
    plots = property(lambda self: self.root / "plots")
    model = property(lambda self: self.root / "model.onnx")
    parity = property(lambda self: self.root / "parity.json")
    parity_windows = property(lambda self: self.root / "parity_windows.npz")
    registration = property(lambda self: self.root / "registration.json")
    judgement = property(lambda self: self.root / "gate_judgement.json")  # the gate's decision, before aliases move
    tuning = property(lambda self: self.root / "tuning.json")  # the study that picked this config (ml.tuning)

    def status(self, stage: str) -> Path:
        """How a stage of this run ended (done, failed or skipped, and why): one file per stage."""
        return self.root / "status" / f"{stage}.json"

    def fold(self, index: int) -> Path:
        """A fold's folder: the selected seed's policy.pt and history.json, and training.json."""
        return self.root / "folds" / f"fold_{index}"

    def seed(self, fold: int, seed: int) -> Path:
        """One seed's folder: policy.pt, history.json, validation_returns.npy, training.json and the
        resumable train_state.pt."""
        return self.fold(fold) / f"seed_{seed}"

    def cpcv_split(self, index: int) -> Path:
        """A CPCV split's folder: as a fold's, with its seeds' folders inside."""
        return self.root / "cpcv" / f"split_{index}"

    def cpcv_seed(self, split: int, seed: int) -> Path:
        return self.cpcv_split(split) / f"seed_{seed}"

    def test_equity(self, fold: int) -> Path:
        return self.root / f"fold_{fold}_test_equity.csv"

    def test_baselines(self, fold: int) -> Path:
        return self.root / f"fold_{fold}_test_baselines.csv"

    def test_trades(self, fold: int) -> Path:
        return self.root / f"fold_{fold}_test_trades.csv"

    def test_risk(self, fold: int) -> Path:
        return self.root / f"fold_{fold}_test_risk.csv"

    def plot(self, name: str) -> Path:
        return self.plots / f"{name}.png"

    def report_artifacts(self) -> list[Path]:
        """What goes into the MLflow run's ``report/`` folder (plots apart)."""
        fixed = [self.report, self.report_html, self.config, self.data, self.validation, self.folds, self.parity]
        optional = [path for path in (self.cpcv_folds, self.cpcv_curves, self.tuning) if path.exists()]
        return fixed + optional + sorted(self.root.glob("fold_*_test_*.csv"))


# File names inside a fold's or a seed's folder.
POLICY, HISTORY, TRAINING, TRAIN_STATE = "policy.pt", "history.json", "training.json", "train_state.pt"
# A seed's per-bar validation returns of every checkpoint its selection scored: float64 [trials, bars].
VALIDATION_RETURNS = "validation_returns.npy"


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(data), indent=2, sort_keys=False, default=str))
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def finite(value):
    """JSON has no NaN/Infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        return sha or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def training_fingerprint(config: PipelineConfig) -> str:
    """Hash of the settings that shape the trained model, the data apart (the dataset hash covers it).

    Where the bars come from, the gate, the registry and the device or thread count do not change
    what is learned, so they are left out: moving the lake or the tracking server retrains nothing.
    Nor do the settings of model options left off (encoder, quantile critic, regime features), so
    models trained before those options existed keep their hash.
    """
    settings = config.to_dict()
    for section in ("data", "gate", "registry"):
        settings.pop(section)
    ppo = settings["ppo"]
    unused = ["device", "threads"]
    if config.ppo.encoder == "mlp":
        unused += ["encoder", "encoder_channels"]
    if not config.return_window:
        unused.append("encoder_window")
    if not config.ppo.critic_quantiles:
        unused += ["critic_quantiles", "cvar_alpha", "cvar_weight"]
    if not config.ppo.regime_states:
        unused.append("regime_states")
    for key in unused:
        ppo.pop(key, None)
    if not config.action.selects_strategies:
        settings["action"].pop("strategies")
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def save_config(run: RunFolder, config: PipelineConfig) -> Path:
    return write_json(run.config, config.to_dict())


def read_config(run: RunFolder) -> PipelineConfig:
    return config_from_dict(read_json(run.config))


def read_bars(run: RunFolder) -> pd.DataFrame:
    return pd.read_parquet(run.bars)


def symbol_frames(bars: pd.DataFrame, symbols: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """The snapshot (every symbol in one table) split per symbol, in the configured order."""
    return {symbol: bars[bars["symbol"] == symbol].reset_index(drop=True) for symbol in symbols}


def read_market(run: RunFolder, config: PipelineConfig, device: torch.device) -> MarketSeries:
    """The run's bars as the series the config trains on."""
    return prepare_series(symbol_frames(read_bars(run), config.symbols), config.lookback, device,
                          config.return_window, config.action.selects_strategies)


def market_timestamps(run: RunFolder, config: PipelineConfig) -> pd.Series:
    """The bars folds are laid on: the bars every symbol has."""
    return align_bars(symbol_frames(read_bars(run), config.symbols))[0]


def read_folds(run: RunFolder) -> list[Fold]:
    return [Fold(index=f["index"], train=(f["train"]["first_bar"], f["train"]["last_bar"]),
                 validation=(f["validation"]["first_bar"], f["validation"]["last_bar"]),
                 test=(f["test"]["first_bar"], f["test"]["last_bar"]))
            for f in read_json(run.folds)]


def read_cpcv_folds(run: RunFolder) -> list[CPCVFold]:
    def bars(span: dict) -> tuple[int, int]:
        return span["first_bar"], span["last_bar"]
    return [CPCVFold(index=f["index"], test_groups=tuple(f["test_groups"]), validation_group=f["validation_group"],
                     train=tuple(bars(s) for s in f["train"]), validation=bars(f["validation"]),
                     test=tuple(bars(s) for s in f["test"]))
            for f in read_json(run.cpcv_folds)]


def load_agent(run: RunFolder, fold: int, seed: int | None = None) -> tuple[ActorCritic, dict]:
    """The fold's selected policy, or one seed's."""
    return load_agent_at(run.fold(fold) if seed is None else run.seed(fold, seed))


def load_agent_at(folder: Path) -> tuple[ActorCritic, dict]:
    """The policy kept in a fold's, a CPCV split's or a seed's folder."""
    checkpoint = torch.load(folder / POLICY, weights_only=True)
    return load_policy(checkpoint).actor_critic, checkpoint
