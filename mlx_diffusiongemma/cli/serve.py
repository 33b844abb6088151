"""`dgemma serve`: load the model, build the app, run it under uvicorn."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlx_diffusiongemma.checkpoint.files import DEFAULT_MODEL

from .errors import fail, handle_errors
from .flags import AdapterPath, Debug, KvBits, KvGroupSize, Model, Offline
from .loader import load_model


def serve(
    model: Model = DEFAULT_MODEL,
    adapter_path: AdapterPath = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port.")] = 8080,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Default max_tokens of a request.")] = 512,
    max_tokens_limit: Annotated[int, typer.Option(
        "--max-tokens-limit", min=1, help="Largest max_tokens accepted.")] = 16384,
    chat_template_args: Annotated[str, typer.Option(
        "--chat-template-args", help='JSON arguments for the chat template, e.g. \'{"enable_thinking":true}\'.')] = "{}",
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="DGEMMA_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.")] = None,
    allowed_origins: Annotated[str, typer.Option(
        "--allowed-origins", help="Web pages (origins, comma-separated, or '*') allowed to call the server "
        "besides loopback ones, when it runs without --api-key.")] = "",
    max_concurrency: Annotated[int, typer.Option("--max-concurrency", min=1, help="Requests denoised in turn.")] = 4,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests waiting before 503.")] = 16,
    max_body_kb: Annotated[int, typer.Option("--max-body-kb", min=1, help="Largest request body.")] = 4096,
    prompt_cache_size: Annotated[int, typer.Option("--prompt-cache-size", min=0, help="KV caches kept.")] = 8,
    prompt_cache_bytes: Annotated[Optional[str], typer.Option(
        "--prompt-cache-bytes", help="Most bytes the kept KV caches hold, e.g. 4GB, 512MB (default: what the "
        "memory budget leaves beside the running requests).")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")] = "INFO",
    fast: Annotated[bool, typer.Option(
        "--fast/--exact", help="Default path of a request that sends no 'mode': fast mode (the default), or "
        "the exact reference sampler. Both are batched across requests.")] = True,
    image_dir: Annotated[Optional[str], typer.Option(
        "--image-dir", help="Let requests name image files inside this folder (default: data: URLs only).")] = None,
    kv_bits: KvBits = None,
    kv_group_size: KvGroupSize = None,
    offline: Offline = False,
    debug: Debug = False,
):
    """Serve the model over an OpenAI-compatible HTTP API (and a web chat at /)."""
    ui = Console(stderr=True, highlight=False)
    cache_bytes = None if prompt_cache_bytes is None else parse_size(prompt_cache_bytes, "--prompt-cache-bytes")
    with handle_errors(debug):
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            fail(f"--log-level {log_level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        run_server(model=model, host=host, port=port, api_key=api_key, log_level=log_level,
                   allowed_origins=tuple(o.strip() for o in allowed_origins.split(",") if o.strip()),
                   chat_template_args=chat_template_args, load=lambda: load_model(
                       model, offline, ui, adapter_path, kv_bits=kv_bits, kv_group_size=kv_group_size),
                   ui=ui, default_max_tokens=max_tokens, max_tokens_limit=max_tokens_limit,
                   max_active=max_concurrency, max_queue=max_queue, max_body_bytes=max_body_kb * 1024,
                   prompt_cache_size=prompt_cache_size, prompt_cache_bytes=cache_bytes, default_mode="fast" if fast else "exact", image_dir=image_dir)


SIZE_UNITS = {"": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, flag: str) -> int:
    """A byte count as mlx_lm.server's --prompt-cache-bytes takes it: a number, optionally with a
    unit (K, M, G and KB, MB, GB are powers of 1000; KiB, MiB, GiB of 1024)."""
    number = text.strip().rstrip("bBiIkKmMgG ")
    unit = text.strip()[len(number):].strip().upper()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in SIZE_UNITS or not value >= 0 or value * SIZE_UNITS[unit] > 2**62:
        raise typer.BadParameter(f"{text!r} is not a size (e.g. 4GB, 512MB, 1073741824)", param_hint=flag)
    return int(value * SIZE_UNITS[unit])


def parse_template_args(text: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat-template-args is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError("--chat-template-args must be a JSON object")
    return value


def public_model_id(model: str) -> str:
    """The name /v1/models shows: a local folder's name (its absolute path would tell every client
    where the user keeps their files), a hub id or demo name as given."""
    folder = Path(model).expanduser()
    return folder.resolve().name if folder.is_dir() else model


def run_server(*, model: str, host: str, port: int, api_key: str | None, log_level: str,
               chat_template_args: str, load, ui: Console, allowed_origins: tuple[str, ...] = (), **limits) -> None:
    try:
        from mlx_diffusiongemma.server import ServerConfig, create_app
        from mlx_diffusiongemma.server.guard import is_loopback
        from mlx_diffusiongemma.server.serving import make_server
    except ImportError as e:
        raise ValueError(f"the server needs its extra: pip install 'mlx-diffusiongemma[server]' ({e})") from None

    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key (or DGEMMA_API_KEY) is empty: give a key, or leave it out to serve without one")
    name = public_model_id(model)
    config = ServerConfig(model_id=name, model_aliases=(model,) if model != name else (), api_key=api_key,
                          host=host, allowed_origins=allowed_origins,
                          chat_template_args=parse_template_args(chat_template_args), **limits)
    if not is_loopback(host) and api_key is None:
        ui.print(f"[yellow]warning: listening on {host} without --api-key: anyone who can reach it can use it[/]")
    llm, tokenizer = load()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(llm, tokenizer, config)
    ui.print(f"serving [bold]{name}[/] on http://{host}:{port} (OpenAI API under /v1, web chat at /)")
    make_server(app, host=host, port=port, log_level=log_level.lower()).run()
