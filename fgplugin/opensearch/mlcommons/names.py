"""What the wiring registers and under which names, and the document fields it reads and fills.

Names carry the model card version ``v`` (first 12 hex digits), so a new model gets new objects beside
the old ones and nothing is overwritten in place:

==========================  =====================================  ===========================================
object                      name / id                              what it does
==========================  =====================================  ===========================================
stored painless script      ``scripts.SCRIPT_ID``                  weighted cosine (shared with the store)
mustache search template    ``TEMPLATE_ID``                        the exact weighted query, params in
ML connector                ``fgplugin-encoder-<v>``               POST ``<serve-url>/encode`` {"url": ...}
ML model group / model      ``fgplugin-encoder`` / ``...-<v>``     ``function_name: remote`` on the connector
query connector / model     ``fgplugin-encoder-query-<v>``         only for ``posterior = prob`` models (card
                                                                   ``query_slack``): {"url": ..., "form": "query"}
ingest pipeline             ``fgplugin-encode-<v>``                ``image`` URL -> every ``emb_<attr>``,
                                                                   ``emb_all`` and ``model_version``
search pipeline             ``fgplugin-image-query-<v>``           ``{"query": {"term": {"image": URL}}}`` ->
                                                                   the query ``compile.to_opensearch`` builds
==========================  =====================================  ===========================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import FgpluginError
from ..scripts import SCRIPT_ID

TEMPLATE_ID = "fgplugin-weighted-query-v1"  # bump with the template's shape
MODEL_GROUP = "fgplugin-encoder"
IMAGE_FIELD = "image"  # the document field holding the image URL (mapping.py)
QUERY_INPUT_PATH = f"query.term.{IMAGE_FIELD}.value"  # where the search pipeline reads the query image URL
ML = "/_plugins/_ml"  # ML Commons' REST prefix


class WiringError(FgpluginError):
    """A generated body breaks a rule ML Commons or OpenSearch depends on, or setup cannot proceed."""


def short_version(version: str) -> str:
    v = re.sub(r"[^a-z0-9]", "", (version or "").lower())[:12]
    if not v:
        raise WiringError("the model card has no version; re-export the model")
    return v


@dataclass(frozen=True)
class Names:
    version: str  # short model version
    connector: str
    model_group: str
    model: str
    ingest_pipeline: str
    search_pipeline: str
    script: str = SCRIPT_ID
    template: str = TEMPLATE_ID

    @property
    def query_connector(self) -> str:
        """Connector and model whose /encode answers in the query form (posterior = prob models)."""
        return f"fgplugin-encoder-query-{self.version}"

    @property
    def query_model(self) -> str:
        return self.query_connector

    def connector_for(self, form: str) -> str:
        return self.query_connector if form == "query" else self.connector

    def model_for(self, form: str) -> str:
        return self.query_model if form == "query" else self.model

    @classmethod
    def for_version(cls, version: str) -> "Names":
        v = short_version(version)
        return cls(v, f"fgplugin-encoder-{v}", MODEL_GROUP, f"fgplugin-encoder-{v}", f"fgplugin-encode-{v}",
                   f"fgplugin-image-query-{v}")


__all__ = ["TEMPLATE_ID", "MODEL_GROUP", "IMAGE_FIELD", "QUERY_INPUT_PATH", "ML", "WiringError", "short_version",
           "Names"]
