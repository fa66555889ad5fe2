"""Validate request bodies against the official OpenSearch API spec (../shared/opensearch-api-spec).

Every ``spec/schemas/*.yaml`` and ``spec/namespaces/*.yaml`` is loaded with PyYAML and registered under
its ``file://`` URI as a Draft 2020-12 resource, so the spec's relative cross-file ``$ref``s resolve.
A request body is checked against the operation's ``requestBodies`` schema, e.g.
``<_core.yaml>#/components/requestBodies/search/content/application~1json/schema``. Loading takes a
couple of seconds: use the session fixture ``api_spec`` (tests/test_opensearch_*.py) to do it once.

The spec has no ``additionalProperties: false`` in the query DSL and no enums for engine/space_type, so
it catches wrong types, missing required keys and two fields in one knn clause, not unknown keys;
``fgplugin.opensearch.checks`` adds the stricter rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SPEC_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "opensearch-api-spec"

# kind -> (namespace file, requestBodies name, content type)
REQUEST_BODIES = {
    "search": ("_core.yaml", "search", "application/json"),
    "bulk": ("_core.yaml", "bulk", "application/x-ndjson"),
    "mget": ("_core.yaml", "mget", "application/json"),
    "put_script": ("_core.yaml", "put_script", "application/json"),
    "count": ("_core.yaml", "count", "application/json"),
    "indices.create": ("indices.yaml", "indices.create", "application/json"),
    "indices.put_mapping": ("indices.yaml", "indices.put_mapping", "application/json"),
    "indices.update_aliases": ("indices.yaml", "indices.update_aliases", "application/json"),
}

try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # PyYAML without libyaml
    _Loader = yaml.SafeLoader  # type: ignore[misc]


def _pointer(s: str) -> str:
    return s.replace("~", "~0").replace("/", "~1")


@dataclass
class ApiSpec:
    root: Path
    registry: Registry
    _validators: dict = field(default_factory=dict, repr=False)

    def uri(self, relative: str) -> str:
        return (self.root / "spec" / relative).resolve().as_uri()

    def validator(self, kind: str) -> jsonschema.Draft202012Validator:
        if kind not in self._validators:
            self._validators[kind] = self._make_validator(kind)
        return self._validators[kind]

    def _make_validator(self, kind: str) -> jsonschema.Draft202012Validator:
        ns, name, ctype = REQUEST_BODIES[kind]
        ref = f"{self.uri('namespaces/' + ns)}#/components/requestBodies/{_pointer(name)}/content/{_pointer(ctype)}/schema"
        return jsonschema.Draft202012Validator({"$ref": ref}, registry=self.registry)

    def errors(self, kind: str, body: Any) -> list[str]:
        """Every violation, as 'path: message' (empty when the body is valid)."""
        out = []
        for e in self.validator(kind).iter_errors(body):
            path = "/".join(str(p) for p in e.absolute_path) or "<body>"
            out.append(f"{path}: {e.message[:300]}")
        return out

    def validate(self, kind: str, body: Any) -> None:
        errs = self.errors(kind, body)
        if errs:
            raise AssertionError(f"{kind} body breaks the OpenSearch API spec: " + "; ".join(errs[:5]))


def load_api_spec(root: Path = SPEC_DIR) -> ApiSpec:
    resources = []
    for sub in ("schemas", "namespaces"):
        for p in sorted((root / "spec" / sub).glob("*.yaml")):
            with open(p, encoding="utf-8") as f:
                doc = yaml.load(f, Loader=_Loader)
            resources.append((p.resolve().as_uri(), DRAFT202012.create_resource(doc)))
    return ApiSpec(root, Registry().with_resources(resources).crawl())


def story_payloads(root: Path, pattern: str = "tests/default/_core/search/knn/**/*.yaml") -> list[tuple[str, str, str, Any]]:
    """(story file, method, path, payload) of every request in the matching official test stories."""
    out = []
    for p in sorted(root.glob(pattern)):
        story = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)
        steps = (story.get("prologues") or []) + (story.get("chapters") or []) + (story.get("epilogues") or [])
        for step in steps:
            payload = (step.get("request") or {}).get("payload")
            if payload is not None:
                out.append((str(p.relative_to(root)), step["method"], step["path"], payload))
    return out


def kind_of(method: str, path: str) -> str | None:
    """The request kind of a test-story step (None for requests we do not validate)."""
    if path.endswith("/_search"):
        return "search"
    if path.endswith("/_bulk"):
        return "bulk"
    if method == "PUT" and path.count("/") == 1 and not path.startswith("/_"):
        return "indices.create"
    return None


_CACHE: dict[Path, ApiSpec] = {}


def cached_api_spec(root: Path = SPEC_DIR) -> ApiSpec:
    """Load once per process, however many test modules ask."""
    if root not in _CACHE:
        _CACHE[root] = load_api_spec(root)
    return _CACHE[root]


try:  # the session fixture the OpenSearch test modules import
    import pytest

    @pytest.fixture(scope="session")
    def api_spec() -> ApiSpec:
        if not (SPEC_DIR / "spec" / "namespaces" / "_core.yaml").is_file():
            pytest.skip(f"the OpenSearch API spec is not at {SPEC_DIR} (it lives in ../shared/ beside the repo)")
        return cached_api_spec()
except ImportError:  # pragma: no cover - used outside pytest
    pass
