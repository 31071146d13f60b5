"""The broker process role: installed as burla.broker (see pyproject.toml)."""

from burla.broker.broker import Broker, main

__all__ = ["Broker", "main"]
