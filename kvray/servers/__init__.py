"""Inference-server processes kvray starts (start, health, stop), their Prometheus /metrics, servable model dirs."""
