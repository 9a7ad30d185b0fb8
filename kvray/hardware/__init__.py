"""Hardware facts: the GPU table (published figures) and this machine's environment (NVML, torch, libraries)."""
