"""Deployment helpers: container entrypoint and health check, preset memory arithmetic (``python -m deploy.presets``)."""
