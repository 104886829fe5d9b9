"""Where the read-only `shared/` folder is: beside the repository (override: UPERNET_SHARED).

Tests that need it skip cleanly when it is absent.
"""
import os
from pathlib import Path

SHARED = Path(os.environ.get("UPERNET_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REALDATA = SHARED / "realdata"
SPEC = SHARED / "spec"
