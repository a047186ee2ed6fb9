"""Market data as tensors: the causal feature module and the aligned bar series it runs over."""
