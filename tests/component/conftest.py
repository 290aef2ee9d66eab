"""Component tests run on the event loop the agent runs on (uvloop)."""

from __future__ import annotations

import asyncio

import uvloop

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
