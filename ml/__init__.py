"""Reinforcement-learning trading: data, features, environment, PPO, evaluation, export, registry.

Submodules are imported on demand so that light users (``ml.serving``) do not
pay for torch or Airflow.
"""

__version__ = "0.1.0"
