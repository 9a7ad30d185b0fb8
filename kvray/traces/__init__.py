"""Request traces: public production traces and kvray's own, read, cut to a window and described — the KV footprint
(prefix hits, LRU pools, working set) predicted from the trace alone, before a request is sent. docs/traces.md."""
