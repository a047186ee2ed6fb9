"""The HTTP service for downstream consumers: ``python -m ml serve --http --model models:/NAME@champion``.

``Champion`` loads the registered policy and follows its alias as it moves (``champion``);
``create_app`` answers decisions over HTTP with the library's input checks (``ml.serving``);
``run_http`` serves the app with uvicorn. It needs the registry client (MLflow) besides numpy and
onnxruntime, never torch. Applications that only run a model in-process use ``ml.serving``.
"""

from ml.service.champion import Champion, Served
from ml.service.http import create_app, run_http

__all__ = ["Champion", "Served", "create_app", "run_http"]
