# syntax=docker/dockerfile:1
# Airflow image: api-server, scheduler, dag-processor, triggerer and CPU workers.
# Build context is the repository root (see docker-compose.yml).
FROM python:3.11-slim

ARG AIRFLOW_UID=50000
# CPU build of torch: the default Linux wheel pulls several GB of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV AIRFLOW_HOME=/opt/airflow \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# curl for the compose healthchecks; g++ builds the ml package's CPU training kernel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl g++ \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.txt docker/requirements-stack.txt /tmp/requirements/
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" \
        -r /tmp/requirements/requirements.txt \
        -r /tmp/requirements/requirements-stack.txt \
    && rm -rf /tmp/requirements

# The ml package is baked in (rebuild after changing it); dags/ and plugins/ are mounted.
COPY pyproject.toml setup.py README.md /tmp/src/
COPY ml /tmp/src/ml
RUN pip install --no-deps --no-build-isolation /tmp/src && rm -rf /tmp/src

# Group 0 as in Airflow's own image, so any AIRFLOW_UID can write; the folders seed the
# named volumes with this ownership.
RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir "${AIRFLOW_HOME}" --no-create-home airflow \
    && mkdir -p "${AIRFLOW_HOME}"/dags "${AIRFLOW_HOME}"/plugins "${AIRFLOW_HOME}"/logs \
        "${AIRFLOW_HOME}"/runs "${AIRFLOW_HOME}"/config "${AIRFLOW_HOME}"/great_expectations \
    && chown -R "${AIRFLOW_UID}:0" "${AIRFLOW_HOME}" \
    && chmod -R g+rwX "${AIRFLOW_HOME}"

USER ${AIRFLOW_UID}
WORKDIR ${AIRFLOW_HOME}
EXPOSE 8080
CMD ["airflow", "version"]
