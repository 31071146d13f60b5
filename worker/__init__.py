"""The worker process role: installed as burla.worker (see pyproject.toml)."""
