"""The round engine: rounds, stages, submissions, enrolment, secure rounds, privacy.

Nothing here imports aiohttp (an import-linter contract checks it) or issues SQL (every
statement lives in :mod:`confide_server.store`): the engine is driven by the HTTP handlers
and by the round timer, and is unit-tested directly.
"""
