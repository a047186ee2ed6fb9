"""The run folder: where pipeline stages hand over to each other, and how they read it.

One folder per pipeline run holds config.json, the bar snapshot, folds.json,
per-fold checkpoints, report.json and model.onnx. JSON is written without
NaN/Infinity (as null), so every file is standard JSON.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pandas as pd
import torch

from ml.config import PipelineConfig, config_from_dict
from ml.evaluation.splits import Fold
from ml.policy import ActorCritic, load_policy


def write_json(path: Path, data) -> Path:
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
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        return sha or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_config(run_dir: Path, config: PipelineConfig) -> Path:
    return write_json(Path(run_dir) / "config.json", config.to_dict())


def read_config(run_dir: Path) -> PipelineConfig:
    return config_from_dict(read_json(Path(run_dir) / "config.json"))


def read_bars(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / "bars.parquet")


def symbol_frames(bars: pd.DataFrame, symbols: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """A portfolio snapshot (all symbols in one table) split per symbol, in the configured order."""
    return {symbol: bars[bars["symbol"] == symbol].reset_index(drop=True) for symbol in symbols}


def read_market(run_dir: Path, config: PipelineConfig, device: torch.device):
    """The run's bars as the training series: a ``MarketSeries``, or a ``PortfolioSeries``."""
    return prepare_market(read_bars(run_dir), config, device)


def prepare_market(bars: pd.DataFrame, config: PipelineConfig, device: torch.device):
    """Bars (all symbols of a portfolio in one table) as the series the config trains on."""
    from ml.market import prepare_series
    from ml.portfolio import prepare_portfolio

    if config.portfolio:
        return prepare_portfolio(symbol_frames(bars, config.data.symbols), config.lookback, device)
    return prepare_series(bars, config.lookback, device)


def market_timestamps(run_dir: Path, config: PipelineConfig) -> pd.Series:
    """The bars folds are laid on: every bar, or in portfolio mode the bars all symbols share."""
    from ml.portfolio import align_bars

    bars = read_bars(run_dir)
    if config.portfolio:
        return align_bars(symbol_frames(bars, config.data.symbols))[0]
    return bars["timestamp"].reset_index(drop=True)


def read_folds(run_dir: Path) -> list[Fold]:
    return [Fold(index=f["index"], train=(f["train"]["first_bar"], f["train"]["last_bar"]),
                 validation=(f["validation"]["first_bar"], f["validation"]["last_bar"]),
                 test=(f["test"]["first_bar"], f["test"]["last_bar"]))
            for f in read_json(Path(run_dir) / "folds.json")]


def load_agent(run_dir: Path, fold: int, seed: int | None = None) -> tuple[ActorCritic, dict]:
    """The fold's selected policy, or one seed's."""
    folder = Path(run_dir) / "folds" / f"fold_{fold}"
    if seed is not None:
        folder = folder / f"seed_{seed}"
    checkpoint = torch.load(folder / "policy.pt", weights_only=True)
    return load_policy(checkpoint).actor_critic, checkpoint
