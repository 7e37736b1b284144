"""URL table of the federation API (version 1)."""

from __future__ import annotations

from aiohttp import web

from confide_server import handlers
from confide_server.enrolment import EnrolLimiter
from confide_server.keys import enrol_limiter_key
from confide_server.operator import setup_operator_routes
from confide_server.releases import setup_release_routes

__all__ = ["setup_routes"]


def setup_routes(app: web.Application) -> None:
    """Register every route on ``app`` (and the enrolment route's failure table)."""
    app[enrol_limiter_key] = EnrolLimiter()
    app.router.add_get("/v1/health", handlers.get_health)
    app.router.add_get("/v1/status", handlers.get_status)
    app.router.add_get("/v1/manifest", handlers.get_manifest)
    app.router.add_post("/v1/enroll", handlers.enroll_client)
    app.router.add_get("/v1/task", handlers.get_task)
    app.router.add_get("/v1/models/{sha256:[0-9a-f]{64}}", handlers.get_model)
    app.router.add_put(
        "/v1/rounds/{round}/{stage}",
        handlers.put_submission,
        expect_handler=handlers.expect_upload,
    )
    setup_release_routes(app)  # /v1/releases/*: signed models for devices
    setup_operator_routes(app)  # /v1/operator/*: abort a round, revoke a site
