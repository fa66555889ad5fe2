"""`fgplugin serve`: run the encoder as an HTTP service (for ML Commons connectors and people)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fgplugin.images import ImageLimits
from fgplugin.serve_api import DEFAULT_HOST, DEFAULT_PORT, SERVE_LIMITS, ServeConfig

from .common import PS_WARNING, err_console, friendly_errors, needs_extra, resolve_secret


@friendly_errors
@needs_extra("serve")
def serve(
    model: Path = typer.Option(..., "--model", "-m", help="Export folder (from `fgplugin export`).",
                               envvar="FGPLUGIN_MODEL"),
    host: str = typer.Option(DEFAULT_HOST, help="Interface to bind (0.0.0.0 to accept remote clients)."),
    port: int = typer.Option(DEFAULT_PORT, help="TCP port."),
    max_batch: int = typer.Option(32, help="Most images per model call."),
    max_wait_ms: float = typer.Option(5.0, help="How long the first image of a batch waits for more."),
    allow_host: Optional[List[str]] = typer.Option(
        None, "--allow-host",
        help="Host that image URLs may be fetched from (repeat; '*.example.com' matches subdomains, '*' any "
             "host). Default: none, i.e. URL fetching is off and only uploaded/base64 images are accepted.",
    ),
    allow_hosts_env: str = typer.Option("", "--allow-hosts", envvar="FGPLUGIN_ALLOW_HOSTS", hidden=True,
                                        help="Comma-separated allowed hosts (for containers)."),
    max_concurrency: int = typer.Option(64, help="Requests in flight before answering 429."),
    max_images: int = typer.Option(64, help="Most images in one request."),
    max_image_bytes: int = typer.Option(SERVE_LIMITS.max_bytes, help="Largest image (bytes), uploaded or fetched."),
    max_pixels: int = typer.Option(SERVE_LIMITS.max_pixels, help="Largest image (pixels) accepted for decoding."),
    fetch_timeout: float = typer.Option(SERVE_LIMITS.timeout_s, help="Seconds one attempt to fetch an image URL may take in all (connect, headers and body)."),
    fetch_retries: int = typer.Option(SERVE_LIMITS.retries, help="Extra attempts for URL timeouts and 5xx."),
    token: Optional[str] = typer.Option(
        None, envvar="FGPLUGIN_SERVE_TOKEN", show_default=False,
        help=f"Require 'Authorization: Bearer TOKEN' on /encode and /model. Prefer the env var or --token-file: "
             f"{PS_WARNING}."),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", envvar="FGPLUGIN_SERVE_TOKEN_FILE", show_default=False,
        help="Read the --token from this file (one line; chmod 600 it)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    log_level: str = typer.Option("info", help="debug, info, warning, error."),
) -> None:
    """Serve the encoder over HTTP: POST /encode, GET /health, GET /model."""
    from fgplugin.serve import run  # torch and starlette: the [serve] extra, loaded when the command runs

    token = resolve_secret(token, token_file, param="token", option="--token", file_option="--token-file",
                           env="FGPLUGIN_SERVE_TOKEN")
    hosts = list(allow_host or []) + [h.strip() for h in allow_hosts_env.split(",") if h.strip()]
    limits = ImageLimits(max_bytes=max_image_bytes, max_pixels=max_pixels, timeout_s=fetch_timeout,
                         retries=fetch_retries, backoff_s=SERVE_LIMITS.backoff_s)
    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_concurrency=max_concurrency,
                         allow_hosts=tuple(hosts), limits=limits, max_images=max_images, token=token or None)
    if not hosts:
        err_console.print("[yellow]note:[/] no --allow-host given: URL fetching is off "
                          "(base64 and uploads only).", highlight=False)
    run(str(model), host=host, port=port, config=config, device=device, log_level=log_level)
