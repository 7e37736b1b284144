"""confide-server: the lightweight aggregation server of the confide federated-learning SDK."""

from confide_server.app import create_app, open_engine
from confide_server.config import Config, load_config
from confide_server.engine.rounds import RoundEngine

__all__ = ["Config", "RoundEngine", "create_app", "load_config", "open_engine"]
