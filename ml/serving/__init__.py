"""Run an exported policy: onnxruntime and numpy only (no torch, no Airflow).

    from ml.serving import Policy
    policy = Policy.load("models:/ppo_GSPC_1d@champion")   # or a path to model.onnx
    exposure = policy.decide(ohlcv_window, position)        # [B, L, 5], [B, 1] -> [B, 1]

A model trained with a risk overlay (metadata ``risk``) runs it inside the graph and needs the
account: ``decision = policy.decide_with_risk(window, position, nav, timestamps, state)`` returns
the executed target and the state to pass back with the next bar (``RiskDecision``).

A portfolio model (metadata ``symbols``) takes ``ohlcv`` [B, L, A, 5] with the assets
in that order and the current ``weights`` [B, A], and returns target weights [B, A].

Every window is held to the data gate's bar rules (``ml.serving.bars``) before the model
sees it: finite values, positive prices, non-negative volume, the OHLC order (for models that
read open/high/low), no abnormal one-bar jump, no stale feed; with ``timestamps``, bars unique,
increasing, not in the future and, with ``max_age``, recent enough.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ml.config import first_line
from ml.market.sessions import session_schedule
from ml.serving.bars import MAX_ABS_LOG_RETURN, BarRules, InputError
from ml.serving.files import bars_to_window, portfolio_window

__all__ = ["InputError", "ModelLoadError", "Policy", "RiskDecision", "bars_to_window", "create_session",
           "cuda_driver_present", "portfolio_window", "resolve_model_path"]

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """No usable model at that place: a missing or corrupt file, an unknown model, version or alias."""


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
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    # Explicit URIs for this download only: two loads from different stores in one process
    # (threads included) never see each other's store. MLflow resolves a `models:/` URI through the
    # process-wide registry whatever registry_uri says, so resolve it here with a client of this store.
    given = uri
    tracking_uri = _existing_store(given, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        if uri.startswith("models:/"):
            client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            model = get_model_name_and_version(client, uri)  # (name, version), or (logged model id,)
            uri = (client.get_logged_model(model[0]).artifact_location if len(model) == 1
                   else client.get_model_version_download_uri(*model))
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(),
                                                          tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except (MlflowException, OSError) as exc:  # unknown model, version or alias; an unreachable store
        raise ModelLoadError(f"{given}: {first_line(exc)}") from None
    found = sorted(folder.rglob("*.onnx"))
    if not found:
        raise FileNotFoundError(f"{uri}: the model artifact holds no .onnx file")
    return found[0]


def _existing_store(model_uri: str, tracking_uri: str | None) -> str:
    """The store to resolve a registry URI in, which must be named and, for SQLite, exist: MLflow
    would otherwise create an empty ``mlflow.db`` wherever the service happens to run."""
    if not tracking_uri:
        raise ModelLoadError(f"{model_uri}: no MLflow store named: pass tracking_uri (--tracking-uri) "
                             "or set MLFLOW_TRACKING_URI")
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise ModelLoadError(f"{model_uri}: no MLflow store at {database} (tracking URI {tracking_uri})")
    return tracking_uri


def _reads_ohlc(metadata: dict) -> bool:
    """Whether the model was trained on full bars (its windows must keep the OHLC order).

    The pipeline records ``close_only`` and the ``features``; a model without either is held
    to every rule.
    """
    if "close_only" in metadata:
        return metadata["close_only"] != "true"
    if metadata.get("features"):
        return any(name.startswith(("range_", "volume_")) for name in metadata["features"].split(","))
    return True


@dataclass
class RiskDecision:
    target: np.ndarray  # [B, A] the executed target: what the account should hold after the next fill
    policy_target: np.ndarray  # [B, A] the policy's own target, before the risk overlay
    state: np.ndarray  # [B, S] the overlay's memory: pass it back unchanged with the next bar


# The largest max_leverage a config accepts (ml.config.RiskConfig): the sanity bound on a held position.
MAX_POSITION = 10.0
# The overlay's state: these scalars, then an entry price and a stop cool-down per asset (the layout of
# ml.env.risk, which serving cannot import: it needs torch; a test holds the two together).
_RISK_STATE_SCALARS = 6


class Policy:
    """An exported policy with input checks.

    ``max_stale_bars``: refuse a window whose last closes repeat more than this many
    times in a row (a frozen feed). ``max_abs_log_return``: refuse a close-to-close move
    larger than this (the data gate's jump rule). ``max_age`` (a ``datetime.timedelta`` or
    ``numpy.timedelta64``): with timestamps, refuse a window whose last bar is older. None
    turns a check off.
    """

    def __init__(self, path: str | Path, prefer_gpu: bool = True, max_stale_bars: int | None = 10,
                 intra_op_threads: int | None = None, max_abs_log_return: float | None = MAX_ABS_LOG_RETURN,
                 max_age=None):
        self.path = Path(path)
        try:
            self.session = create_session(self.path, prefer_gpu, intra_op_threads)
            self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
            self.lookback = int(self.metadata["lookback"])
        except KeyError:
            raise ModelLoadError(f"{self.path}: no 'lookback' in the model metadata (not an exported policy)") from None
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            raise ModelLoadError(f"{self.path}: not a loadable ONNX model ({first_line(exc)})") from None
        # Portfolio models name their assets; the asset axis of the inputs follows this order.
        self.symbols = self.metadata["symbols"].split(",") if self.metadata.get("symbols") else None
        # A panel model: one graph for many symbols, each window with its symbol's feature statistics.
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.per_symbol = "normalization" in inputs
        self.n_features = inputs["normalization"][2] if self.per_symbol else None
        # The risk overlay's settings, when the model runs one (its session rules need them here).
        self.risk = json.loads(self.metadata["risk"]) if self.metadata.get("risk") else None
        self.rules = BarRules(reads_ohlc=_reads_ohlc(self.metadata), max_abs_log_return=max_abs_log_return,
                              max_stale_bars=max_stale_bars,
                              max_age=np.timedelta64(max_age, "ns") if max_age is not None else None,
                              symbols=tuple(self.symbols) if self.symbols else None)

    @classmethod
    def load(cls, uri: str, tracking_uri: str | None = None, prefer_gpu: bool = True,
             intra_op_threads: int | None = None, **checks) -> "Policy":
        """A path or an MLflow URI; ``checks`` are the keyword settings of the input checks."""
        try:
            path = resolve_model_path(uri, tracking_uri)
        except FileNotFoundError as exc:
            raise ModelLoadError(str(exc)) from None
        return cls(path, prefer_gpu, intra_op_threads=intra_op_threads, **checks)

    def validate(self, ohlcv: np.ndarray, position: np.ndarray,
                 timestamps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Inputs as float32 batches, checked against the contract; ``position`` is the weights of a portfolio.

        ``timestamps`` [B, L] (or [L] for every window): the bars' times as datetime64, UTC.
        """
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
        self.rules.check_windows(ohlcv if assets else ohlcv[:, :, None, :])
        if timestamps is not None:
            self.rules.check_timestamps(timestamps, ohlcv.shape[0], self.lookback)
        # max() propagates NaN, and NaN <= 1 is False: one comparison covers finite and range.
        # The share held at the last close drifts past the target's limit as prices move after the
        # fill (a short that rose, cash a little below zero after costs), and the policy was trained
        # on those drifted values: only a sanity bound (the largest max_leverage).
        limit = MAX_POSITION
        if assets and not (position.min(initial=0.0) >= -1e-6
                           and position.sum(axis=1).max(initial=0.0) <= limit + 1e-6):
            raise InputError(f"weights: must be finite, non-negative and sum to at most {limit:g} (the rest is cash)")
        if not assets and not np.abs(position).max(initial=0.0) <= limit + 1e-6:
            raise InputError(f"position: must be finite and within [-{limit:g}, {limit:g}]")
        return ohlcv, position

    def self_contained(self) -> "Policy":
        """This policy, refused when it is a panel model: for callers that cannot pass a symbol's
        statistics (the serve command, the HTTP service)."""
        if self.per_symbol:
            raise ModelLoadError(f"{self.path.name}: a panel model needs each symbol's feature statistics, "
                                 "which this command does not take; call ml.serving.Policy.decide(..., "
                                 "normalization=policy.normalization(symbol))")
        return self

    def normalization(self, symbol: str) -> np.ndarray:
        """[2, F] feature mean and std of a symbol the panel trained on (for another symbol, fit them
        on its own history with ``ml.market.panel.symbol_normalization``)."""
        table = json.loads(self.metadata.get("normalization") or "{}")
        if symbol not in table:
            raise InputError(f"symbol {symbol!r}: the model holds no feature statistics for it "
                             f"(it has {', '.join(sorted(table)) or 'none'}); fit them on its own history")
        return np.asarray(table[symbol], dtype=np.float32)

    def decide(self, ohlcv: np.ndarray, position: np.ndarray, timestamps: np.ndarray | None = None,
               normalization: np.ndarray | None = None) -> np.ndarray:
        """Target exposures [B, 1]; for a portfolio model ``position`` is the weights and this
        returns target weights [B, A]. ``timestamps``: see ``validate``. A panel model also takes
        the symbol's ``normalization`` ([2, F], or [B, 2, F] per window; see ``normalization``)."""
        ohlcv, position = self.validate(ohlcv, position, timestamps)
        if self.risk is not None:
            raise InputError("this model applies a risk overlay: call decide_with_risk(ohlcv, position, nav, "
                             "timestamps, state) so that its limits hold")
        if self.per_symbol:
            stats = self._checked_normalization(normalization, ohlcv.shape[0])
            return self.session.run(["target_exposure"], {"ohlcv": ohlcv, "position": position,
                                                          "normalization": stats})[0]
        if normalization is not None:
            raise InputError("normalization: this model normalizes inside its graph; pass none")
        if self.symbols is not None:
            return self.session.run(["target_weights"], {"ohlcv": ohlcv, "weights": position})[0]
        return self.session.run(["target_exposure"], {"ohlcv": ohlcv, "position": position})[0]

    def _checked_normalization(self, normalization, batch: int) -> np.ndarray:
        width = self.n_features
        if normalization is None:
            raise InputError("normalization: this panel model needs the symbol's feature statistics "
                             "(Policy.normalization(symbol), or fitted on the symbol's own history)")
        try:
            stats = np.asarray(normalization, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"normalization: must be numbers, [2, {width}] or [batch, 2, {width}]") from None
        if stats.ndim == 2:
            stats = np.broadcast_to(stats, (batch,) + stats.shape)
        if stats.shape != (batch, 2, width) or not np.isfinite(stats).all() or not (stats[:, 1] > 0).all():
            raise InputError(f"normalization: must be finite, [2, {width}] or [{batch}, 2, {width}], "
                             "the std row above 0")
        return np.ascontiguousarray(stats)

    def initial_risk_state(self, nav: np.ndarray) -> np.ndarray:
        """The overlay's state of fresh accounts [B, S] at ``nav`` [B]: at their peak, before any session."""
        nav = np.asarray(nav, dtype=np.float32).reshape(-1)
        state = np.zeros((len(nav), _RISK_STATE_SCALARS + 2 * (len(self.symbols or ()) or 1)), dtype=np.float32)
        state[:, 0], state[:, 1], state[:, 2], state[:, 3] = nav, nav, -1.0, nav
        return state

    def decide_with_risk(self, ohlcv: np.ndarray, position: np.ndarray, nav, timestamps,
                         state: np.ndarray | None = None) -> RiskDecision:
        """The executed target of a model with a risk overlay, for accounts at ``nav`` [B] (the
        account's value at the last bar's close, any currency). ``timestamps`` (required) give the
        session; ``state`` is what the previous call returned (None: a fresh account)."""
        if self.risk is None:
            raise InputError("this model has no risk overlay: call decide(ohlcv, position)")
        if timestamps is None:
            raise InputError("timestamps: required by the risk overlay (sessions and the loss limit follow them)")
        ohlcv, position = self.validate(ohlcv, position, timestamps)
        batch = ohlcv.shape[0]
        try:
            nav = np.asarray(nav, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise InputError("nav: must be numbers, one per window") from None
        if nav.shape != (batch,) or not (nav > 0).all() or not np.isfinite(nav).all():
            raise InputError(f"nav: must be {batch} finite values above 0, one per window")
        state = self.initial_risk_state(nav) if state is None else np.asarray(state, dtype=np.float32)
        expected = self.initial_risk_state(nav).shape
        if state.shape != expected or not np.isfinite(state).all():
            raise InputError(f"state: must be the finite [{expected[0]}, {expected[1]}] array the last decision "
                             "returned (or None for a fresh account)")
        stamps = np.asarray(timestamps)
        last = stamps[-1:] if stamps.ndim == 1 else stamps[:, -1]
        day, bars_left = session_schedule(np.broadcast_to(last, (batch,)), self.metadata["interval"],
                                          self.risk["session_timezone"], self.risk["session_close"])
        session = np.stack([day, bars_left], axis=1).astype(np.float32)
        held, target = ("weights", "target_weights") if self.symbols else ("position", "target_exposure")
        inputs = {"ohlcv": ohlcv, held: position, "nav": nav.reshape(-1, 1), "session": session, "risk_state": state}
        policy_target, executed, next_state = self.session.run([target, "executed_target", "next_risk_state"], inputs)
        return RiskDecision(target=executed, policy_target=policy_target.reshape(executed.shape), state=next_state)
