"""Batched, pipelined encoding of catalog images with an exported encoder.

Worker threads read, decode, resize and normalise images (PIL and torch release the GIL, so threads
overlap) while the main thread runs the model on the previous batch; the model, not decoding, is the
bottleneck. A bounded window of in-flight items keeps memory flat on catalogs of any size, and results
come back in input order, one :class:`EncodedBatch` per ``batch_size`` input items.

A bad item never stops a batch: an unreadable file, a failed download, a corrupt or oversize image,
or a model failure becomes a :class:`~fgplugin.search.store.Failure` (stage ``read``, ``decode`` or
``encode``) on the batch that item belonged to, and the other items go on.

Vectors are float32 by default, each L2-normalised (the export does that). ``dtype="float16"`` or
``"int8"`` give compact copies: int8 uses the model card's symmetric per-attribute scheme
(``card["storage"]["int8"]``): ``q = clip(round(v * scale_a), -127, 127)`` and ``v ~= q / scale_a``,
where ``scale_a`` defaults to 127 because every component of a unit vector lies in [-1, 1]. Use
:func:`dequantize` to get float32 back. The rules live in ``fgplugin.codecs`` (shared with the stores).
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import httpx
import numpy as np
import torch

from . import images
from .encoding import DeployedEncoder
from .errors import ImageError
from .images import ImageLimits
from .codecs import dequantize, int8_scales, quantize  # quantize and dequantize re-exported (see __all__)
from .search.store import Failure

DTYPES = ("float32", "float16", "int8")


@dataclass
class BatchTimings:
    """Seconds spent on one batch. read_s and decode_s are summed over worker threads (they overlap
    with each other and with the model); wait_s is how long the model thread sat idle waiting for
    decoded images (near zero when the model is the bottleneck, as it should be)."""

    read_s: float = 0.0  # file reads and downloads
    decode_s: float = 0.0  # image decode + resize + normalise
    model_s: float = 0.0  # forward pass (main thread)
    wait_s: float = 0.0  # main thread blocked on the loaders

    def add(self, other: "BatchTimings") -> None:
        self.read_s += other.read_s
        self.decode_s += other.decode_s
        self.model_s += other.model_s
        self.wait_s += other.wait_s


@dataclass
class EncodedBatch:
    """The outcome of ``batch_size`` consecutive input items: every item is in ``ids`` or ``failures``."""

    ids: list[str]  # encoded items, in input order
    vectors: dict[str, np.ndarray]  # attribute -> [len(ids), d] (float32 unless another dtype was asked)
    failures: list[Failure] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # image source of each encoded id
    timings: BatchTimings = field(default_factory=BatchTimings)

    def __len__(self) -> int:
        return len(self.ids) + len(self.failures)


@dataclass
class _Loaded:
    id: str
    source: str
    tensor: torch.Tensor | None = None
    failure: Failure | None = None
    read_s: float = 0.0
    decode_s: float = 0.0


def _load(id_: str, source: str, transform: Callable[[Any], torch.Tensor], limits: ImageLimits,
          client: httpx.Client) -> _Loaded:
    """Read + decode + preprocess one image in a worker thread; any failure becomes a Failure."""
    out = _Loaded(id_, source)
    t0 = time.perf_counter()
    try:
        data = images.read_bytes(source, limits=limits, client=client)
    except ImageError as e:
        out.failure = Failure(id_, "read", str(e), kind=_read_kind(e))
        return out
    except Exception as e:  # noqa: BLE001 - an unexpected error on one item must not end the run
        out.failure = Failure(id_, "read", f"{images.shown_source(source)}: {images.plain_cause(e)}", kind="error")
        return out
    t1 = time.perf_counter()
    out.read_s = t1 - t0
    try:
        im = images.decode(data, source, limits=limits)
        out.tensor = transform(im)
    except ImageError as e:
        out.failure = Failure(id_, "decode", str(e), kind=e.kind)
    except Exception as e:  # noqa: BLE001
        out.failure = Failure(id_, "decode", f"{images.shown_source(source)}: {images.plain_cause(e)}", kind="corrupt")
    out.decode_s = time.perf_counter() - t1
    return out


def _read_kind(e: ImageError) -> str:
    # images.check_source raises with the generic kind for a scheme it refuses.
    return "bad_url" if e.kind == "image" and "scheme" in e.cause else e.kind


def make_client(limits: ImageLimits, workers: int) -> httpx.Client:
    """One pooled HTTP client shared by the loader threads (httpx.Client is thread-safe)."""
    return httpx.Client(
        timeout=limits.timeout_s,
        follow_redirects=True,
        limits=httpx.Limits(max_connections=max(4, 2 * workers), max_keepalive_connections=max(4, 2 * workers)),
    )


def _forward(encoder: DeployedEncoder, tensors: list[torch.Tensor], ids: list[str]) -> tuple[dict[str, np.ndarray], list[int], list[Failure]]:
    """Encode a batch; if the batch fails, encode item by item so one bad input costs only itself.

    Returns (vectors of the kept rows, indices of the kept rows, failures)."""
    try:
        out = encoder.encode_tensors(torch.stack(tensors))
        keep = list(range(len(ids)))
    except Exception as e:  # noqa: BLE001 - isolate the item that broke the batch
        if len(ids) == 1:
            return {}, [], [Failure(ids[0], "encode", f"model failed: {images.plain_cause(e)}", kind="model")]
        parts, keep, failures = [], [], []
        for i, t in enumerate(tensors):
            got, k, f = _forward(encoder, [t], [ids[i]])
            failures += f
            if k:
                parts.append(got)
                keep.append(i)
        if not parts:
            return {}, [], failures
        return {a: np.concatenate([p[a] for p in parts]) for a in parts[0]}, keep, failures
    # A vector with NaN/inf is useless for cosine search: report it instead of storing it.
    finite = np.ones(len(ids), dtype=bool)
    for v in out.values():
        finite &= np.isfinite(v).all(axis=1)
    if finite.all():
        return out, keep, []
    failures = [Failure(ids[i], "encode", "model produced non-finite values (NaN or inf)", kind="nan")
                for i in np.flatnonzero(~finite)]
    return {a: v[finite] for a, v in out.items()}, [i for i in keep if finite[i]], failures


def _assemble(encoder: DeployedEncoder, loaded: list[_Loaded], dtype: str, timings: BatchTimings) -> EncodedBatch:
    """One batch from its loaded items: encode the good ones, keep every failure."""
    failures = [x.failure for x in loaded if x.failure is not None]
    good = [x for x in loaded if x.failure is None]
    timings.read_s = sum(x.read_s for x in loaded)
    timings.decode_s = sum(x.decode_s for x in loaded)
    vectors: dict[str, np.ndarray] = {a: np.zeros((0, encoder.dims[a]), np.float32) for a in encoder.attributes}
    ids: list[str] = []
    sources: list[str] = []
    if good:
        t1 = time.perf_counter()
        got, keep, model_failures = _forward(encoder, [x.tensor for x in good], [x.id for x in good])
        timings.model_s = time.perf_counter() - t1
        failures += model_failures
        if keep:
            vectors = got
            ids = [good[i].id for i in keep]
            sources = [good[i].source for i in keep]
    if dtype != "float32":
        vectors = quantize(vectors, dtype, scales=int8_scales(encoder.card) if dtype == "int8" else None)
    return EncodedBatch(ids, vectors, failures, sources, timings)


class _Loader:
    """Keeps at most ``window`` items queued for the loader threads, in input order."""

    def __init__(self, items: Iterable[tuple[str, str]], transform: Callable[[Any], torch.Tensor], limits: ImageLimits,
                 workers: int, window: int):
        self.items, self.transform, self.limits, self.window = iter(items), transform, limits, window
        self.pending: collections.deque[Future[_Loaded]] = collections.deque()
        self.client = make_client(limits, workers)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fgplugin-load")
        self.exhausted = False

    def top_up(self) -> None:
        while not self.exhausted and len(self.pending) < self.window:
            try:
                id_, source = next(self.items)
            except StopIteration:
                self.exhausted = True
                return
            self.pending.append(self.pool.submit(_load, str(id_), str(source), self.transform, self.limits, self.client))

    def next_batch(self, batch_size: int) -> list[_Loaded]:
        loaded: list[_Loaded] = []
        while self.pending and len(loaded) < batch_size:
            loaded.append(self.pending.popleft().result())
            self.top_up()  # keep the loaders busy while this batch is assembled and encoded
        return loaded

    def close(self) -> None:
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


def iter_encoded(
    encoder: DeployedEncoder,
    items: Iterable[tuple[str, str]],
    *,
    batch_size: int = 32,
    workers: int = 4,
    limits: ImageLimits = images.DEFAULT_LIMITS,
    progress: Callable[[EncodedBatch], None] | None = None,
    dtype: str = "float32",
    prefetch_batches: int = 2,
) -> Iterator[EncodedBatch]:
    """Encode ``(id, source)`` pairs (local paths or http(s) URLs), ``batch_size`` input items per batch.

    ``encoder``: an exported encoder (``DeployedEncoder``: ``preprocess``, ``attributes``, ``dims``,
    ``encode_tensors``, and ``card`` for int8). Up to ``workers`` threads load images while the model
    runs; at most ``(prefetch_batches + 1) * batch_size`` items are queued for the loaders besides the
    batch being encoded, so memory stays flat whatever the catalog size. ``progress`` is called with
    each batch before it is yielded.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    transform = encoder.preprocess.transform()  # built once; torchvision v2 transforms are thread-safe
    loader = _Loader(items, transform, limits, workers, (prefetch_batches + 1) * batch_size)
    try:
        while True:
            loader.top_up()
            if not loader.pending:
                return
            timings = BatchTimings()
            t0 = time.perf_counter()
            loaded = loader.next_batch(batch_size)
            timings.wait_s = time.perf_counter() - t0
            batch = _assemble(encoder, loaded, dtype, timings)
            if progress is not None:
                progress(batch)
            yield batch
    finally:
        loader.close()


__all__ = ["iter_encoded", "EncodedBatch", "BatchTimings", "quantize", "dequantize", "int8_scales", "DTYPES"]
