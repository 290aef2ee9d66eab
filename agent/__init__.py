"""nodemesh's agent. A build of compiled modules (scripts/build_native.py) that its sources
no longer match is removed here, before any of them is imported (agent/native.py)."""

import os as _os

from agent import native as _native

_native.drop_stale(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
