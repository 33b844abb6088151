"""`dgemma serve`: an OpenAI-compatible HTTP server (optional extra `[server]`).

    from mlx_diffusiongemma.server import ServerConfig, create_app
    app = create_app(model, tokenizer, ServerConfig(model_id="demo"))   # an ASGI app for uvicorn

See docs/server.md for the endpoints, the extensions (drafts, streaming inside a canvas) and
the measurements.
"""

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
