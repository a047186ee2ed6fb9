# syntax=docker/dockerfile:1
# Celery worker for the `gpu` queue: CUDA build of torch, onnxruntime-gpu, same Airflow and ml
# package as airflow.Dockerfile. Build context is the repository root.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG AIRFLOW_UID=50000
ARG TORCH_VERSION=2.13.0
# Pick the CUDA variant the host driver supports (cu126, cu128, ...).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PYPI_INDEX_URL=https://pypi.org/simple

ENV AIRFLOW_HOME=/opt/airflow \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# Ubuntu 22.04 ships Python 3.10; the pinned wheels (torch among them) are cp311.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent curl ca-certificates \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

COPY requirements.txt docker/requirements-stack.txt /tmp/requirements/
# torch first, from the CUDA index, with its dependencies held to the pinned set; then the rest
# of the pinned set without the torch line (it would pull the CPU or default build).
RUN grep -v '^torch==' /tmp/requirements/requirements.txt > /tmp/requirements/requirements-no-torch.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url "${PYPI_INDEX_URL}" \
        -c /tmp/requirements/requirements-no-torch.txt "torch==${TORCH_VERSION}" \
    && pip install -r /tmp/requirements/requirements-no-torch.txt \
        -r /tmp/requirements/requirements-stack.txt \
    && python -c "import torch; assert torch.version.cuda, 'installed a CPU-only torch'" \
    && rm -rf /tmp/requirements

COPY pyproject.toml setup.py README.md /tmp/src/
COPY ml /tmp/src/ml
RUN pip install --no-deps --no-build-isolation /tmp/src && rm -rf /tmp/src

RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir "${AIRFLOW_HOME}" --no-create-home airflow \
    && mkdir -p "${AIRFLOW_HOME}"/dags "${AIRFLOW_HOME}"/plugins "${AIRFLOW_HOME}"/logs \
        "${AIRFLOW_HOME}"/runs "${AIRFLOW_HOME}"/config "${AIRFLOW_HOME}"/great_expectations \
    && chown -R "${AIRFLOW_UID}:0" "${AIRFLOW_HOME}" \
    && chmod -R g+rwX "${AIRFLOW_HOME}"

USER ${AIRFLOW_UID}
WORKDIR ${AIRFLOW_HOME}
CMD ["airflow", "celery", "worker", "-q", "gpu", "--concurrency", "1"]
