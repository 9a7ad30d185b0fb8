"""The roofline simulator: predicted TTFT, TPOT, throughput and memory for any model on any GPU in the table."""
