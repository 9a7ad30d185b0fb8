"""Capacity planning: which GPU, how many, split how, with which KV choices, serves a traffic within its SLOs at
the lowest cost (``kvray plan``, docs/capacity.md). Arithmetic and the serving simulator only: no GPU, no Ray —
except ``replicas``, ``kvray route``'s check of the routing prediction on real vLLM replicas (started through
kvray/runner/routed.py)."""
