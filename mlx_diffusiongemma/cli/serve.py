"""`dgemma serve`: load the model, build the app, run it under uvicorn."""

from __future__ import annotations

import json
import logging

from rich.console import Console


def parse_template_args(text: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat-template-args is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError("--chat-template-args must be a JSON object")
    return value


def run_server(*, model: str, host: str, port: int, api_key: str | None, log_level: str,
               chat_template_args: str, load, ui: Console, **limits) -> None:
    try:
        import uvicorn

        from mlx_diffusiongemma.server import ServerConfig, create_app
    except ImportError as e:
        raise ValueError(f"the server needs its extra: pip install 'mlx-diffusiongemma[server]' ({e})") from None

    config = ServerConfig(model_id=model, api_key=api_key, chat_template_args=parse_template_args(chat_template_args),
                          **limits)
    llm, tokenizer = load()
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        ui.print(f"[yellow]warning: listening on {host} without --api-key: anyone who can reach it can use it[/]")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ui.print(f"serving [bold]{model}[/] on http://{host}:{port} (OpenAI API under /v1, web chat at /)")
    app = create_app(llm, tokenizer, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5)
