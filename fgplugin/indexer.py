"""The index worker: catalog -> encoder -> store, resumable, with every failure reported.

One run:

1. checks that the export was trained for the catalog's schema and creates (or checks) the index;
2. compares each catalog item with what the store holds for its id (``store.fingerprints()``: model
   version, image key, metadata key; see :class:`fgplugin.search.store.Fingerprint`). The image key is
   the image source plus, for a local file, its size and mtime (one ``stat``), so a file replaced in
   place counts as a new image; the metadata key hashes the metadata as the store keeps it:
   - same model version, image key and metadata key: skipped as already current. So a run killed at
     any point and started again finishes the job without duplicates or gaps (upserts replace by id,
     and each batch is written as soon as it is encoded);
   - same model version and image key, other metadata: the document is rewritten with the new
     metadata and its stored vectors (read back by id), without re-encoding ("metadata updated");
   - anything else (a new item, another model, another image source, a replaced file, or a document
     without a fingerprint, e.g. written by an older fgplugin): re-encoded;
3. skips items that failed before with the same image and metadata (they are in the errors file;
   pass ``retry_errors=True`` to reprocess exactly those);
4. writes the metadata updates, then encodes the rest in batches (:func:`fgplugin.encoder.iter_encoded`)
   and upserts each batch;
5. reports every item that was not indexed: catalog rows that do not validate (stage ``catalog``),
   images that cannot be read or decoded, model failures, and store rejections, each in the errors
   file with id, stage, kind, reason and time;
6. removes what the catalog no longer describes (see "Removals" below): documents whose update
   failed, documents of rows that are now invalid, and with ``prune=True`` documents whose ids are no
   longer in the catalog;
7. on a store that builds a new model version's index beside the one it serves (OpenSearch: an alias
   over versioned indices), switches the alias to the new index once every catalog item is in it
   (``promote=None``), always (``True``) or never (``False``).

Shards. ``shard=Shard(i, n)`` (``--shard i/n``) makes the run handle only the catalog items whose id
hashes into shard ``i`` of ``n`` (blake2b of the id: stable across processes and machines, every id in
exactly one shard), so ``n`` workers encode disjoint parts of one catalog into one store. Each shard
keeps the guarantees above for its own ids: it compares, skips, resumes and removes (stale documents,
invalid rows) only among documents whose ids hash into it, ``max_removal`` counts against its own stored
documents, its ``orphans`` are the documents of its ids that no row names (never another shard's),
and it has its own errors file (:meth:`Shard.errors_path`). Catalog problems go to the
shard of their row's id (rows without any id to shard 0), so each is reported once. Two things need
the whole catalog and are not done by a shard: ``prune`` is refused (an unsharded ``prune`` run
afterwards removes what no row names), and the alias is not switched to a new model's index unless
``promote=True`` (other shards may not be done).

The errors file (JSONL, one object per line) always describes what is currently not indexed: lines
are appended as failures happen (so a killed run loses none), and the file is rewritten compactly at
the end without the items that have since succeeded or left the catalog.

Extensions. A model made by ``fgplugin train --extend`` gives the base model's attributes bit-identical
vectors (its card says which base export version it extends: ``fgplugin.card.extension_of``). Indexed into
a store built with that base version (same attributes, sizes, codec), the run adds the new attributes'
fields to the live index (``Store.add_attributes``: a DuckDB column; an OpenSearch mapping field, the
alias untouched) and gives each document at the base version with the same image and metadata keys only
the new attributes' vectors and the new model version (``Store.update_vectors``, counted as ``extended``);
everything else takes the normal path. A resumed run finds the fields there and the documents already
moved to the new version current. A model that extends another version than the index's is refused
(StoreError naming both), as is one extended from a training checkpoint (its card names no base
version). The same path adds back an attribute removed by ``Store.drop_attribute`` when the model it was
dropped from indexes the store again (the documents carry a version derived from that model's).

Removals. A stored document that is out of date and fails to be brought up to date (its re-encoding
with a new model or from a new image fails, or the store rejects its new metadata), and the document
of a row that has become invalid (a bad value, a duplicate of another row's id is not one of them),
is deleted rather than left stale: scores between vectors of different models are meaningless, and
vectors or metadata the catalog no longer describes would answer queries wrongly (an old
``in_stock=true``). The item is then in the errors file like any other failure. ``prune=True`` also
deletes documents whose ids are in no row of the catalog, but only when every row of the file was read
and identified (:attr:`Catalog.complete`): a line that cannot be parsed, a bad byte or a row without an
id would otherwise make its item look gone. All removals of a run happen at its end, together, and
only while they stay within ``max_removal`` (a fraction of the stored documents, default 10 %): more
than that looks like a damaged catalog, an unmounted image folder or the wrong file, so nothing is
removed and the report says how many and why (pass a higher ``max_removal`` to confirm). A run that
was aborted or interrupted removes nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


from .card import extension_of
from .catalog import UNREADABLE, Catalog, Problem, load_catalog
from .codecs import card_codec, check_codec, int8_scales, uses_scales
from .encoder import BatchTimings, EncodedBatch, iter_encoded
from .encoding import DeployedEncoder
from .errors import ImageError, ModelCardError, SettingError, StoreError
from .images import DEFAULT_LIMITS, ImageLimits
from .progress import OnProgress, report as report_step
from .schema import require_same_schema
from .search.store import (Document, Failure, Fingerprint, IndexLayout, Store, UpsertResult, dropped_version, image_key,
                           metadata_key, same_image)

METADATA_CHUNK = 500  # documents per get_vectors + upsert round of metadata-only updates
MAX_REMOVAL = 0.10  # default share of the stored documents one run may remove (see "Removals")


# -- shards ----------------------------------------------------------------------------------------
def shard_of(id_: str, count: int) -> int:
    """The shard (0..count-1) an id belongs to. blake2b, not hash(): Python salts str hashes per process,
    and every worker on every machine must put an id in the same shard."""
    digest = hashlib.blake2b(id_.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard index/count``): the catalog items whose id hashes to it."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise SettingError(f"--shard {self}: the number of shards N must be at least 1")
        if not 0 <= self.index < self.count:
            raise SettingError(f"--shard {self}: the shard number I must be in 0..{self.count - 1} "
                               f"(shards are numbered from 0, so {self.count} shards are 0/{self.count} .. "
                               f"{self.count - 1}/{self.count})")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if m is None:
            raise SettingError(f"--shard {text!r}: expected I/N, worker I of N counted from 0 (e.g. 0/4 .. 3/4)")
        return cls(int(m[1]), int(m[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, id_: str) -> bool:
        return shard_of(id_, self.count) == self.index

    def errors_path(self, default: str | Path) -> Path:
        """The shard's own errors file beside ``default`` (errors.jsonl -> errors.shard-0-of-4.jsonl), so
        workers sharing a folder do not overwrite each other's."""
        p = Path(default)
        return p.with_name(f"{p.stem}.shard-{self.index}-of-{self.count}{p.suffix}")


def refuse_prune_in_shard(shard: Shard | None, prune: bool) -> None:
    """A shard sees part of the catalog: every other shard's item would look gone to it."""
    if shard is not None and prune:
        raise SettingError(
            f"--prune is refused with --shard {shard}: prune removes documents no catalog row names, which only a "
            "run that saw the whole catalog can tell; run the shards without --prune, then one unsharded "
            "`fgplugin index --prune` afterwards")


def shard_catalog(catalog: Catalog, shard: Shard) -> Catalog:
    """The part of ``catalog`` a shard handles: its items, and the problems of rows with its ids (rows
    without an id go to shard 0, so the shards together report each problem once)."""
    items = [it for it in catalog if shard.owns(it.id)]
    problems = [p for p in catalog.problems
                if (shard.owns(p.item_id) if p.item_id is not None else shard.index == 0)]
    return dataclasses.replace(catalog, items=items, problems=problems)


# -- the errors file -------------------------------------------------------------------------------
def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def failure_entry(f: Failure, *, image: str | None, model_version: str,
                  keys: tuple[str, str] | None = None) -> dict[str, Any]:
    """One errors-file line; ``keys`` (image key, metadata key) tell a later run whether the item's
    inputs changed since it failed (then it is tried again without ``retry_errors``)."""
    e = {"id": f.id, "stage": f.stage, "kind": f.kind, "reason": f.reason, "image": image,
         "model_version": model_version, "time": _now()}
    if keys is not None:
        e["image_key"], e["meta_key"] = keys
    return e


def _same_inputs(entry: dict[str, Any], src: str, keys: tuple[str, str]) -> bool:
    """Whether an item failed before with the inputs it has now (entries of older runs: same source)."""
    if "image_key" in entry:
        return (entry.get("image_key"), entry.get("meta_key")) == keys
    return entry.get("image") == src


def problem_entry(p: Problem) -> dict[str, Any]:
    return {"id": p.item_id, "stage": "catalog", "kind": p.kind, "reason": p.cause, "row": p.row, "time": _now()}


def read_errors(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Item failures recorded in an errors file: id -> latest entry (catalog problems are left out:
    each run re-derives them from the catalog). A torn last line (killed writer) is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if path is None or not Path(path).is_file():
        return out
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(e, dict) and e.get("stage") != "catalog" and isinstance(e.get("id"), str):
                out[e["id"]] = e
    return out


def write_errors(path: Path, entries: Iterable[dict[str, Any]]) -> int:
    """Replace the errors file atomically; an empty list removes it. Returns the number of lines."""
    rows = list(entries)
    if not rows:
        path.unlink(missing_ok=True)
        return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for e in rows:
            f.write(json.dumps(e, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return len(rows)


# -- the report ------------------------------------------------------------------------------------
@dataclass
class IndexReport:
    catalog: str
    store: str
    model_version: str
    shard: str | None = None  # "i/n" for a shard run: the counts below are that shard's
    catalog_items: int = 0  # valid catalog rows (of the shard)
    to_index: int = 0  # items this run tried
    indexed: int = 0
    skipped_current: int = 0  # already indexed with this model version, image and metadata
    metadata_updated: int = 0  # metadata rewritten, vectors kept (same model version and image)
    extended: int = 0  # given only the vectors of attributes added to the index in place (see "Extensions")
    added_attributes: list[str] = field(default_factory=list)  # attributes this run added to the index
    codec: str = ""  # how the index keeps the vectors (fgplugin.codecs)
    skipped_failed: int = 0  # failed before with the same image and metadata; see retry_errors
    not_attempted: int = 0  # with retry_errors: new or stale items outside the errors file
    failures: list[Failure] = field(default_factory=list)  # this run's
    catalog_problems: list[Problem] = field(default_factory=list)
    stale_removed: int = 0  # out-of-date documents deleted because bringing them up to date failed
    invalid_removed: int = 0  # documents of rows that are now invalid
    orphans: int = 0  # in the store, not in the catalog (deleted with prune)
    pruned: int = 0
    not_pruned: str | None = None  # why --prune removed nothing although there were orphans
    removal_refused: str | None = None  # why nothing was removed (over max_removal)
    notes: list[str] = field(default_factory=list)  # the catalog's warnings (e.g. a type inferred as text)
    promoted: str | None = None  # the index a store's alias was switched to, if any
    not_promoted: str | None = None  # why a new model version's index does not serve queries yet
    errors_path: str | None = None
    errors_in_file: int = 0
    aborted: str | None = None
    elapsed_s: float = 0.0
    write_s: float = 0.0
    timings: BatchTimings = field(default_factory=BatchTimings)

    @property
    def ok(self) -> bool:
        """True when everything in the catalog is indexed and current."""
        return not (self.failures or self.catalog_problems or self.skipped_failed or self.aborted or self.not_attempted
                    or self.removal_refused or self.not_pruned)

    def failed_by_cause(self) -> dict[str, int]:
        c = collections.Counter(f"{f.stage}/{f.kind or '?'}" for f in self.failures)
        c.update(f"catalog/{p.kind}" for p in self.catalog_problems)
        return dict(sorted(c.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "catalog": self.catalog,
            "store": self.store,
            "model_version": self.model_version,
            "shard": self.shard,
            "catalog_items": self.catalog_items,
            "to_index": self.to_index,
            "indexed": self.indexed,
            "metadata_updated": self.metadata_updated,
            "extended": self.extended,
            "added_attributes": list(self.added_attributes),
            "codec": self.codec,
            "skipped_current": self.skipped_current,
            "skipped_previously_failed": self.skipped_failed,
            "not_attempted": self.not_attempted,
            "failed": len(self.failures) + len(self.catalog_problems),
            "failed_by_cause": self.failed_by_cause(),
            "failures": [f.__dict__ for f in self.failures[:1000]],
            "stale_removed": self.stale_removed,
            "invalid_removed": self.invalid_removed,
            "orphans": self.orphans,
            "pruned": self.pruned,
            "not_pruned": self.not_pruned,
            "removal_refused": self.removal_refused,
            "notes": list(self.notes),
            "promoted": self.promoted,
            "not_promoted": self.not_promoted,
            "errors_path": self.errors_path,
            "errors_in_file": self.errors_in_file,
            "aborted": self.aborted,
            "elapsed_s": round(self.elapsed_s, 3),
            "items_per_s": round(self.indexed / self.elapsed_s, 2) if self.elapsed_s > 0 else None,
            "timings_s": {"read": round(self.timings.read_s, 3), "decode": round(self.timings.decode_s, 3),
                          "model": round(self.timings.model_s, 3), "wait_for_images": round(self.timings.wait_s, 3),
                          "write": round(self.write_s, 3)},
        }


def check_schema(catalog: Catalog, encoder: DeployedEncoder) -> None:
    """Refuse an export trained for another schema than the catalog's."""
    require_same_schema(encoder.schema, catalog.schema, have_is=f"the model {encoder.path}",
                        want_is=f"the catalog {catalog.path}", error=ModelCardError)


@dataclass
class _Work:
    """What one run has to do, from comparing the catalog with the store's fingerprints (step 2-3)."""

    encode: list[tuple[str, str]] = field(default_factory=list)  # (id, image source) to encode
    metadata_only: list[str] = field(default_factory=list)  # ids whose metadata alone changed
    extend: list[tuple[str, str]] = field(default_factory=list)  # (id, image source) needing only added attributes
    added: dict[str, list[str]] = field(default_factory=dict)  # id in ``extend`` -> the attributes it lacks
    sources: dict[str, str] = field(default_factory=dict)  # id -> image source
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (image key, metadata key) written
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)  # standing failures, id -> errors-file entry
    early: list[Failure] = field(default_factory=list)  # items that fail before encoding (bad image URL)


def _plan_work(catalog: Catalog, layout: IndexLayout, stored: dict[str, Fingerprint],
               prior: dict[str, dict[str, Any]], retry_errors: bool, report: IndexReport,
               extend_from: dict[str, list[str]] | None = None) -> _Work:
    """Sort every catalog item into skipped (counted on ``report``), metadata-only or to encode."""
    work = _Work()
    for it in catalog:
        try:
            src = catalog.image_source(it)
        except ImageError as e:
            work.early.append(Failure(it.id, "read", str(e), kind="bad_url"))
            continue
        ik, mk = image_key(src), metadata_key(layout, it.metadata)
        fp = stored.get(it.id)
        # same_image: also a key stored before image sources were made absolute, for the same file
        # (its document is then rewritten with the absolute source, without re-encoding).
        same_vectors = fp is not None and fp.model_version == layout.model_version and same_image(fp.image_key, ik)
        if same_vectors and fp is not None and fp.image_key == ik and fp.meta_key == mk:
            report.skipped_current += 1
            continue
        work.keys[it.id] = (ik, mk)
        known = prior.get(it.id)
        if known is not None:
            work.errors[it.id] = known
        if retry_errors:
            if known is None:
                report.not_attempted += 1
                continue
        elif known is not None and _same_inputs(known, src, (ik, mk)):
            report.skipped_failed += 1
            continue
        work.sources[it.id] = src
        if same_vectors:
            work.metadata_only.append(it.id)
        elif (fp is not None and fp.model_version in (extend_from or {}) and fp.image_key == ik
              and fp.meta_key == mk):
            work.extend.append((it.id, src))  # the base's vectors are the model's: only the added ones are written
            work.added[it.id] = (extend_from or {})[fp.model_version]
        else:
            work.encode.append((it.id, src))
    report.to_index = len(work.encode) + len(work.metadata_only) + len(work.extend) + len(work.early)
    return work


@dataclass
class _Run:
    """One run's moving parts: what it writes, what it records, and where failures go as they happen."""

    catalog: Catalog
    store: Store
    report: IndexReport
    work: _Work
    stored: dict[str, Fingerprint]  # updated as documents are written: the run's view of the store
    errors_file: Any = None  # open errors file (append), or None
    shard: Shard | None = None
    items: dict[str, Any] = field(default_factory=dict)  # catalog id -> item

    def __post_init__(self) -> None:
        self.items = self.catalog.by_id()

    def record(self, failed: list[Failure]) -> None:
        """Report failures and append them to the errors file at once (a killed run loses none)."""
        for f in failed:
            self.report.failures.append(f)
            e = failure_entry(f, image=self.work.sources.get(f.id), model_version=self.report.model_version,
                              keys=self.work.keys.get(f.id))
            self.work.errors[f.id] = e
            if self.errors_file is not None:
                self.errors_file.write(json.dumps(e, ensure_ascii=False, default=str) + "\n")
        if self.errors_file is not None and failed:
            self.errors_file.flush()

    def written(self, ids: Iterable[str]) -> None:
        for i in ids:
            self.work.errors.pop(i, None)
            self.stored[i] = Fingerprint(self.report.model_version, *self.work.keys[i])

    def document(self, id_: str, vectors: dict[str, Any]) -> Document:
        item = self.items[id_]
        ik, mk = self.work.keys[id_]
        return Document(id_, vectors, dict(item.metadata), model_version=self.report.model_version,
                        image=self.work.sources[id_], image_key=ik, meta_key=mk)

    def write(self, docs: list[Document], *, vectors_only: bool = False) -> UpsertResult | None:
        """Upsert (``vectors_only``: ``update_vectors``); a StoreError (store down or broken) aborts the run:
        None. Those items are not failures of their own; the next run picks them (and everything after them)
        up again."""
        t0 = time.perf_counter()
        try:
            result = self.store.update_vectors(docs) if vectors_only else self.store.upsert(docs)
        except StoreError as e:
            self.report.aborted = str(e)
            return None
        self.report.write_s += time.perf_counter() - t0
        self.written(result.ok)
        return result


def _update_metadata(run: _Run) -> None:
    """Metadata-only changes: rewrite the documents with their stored vectors (no image is read)."""
    ids = run.work.metadata_only
    for start in range(0, len(ids), METADATA_CHUNK):
        chunk = ids[start:start + METADATA_CHUNK]
        try:
            vectors = run.store.get_vectors(chunk)
        except StoreError as e:
            run.report.aborted = str(e)
            return
        # A document gone since the fingerprints were read is encoded instead.
        run.work.encode.extend((i, run.work.sources[i]) for i in chunk if i not in vectors)
        docs = [run.document(i, vectors[i]) for i in chunk if i in vectors]
        if not docs:
            continue
        result = run.write(docs)
        if result is None:
            return
        run.report.metadata_updated += len(result.ok)
        run.record(result.failed)


def _encode_and_write(run: _Run, encoder: DeployedEncoder, *, batch_size: int, workers: int, limits: ImageLimits,
                      on_progress: OnProgress | None, on_batch: Callable[[EncodedBatch], None] | None,
                      extend: bool = False) -> None:
    """Encode the items to encode in batches and upsert each batch as soon as it is encoded. ``extend``: the
    items that need only the attributes added in place; the encoder computes every vector, the store gets
    only those (``Store.update_vectors``)."""
    items, step = (run.work.extend, "extending") if extend else (run.work.encode, "indexing")
    total, done = len(items), 0
    report_step(on_progress, step, 0, total)
    for batch in iter_encoded(encoder, items, batch_size=batch_size, workers=workers, limits=limits):
        run.report.timings.add(batch.timings)
        docs = [run.document(id_, {a: batch.vectors[a][j] for a in (run.work.added[id_] if extend else encoder.attributes)})
                for j, id_ in enumerate(batch.ids)]
        failed = list(batch.failures)
        if docs:
            result = run.write(docs, vectors_only=extend)
            if result is None:
                run.record(failed)
                return
            if extend:
                run.report.extended += len(result.ok)
            else:
                run.report.indexed += len(result.ok)
            failed += result.failed
        run.record(failed)
        done += len(batch)
        nfail = len(run.report.failures)
        report_step(on_progress, step, done, total, f"{nfail} failed" if nfail else "")
        if on_batch is not None:
            on_batch(batch)


def _remove_and_promote(run: _Run, *, prune: bool, max_removal: float, promote: bool | None) -> None:
    """Steps 6 and 7: the run's removals (all or none, see "Removals") and the alias switch."""
    rep, store = run.report, run.store
    # ``stored`` now holds this run's fingerprints for what it wrote: a failed id still in it keeps a
    # document that was not brought up to date.
    plan = plan_removals(run.catalog, run.stored, run.work.errors, prune=prune, max_removal=max_removal)
    rep.orphans, rep.not_pruned, rep.removal_refused = len(plan.orphans), plan.not_pruned, plan.refused
    if plan.ids and not rep.aborted:
        rep.stale_removed = store.delete(plan.stale) if plan.stale else 0
        rep.invalid_removed = store.delete(plan.invalid) if plan.invalid else 0
        rep.pruned = store.delete(plan.prune) if plan.prune else 0
    if not store.pending_promotion:
        return
    if rep.aborted:
        rep.not_promoted = "the run did not finish; queries still use the previous index"
    elif promote or (promote is None and rep.ok and run.shard is None):
        rep.promoted = str(store.promote()["index"])
    elif promote is False:
        rep.not_promoted = "promotion was turned off"
    elif run.shard is not None:
        rep.not_promoted = (
            f"a shard run ({run.shard}) does not switch the alias to the new model's index {store.write_target}: "
            "other shards may not be done; queries still use the previous index (once every shard is done, "
            "rerun one with --promote)")
    else:
        rep.not_promoted = (f"the new model's index {store.write_target} is not complete; queries still use the "
                            "previous one (fix the failures and rerun, or pass --promote)")


def _start_run(catalog: Catalog | str | Path, encoder: DeployedEncoder, store: Store, *, shard: Shard | None,
               errors_path: str | Path | None, retry_errors: bool, model_path: str | Path | None,
               codec: str | None = None) -> _Run:
    """Steps 1-3: the catalog (a shard's part of it), the index, and the work from the store's fingerprints."""
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog, encoder.schema, strict=False)
    check_schema(catalog, encoder)
    if shard is not None:
        catalog = shard_catalog(catalog, shard)
    rep = IndexReport(str(catalog.path), store.url, encoder.version, shard=None if shard is None else str(shard),
                      catalog_items=len(catalog), catalog_problems=list(catalog.problems), notes=list(catalog.notes))
    codec = card_codec(encoder.card) if codec is None else codec
    try:
        check_codec(codec)
    except ValueError as e:
        raise SettingError(f"--codec: {e}") from None
    layout = IndexLayout(encoder.schema, dict(encoder.dims), dict(catalog.metadata_types), encoder.version,
                         query_slack=encoder.query_slack, codec=codec,
                         scales=int8_scales(encoder.card) if uses_scales(codec) else {})
    rep.codec = codec
    store.verify()  # a damaged store must not pass for "already current": read it whole first
    extend_from, rep.added_attributes = grow_in_place(store, encoder, layout)
    store.ensure_index(layout)  # workers that start together: the store takes a concurrent create
    store.set_meta("model_path", str(Path(model_path if model_path is not None else encoder.path).resolve()))

    # A shard's view of the store is the documents of its ids: other shards' are neither current nor orphans.
    stored = {i: fp for i, fp in store.fingerprints().items() if shard is None or shard.owns(i)}
    catalog_ids = set(catalog.ids)
    prior = {i: e for i, e in read_errors(errors_path).items() if i in catalog_ids}
    return _Run(catalog, store, rep, _plan_work(catalog, layout, stored, prior, retry_errors, rep, extend_from), stored,
                shard=shard)


def grow_in_place(store: Store, encoder: DeployedEncoder, layout: IndexLayout) -> tuple[dict[str, list[str]], list[str]]:
    """Step 1 for a model that adds attributes to the index's (see "Extensions"): add their fields to the live
    index (``Store.add_attributes``) and say which stored documents need only them. Returns ({model version of
    such documents: the attributes they lack}, the attributes added now). Refuses (StoreError) a model that
    extends another model than the index's, or a training checkpoint (no base version to check)."""
    old = store.layout
    ext = extension_of(encoder.card)
    if old is None:
        return {}, []
    extend_from: dict[str, list[str]] = {}
    if ext is not None and ext[0] is not None:
        extend_from[ext[0]] = list(ext[2])
    # documents whose attribute was dropped (``Store.drop_attribute``): this model adds it back
    extend_from.update({dropped_version(encoder.version, a): [a] for a in encoder.attributes})
    readd = _dropped_from(old, encoder.version)
    if readd:
        extend_from[old.model_version] = [a for a in layout.attributes if a not in old.attributes]
    missing = [a for a in layout.attributes if a not in old.attributes]
    if not missing or [a for a in old.attributes if a not in layout.attributes]:
        return extend_from, []  # nothing to add (a resumed run), or another schema: ensure_index decides
    where = f"the index in {store.url}"
    if readd:  # the model the attributes were dropped from, whose vectors the documents still hold
        return extend_from, store.add_attributes(old.extended_by(layout, old.model_version, missing))
    if ext is not None and ext[0] is None and sorted(old.attributes) == sorted(ext[1]):
        raise StoreError(f"the model {encoder.path} was extended from a training checkpoint, so its card names no "
                         f"base export version and {where} cannot be known to hold its vectors: extend from the export "
                         "the index was built with (fgplugin train --extend EXPORT), or index into a new store")
    if ext is not None and sorted(old.attributes) == sorted(ext[1]):
        grown = old.extended_by(layout, ext[0] or "", ext[2])
    elif any(a in old.dropped for a in missing):
        raise StoreError(f"attribute(s) {', '.join(a for a in missing if a in old.dropped)} were dropped from {where} "
                         f"(model version {old.model_version[:12]}), whose documents do not hold the vectors of the "
                         f"model {encoder.path} ({encoder.version[:12]}): index with the model they were dropped from "
                         "while the index holds its vectors, or into a new store")
    else:
        return extend_from, []  # not an extension: ensure_index refuses it as any other schema
    return extend_from, store.add_attributes(grown)


def _dropped_from(layout: IndexLayout, version: str) -> bool:
    """Whether ``layout`` is model ``version``'s index with attributes dropped and nothing re-encoded since."""
    v = layout.dropped_from
    for a in layout.dropped:
        v = dropped_version(v, a)
    return bool(layout.dropped) and layout.dropped_from == version and v == layout.model_version


def index_catalog(
    catalog: Catalog | str | Path,
    encoder: DeployedEncoder,
    store: Store,
    *,
    batch_size: int = 32,
    workers: int = 4,
    errors_path: str | Path | None = None,
    retry_errors: bool = False,
    prune: bool = False,
    max_removal: float = MAX_REMOVAL,
    on_progress: OnProgress | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    model_path: str | Path | None = None,
    promote: bool | None = None,
    on_batch: Callable[[EncodedBatch], None] | None = None,
    shard: Shard | None = None,
    codec: str | None = None,
) -> IndexReport:
    """Bring ``store`` up to date with ``catalog`` encoded by ``encoder`` (the steps of the module docstring).

    ``catalog``: a loaded Catalog or a manifest path (loaded non-strictly with the encoder's schema;
    invalid rows are reported, not indexed). ``errors_path``: the errors JSONL (None: failures are only
    in the report). ``model_path``: recorded in the store's meta (``model_path``), so image queries find
    the encoder; defaults to ``encoder.path``. ``on_progress``: called with ``Step("indexing", done,
    total, info)`` as batches are written. ``promote``: step 7. ``on_batch``: called after each batch is
    written. ``max_removal``: see "Removals". ``shard``: handle only that shard's items (see "Shards";
    ``prune`` with a shard raises SettingError before anything is read). ``codec``: how the stores keep the
    vectors (``fgplugin.codecs``: float32, float16, int8, binary; None: the card's ``storage.codec``, else
    float32); a store holding another codec refuses the run (StoreError naming both).

    Ctrl-C (KeyboardInterrupt) ends the run early with a report (``aborted``) of what was done; what
    was written stays, and a rerun continues from there.
    """
    t_start = time.perf_counter()
    refuse_prune_in_shard(shard, prune)
    run = _start_run(catalog, encoder, store, shard=shard, errors_path=errors_path, retry_errors=retry_errors,
                     model_path=model_path, codec=codec)
    rep = run.report

    err_file = Path(errors_path) if errors_path is not None else None
    if err_file is not None:
        err_file.parent.mkdir(parents=True, exist_ok=True)
        # Start the file with what stands now, then append as failures happen: a killed run loses none.
        write_errors(err_file, [problem_entry(p) for p in rep.catalog_problems] + list(run.work.errors.values()))
        run.errors_file = err_file.open("a", encoding="utf-8")
    try:
        run.record(run.work.early)
        _update_metadata(run)
        for extend in (True, False):  # the added attributes first: queries on them answer for every item soonest
            if not rep.aborted:
                _encode_and_write(run, encoder, batch_size=batch_size, workers=workers, limits=limits,
                                  on_progress=on_progress, on_batch=on_batch, extend=extend)
    except KeyboardInterrupt:
        # Written batches stay (each upsert is all or nothing); report what was done instead of a traceback.
        rep.aborted = "interrupted (Ctrl-C); what was written stays, rerun to continue"
    finally:
        if run.errors_file is not None:
            run.errors_file.close()

    _remove_and_promote(run, prune=prune, max_removal=max_removal, promote=promote)
    if err_file is not None:
        rep.errors_path = str(err_file)
        rep.errors_in_file = write_errors(
            err_file, [problem_entry(p) for p in rep.catalog_problems] + list(run.work.errors.values()))
    rep.elapsed_s = time.perf_counter() - t_start
    return rep


@dataclass
class Removals:
    """What one run removes (module docstring, "Removals"): all of it, or nothing with ``refused`` set."""

    stale: list[str] = field(default_factory=list)  # documents whose update failed
    invalid: list[str] = field(default_factory=list)  # documents of rows that are now invalid
    orphans: list[str] = field(default_factory=list)  # documents in no row of the catalog
    prune: list[str] = field(default_factory=list)  # the orphans that go (with prune, on a complete catalog)
    not_pruned: str | None = None
    refused: str | None = None

    @property
    def ids(self) -> list[str]:
        return [] if self.refused else [*self.stale, *self.invalid, *self.prune]


def plan_removals(catalog: Catalog, stored_ids: Iterable[str], failed_ids: Iterable[str], *, prune: bool,
                  max_removal: float = MAX_REMOVAL) -> Removals:
    """Decide the run's removals from the catalog as read, the stored ids, and the ids with a standing
    failure whose stored document was not rewritten this run."""
    stored = list(stored_ids)
    stored_set = set(stored)
    catalog_ids = set(catalog.ids)
    plan = Removals(stale=[i for i in failed_ids if i in stored_set])
    # Rows with an id that no longer validate (a duplicate row's id is valid in its first row).
    plan.invalid = sorted({p.item_id for p in catalog.problems if p.kind != UNREADABLE and p.item_id is not None
                           and p.item_id in stored_set and p.item_id not in catalog_ids} - set(plan.stale))
    named = {p.item_id for p in catalog.problems if p.item_id is not None}  # unreadable rows' guesses too
    plan.orphans = [i for i in stored if i not in catalog_ids and i not in named]
    if prune and plan.orphans and not catalog.complete:
        bad = catalog.unidentified()
        plan.not_pruned = (
            f"{len(bad)} row(s) of the catalog could not be read or have no id ({bad[0]}"
            f"{'; ...' if len(bad) > 1 else ''}), so an item missing from what was read may still be in the file; "
            "fix them, then prune")
    elif prune:
        plan.prune = list(plan.orphans)
    total = len(plan.stale) + len(plan.invalid) + len(plan.prune)
    if total > max_removal * len(stored):
        parts = [f"{n} {what}" for n, what in ((len(plan.prune), "not in the catalog"), (len(plan.invalid), "of invalid rows"),
                                               (len(plan.stale), "whose update failed")) if n]
        needed = 100 * total / len(stored)
        plan.refused = (
            f"{total} of the {len(stored)} stored documents would be removed ({', '.join(parts)}): {needed:.0f} %, "
            f"more than the {100 * max_removal:.0f} % one run may remove. A damaged or partial catalog, a wrong file "
            "or an unmounted image folder looks like this; if these items really are gone or broken, rerun with "
            f"--max-removal {min(100, math.ceil(needed))}")
    return plan


__all__ = ["index_catalog", "IndexReport", "Removals", "plan_removals", "MAX_REMOVAL", "read_errors", "write_errors",
           "check_schema", "Shard", "shard_of", "shard_catalog", "refuse_prune_in_shard"]
