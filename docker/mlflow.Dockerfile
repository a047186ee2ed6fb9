# syntax=docker/dockerfile:1
# MLflow tracking server: Postgres backend store, artifacts proxied to S3 (MinIO), basic auth
# (the `auth` extra brings Flask-WTF for the login forms' CSRF protection).
# Build context is the repository root; versions are held to the project's pinned set.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.txt docker/requirements-stack.txt /tmp/requirements/
RUN pip install \
        -c /tmp/requirements/requirements.txt \
        -c /tmp/requirements/requirements-stack.txt \
        "mlflow[auth]==3.17.2" boto3==1.44.5 psycopg2-binary==2.9.13 \
    && rm -rf /tmp/requirements

RUN useradd --uid 1000 --create-home mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
