"""The dataset on disk: cells.jsonl (source of truth), parquet/csv tables, the manifest, status counts."""
