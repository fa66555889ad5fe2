"""`fgplugin explore`: serve a web page over a store (pick an item or upload a photo, weight attributes, filter)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fgplugin.stores import open_store

from .common import err_console, friendly_errors, needs_extra, warn_password_in_url
from .query import STORE_HELP


@friendly_errors
@needs_extra("serve")
def explore(
    store: str = typer.Option("embedded:fgplugin-store", "--store", help=STORE_HELP),
    index: Optional[str] = typer.Option(None, "--index", help="OpenSearch index name (OpenSearch stores only)."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Export folder for photo queries (default: the one the store was indexed with)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Training checkpoint for attention heat maps (an export has no attention maps)."),
    catalog: Optional[Path] = typer.Option(
        None, "--catalog", help="Catalog whose attribute labels are shown beside the hits."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 to accept remote clients)."),
    port: int = typer.Option(8090, help="TCP port."),
    log_level: str = typer.Option("warning", help="debug, info, warning, error."),
) -> None:
    """Serve the explore page: similar items by attribute, with weights, filters and attention maps."""
    # starlette and uvicorn: the [serve] extra, loaded when the command runs
    import uvicorn

    from fgplugin.web.app import catalog_labels, create_app

    warn_password_in_url(store, param="store", option="--store")
    st = open_store(store, index=index, read_only=True, interactive=True)
    try:
        layout = st.require_layout()
        labels = catalog_labels(catalog, st) if catalog is not None else None
        explainer = None
        if checkpoint is not None:
            from fgplugin.loading import load_encoder  # torch: only for attention maps

            explainer = load_encoder(checkpoint, device="cpu")
        app = create_app(st, model=str(model) if model else None, explainer=explainer, labels=labels)
        err_console.print(f"explore {st.url} ({st.count()} items, {len(layout.attributes)} attributes) at "
                          f"http://{host}:{port}/  (Ctrl-C stops)", highlight=False)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        st.close()
