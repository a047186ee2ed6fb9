# syntax=docker/dockerfile:1
# Policy service: `python -m ml serve --http` answers decisions of the champion over HTTP and
# reloads it when the alias moves. numpy, onnxruntime, the MLflow client, FastAPI and uvicorn:
# no torch, no Airflow. Build context is the repository root (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_ENABLE_TELEMETRY=false \
    DO_NOT_TRACK=1

# Versions come from the project's pins (-c): the same mlflow, onnx, onnxruntime (the GPU wheel runs
# on CPU without CUDA) and FastAPI as everywhere else. boto3 for artifact roots on S3.
COPY requirements.txt /tmp/requirements/
RUN pip install -c /tmp/requirements/requirements.txt \
        mlflow onnx onnxruntime-gpu numpy pandas pyyaml filelock boto3 \
        fastapi uvicorn uvloop httptools \
    && rm -rf /tmp/requirements

# The ml package without its dependencies; built in isolation, so without torch the optional
# training kernel is skipped (serving never uses it).
COPY pyproject.toml setup.py README.md /tmp/src/
COPY ml /tmp/src/ml
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src

RUN useradd --uid 1000 --create-home serve
USER serve
WORKDIR /home/serve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/health', timeout=5)"]
# Every interface of the container: the compose network reaches it as serve:8000.
ENTRYPOINT ["python", "-m", "ml", "serve", "--http", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "models:/ppo_GSPC_1d@champion"]
