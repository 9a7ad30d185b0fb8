import os
import sys
from pathlib import Path

# Tests never reach the hub: an unknown id must fail fast, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from storage_fixtures import s3  # noqa: E402, F401 - moto's S3 server, module-scoped, for any test that asks
