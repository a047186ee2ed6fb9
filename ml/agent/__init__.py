"""The agent: the actor-critic policy, PPO, training checkpoints and action diagnostics."""
