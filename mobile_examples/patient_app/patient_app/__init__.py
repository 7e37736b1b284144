"""confide's patient diagnosis app: on-device inference of verified, DP-trained models."""

from patient_app.app import AppConfig, create_app

__all__ = ["AppConfig", "create_app"]
