"""The HTTP API over the served policy (FastAPI); ``run_http`` serves it with uvicorn.

    GET  /health         status, the version served, the last alias check and any reload error
    GET  /model          the version and what it expects: lookback, interval, assets, risk overlay
    POST /decide         one window -> one decision
    POST /decide/batch   {"windows": [window, ...]} -> {"decisions": [...]}, one model call for all

A window is ``ohlcv`` (``lookback`` bars, oldest first, each [open, high, low, close, volume]; a
portfolio model takes one such bar per asset at each step, in the order of its symbols), the
account's ``position`` (one asset) or ``weights`` (a portfolio), and optional bar ``timestamps``
(ISO 8601; UTC when they carry no zone). A model with a risk overlay also takes the account's
``nav`` and the ``risk_state`` its last decision returned, and needs the timestamps.

Every answer names the ``model_version`` that made it. Input that breaks a rule gets 422 with
``{"detail": one line}`` naming the field and the rule: the library's own checks (``ml.serving``)
in the CLI's words. A body that is not JSON gets 400.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ml.service.champion import Champion, Served
from ml.serving import InputError

log = logging.getLogger(__name__)

MAX_BATCH = 4096


class Window(BaseModel):
    """One account's bars and holdings at the last bar."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored

    ohlcv: list = Field(description="lookback bars, oldest first: [open, high, low, close, volume] each; "
                                    "a portfolio model takes [[o, h, l, c, v] per asset] each")
    position: float | None = Field(None, description="one-asset models: the current exposure in [-1, 1]")
    weights: list[float] | None = Field(None, description="portfolio models: the current weight of each asset")
    timestamps: list[datetime.datetime] | None = Field(None, description="each bar's time, ISO 8601 (UTC "
                                                                         "without a zone)")
    nav: float | None = Field(None, description="risk-overlay models: the account's value at the last close")
    risk_state: list[float] | None = Field(None, description="risk-overlay models: what the previous "
                                                             "decision returned (none for a fresh account)")


class Batch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    windows: list[Window] = Field(min_length=1)


WINDOW_SCHEMA = Window.model_json_schema()
BATCH_SCHEMA = {"type": "object", "required": ["windows"], "additionalProperties": False,
                "properties": {"windows": {"type": "array", "minItems": 1, "items": WINDOW_SCHEMA}}}


def _body(schema: dict) -> dict:
    """The request body for the OpenAPI page (/docs): the routes parse it themselves."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _utc(times: list[datetime.datetime]) -> np.ndarray:
    """Bar times as naive UTC datetime64 (what ``Policy.validate`` compares); naive ones are taken as UTC."""
    naive = [t.astimezone(datetime.timezone.utc).replace(tzinfo=None) if t.tzinfo else t for t in times]
    return np.array(naive, dtype="datetime64[ns]")


def _numbers(value: list, field: str, shape: tuple[int, ...], meaning: str) -> np.ndarray:
    rule = f"must be [{', '.join(map(str, shape))}]: {meaning}"
    try:
        array = np.asarray(value)
    except ValueError:  # ragged: bars of different lengths
        raise InputError(f"{field}: {rule}") from None
    if array.dtype.kind not in "iuf":  # text, booleans, nulls
        raise InputError(f"{field}: numbers only; {rule}")
    if array.shape != shape:
        raise InputError(f"{field}: shape {list(array.shape)}, {rule}")
    return array.astype(np.float32)


def _inputs(policy, windows: list[Window], batch: bool) -> dict:
    """The batch arrays for the library, each window's fields checked against what this model takes."""
    symbols, lookback = policy.symbols, policy.lookback
    if symbols:
        shape, meaning = (lookback, len(symbols), 5), (f"{lookback} bars, oldest first, each one "
                                                      f"[open, high, low, close, volume] per asset {symbols}")
    else:
        shape, meaning = (lookback, 5), f"{lookback} bars, oldest first, each [open, high, low, close, volume]"
    state_size = policy.initial_risk_state(np.ones(1)).shape[1] if policy.risk else 0
    ohlcv, held, times, navs, states = [], [], [], [], []
    timed = windows[0].timestamps is not None
    for i, window in enumerate(windows):
        where = f"windows[{i}]." if batch else ""
        ohlcv.append(_numbers(window.ohlcv, f"{where}ohlcv", shape, meaning))
        if symbols:
            if window.position is not None:
                raise InputError(f"{where}position: this portfolio model takes weights, one per asset {symbols}")
            if window.weights is None:
                raise InputError(f"{where}weights: required: the current weight of each asset {symbols} "
                                 "(0 for one not held)")
            if len(window.weights) != len(symbols):
                raise InputError(f"{where}weights: {len(window.weights)} values for the assets {symbols}")
            held.append(window.weights)
        else:
            if window.weights is not None:
                raise InputError(f"{where}weights: this model trades one asset: send position")
            if window.position is None:
                raise InputError(f"{where}position: required: the current exposure in [-1, 1] (0 when flat)")
            held.append([window.position])
        if (window.timestamps is not None) != timed:
            raise InputError(f"{where}timestamps: send them with every window of a batch or with none")
        if timed:
            if len(window.timestamps) != lookback:
                raise InputError(f"{where}timestamps: {len(window.timestamps)} times, must be {lookback}, one per bar")
            times.append(_utc(window.timestamps))
        if policy.risk is None:
            if window.nav is not None or window.risk_state is not None:
                raise InputError(f"{where}{'nav' if window.nav is not None else 'risk_state'}: this model has no "
                                 "risk overlay: send neither nav nor risk_state")
            continue
        if window.nav is None:
            raise InputError(f"{where}nav: required by this model's risk overlay: the account's value at the "
                             "last bar's close")
        if window.risk_state is not None and (len(window.risk_state) != state_size
                                              or not np.isfinite(window.risk_state).all()):
            raise InputError(f"{where}risk_state: must be the {state_size} finite numbers the last decision "
                             f"returned, got {len(window.risk_state)} (none for a fresh account)")
        navs.append(window.nav)
        states.append(window.risk_state)
    return {"ohlcv": np.stack(ohlcv), "held": np.array(held, dtype=np.float32),
            "timestamps": np.stack(times) if timed else None, "nav": navs, "states": states}


def _decide(served: Served, windows: list[Window], batch: bool) -> list[dict]:
    """The library's decisions, one dict per window (raises ``InputError`` with its rule)."""
    policy = served.policy
    inputs = _inputs(policy, windows, batch)
    name = (lambda row: dict(zip(policy.symbols, map(float, row)))) if policy.symbols else (lambda row: float(row[0]))
    key = "target_weights" if policy.symbols else "target_exposure"
    if policy.risk is None:
        target = policy.decide(inputs["ohlcv"], inputs["held"], inputs["timestamps"])
        return [{key: name(row)} for row in target]
    nav = np.array(inputs["nav"], dtype=np.float32)  # checked by the library: finite and above 0
    state = policy.initial_risk_state(nav)  # a fresh account's, for the windows that bring none
    for row, given in enumerate(inputs["states"]):
        if given is not None:
            state[row] = given
    decision = policy.decide_with_risk(inputs["ohlcv"], inputs["held"], nav, inputs["timestamps"], state)
    return [{key: name(target), "executed_target": name(executed), "risk_state": [float(x) for x in next_state]}
            for target, executed, next_state in zip(decision.policy_target, decision.target, decision.state)]


def _field(location: tuple) -> str:
    """('body', 'windows', 0, 'ohlcv') -> 'windows[0].ohlcv'."""
    text = ""
    for part in location[1:] if location and location[0] == "body" else location:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "body"


def _one_line(exc: ValidationError) -> tuple[int, str]:
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return 400, f"body: not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    rule = {"missing": "required",
            "extra_forbidden": f"unknown field (a window has {', '.join(Window.model_fields)}; a batch has windows)",
            }.get(first["type"], first["msg"])
    return 422, f"{_field(tuple(first['loc']))}: {rule}{more}"


def create_app(champion: Champion, max_batch: int = MAX_BATCH) -> FastAPI:
    """The service's routes over ``champion``; its lifespan follows the alias while the app runs."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        champion.start()
        yield
        champion.stop()

    app = FastAPI(title="rltrade policy service", lifespan=lifespan,
                  description="Target exposures (or portfolio weights) of the registered champion policy.")

    @app.exception_handler(ValidationError)
    async def one_line(_request: Request, exc: ValidationError) -> JSONResponse:
        status, detail = _one_line(exc)
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(InputError)
    async def broken_rule(_request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    def answer(served: Served, body: dict) -> JSONResponse:
        return JSONResponse({**body, "model": champion.uri, "model_version": served.version})

    @app.get("/health")
    def health() -> JSONResponse:
        served = champion.served
        return JSONResponse({
            # "stale": the last check of the alias failed, so a newer version may be waiting.
            "status": "stale" if champion.reload_error else "ok", "model": champion.uri,
            "model_version": served.version, "loaded_at": served.loaded_at, "follows_alias": champion.follows,
            "reload_interval_s": champion.reload_interval if champion.follows else None,
            "last_check": champion.last_check, "reload_error": champion.reload_error})

    @app.get("/model")
    def model() -> JSONResponse:
        served = champion.served
        policy = served.policy
        return answer(served, {
            "name": champion.name, "alias": champion.alias, "lookback": policy.lookback,
            "interval": policy.metadata.get("interval"), "symbols": policy.symbols,
            "risk_overlay": policy.risk is not None, "reads_ohlc": policy.rules.reads_ohlc,
            "held": "weights" if policy.symbols else "position", "max_batch": max_batch,
            "metadata": policy.metadata})

    # Bodies are parsed by pydantic straight from the bytes (several times faster than json.loads and
    # then validation on a body of floats). One window takes tens of microseconds: it is decided on the
    # event loop, where a hop to a thread would cost more. A batch goes to the thread pool so that
    # other requests are not held up; onnxruntime releases the GIL while it runs.
    @app.post("/decide", openapi_extra=_body(WINDOW_SCHEMA))
    async def decide(request: Request) -> JSONResponse:
        window = Window.model_validate_json(await request.body())
        served = champion.served  # taken once: a reload during this request does not change it
        return answer(served, _decide(served, [window], batch=False)[0])

    @app.post("/decide/batch", openapi_extra=_body(BATCH_SCHEMA))
    async def decide_batch(request: Request) -> JSONResponse:
        batch = await run_in_threadpool(Batch.model_validate_json, await request.body())
        if len(batch.windows) > max_batch:
            raise InputError(f"windows: {len(batch.windows)} in one request, at most {max_batch}")
        served = champion.served
        return answer(served, {"decisions": await run_in_threadpool(_decide, served, batch.windows, True)})

    return app


def run_http(champion: Champion, host: str = "127.0.0.1", port: int = 8000, max_batch: int = MAX_BATCH) -> None:
    """Serve until interrupted (SIGINT/SIGTERM let requests in flight finish)."""
    import uvicorn

    app = create_app(champion, max_batch)
    # The imports (MLflow, pandas) leave ~300k objects that live as long as the process. Frozen, the
    # collector stops walking them on every full collection, which a batch body, hundreds of
    # thousands of floats, sets off again and again: several times faster parsing of large batches.
    gc.freeze()
    version = f" v{champion.served.version}" if champion.served.version else ""
    log.info("serving %s%s on http://%s:%d", champion.uri, version, host, port)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")
