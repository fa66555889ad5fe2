"""OpenSearchStore: the Store interface on an OpenSearch cluster with the k-NN plugin (opensearch-py 3.x).

Layout on the cluster: queries read the alias ``index`` (default ``fgplugin``); documents live in the
versioned index ``<alias>-<model_version[:12]>`` (``mapping.py``). ``ensure_index``:
- no alias yet: creates the versioned index with the alias in one request, and stores the scoring script;
- the alias points at this model version's index: checks the layout fits (schema, vector sizes,
  metadata types; new metadata fields are added to the mapping, and so are the fingerprint fields
  ``image_key``/``meta_key`` in an index created before they existed);
- the alias points at an older model's index (or this model's in another codec: ``<alias>-<version>-<codec>``,
  ``fgplugin.codecs``): creates the new index beside it; writes go there, reads
  still hit the old one until ``promote()`` swaps the alias atomically (``pending_promotion`` tells).

Writes use ``helpers.streaming_bulk(raise_on_error=False, max_retries=N)``: per-document 429s are
retried with backoff by the helper, every other per-item failure becomes a ``Failure(id, "store",
reason, kind)``; nothing is dropped. Whole-request failures (connection errors, 429, 5xx) are retried
with exponential backoff up to ``retry_total_s`` of waiting (each wait logged: what failed, why, how
long), then raise a StoreError naming the URL (never credentials) and the cause. Timeouts are retried
only when ``retry_timeouts`` (the indexer; interactive commands fail at once, see ``client.INTERACTIVE``);
the first request (the alias lookup) must answer within ``connect_timeout``, so an address that
accepts connections but never answers is reported in seconds too. Every request body passes
``checks.check_request`` before it is sent.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from opensearchpy import NotFoundError, helpers
from opensearchpy import exceptions as ex

from ..codecs import code_dtype, decode, encode
from ..errors import QueryError, StoreError
from ..schema import require_same_schema
from ..search.spec import QuerySpec, SearchResult
from ..search.store import (ERRORS_FILE, Document, Failure, Fingerprint, IndexLayout, Store, UpsertResult, document_vectors,
                           dropped_version, reference_vectors, typed_metadata, unit_rows)
from .checks import ENGINES, RequestCheckError, check_request
from .client import OpenSearchConfig, describe_cause, is_timeout, load_config, make_client, redact_url
from .compile import iso_utc, parse_hits, plan_query, to_opensearch, total_candidates
from .mapping import (ALL_FIELD, FINGERPRINT_FIELDS, alias_swap_body, build_index_body, build_properties,
                      check_index_name, combined_blocks, emb_field, fingerprint_properties, layout_from_meta, layout_meta,
                      vector_property, versioned_index_name)
from .scripts import SCRIPT_ID, stored_script_body

log = logging.getLogger("fgplugin.opensearch")

RETRY_STATUS = (429, 500, 502, 503, 504)
MGET_CHUNK = 1000
ENGINE_ENV = "FGPLUGIN_OPENSEARCH_ENGINE"  # the k-NN engine of new indices (faiss when unset)


class OpenSearchStore(Store):
    """A Store on OpenSearch. Build it with ``from_url`` or from an ``OpenSearchConfig``."""

    kind = "opensearch"

    def __init__(
        self,
        config: OpenSearchConfig,
        *,
        client: Any = None,
        refresh: bool | str = False,
        engine: str | None = None,
        index_options: Mapping[str, Any] | None = None,
        stored_script: bool = True,
    ):
        self.config = config
        self.alias = check_index_name(config.index)
        self.client = client if client is not None else make_client(config)
        self.refresh_writes = refresh  # bulk ?refresh= (tests use "wait_for")
        # The k-NN engine of new indices: faiss unless the environment names another (a cluster without
        # the native libraries, such as docker/opensearch-node.sh's, needs lucene).
        self.engine = engine or os.environ.get(ENGINE_ENV) or "faiss"
        if self.engine not in ENGINES:
            raise StoreError(f"k-NN engine {self.engine!r} is not supported; use one of {', '.join(ENGINES)}")
        self.index_options = dict(index_options or {})
        self.script_id: str | None = SCRIPT_ID if stored_script else None
        self.write_index: str | None = None
        self.write_layout: IndexLayout | None = None
        self._read_index: str | None = None
        self._read_layout: IndexLayout | None = None
        self._read_meta: dict[str, Any] = {}
        self._loaded = False

    @classmethod
    def from_url(cls, url: str, *, index: str | None = None, config_path: Any = None, **kwargs: Any) -> "OpenSearchStore":
        """``url``: the cluster (``http(s)://[user:pass@]host:port[/index]``); credentials may also come
        from FGPLUGIN_OPENSEARCH_* env vars or the TOML config file (see ``client.py``)."""
        options = {k: kwargs.pop(k) for k in ("refresh", "engine", "index_options", "stored_script") if k in kwargs}
        return cls(load_config(url, index=index, config_path=config_path, **kwargs), **options)

    def __repr__(self) -> str:
        return f"OpenSearchStore({self.url!r})"

    @property
    def index(self) -> str:
        """The alias queries read (the --index name)."""
        return self.alias

    @property
    def url(self) -> str:
        """The store URL without credentials."""
        return f"opensearch:{redact_url(self.config.url)}/{self.alias}"

    # -- transport with retries -------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one client call; retry connection errors, 429 and 5xx with backoff (bounded total wait)."""
        cfg = self.config
        waited, delay, attempt = 0.0, cfg.retry_initial_s, 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except (ex.ConnectionError, ex.TransportError) as e:
                status = getattr(e, "status_code", None)
                timed_out = is_timeout(e)
                retryable = ((isinstance(e, ex.ConnectionError) or status in RETRY_STATUS)
                             and (cfg.retry_timeouts or not timed_out))
                cause = describe_cause(e, cfg, timeout=kwargs.get("request_timeout"))
                if isinstance(e, ex.ConnectionTimeout):
                    knob = "CONNECT_TIMEOUT" if "request_timeout" in kwargs else "TIMEOUT"
                    cause += f" (FGPLUGIN_OPENSEARCH_{knob} sets the limit)"
                if retryable and waited + delay <= cfg.retry_total_s:
                    log.warning("OpenSearch at %s: %s failed (%s); retrying in %.1f s (waited %.1f s of at most "
                                "%g s; FGPLUGIN_OPENSEARCH_RETRY_TOTAL_S sets it)", cfg.url, what, cause, delay,
                                waited, cfg.retry_total_s)
                    time.sleep(delay)
                    waited += delay
                    delay = min(delay * 2, 10.0)
                    continue
                tries = f" after {attempt} attempts over {waited:.1f} s" if attempt > 1 else ""
                hint = ""
                if isinstance(e, ex.ConnectionError) and not isinstance(e, ex.SSLError):
                    hint = "; check that OpenSearch runs at that address and answers"
                raise StoreError(f"OpenSearch at {cfg.url}: {what} failed{tries}: {cause}{hint}") from None
            except ex.ImproperlyConfigured as e:
                raise StoreError(f"OpenSearch at {self.config.url}: {what}: bad client settings: "
                                 f"{self.config.scrub(str(e))}") from None

    def _checked(self, kind: str, body: Any) -> Any:
        try:
            return check_request(kind, body)
        except RequestCheckError as e:
            raise StoreError(f"OpenSearch at {self.config.url}: {e}") from None

    # -- layout -----------------------------------------------------------------------------------------
    def _alias_targets(self) -> list[str]:
        try:
            # The first request of every command: small, so a cluster that cannot answer it within
            # connect_timeout is reported unreachable instead of waiting out the (longer) request timeout.
            got = self.call(f"reading alias {self.alias!r}", self._get_alias,
                            request_timeout=self.config.connect_timeout)
        except _NotFound:
            return []
        return sorted(got)

    def _get_alias(self, request_timeout: float) -> dict[str, Any]:
        try:
            return self.client.indices.get_alias(name=self.alias, request_timeout=request_timeout)
        except NotFoundError:
            if self.client.indices.exists(index=self.alias, request_timeout=request_timeout):
                try:  # another writer may have created the index and its alias between the two requests
                    return self.client.indices.get_alias(name=self.alias, request_timeout=request_timeout)
                except NotFoundError:
                    pass
                raise StoreError(
                    f"OpenSearch at {self.config.url}: {self.alias!r} is a plain index, not an fgplugin alias; "
                    "pick another --index name (fgplugin creates <name>-<model version> behind the alias <name>)"
                ) from None
            raise _NotFound() from None

    def _index_mappings(self, index: str) -> dict[str, Any]:
        got = self.call(f"reading the mapping of {index!r}", self.client.indices.get_mapping, index=index)
        body = got.get(index) or next(iter(got.values()), {})
        return body.get("mappings") or {}

    def _index_meta(self, index: str) -> dict[str, Any]:
        return (self._index_mappings(index).get("_meta") or {}).get("fgplugin") or {}

    def _load(self, force: bool = False) -> None:
        if self._loaded and not force:
            return
        targets = self._alias_targets()
        if len(targets) > 1:
            raise StoreError(f"OpenSearch at {self.config.url}: alias {self.alias!r} points at several indices "
                             f"({', '.join(targets)}); fgplugin expects one")
        if targets:
            self._read_index = targets[0]
            self._read_meta = self._index_meta(targets[0])
            self._read_layout = layout_from_meta(self._read_meta, f"OpenSearch index {targets[0]!r}")
        else:
            self._read_index, self._read_layout, self._read_meta = None, None, {}
        self._loaded = True

    @property
    def layout(self) -> IndexLayout | None:
        """The layout queries see (the alias's index); None when nothing is indexed yet."""
        self._load()
        return self._read_layout

    @property
    def write_target(self) -> str:
        return self.write_index or ""

    @property
    def pending_promotion(self) -> bool:
        """True when writes go to a new model's index that the alias does not serve yet."""
        self._load()
        return self.write_index is not None and self.write_index != self._read_index

    def _need_read(self) -> tuple[str, IndexLayout]:
        self._load()
        if self._read_index is None or self._read_layout is None:
            raise StoreError(f"{self.url} holds no index yet; build one with `fgplugin index --store {self.url.rsplit('/', 1)[0]}`")
        return self._read_index, self._read_layout

    def _need_write(self) -> tuple[str, IndexLayout]:
        if self.write_index is None or self.write_layout is None:
            raise StoreError(f"{self.url}: call ensure_index(layout) before writing")
        return self.write_index, self.write_layout

    def _data_index(self) -> tuple[str, IndexLayout]:
        """Where id-level reads (versions, get_vectors, count, delete) go: the write index if set."""
        if self.write_index is not None:
            return self._need_write()
        return self._need_read()

    def ensure_index(self, layout: IndexLayout) -> None:
        """Create the versioned index (and the alias, the first time) or check the existing one fits."""
        if sorted(layout.dims) != sorted(layout.attributes):
            raise StoreError(f"layout dims cover {sorted(layout.dims)} but the schema's attributes are {layout.attributes}")
        self._load(force=True)
        target = versioned_index_name(self.alias, layout.model_version, layout.codec)
        read = self._read_layout
        if read is not None and self._read_index and (read.model_version, read.codec) == (layout.model_version, layout.codec):
            target = self._read_index  # an index extended in place (add_attributes) keeps its name
        if read is not None:
            require_same_schema(read.schema, layout.schema, have_is=self.url, want_is="the model", error=StoreError,
                                hint="index into another --index name")
        exists = self.call(f"checking index {target!r}", self.client.indices.exists, index=target)
        if not exists:
            exists = not self._create_index(target, layout)
        if exists:
            old = layout_from_meta(self._index_meta(target), f"OpenSearch index {target!r}")
            self._check_compatible(target, old, layout)
            new_fields = {f: t for f, t in layout.metadata_types.items() if f not in old.metadata_types}
            if new_fields:
                merged = dataclasses.replace(old, metadata_types={**old.metadata_types, **new_fields})
                props = build_properties(merged, engine=self.engine)
                body = {"_meta": {"fgplugin": {**self._index_meta(target), **layout_meta(merged)}},
                        "properties": {f: props[f] for f in new_fields}}
                self.call(f"adding fields to {target!r}", self.client.indices.put_mapping, index=target,
                          body=self._checked("indices.put_mapping", body))
            have = self._index_mappings(target).get("properties") or {}
            missing = {f: p for f, p in fingerprint_properties().items() if f not in have}
            if missing:  # an index created before documents carried fingerprints
                self.call(f"adding fingerprint fields to {target!r}", self.client.indices.put_mapping, index=target,
                          body=self._checked("indices.put_mapping", {"properties": missing}))
            if self._read_index is None:  # an index left without its alias (e.g. a failed swap): attach it
                self.call("adding the alias", self.client.indices.update_aliases,
                          body=alias_swap_body(self.alias, target))
        self.put_script()
        self.write_index = target
        self.write_layout = layout_from_meta(self._index_meta(target), f"OpenSearch index {target!r}")
        self._load(force=True)

    def _create_index(self, target: str, layout: IndexLayout) -> bool:
        """Create ``target``; False when another writer created it first (index workers of one catalog,
        e.g. `fgplugin index --shard`, start together): the caller then checks it like any existing index."""
        body = build_index_body(layout, engine=self.engine, **self.index_options)
        if self._read_index is None:
            body["aliases"] = {self.alias: {}}

        def create() -> bool:
            try:
                self.client.indices.create(index=target, body=self._checked("indices.create", body))
            except ex.RequestError as e:
                if e.error == "resource_already_exists_exception":
                    return False
                raise
            return True

        created = self.call(f"creating index {target!r}", create)
        if created:
            log.info("created OpenSearch index %s on %s", target, redact_url(self.config.url))
        return created

    def _check_compatible(self, index: str, old: IndexLayout, new: IndexLayout) -> None:
        where = f"OpenSearch index {index!r} at {redact_url(self.config.url)}"
        hint = "delete that index or index into another --index name"
        old.require_fits(new, where=where, hint=hint)

    def put_script(self) -> None:
        """Store the weighted-cosine painless script (idempotent)."""
        if self.script_id is None:
            return
        self.call("storing the scoring script", self.client.put_script, id=self.script_id,
                  body=self._checked("put_script", stored_script_body()))

    def promote(self, *, delete_old: bool = False) -> dict[str, Any]:
        """Point the alias at the write index in one atomic ``_aliases`` request (no downtime)."""
        target, _ = self._need_write()
        self._load(force=True)
        old = [self._read_index] if self._read_index and self._read_index != target else []
        if old or self._read_index is None:
            self.call(f"swapping alias {self.alias!r} to {target!r}", self.client.indices.update_aliases,
                      body=alias_swap_body(self.alias, target, old))
            log.info("alias %s now serves %s (was %s)", self.alias, target, ", ".join(old) or "nothing")
        if delete_old:
            for i in old:
                self.call(f"deleting old index {i!r}", self.client.indices.delete, index=i)
        self._load(force=True)
        return {"alias": self.alias, "index": target, "previous": old, "deleted": old if delete_old else []}

    # -- free-form metadata (kept in the index mapping's _meta) -----------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        self._load()
        return (self._read_meta.get("extra") or {}).get(key, default)

    def set_meta(self, key: str, value: Any) -> None:
        index, _ = self._need_write()
        meta = self._index_meta(index)
        meta["extra"] = {**(meta.get("extra") or {}), key: value}
        self.call("writing index metadata", self.client.indices.put_mapping, index=index,
                  body=self._checked("indices.put_mapping", {"_meta": {"fgplugin": meta}}))
        self._load(force=True)

    # -- writing ----------------------------------------------------------------------------------------
    def prepare_document(self, doc: Document, layout: IndexLayout) -> dict[str, Any]:
        """The ``_source`` for ``doc``; raises ValueError with the cause for a document the index can't take."""
        vectors = document_vectors(doc, layout)
        if len(doc.id.encode()) > 512:
            raise ValueError("document id is longer than OpenSearch's 512-byte limit")
        src: dict[str, Any] = {"model_version": doc.model_version or layout.model_version}
        if doc.image is not None:
            src["image"] = str(doc.image)
        for f in FINGERPRINT_FIELDS:
            if getattr(doc, f) is not None:
                src[f] = str(getattr(doc, f))
        codes = self.vector_codes(vectors, layout)
        src.update({emb_field(a): c.tolist() for a, c in codes.items()})
        if codes:  # missing attributes (and dropped ones): zero blocks in emb_all
            src[ALL_FIELD] = np.concatenate([codes[a] if a in codes else np.zeros(d, dtype=code_dtype(layout.codec))
                                             for a, d in combined_blocks(layout)]).tolist()
        for f, value in typed_metadata(layout, doc.metadata).items():
            if value is not None:
                src[f] = iso_utc(value) if isinstance(value, dt.datetime) else value
        return src

    @staticmethod
    def vector_codes(vectors: Mapping[str, np.ndarray], layout: IndexLayout) -> dict[str, np.ndarray]:
        """The stored form of each vector (unit; int8 codes or fp16-rounded values); ValueError for a bad one."""
        out = {}
        for a in layout.attributes:
            if a in vectors:
                rows, refused = unit_rows(a, vectors[a][None, :])
                if refused:
                    raise ValueError(refused[0])
                out[a] = encode(rows, layout.codec, layout.scale(a))[0]
        return out

    # -- attributes added or dropped in place -----------------------------------------------------------
    def add_attributes(self, layout: IndexLayout) -> list[str]:
        """``emb_<a>`` for each added attribute put into the mapping of the index the alias serves (no new
        index, no alias change) and the grown layout into its ``_meta``; ``emb_all`` stays as it is."""
        index, old = self._need_read()
        if self.write_index is not None and self.write_index != index:
            raise StoreError(f"{self.url}: a new index {self.write_index!r} is being built beside {index!r}; finish "
                             "or delete it before adding attributes to the live one")
        gone = [a for a in old.attributes if a not in layout.attributes]
        if gone:
            raise StoreError(f"adding attributes to {self.url}: the new layout lacks {', '.join(gone)}")
        added = [a for a in layout.attributes if a not in old.attributes]
        props = self._index_mappings(index).get("properties") or {}
        base = props.get(emb_field(old.attributes[0])) or {}
        engine = (base.get("method") or {}).get("engine") or self.engine  # the index's own engine
        params = (base.get("method") or {}).get("parameters") or {}
        body = {"_meta": {"fgplugin": {**self._index_meta(index), **layout_meta(layout)}},
                "properties": {emb_field(a): vector_property(layout.dims[a], engine, params.get("m", 16),
                                                             params.get("ef_construction", 128), layout.codec)
                               for a in added}}
        self.call(f"adding attribute fields to {index!r}", self.client.indices.put_mapping, index=index,
                  body=self._checked("indices.put_mapping", body))
        self._load(force=True)
        self.write_index, self.write_layout = index, self._read_layout
        return added

    def update_vectors(self, docs: list[Document]) -> UpsertResult:
        """Partial ``_update`` of each document: its vectors and ``model_version`` only (the server merges them
        into the stored source); a document that is not stored fails with kind ``missing``."""
        index, layout = self._data_index()
        result = UpsertResult()
        actions = []
        for doc in docs:
            try:
                codes = self.vector_codes(document_vectors(doc, layout), layout)
            except ValueError as e:
                result.failed.append(Failure(str(doc.id), "store", str(e), kind="rejected"))
                continue
            partial = {"model_version": doc.model_version or layout.model_version,
                       **{emb_field(a): c.tolist() for a, c in codes.items()}}
            actions.append({"_op_type": "update", "_index": index, "_id": str(doc.id), "_source": {"doc": partial}})
        self._bulk(actions, result, what=f"adding vectors to {index!r}")
        return result

    def drop_attribute(self, attribute: str) -> dict[str, Any]:
        """Every document loses ``emb_<attribute>`` from its ``_source`` and takes its derived version (bulk
        scripted updates); the mapping field stays (OpenSearch removes none) and ``_meta`` records the drop."""
        index, layout = self._need_read()
        new = layout.without(attribute)
        # idempotent, so a rerun after a partial failure finishes the job without deriving a version twice
        script = ("if (ctx._source.containsKey(params.f)) { ctx._source.remove(params.f); "
                  "ctx._source.model_version = params.v } else { ctx.op = 'noop' }")
        actions = [{"_op_type": "update", "_index": index, "_id": i, "_source": {"script": {
            "source": script, "lang": "painless",
            "params": {"f": emb_field(attribute), "v": dropped_version(v, attribute)}}}}
            for i, v in self.versions().items()]
        result = UpsertResult()
        self._bulk(actions, result, what=f"removing {attribute!r} from the documents of {index!r}")
        if result.failed:
            f = result.failed[0]
            raise StoreError(f"OpenSearch at {redact_url(self.config.url)}: removing {attribute!r} failed for "
                             f"{len(result.failed)} document(s), e.g. {f.id}: {f.reason}; rerun to finish")
        body = {"_meta": {"fgplugin": {**self._index_meta(index), **layout_meta(new)}}}
        self.call(f"recording the drop in {index!r}", self.client.indices.put_mapping, index=index,
                  body=self._checked("indices.put_mapping", body))
        self._load(force=True)
        return {"store": self.url, "dropped": attribute, "documents": len(result.ok), "attributes": new.attributes,
                "model_version": new.model_version, "index": index}

    def upsert(self, docs: list[Document]) -> UpsertResult:
        """Index or replace documents; every rejection comes back as a Failure (none is dropped)."""
        index, layout = self._need_write()
        result = UpsertResult()
        good: dict[str, dict[str, Any]] = {}
        for doc in docs:
            try:
                src = self.prepare_document(doc, layout)
            except ValueError as e:
                result.failed.append(Failure(str(doc.id), "store", str(e), kind="rejected"))
                continue
            good.pop(doc.id, None)  # the last copy of a repeated id wins
            good[doc.id] = src
        actions = [{"_op_type": "index", "_index": index, "_id": i, "_source": s} for i, s in good.items()]
        self._bulk(actions, result, what=f"indexing into {index!r}")
        return result

    def _bulk(self, actions: list[dict[str, Any]], result: UpsertResult, *, what: str) -> list[dict[str, Any]]:
        """Send ``actions`` in chunks; fill ``result``; return the per-item responses of the successes."""
        size = max(1, int(self.config.bulk_chunk_size))
        oks: list[dict[str, Any]] = []
        for start in range(0, len(actions), size):
            pending = {a["_id"]: a for a in actions[start:start + size]}
            self._checked("bulk", _bulk_lines(pending.values()))

            def send() -> None:
                kwargs: dict[str, Any] = {}
                if self.refresh_writes:
                    kwargs["refresh"] = self.refresh_writes
                for ok, item in helpers.streaming_bulk(
                    self.client, list(pending.values()), chunk_size=size, raise_on_error=False,
                    raise_on_exception=True, max_retries=self.config.bulk_max_retries,
                    initial_backoff=self.config.bulk_initial_backoff, max_backoff=30, **kwargs,
                ):
                    (op, info), = item.items()
                    id_ = str(info.get("_id"))
                    pending.pop(id_, None)  # settled: a retry after a transport error resends only the rest
                    if op == "delete" and info.get("status") == 404:
                        continue  # deleting a missing id: nothing to do, not a failure
                    if ok:
                        oks.append(info)
                        if op != "delete":
                            result.ok.append(id_)
                    else:
                        result.failed.append(_item_failure(id_, info, self.config))

            # A transport failure mid-chunk (even during the helper's 429 retries) resends only the
            # documents not yet settled; index operations are idempotent per id.
            self.call(what, _until_settled, send, pending)
        return oks

    def delete(self, ids: Iterable[str]) -> int:
        index, _ = self._data_index()
        idl = list(dict.fromkeys(str(i) for i in ids))
        if not idl:
            return 0
        result = UpsertResult()
        oks = self._bulk([{"_op_type": "delete", "_index": index, "_id": i} for i in idl], result,
                         what=f"deleting from {index!r}")
        if result.failed:
            f = result.failed[0]
            raise StoreError(f"OpenSearch at {self.config.url}: deleting {len(result.failed)} document(s) failed: "
                             f"{f.id}: {f.reason}")
        return sum(1 for o in oks if o.get("result") == "deleted")

    def refresh(self) -> None:
        """Make recent writes visible to search (tests; the index command need not call it)."""
        index, _ = self._data_index()
        self.call(f"refreshing {index!r}", self.client.indices.refresh, index=index)

    # -- reading ----------------------------------------------------------------------------------------
    def _mget(self, index: str, ids: Sequence[str], fields: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), MGET_CHUNK):
            body = self._checked("mget", {"ids": list(ids[start:start + MGET_CHUNK])})
            got = self.call(f"reading documents from {index!r}", self.client.mget, index=index, body=body,
                            _source_includes=fields)
            for d in got.get("docs", []):
                if d.get("found"):
                    out[str(d["_id"])] = d.get("_source") or {}
        return out

    def get_vectors(self, ids: Iterable[str], attributes: Iterable[str] | None = None,
                    *, index: str | None = None) -> dict[str, dict[str, np.ndarray]]:
        """id -> attribute -> vector for the ids that exist (missing attributes are left out)."""
        idx, layout = (index, self._need_read()[1]) if index else self._data_index()
        attrs = layout.schema.check_names(attributes) if attributes is not None else layout.attributes
        idl = list(dict.fromkeys(str(i) for i in ids))
        if not idl:
            return {}
        docs = self._mget(idx, idl, [emb_field(a) for a in attrs])
        return {
            i: {a: decode(np.asarray(src[emb_field(a)], dtype=code_dtype(layout.codec)), layout.codec, layout.scale(a))
                for a in attrs if src.get(emb_field(a)) is not None}
            for i, src in docs.items()
        }

    def image_of(self, id_: str) -> str | None:
        index, _ = self._need_read()
        return self._mget(index, [str(id_)], ["image"]).get(str(id_), {}).get("image")

    def exists(self, id_: str) -> bool:
        index, _ = self._need_read()
        return str(id_) in self._mget(index, [str(id_)], ["model_version"])

    def versions(self) -> dict[str, str]:
        """id -> model_version of every document in the write index (or the alias's)."""
        index, _ = self._data_index()
        query = self._checked("search", {"_source": ["model_version"], "query": {"match_all": {}}})

        def scan() -> dict[str, str]:
            return {str(h["_id"]): str((h.get("_source") or {}).get("model_version", ""))
                    for h in helpers.scan(self.client, index=index, query=query, size=1000, scroll="2m")}

        return self.call(f"listing documents of {index!r}", scan)

    def fingerprints(self) -> dict[str, Fingerprint]:
        """id -> Fingerprint(model_version, image_key, meta_key) of every document in the write index (or
        the alias's); keys are None where a document has none (written before fingerprints existed)."""
        index, _ = self._data_index()
        query = self._checked("search", {"_source": ["model_version", *FINGERPRINT_FIELDS], "query": {"match_all": {}}})

        def scan() -> dict[str, Fingerprint]:
            out = {}
            for h in helpers.scan(self.client, index=index, query=query, size=1000, scroll="2m"):
                src = h.get("_source") or {}
                out[str(h["_id"])] = Fingerprint(str(src.get("model_version", "")), src.get("image_key"),
                                                 src.get("meta_key"))
            return out

        return self.call(f"listing documents of {index!r}", scan)

    def count(self) -> int:
        """Documents in the write index (or the alias's); 0 when nothing is indexed yet."""
        if self.write_index is None:
            self._load()  # connection and auth problems raise here
            if self._read_index is None:
                return 0
        index, _ = self._data_index()
        return int(self.call(f"counting {index!r}", self.client.count, index=index)["count"])

    def verify(self) -> dict[str, Any]:
        """The OpenSearch side of ``fgplugin store verify`` (and of the index worker's first step): the
        index behind the alias must not be red (a primary shard lost or unreadable), else StoreError."""
        self._load()
        if self._read_index is None and self.write_index is None:
            return {"store": self.url, "documents": 0, "ok": True}
        index = self._read_index or self.write_index
        health = self.call(f"checking the health of {index!r}", self.client.cluster.health, index=index)
        if health.get("status") == "red":
            raise StoreError(f"the OpenSearch index {index!r} at {redact_url(self.config.url)} is red: "
                             f"{health.get('unassigned_shards', '?')} shard(s) unassigned, so some documents "
                             "cannot be read; see GET _cluster/allocation/explain")
        layout = self._read_layout or self.write_layout
        return {"store": self.url, "documents": self.count(), "ok": True, "health": health.get("status"),
                "codec": layout.codec if layout is not None else None}

    def search(self, spec: QuerySpec) -> SearchResult:
        """Top-k by the weighted cosine sum in ``spec.mode`` (exact, ann or ann+rescore), via the alias."""
        index, layout = self._need_read()
        layout.refuse_dropped(spec.attributes, self.url)
        spec.validate(layout.schema, layout.dims)
        if spec.image is not None:
            raise QueryError("this store searches by id or vectors; encode the image first (fgplugin.query.execute)")
        qv = reference_vectors(spec, lambda ids, a: self.get_vectors(ids, a, index=self.alias), self.url)
        body = to_opensearch(spec, layout, query_vectors=qv, stored_script_id=self.script_id)
        resp = self.call(f"searching {self.alias!r}", self.client.search, index=self.alias, body=body)
        shards = resp.get("_shards") or {}
        if shards.get("failed"):
            reasons = [f.get("reason", {}).get("reason", "?") for f in shards.get("failures", [])[:2]]
            raise StoreError(f"OpenSearch at {self.config.url}: search failed on {shards['failed']} shard(s): "
                             f"{self.config.scrub('; '.join(map(str, reasons)))}")
        hits = parse_hits(resp, spec, layout, query_vectors=qv)
        return SearchResult(hits=hits, mode=spec.mode, total_candidates=total_candidates(resp, spec),
                            plan=plan_query(spec, layout).describe())

    def stats(self) -> dict[str, Any]:
        index, layout = self._need_read()
        return {"store": self.url, "index": index, "documents": self.count(), "attributes": layout.attributes,
                "dims": layout.dims, "metadata_types": layout.metadata_types, "model_version": layout.model_version,
                "codec": layout.codec, "int8_scales": layout.codec_meta()["scales"]}

    def browse(self, prefix: str | None = None, offset: int = 0, limit: int = 50) -> list[Document]:
        """Documents by id ascending (ids starting with ``prefix``), without vectors (``Store.browse``).

        ``_id`` takes no prefix query, but sorts: the ids starting with ``prefix`` are ``prefix`` itself and the
        run of ids right after it (``search_after``). Sorting on ``_id`` is deprecated in OpenSearch 2 (it
        loads the ids as fielddata); the mapping has no other id field."""
        layout = self.check_listing(offset, limit)
        fields = ["image", *layout.metadata_types]
        body: dict[str, Any] = {"query": {"match_all": {}}, "sort": [{"_id": "asc"}], "_source": fields}
        body.update({"search_after": [prefix], "size": offset + limit} if prefix else {"from": offset, "size": limit})
        with warnings.catch_warnings():  # the deprecation above, once per call: known, and noise to a reader
            warnings.filterwarnings("ignore", message=".*fielddata on the _id field.*")
            resp = self.call(f"listing documents of {self.alias!r}", self.client.search, index=self.alias,
                             body=self._checked("search", body))
        found = [(str(h["_id"]), h.get("_source") or {}) for h in resp.get("hits", {}).get("hits", [])]
        if prefix:
            found = [(i, s) for i, s in found if i.startswith(prefix)]  # the run ends where the prefix does
            own = self._mget(self._need_read()[0], [prefix], fields)
            found = ([(prefix, own[prefix])] if prefix in own else []) + found
            found = found[offset:offset + limit]
        return [Document(i, {}, {f: s[f] for f in layout.metadata_types if s.get(f) is not None}, image=s.get("image"))
                for i, s in found]

    def keyword_values(self, field_: str, limit: int = 100) -> list[tuple[str, int]]:
        """Values of a keyword field by document count, most frequent first (``Store.keyword_values``)."""
        self.check_listing(0, limit, field_)
        body = self._checked("search", {"size": 0, "aggs": {"values": {"terms": {
            "field": field_, "size": limit, "order": [{"_count": "desc"}, {"_key": "asc"}]}}}})
        resp = self.call(f"listing the values of {field_!r} in {self.alias!r}", self.client.search,
                         index=self.alias, body=body)
        buckets = ((resp.get("aggregations") or {}).get("values") or {}).get("buckets", [])
        return [(str(b["key"]), int(b["doc_count"])) for b in buckets]

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a pool must never mask the caller's error
            pass

    def default_errors_path(self) -> Path:
        return Path.cwd() / f"{self.alias}.{ERRORS_FILE}"


class _NotFound(Exception):
    pass


def _until_settled(send: Callable[[], None], pending: dict[str, Any]) -> None:
    send()
    if pending:  # the helper always reports every action; anything left means a protocol surprise
        raise StoreError(f"bulk response did not report {len(pending)} document(s), e.g. {next(iter(pending))!r}")


def _bulk_lines(actions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The NDJSON lines streaming_bulk will send for ``actions`` (for check_request)."""
    lines: list[dict[str, Any]] = []
    for a in actions:
        meta = {"_id": a["_id"]}
        if "_index" in a:
            meta["_index"] = a["_index"]
        lines.append({a["_op_type"]: meta})
        if a["_op_type"] != "delete":
            lines.append(a["_source"])
    return lines


def _item_failure(id_: str, info: Mapping[str, Any], cfg: OpenSearchConfig) -> Failure:
    """kind: throttled (429 after all retries), rejected (other 4xx: the document is bad), http (5xx)."""
    err = info.get("error")
    status = info.get("status")
    if isinstance(err, dict):
        reason = f"{err.get('type', 'error')}: {err.get('reason', '')}"
        cause = err.get("caused_by")
        if isinstance(cause, dict) and cause.get("reason"):
            reason += f" (caused by {cause.get('type', 'error')}: {cause['reason']})"
    else:
        reason = str(err or "failed")
    if status == 429:
        kind = "throttled"
    elif status == 404:  # an update of a document that is not stored
        kind = "missing"
        reason += " (still rejected after the bulk retries)"
    elif isinstance(status, int) and 400 <= status < 500:
        kind = "rejected"
    else:
        kind = "http"
    reason = cfg.scrub(" ".join(f"HTTP {status}: {reason}".split()))[:1000]
    return Failure(id_, "store", reason, kind=kind)
