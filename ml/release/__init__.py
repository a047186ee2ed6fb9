"""Releasing a policy: ONNX export and parity, the promotion gate, the MLflow registry."""
