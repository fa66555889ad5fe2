"""Codecs on a real OpenSearch node (the session's test node, lucene engine): every codec the lucene engine
holds (float32; int8 as Lucene byte vectors) is accepted, recorded in the index, and answers the same top
hits as the embedded store of that codec, with scores within the codec's error bound of the float32
truth; float16 and binary are refused with a StoreError naming the way out, before any index exists.
(tests/test_store_contract.py judges int8 on the contract's wider set of queries and filters.)"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from fgplugin.codecs import CODECS, cosine_error_bound
from fgplugin.errors import StoreError
from fgplugin.opensearch.store import OpenSearchStore
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.embedded import DuckDBStore
from fgplugin.search.spec import QuerySpec, Term
from fgplugin.search.store import Document, IndexLayout

pytestmark = [pytest.mark.live]

DIMS = {"sleeve": 16, "collar": 16}
N, K = 300, 15
HELD = ("float32", "int8")  # what k-NN 2.19's lucene engine stores; the rest needs faiss or is not offered
REFUSED = {"float16": r"codec float16 needs the faiss engine .* use --engine faiss, or --codec int8",
           "binary": r"codec binary is not available on OpenSearch: .* use --codec int8"}


def layout(codec: str) -> IndexLayout:
    schema = AttributeSchema(tuple(Attribute(a, ("x", "y")) for a in DIMS), name="codecs")
    scales = {a: 127.0 for a in DIMS} if codec in ("int8", "binary") else {}
    return IndexLayout(schema, DIMS, {"cat": "keyword"}, "c0decs" + "0" * 14, codec=codec, scales=scales)


@pytest.fixture(scope="module")
def items() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    out = {}
    for a, d in DIMS.items():  # clustered unit vectors, as real embeddings are
        x = rng.normal(size=(8, d))[rng.integers(0, 8, size=N)] + 0.4 * rng.normal(size=(N, d))
        out[a] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def docs(items) -> list[Document]:
    return [Document(f"it-{i:04d}", {a: items[a][i] for a in DIMS}, {"cat": "ab"[i % 2]}, layout("float32").model_version)
            for i in range(N)]


def test_every_codec_is_held_or_refused_by_lucene():
    assert set(HELD) | set(REFUSED) == set(CODECS)  # a new codec must be judged here too


@pytest.mark.parametrize("codec", sorted(REFUSED))
def test_lucene_refuses_float16_and_binary_before_creating_anything(opensearch_url, codec):
    alias = f"fgcodec-{codec}-{uuid.uuid4().hex[:8]}"
    store = OpenSearchStore.from_url(opensearch_url, index=alias, refresh="wait_for", engine="lucene")
    try:
        with pytest.raises(StoreError, match=REFUSED[codec]):
            store.ensure_index(layout(codec))
        assert store.client.indices.get(index=f"{alias}*") == {}  # no index, no alias left behind
    finally:
        store.close()


@pytest.mark.parametrize("codec", HELD)
def test_the_node_holds_the_codec_and_answers_as_the_embedded_store(opensearch_url, tmp_path, items, codec):
    alias = f"fgcodec-{codec}-{uuid.uuid4().hex[:8]}"
    node = OpenSearchStore.from_url(opensearch_url, index=alias, refresh="wait_for", engine="lucene")
    emb = DuckDBStore(tmp_path)
    try:
        for st in (node, emb):
            st.ensure_index(layout(codec))
            assert not st.upsert(docs(items)).failed
        reopened = OpenSearchStore.from_url(opensearch_url, index=alias, engine="lucene")
        assert reopened.layout.codec == codec  # recorded in the index mapping, read back from the cluster alone
        reopened.close()
        rng = np.random.default_rng(3)
        for weights, filters in (({"sleeve": 1.0}, []), ({"sleeve": 1.0, "collar": 0.5}, [Term("cat", "a")])):
            ref = int(rng.integers(0, N))
            q = {a: items[a][ref] + 0.1 * rng.normal(size=DIMS[a]).astype(np.float32) for a in weights}
            spec = QuerySpec(dict(weights), vectors=q, filters=filters, k=K)
            e, o = emb.search(spec), node.search(spec)
            assert len(o.hits) == K and [h.id for h in o.hits] == [h.id for h in e.hits]
            assert [h.score for h in o.hits] == pytest.approx([h.score for h in e.hits], abs=1e-4)
            # against the float32 truth of each hit: within the codec's stated bound
            unit = {a: q[a] / np.linalg.norm(q[a]) for a in weights}
            bound = sum(w * cosine_error_bound(codec, DIMS[a]) for a, w in weights.items()) + 1e-5
            for h in o.hits:
                i = int(h.id.split("-")[1])
                truth = sum(w * float(items[a][i] @ unit[a]) for a, w in weights.items())
                assert abs(h.score - truth) <= bound, (codec, h.id, h.score, truth, bound)
    finally:
        for name in list(node.client.indices.get(index=f"{alias}-*")):
            node.client.indices.delete(index=name)
        node.close()
        emb.close()
