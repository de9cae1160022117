"""OpenAI-compatible HTTP front end for the diffusion engine (``engine/``).

Entry points: ``server.cli:main`` (console script ``diffusion-server``, ``python -m server``) and
``server.app:create_app`` for embedding.
"""

__all__ = ["create_app", "ServerSettings"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
