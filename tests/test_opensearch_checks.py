"""check_request: the project's stricter-than-spec rules, with positive and negative cases; where the
official spec is too lax to notice, the negative case is shown to pass the spec and fail our check.
The official k-NN test-story payloads are positive fixtures for the spec validator."""

from __future__ import annotations

import copy

import pytest

from opensearch_spec import SPEC_DIR, api_spec, kind_of, story_payloads  # noqa: F401 (session fixture)
from fgplugin.opensearch.checks import RequestCheckError, check_request
from fgplugin.opensearch.compile import to_opensearch
from fgplugin.opensearch.mapping import alias_swap_body, build_index_body
from fgplugin.opensearch.scripts import stored_script_body
from fgplugin.search.spec import QuerySpec
from fgplugin.schema import Attribute, AttributeSchema
from fgplugin.search.store import IndexLayout

DIMS = {"sleeve": 4, "neckline": 3}
LAYOUT = IndexLayout(AttributeSchema(tuple(Attribute(n, ("a", "b")) for n in DIMS), name="t"), DIMS, {"price": "float"}, "v1")
VECS = {"sleeve": [1.0, 0.0, 0.0, 0.0], "neckline": [0.0, 1.0, 0.0]}


def index_body():
    return build_index_body(LAYOUT)


def search_body(mode="exact"):
    return to_opensearch(QuerySpec({"sleeve": 1.0, "neckline": 0.5}, vectors=VECS, k=5, mode=mode), LAYOUT)


def bulk_lines():
    return [{"index": {"_index": "fg-v1", "_id": "a"}}, {"emb_sleeve": [1.0, 0, 0, 0], "price": 3.0},
            {"delete": {"_index": "fg-v1", "_id": "b"}}]


def test_everything_the_project_builds_passes_both(api_spec):
    bodies = [("indices.create", index_body()), ("put_script", stored_script_body()),
              ("indices.update_aliases", alias_swap_body("fg", "fg-v2", ["fg-v1"])), ("bulk", bulk_lines()),
              ("mget", {"ids": ["a", "b"]}), ("count", {"query": {"match_all": {}}})]
    bodies += [("search", search_body(m)) for m in ("exact", "ann", "ann+rescore")]
    for kind, body in bodies:
        api_spec.validate(kind, body)
        assert check_request(kind, body) is body


def _edit(body, path, value):
    body = copy.deepcopy(body)
    node = body
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return body


_DELETE = object()
_EMB = ("mappings", "properties", "emb_sleeve")
_KNN = ("query", "knn", "emb_all")

# (kind, base, path, new value, message our check gives, does the official spec notice too?)
NEGATIVE = [
    ("indices.create", index_body, _EMB + ("method", "engine"), "nmslib", "nmslib is deprecated", False),
    ("indices.create", index_body, _EMB + ("method", "engine"), "annoy", "engine must be one of faiss, lucene", False),
    ("indices.create", index_body, _EMB + ("method", "space_type"), "dotproduct", "space_type 'dotproduct' is not allowed", False),
    ("indices.create", index_body, _EMB + ("method", "space_type"), "hamming", "not allowed for faiss", False),
    ("indices.create", index_body, _EMB + ("method", "parameters", "ef_serch"), 100, "unknown for faiss hnsw: ef_serch", False),
    ("indices.create", index_body, _EMB + ("method", "parameters", "m"), 1, "m must be an integer in 2..100", False),
    ("indices.create", index_body, _EMB + ("method",), _DELETE, "must name the engine explicitly", False),
    ("indices.create", index_body, _EMB + ("dimension",), 0, "dimension must be an integer in 1..16000", False),
    ("indices.create", index_body, _EMB + ("dimension",), "4", "dimension must be an integer", True),
    ("indices.create", index_body, ("settings", "index", "knn"), False, "settings.index.knn must be true", False),
    ("search", lambda: search_body("ann"), _KNN + ("min_score",), 0.5, "exactly one of k, max_distance, min_score", False),
    ("search", lambda: search_body("ann"), _KNN + ("k",), _DELETE, "exactly one of k, max_distance, min_score", False),
    ("search", lambda: search_body("ann"), _KNN + ("k",), 0, "k must be an integer in 1..10000", False),
    ("search", lambda: search_body("ann"), _KNN + ("k",), "five", "k must be an integer", True),
    ("search", lambda: search_body("ann"), ("size",), 6, "size 6 exceeds the knn k 5", False),
    ("search", lambda: search_body("ann"), ("size",), _DELETE, "explicit size <= k", False),
    ("search", lambda: search_body("ann"), _KNN + ("vector",), [], "vector must be a non-empty list", False),
    ("search", lambda: search_body("ann"), _KNN + ("vector",), [1.0, float("nan")], "not a finite number", False),
    ("search", lambda: search_body("ann"), _KNN + ("vector",), _DELETE, "vector must be a non-empty list", True),
    ("search", lambda: search_body("ann"), _KNN + ("ef_search",), 64, "unknown key(s) ef_search", False),
    ("search", lambda: search_body("ann"), _KNN + ("method_parameters",), {"ef_serch": 64}, "unknown key 'ef_serch'", False),
    ("search", lambda: search_body("ann"), ("query", "knn", "emb_sleeve"), {"vector": [1.0], "k": 5},
     "exactly one vector field", True),
    ("search", search_body, ("query", "script_score", "script", "params", "weights"), [1.0, -0.5],
     "weights must be finite numbers >= 0", False),
    ("search", search_body, ("query", "script_score", "script", "params", "weights"), [1.0],
     "same length", False),
    ("search", search_body, ("query", "script_score", "script", "params", "vectors", 1), [0.0, 0.0, 0.0],
     "all zeros", False),
    ("search", search_body, ("query", "script_score", "script", "source"), "return 1;", "exactly one of id", True),
    ("search", lambda: search_body("ann+rescore"), ("rescore", "window_size"), 3, "window_size 3 is below size 5", False),
    ("search", lambda: search_body("ann+rescore"), ("sort",), ["price"], "rescore cannot be combined with a sort", False),
    ("put_script", stored_script_body, ("script", "lang"), "mustache", "script.lang must be painless", False),
    ("indices.update_aliases", lambda: alias_swap_body("fg", "fg-v2"), ("actions",), [], "non-empty list", False),
    ("indices.update_aliases", lambda: alias_swap_body("fg", "fg-v2", ["fg-v1"]), ("actions", 0),
     {"add": {"index": "fg-v3", "alias": "fg"}}, "added to 2 indices", False),
    ("bulk", bulk_lines, (0, "index", "_id"), _DELETE, "needs a non-empty string _id", False),
    ("bulk", bulk_lines, (1, "emb_sleeve"), [1.0, float("inf"), 0.0, 0.0], "not a finite number", False),
    ("mget", lambda: {"ids": ["a"]}, ("ids",), [], "non-empty list of document ids", False),
]


@pytest.mark.parametrize("kind, base, path, value, message, spec_notices", NEGATIVE,
                         ids=[f"{n[0]}:{'/'.join(map(str, n[2]))}={n[3] if n[3] is not _DELETE else 'del'}"[:60] for n in NEGATIVE])
def test_stricter_checks_refuse(api_spec, kind, base, path, value, message, spec_notices):
    good = base()
    check_request(kind, good)  # the unedited body passes
    bad = _edit(good, path, value)
    with pytest.raises(RequestCheckError, match=None) as exc:
        check_request(kind, bad)
    assert message in str(exc.value)
    if "nan" not in repr(value) and "inf" not in repr(value):  # JSON has no NaN: the spec can't judge those
        assert bool(api_spec.errors(kind, bad)) == spec_notices


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown request kind"):
        check_request("reindex", {})


def test_official_knn_test_stories_are_positive_fixtures(api_spec):
    stories = story_payloads(SPEC_DIR)
    assert len({s[0] for s in stories}) >= 6, "expected the tests/default/_core/search/knn stories"
    checked = 0
    for story, method, path, payload in stories:
        kind = kind_of(method, path)
        if kind is None:
            continue
        assert api_spec.errors(kind, payload) == [], f"{story} {method} {path}"
        checked += 1
        try:
            check_request(kind, payload)
        except RequestCheckError as e:
            # Ours is stricter on purpose: the stories rely on the server's default engine and the
            # default size 10 beside a smaller k.
            assert ("must name the engine explicitly" in str(e) or "explicit size <= k" in str(e)), f"{story}: {e}"
    assert checked >= 12
