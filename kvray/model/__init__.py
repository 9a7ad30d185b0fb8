"""A model's geometry from its config.json and the arithmetic on it: KV bytes per token, weights, OOM risk."""
