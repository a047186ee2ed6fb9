"""Run an exported policy: onnxruntime and numpy only (no torch, no Airflow).

    from ml.serving import Policy
    policy = Policy.load("models:/ppo_GSPC_1d@champion")   # or a path to model.onnx
    exposure = policy.decide(ohlcv_window, position)        # [B, L, 5], [B, 1] -> [B, 1]

A portfolio model (metadata ``symbols``) takes ``ohlcv`` [B, L, A, 5] with the assets
in that order and the current ``weights`` [B, A], and returns target weights [B, A].
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A model input that breaks the ONNX contract; the message names the field and the rule."""


def cuda_driver_present() -> bool:
    """True when an NVIDIA driver is installed (the GPU wheel lists CUDA even without one)."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def create_session(path: str | Path, prefer_gpu: bool = True,
                   intra_op_threads: int | None = None) -> ort.InferenceSession:
    """CUDA provider when a GPU is usable, else CPU (with a warning when a GPU is there but fails).

    ``intra_op_threads``: onnxruntime's CPU thread pool size (default: one per core). One thread
    gives the lowest single-decision latency; more only pay off for large batches.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    providers = ["CPUExecutionProvider"]
    if prefer_gpu and "CUDAExecutionProvider" in ort.get_available_providers() and cuda_driver_present():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    if prefer_gpu and providers[0] == "CUDAExecutionProvider" and session.get_providers()[0] != providers[0]:
        log.warning("CUDA execution provider unavailable; running %s on CPU", path)
    return session


def resolve_model_path(uri: str, tracking_uri: str | None = None) -> Path:
    """A local .onnx path as is; a ``models:/NAME@alias`` URI downloaded through MLflow."""
    if not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.exists():
            raise FileNotFoundError(f"{uri}: no ONNX model there")
        return path
    # MLflow is heavy and only needed for registry URIs; a service that loads a file never imports it.
    import mlflow.artifacts
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    # Explicit URIs for this download only: two loads from different stores in one process
    # (threads included) never see each other's store. MLflow resolves a `models:/` URI through the
    # process-wide registry whatever registry_uri says, so resolve it here with a client of this store.
    if uri.startswith("models:/"):
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        model = get_model_name_and_version(client, uri)  # (name, version), or (logged model id,)
        uri = (client.get_logged_model(model[0]).artifact_location if len(model) == 1
               else client.get_model_version_download_uri(*model))
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(),
                                                      tracking_uri=tracking_uri, registry_uri=tracking_uri))
    found = sorted(folder.rglob("*.onnx"))
    if not found:
        raise FileNotFoundError(f"{uri}: the model artifact holds no .onnx file")
    return found[0]


def _read_bars_file(path: Path):
    import pandas as pd

    frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    columns = {str(c).lower(): c for c in frame.columns}
    if "close" not in columns:
        raise InputError(f"{path}: no 'close' column")
    return frame, columns


def bars_to_window(path: str | Path, lookback: int) -> np.ndarray:
    """The last ``lookback`` bars of a CSV/parquet file as a [1, lookback, 5] window.

    Accepts yfinance-style (Open, High, Low, Close, Volume) or lower-case columns; a
    close-only file is filled the way the model was trained (close in O/H/L, volume 0).
    Uses pandas, which a service only needs when it reads files this way.
    """
    path = Path(path)
    frame, columns = _read_bars_file(path)
    if len(frame) < lookback:
        raise InputError(f"{path}: {len(frame)} bars, the model needs the last {lookback}")
    return _window(frame.tail(lookback), columns)


def portfolio_window(paths: list[str | Path], lookback: int) -> np.ndarray:
    """The last ``lookback`` bars every file has (matched on their date column) as [1, lookback, A, 5].

    The files are the assets in the model's order (its ``symbols`` metadata).
    """
    import pandas as pd

    frames = []
    for path in map(Path, paths):
        frame, columns = _read_bars_file(path)
        date = next((columns[c] for c in ("date", "datetime", "timestamp") if c in columns), None)
        if date is None:
            raise InputError(f"{path}: no Date/Datetime/timestamp column to align the assets on")
        frames.append((path, frame.set_index(pd.to_datetime(frame[date], utc=True)), columns))
    common = frames[0][1].index
    for _, frame, _ in frames[1:]:
        common = common.intersection(frame.index)
    if len(common) < lookback:
        raise InputError(f"{[str(p) for p, _, _ in frames]}: {len(common)} common bars, the model needs "
                         f"the last {lookback}")
    last = common.sort_values()[-lookback:]
    return np.stack([_window(frame.loc[last], columns)[0] for _, frame, columns in frames], axis=1)[None]


def _window(tail, columns: dict) -> np.ndarray:
    close = tail[columns["close"]].to_numpy(dtype=np.float64)
    fields = []
    for name in ("open", "high", "low", "close", "volume"):
        if name in columns and tail[columns[name]].notna().all():
            fields.append(tail[columns[name]].to_numpy(dtype=np.float64))
        else:
            fields.append(np.zeros_like(close) if name == "volume" else close)
    return np.stack(fields, axis=1)[None].astype(np.float32)


class Policy:
    """An exported policy with input checks.

    ``max_stale_bars``: refuse a window whose last closes repeat more than this many
    times in a row (a frozen feed); None turns the check off.
    """

    def __init__(self, path: str | Path, prefer_gpu: bool = True, max_stale_bars: int | None = 10,
                 intra_op_threads: int | None = None):
        self.path = Path(path)
        self.max_stale_bars = max_stale_bars
        self.session = create_session(self.path, prefer_gpu, intra_op_threads)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.lookback = int(self.metadata["lookback"])
        # Portfolio models name their assets; the asset axis of the inputs follows this order.
        self.symbols = self.metadata["symbols"].split(",") if self.metadata.get("symbols") else None

    @classmethod
    def load(cls, uri: str, tracking_uri: str | None = None, prefer_gpu: bool = True,
             intra_op_threads: int | None = None) -> "Policy":
        return cls(resolve_model_path(uri, tracking_uri), prefer_gpu, intra_op_threads=intra_op_threads)

    def validate(self, ohlcv: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs as float32 batches, checked against the contract; ``position`` is the weights of a portfolio."""
        assets = len(self.symbols) if self.symbols is not None else None
        name = "weights" if assets else "position"
        try:
            ohlcv = np.asarray(ohlcv, dtype=np.float32)
            position = np.asarray(position, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"ohlcv/{name}: not numeric ({exc})") from exc
        window = (self.lookback, assets, 5) if assets else (self.lookback, 5)
        width = assets or 1
        if ohlcv.ndim == len(window):
            ohlcv = ohlcv[None]
        if position.ndim == 1:
            position = position.reshape(-1, width)
        if ohlcv.shape[1:] != window:
            shape = ", ".join(map(str, window))
            raise InputError(f"ohlcv: shape {ohlcv.shape} must be [batch, {shape}]"
                             + (f" (assets {self.symbols})" if assets else ""))
        if position.shape != (ohlcv.shape[0], width):
            raise InputError(f"{name}: shape {position.shape} must be [{ohlcv.shape[0]}, {width}]")
        self._check_windows(ohlcv if assets else ohlcv[:, :, None, :])
        # max() propagates NaN, and NaN <= 1 is False: one comparison covers finite and range.
        if assets and not (position.min(initial=0.0) >= -1e-6 and position.sum(axis=1).max(initial=0.0) <= 1.0 + 1e-6):
            raise InputError("weights: must be finite, non-negative and sum to at most 1 (the rest is cash)")
        if not assets and not np.abs(position).max(initial=0.0) <= 1.0 + 1e-6:
            raise InputError("position: must be finite and within [-1, 1]")
        return ohlcv, position

    def _check_windows(self, ohlcv: np.ndarray) -> None:
        """NaN, non-positive closes and stale feeds in windows [B, L, A, 5], naming the window (and asset)."""
        # Checks are single reductions where possible: with a batch of one, each numpy call
        # costs a few microseconds however small the array.
        if not np.isfinite(ohlcv).all():
            row, _, asset, _ = np.argwhere(~np.isfinite(ohlcv))[0]
            raise InputError(f"ohlcv: window {int(row)}{self._asset(asset)} contains NaN or infinite values")
        if not ohlcv[..., 3].min(initial=np.inf) > 0:
            raise InputError("ohlcv: close prices must be strictly positive")
        if self.max_stale_bars is not None:
            tail = ohlcv[:, -(self.max_stale_bars + 1):, :, 3]
            # ndarray methods, not np.all(..., axis=): the module-level wrapper costs microseconds.
            moving = (tail[:, :-1] != tail[:, -1:]).any(axis=1)
            if not moving.all():
                row, asset = np.argwhere(~moving)[0]
                raise InputError(f"ohlcv: window {int(row)}{self._asset(asset)} ends with more than "
                                 f"{self.max_stale_bars} identical closes (stale feed)")

    def _asset(self, index) -> str:
        return f" asset {self.symbols[int(index)]}" if self.symbols is not None else ""

    def decide(self, ohlcv: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Target exposures [B, 1]; for a portfolio model ``position`` is the weights and this
        returns target weights [B, A]."""
        ohlcv, position = self.validate(ohlcv, position)
        if self.symbols is not None:
            return self.session.run(["target_weights"], {"ohlcv": ohlcv, "weights": position})[0]
        return self.session.run(["target_exposure"], {"ohlcv": ohlcv, "position": position})[0]
