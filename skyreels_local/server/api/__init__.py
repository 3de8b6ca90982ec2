"""The HTTP API: the WaveSpeed v3 contract over the job table. Never imports torch."""

from .app import create_app

__all__ = ["create_app"]
