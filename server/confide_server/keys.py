"""Typed application keys: the only way handlers reach shared state (no module globals)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from confide_server.config import Config
from confide_server.engine.rounds import RoundEngine
from confide_server.enrolment import EnrolLimiter
from confide_server.events import NonceCache, Notifier, UploadGate

__all__ = [
    "config_key",
    "engine_key",
    "enrol_limiter_key",
    "finished_key",
    "nonce_cache_key",
    "notifier_key",
    "upload_gate_key",
    "wake_key",
]

config_key = web.AppKey("config_key", Config)
engine_key = web.AppKey("engine_key", RoundEngine)
# Set on every state change; long-polling task requests wait on it.
notifier_key = web.AppKey("notifier_key", Notifier)
# Set by handlers after an accepted submission, so the round timer re-checks at once.
wake_key = web.AppKey("wake_key", asyncio.Event)
# Set when the job is finished or failed (the CLI may then exit).
finished_key = web.AppKey("finished_key", asyncio.Event)
nonce_cache_key = web.AppKey("nonce_cache_key", NonceCache)
upload_gate_key = web.AppKey("upload_gate_key", UploadGate)
# Failed enrolments per remote address (429 after repeated failures).
enrol_limiter_key = web.AppKey("enrol_limiter_key", EnrolLimiter)
