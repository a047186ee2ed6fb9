"""A versioned market-data lake of parquet partitions, on local disk or S3.

Layout under the root (a folder, or ``s3://bucket/prefix``)::

    raw/interval=1d/symbol=SPY/<pull_id>.parquet          every pull, exactly as pulled
    curated/interval=1d/symbol=SPY/_versions/<hash>.parquet   every curated version, by content hash
    curated/interval=1d/symbol=SPY/_manifest.json         the current version's hash, and the history
    curated/interval=1d/symbol=SPY/bars.parquet           a copy of the current version, for dataset readers
    quarantine/interval=1d/symbol=SPY/<pull_id>/bars.parquet + validation.json + validation.html

A curated update is one atomic step: the new series is stored as an immutable
version object named by its content hash, then the manifest (one object) is
swapped to name it. Readers read the version the manifest names, so they see
the old series or the new one, never new bars with an old manifest. An update
interrupted before the swap leaves only an unreferenced version object; the
retry builds the same series, finds that object, swaps the manifest and
reports ``updated``. ``bars.parquet`` is refreshed from the version after the
swap; it may lag after a failure (the next pull repairs it) but is never
newer than the manifest.

Names starting with ``_`` or ``.`` are skipped by parquet dataset readers, so
``pd.read_parquet(ROOT + "/curated", partitioning=None)`` reads every current
series at once (the files carry symbol and interval as columns already).

Writes never leave a half-written object: a local file is written to a temp
file and renamed over the target; an S3 PUT is atomic by itself (readers see
the old object or the new one). The manifest swap is compare-and-swap against
the manifest that was read (S3 ``If-Match``, a directory lock locally), so two
writers cannot silently drop each other's bars; raw, version and quarantine
objects are create-only, so nothing stored is ever overwritten.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ml.data.report import render_validation_html
from ml.data.schema import BAR_COLUMNS, DataError, content_hash
from ml.data.storage import ANY, LakeConflictError, LocalStore, S3Store
from ml.data.validation import DataValidationError, ValidationConfig, ValidationResult, validate_bars

log = logging.getLogger(__name__)

LAKE_ROOT_ENV = "ML_LAKE_ROOT"
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_COPY_TRIES = 5  # bars.parquet refreshes lost to other writers before leaving it to the next pull
_NAME_RE = re.compile(r"^[A-Za-z0-9^._=-]+$")  # tickers like ^GSPC, BRK-B, EURUSD=X


class QuarantinedError(DataValidationError):
    """A batch failed the gate and was stored under ``location`` instead of curated;
    ``report_url`` is the human-readable page of the failed rules."""

    def __init__(self, result: ValidationResult, location: str, curated_hash: str | None):
        super().__init__(result)
        self.location = location
        self.report_url = f"{location}/validation.html"
        self.curated_hash = curated_hash


def new_pull_id() -> str:
    """Sortable by time and unique per pull, so raw pulls are never overwritten."""
    return f"{pd.Timestamp.now(tz='UTC'):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:6]}"


def default_root() -> str:
    """``$ML_LAKE_ROOT``, else ``lake/`` in the project checkout."""
    return os.environ.get(LAKE_ROOT_ENV) or str(Path(__file__).resolve().parents[2] / "lake")


# The lake -------------------------------------------------------------------------------------

@dataclass
class CurateResult:
    symbol: str
    interval: str
    status: str  # updated | unchanged
    rows: int  # curated rows after this batch
    rows_added: int  # bars at new timestamps
    rows_revised: int  # stored bars whose values the batch replaced
    curated_hash: str
    previous_hash: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def _to_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _conform(frame: pd.DataFrame) -> pd.DataFrame:
    """Schema column order and the timestamp unit, so hashes do not depend on how a frame was made."""
    frame = frame.loc[:, list(BAR_COLUMNS)].copy()
    frame["timestamp"] = frame["timestamp"].astype("datetime64[ns, UTC]")
    return frame.reset_index(drop=True)


def _single(bars: pd.DataFrame, column: str) -> str:
    values = bars[column].unique()
    if len(values) != 1:
        raise DataError(f"a lake batch holds one {column}; got {list(values)[:5]}")
    return str(values[0])  # Lake.partition checks it can name a folder


def merge_bars(existing: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """Stored bars plus a batch; the batch wins where timestamps repeat (revisions)."""
    if existing is None or existing.empty:
        return new.reset_index(drop=True)
    kept = existing[~existing["timestamp"].isin(new["timestamp"])]
    merged = pd.concat([kept, new], ignore_index=True)
    # A batch that is itself out of order is left so, for the gate to report it.
    if new["timestamp"].is_monotonic_increasing:
        merged = merged.sort_values("timestamp", kind="stable")
    return merged.reset_index(drop=True)


def _revised(existing: pd.DataFrame | None, new: pd.DataFrame) -> int:
    if existing is None or existing.empty:
        return 0
    fields = ["timestamp", "open", "high", "low", "close", "volume"]
    both = existing[fields].merge(new[fields], on="timestamp", suffixes=("_old", "_new"))
    changed = pd.Series(False, index=both.index)
    for field in fields[1:]:
        old, new_ = both[f"{field}_old"], both[f"{field}_new"]
        changed |= ~((old == new_) | (old.isna() & new_.isna()))
    return int(changed.sum())


class Lake:
    """Raw, curated and quarantined bars by symbol and interval; see the module docstring."""

    def __init__(self, root: str | Path | None = None, endpoint_url: str | None = None):
        root = str(root or default_root())
        if root.startswith("s3://"):
            bucket, _, prefix = root[len("s3://"):].partition("/")
            endpoint_url = (endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
                            or os.environ.get("AWS_ENDPOINT_URL") or None)
            self._store = S3Store(bucket, prefix.strip("/"), endpoint_url)
        else:
            self._store = LocalStore(Path(root).expanduser().resolve())
        self.root = root

    def __repr__(self) -> str:
        return f"Lake({self.root!r})"

    # Keys
    @staticmethod
    def partition(zone: str, symbol: str, interval: str) -> str:
        for value in (symbol, interval):
            if not _NAME_RE.match(value) or value.startswith("."):
                raise DataError(f"'{value}' cannot name a lake partition (rule: {_NAME_RE.pattern})")
        return f"{zone}/interval={interval}/symbol={symbol}"

    def _curated(self, symbol: str, interval: str, name: str = "bars.parquet") -> str:
        return f"{self.partition('curated', symbol, interval)}/{name}"

    def _version(self, symbol: str, interval: str, digest: str) -> str:
        if not _HASH_RE.match(str(digest)):
            raise DataError(f"'{digest}' is not a content hash (64 hex digits)")
        return self._curated(symbol, interval, f"_versions/{digest}.parquet")

    def url(self, key: str) -> str:
        return self._store.url(key)

    # Frames
    def _read_frame(self, key: str) -> tuple[pd.DataFrame | None, str | None]:
        found = self._store.read(key)
        if found is None:
            return None, None
        data, token = found
        return _conform(pd.read_parquet(io.BytesIO(data))), token

    def _read_json(self, key: str) -> dict | None:
        found = self._store.read(key)
        return json.loads(found[0]) if found else None

    def _write_json(self, key: str, payload: dict, expect=ANY) -> None:
        self._store.write(key, json.dumps(payload, indent=2, default=str).encode(), expect)

    # Raw
    def write_raw(self, bars: pd.DataFrame, pull_id: str) -> str:
        """Store a pull as it came; a repeated pull id is fine only with the same content."""
        key = f"{self.partition('raw', _single(bars, 'symbol'), _single(bars, 'interval'))}/{pull_id}.parquet"
        try:
            self._store.write(key, _to_bytes(bars.reset_index(drop=True)), expect=None)
        except LakeConflictError:
            stored, _ = self._read_frame(key)
            if stored is None or content_hash(stored) != content_hash(_conform(bars)):
                raise LakeConflictError(f"{self.url(key)}: pull id reused for different bars") from None
        return key

    def raw_pulls(self, symbol: str, interval: str) -> list[str]:
        keys = self._store.list(self.partition("raw", symbol, interval))
        return [Path(k).stem for k in keys if k.endswith(".parquet")]

    def read_raw(self, symbol: str, interval: str, pull_id: str) -> pd.DataFrame:
        data = self._store.read(f"{self.partition('raw', symbol, interval)}/{pull_id}.parquet")
        if data is None:
            raise DataError(f"{self.root}: no raw pull '{pull_id}' for {symbol} {interval}")
        return pd.read_parquet(io.BytesIO(data[0]))

    # Curated
    def _manifest(self, symbol: str, interval: str) -> tuple[dict, str | None]:
        """The manifest and its token (None when there is none yet), for the swap."""
        key = self._curated(symbol, interval, "_manifest.json")
        found = self._store.read(key)
        if found is None:
            return {"symbol": symbol, "interval": interval, "current": None, "history": []}, None
        try:
            manifest = json.loads(found[0])
            current = manifest["current"]
            if not isinstance(manifest["history"], list) or not (
                    current is None or _HASH_RE.match(current["hash"])):
                raise ValueError
        except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
            raise DataError(f"{self.url(key)}: not a lake manifest (rule: JSON with 'history' and a 'current' "
                            "entry whose 'hash' is 64 hex digits)") from None
        return manifest, found[1]

    def _current(self, symbol: str, interval: str) -> tuple[dict, str | None, pd.DataFrame | None, bytes | None]:
        """The manifest, its token, and the bars (frame and stored bytes) of the version it names."""
        manifest, token = self._manifest(symbol, interval)
        if manifest["current"] is None:
            return manifest, token, None, None
        digest = manifest["current"]["hash"]
        frame, data = self._read_version(symbol, interval, digest)
        if frame is None:
            raise DataError(f"{self.url(self._curated(symbol, interval, '_manifest.json'))}: names version "
                            f"{digest}, which is not stored")
        return manifest, token, frame, data

    def _read_version(self, symbol: str, interval: str, digest: str) -> tuple[pd.DataFrame | None, bytes | None]:
        key = self._version(symbol, interval, digest)
        found = self._store.read(key)
        if found is None:
            return None, None
        frame = _conform(pd.read_parquet(io.BytesIO(found[0])))
        if content_hash(frame) != digest:
            raise DataError(f"{self.url(key)}: content hash {content_hash(frame)} does not match its name")
        return frame, found[0]

    def timestamps(self, symbol: str, interval: str) -> pd.Series:
        """Curated bar times, oldest first (empty when nothing is curated yet)."""
        current = self._manifest(symbol, interval)[0]["current"]
        found = self._store.read(self._version(symbol, interval, current["hash"])) if current else None
        if found is None:
            return pd.Series([], dtype="datetime64[ns, UTC]")
        frame = pd.read_parquet(io.BytesIO(found[0]), columns=["timestamp"])
        return frame["timestamp"].astype("datetime64[ns, UTC]").reset_index(drop=True)

    def read_curated(self, symbol: str, interval: str, version: str | None = None) -> pd.DataFrame:
        return self.snapshot(symbol, interval, version)[0]

    def snapshot(self, symbol: str, interval: str, version: str | None = None) -> tuple[pd.DataFrame, str]:
        """Current curated bars (the version the manifest names, or the version with that
        content hash) and their content hash."""
        if version:
            frame, _ = self._read_version(symbol, interval, version)
            if frame is None:
                raise DataError(f"{self.root}: no version {version} for {symbol} {interval}")
            return frame, version
        manifest, _, frame, _ = self._current(symbol, interval)
        if frame is None:
            raise DataError(f"{self.root}: no curated data for {symbol} {interval}")
        return frame, manifest["current"]["hash"]

    def manifest(self, symbol: str, interval: str) -> dict:
        return self._manifest(symbol, interval)[0]

    def symbols(self, interval: str, zone: str = "curated") -> list[str]:
        keys = self._store.list(f"{zone}/interval={interval}")
        if zone == "curated":  # curated once its manifest exists (a lone version is an unfinished update)
            keys = [k for k in keys if k.endswith("/_manifest.json")]
        return sorted({k.split("symbol=", 1)[1].split("/", 1)[0] for k in keys if "symbol=" in k})

    def curate(self, bars: pd.DataFrame, config: ValidationConfig | None = None, *,
               pull_id: str | None = None) -> CurateResult:
        """Merge a batch into curated after the whole merged series passes the gate.

        The merged series is validated (not just the batch) because the
        multi-row rules (jumps, gaps) must also hold at the seam. On failure
        the batch and its validation result go to quarantine, curated is not
        touched, and QuarantinedError (a DataValidationError) is raised.
        The update itself is the manifest swap (see the module docstring);
        LakeConflictError means another writer swapped it first.
        """
        symbol, interval = _single(bars, "symbol"), _single(bars, "interval")
        bars, pull_id = _conform(bars), pull_id or new_pull_id()
        manifest_key = self._curated(symbol, interval, "_manifest.json")
        manifest, token, existing, stored = self._current(symbol, interval)
        previous = manifest["current"]["hash"] if manifest["current"] else None
        merged = merge_bars(existing, bars)
        digest = content_hash(merged)
        known = set(existing["timestamp"]) if existing is not None else set()
        outcome = CurateResult(symbol, interval, "updated", len(merged),
                               int((~bars["timestamp"].isin(known)).sum()), _revised(existing, bars),
                               digest, previous)
        if digest == previous:
            # Nothing new: leave curated (and its ingestion times) exactly as it is.
            self._refresh_copy(symbol, interval, previous, stored)
            return CurateResult(symbol, interval, "unchanged", len(existing), 0, 0, previous, previous)

        result = validate_bars(merged, f"{self.url(manifest_key)} + pull {pull_id}", config or ValidationConfig())
        if not result.success:
            raise QuarantinedError(result, self._quarantine(bars, result, pull_id, previous), previous)

        data = _to_bytes(merged)
        try:
            self._store.write(self._version(symbol, interval, digest), data, expect=None)
        except LakeConflictError:
            # Content-addressed: an earlier update of this very series stored it and did not
            # finish; finish it now, keeping the stored object (and its ingestion times).
            data = self._read_version(symbol, interval, digest)[1] or data
            log.info("%s %s: finishing an interrupted update to version %s", symbol, interval, digest)
        entry = {"hash": digest, "rows": len(merged), "first": str(merged["timestamp"].iloc[0]),
                 "last": str(merged["timestamp"].iloc[-1]), "pull_id": pull_id,
                 "rows_added": outcome.rows_added, "rows_revised": outcome.rows_revised,
                 "curated_at": pd.Timestamp.now(tz="UTC").isoformat()}
        manifest["current"] = entry
        manifest["history"].append(entry)
        self._write_json(manifest_key, manifest, expect=token)  # the update: token None is create-only
        log.info("%s %s: curated %s -> %s (%d rows, %d added, %d revised)", symbol, interval, previous, digest,
                 len(merged), outcome.rows_added, outcome.rows_revised)
        self._refresh_copy(symbol, interval, digest, data)
        return outcome

    def _refresh_copy(self, symbol: str, interval: str, digest: str, data: bytes) -> None:
        """Make ``bars.parquet`` a copy of version ``digest`` while the manifest still names it.

        Compare-and-swap against the copy read just before the manifest check, so a
        slower writer of an older version cannot overwrite the copy of a newer one.
        A failure here is logged, not raised: the update is already in the manifest.
        """
        key = self._curated(symbol, interval)
        try:
            for _ in range(_COPY_TRIES):
                found = self._store.read(key)
                if found is not None and found[0] == data:
                    return
                if (self._manifest(symbol, interval)[0]["current"] or {}).get("hash") != digest:
                    return  # a newer update owns the copy
                try:
                    self._store.write(key, data, expect=found[1] if found else None)
                    return
                except LakeConflictError:
                    continue  # another writer refreshed it meanwhile: look again
            log.warning("%s: kept changing under this writer; left for the next pull", self.url(key))
        except Exception as exc:  # any storage failure: the update stands, the next pull repairs the copy
            log.warning("%s: copy of version %s not refreshed (%s: %s); readers use the manifest, "
                        "the next pull repairs it", self.url(key), digest, type(exc).__name__, exc)

    # Quarantine
    def _quarantine(self, bars: pd.DataFrame, result: ValidationResult, pull_id: str,
                    curated_hash: str | None) -> str:
        prefix = f"{self.partition('quarantine', _single(bars, 'symbol'), _single(bars, 'interval'))}/{pull_id}"
        report = {"pull_id": pull_id, "quarantined_at": pd.Timestamp.now(tz="UTC").isoformat(),
                  "batch_rows": len(bars), "checked_rows": result.rows, "curated_hash": curated_hash,
                  "failed_rules": [rule.rule for rule in result.failed], "validation": result.as_dict()}
        files = (("bars.parquet", _to_bytes(bars), None),
                 ("validation.json", json.dumps(report, indent=2, default=str).encode(), "application/json"),
                 ("validation.html", render_validation_html(report).encode(), "text/html; charset=utf-8"))
        for name, data, content_type in files:
            try:
                self._store.write(f"{prefix}/{name}", data, expect=None, content_type=content_type)
            except LakeConflictError:
                pass  # this pull was quarantined before; keep the first record
        return self.url(prefix)

    def quarantined(self, symbol: str, interval: str) -> list[str]:
        keys = self._store.list(self.partition("quarantine", symbol, interval))
        return sorted({k.rsplit("/", 2)[-2] for k in keys})

    def read_quarantine(self, symbol: str, interval: str, pull_id: str) -> tuple[pd.DataFrame, dict]:
        prefix = f"{self.partition('quarantine', symbol, interval)}/{pull_id}"
        data = self._store.read(f"{prefix}/bars.parquet")
        report = self._read_json(f"{prefix}/validation.json")
        if data is None or report is None:
            raise DataError(f"{self.url(prefix)}: no quarantined batch")
        return pd.read_parquet(io.BytesIO(data[0])), report
