"""Vector codecs: how a unit attribute vector is stored (float32, float16, int8 or binary), decoded and
scored, and how far a cosine computed on the codes may be from the true one. The one home of the
quantisation rules: the encoder, both stores and the OpenSearch mapping use these functions.

- ``float32``: the vector as it is (4 bytes per dimension).
- ``float16``: IEEE half precision (2 bytes); scored as the cosine with the decoded vector (its norm is
  within about 1e-3 of 1), as OpenSearch's ``cosineSimilarity`` scores a float field.
- ``int8``: the model card's symmetric per-attribute scheme ``c = clip(round(v * scale_a), -127, 127)``
  (1 byte); scored as the cosine of the query's own int8 codes (``query_codes``: rounded at the scale
  that maps its largest component to 127) with the stored codes, ``cos(q8, c)`` (the scales cancel).
  That is what OpenSearch's ``cosineSimilarity`` computes on a Lucene byte vector (it takes the query
  as bytes too), so both stores give the same score.
- ``binary``: the sign of each component, 1 bit per dimension (``bits``), kept beside the int8 codes of
  the same vector: the bits make the candidates (their score is the cosine with the decoded sign vector
  ``sign(x) / sqrt(d)``, which has no useful bound), the int8 codes rescore them. So a binary store holds
  the int8 codes too (d + d/8 bytes per vector) and scans d/8.

``cosine_error_bound`` states, per codec, the largest ``|score on codes - q . x|`` for unit ``q`` and
``x`` (tests/test_codecs.py asserts it).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

CODECS = ("float32", "float16", "int8", "binary")
INT8_DEFAULT_SCALE = 127.0  # |v_i| <= 1 for a unit vector, so v * 127 always fits in int8
INT8_MAX = 127
# float16: relative rounding of a normal number (half an ulp of an 11-bit significand), and the absolute
# rounding below the smallest normal (half the smallest subnormal step)
FP16_RELATIVE = 2.0 ** -11
FP16_ABSOLUTE = 2.0 ** -25
FLOAT_SLACK = 1e-6  # float32 arithmetic of the scan itself


def check_codec(codec: str) -> str:
    """``codec`` if it is one of CODECS, else ValueError naming them."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}; got {codec!r}")
    return codec


def stored_codec(codec: str) -> str:
    """The codes a store keeps as its source of truth: binary keeps the int8 codes (its bits derive from them)."""
    return "int8" if check_codec(codec) == "binary" else codec


def uses_scales(codec: str) -> bool:
    """Whether the codes depend on the per-attribute int8 scale (recorded in the index layout)."""
    return stored_codec(codec) == "int8"


CODE_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


def code_dtype(codec: str) -> np.dtype:
    """The NumPy dtype of the stored codes (binary: its int8 codes)."""
    return np.dtype(CODE_DTYPES[stored_codec(codec)])


def bit_bytes(d: int) -> int:
    """Bytes of the packed sign bits of a d-dimensional vector."""
    return (int(d) + 7) // 8


def bytes_per_vector(codec: str, d: int) -> int:
    """Bytes one vector's codes take (binary: the int8 codes and the bits)."""
    base = code_dtype(codec).itemsize * int(d)
    return base + (bit_bytes(d) if codec == "binary" else 0)


# -- the model card's int8 scales ------------------------------------------------------------------
def int8_scales(card: Mapping[str, Any]) -> dict[str, float]:
    """Per-attribute int8 scale from a model card (``storage.int8.scale``), else 127 for every attribute."""
    names = list(card.get("attributes") or [])
    storage = card.get("storage") if isinstance(card.get("storage"), Mapping) else {}
    int8 = storage.get("int8") if isinstance(storage.get("int8"), Mapping) else {}
    given = int8.get("scale") if isinstance(int8.get("scale"), Mapping) else {}
    return {n: float(given.get(n, INT8_DEFAULT_SCALE)) for n in names}


def card_codec(card: Mapping[str, Any]) -> str:
    """The codec a model card asks for (``storage.codec``), float32 when it names none."""
    storage = card.get("storage") if isinstance(card.get("storage"), Mapping) else {}
    return check_codec(str(storage.get("codec") or "float32"))


# -- encoding and decoding -------------------------------------------------------------------------
def encode(rows: np.ndarray, codec: str, scale: float = INT8_DEFAULT_SCALE) -> np.ndarray:
    """float unit vectors [n, d] (or one [d]) -> the stored codes of ``codec`` (binary: its int8 codes)."""
    x = np.asarray(rows, dtype=np.float32)
    kind = stored_codec(codec)
    if kind == "float32":
        return x
    if kind == "float16":
        return x.astype(np.float16)
    return np.clip(np.rint(x * np.float32(scale)), -INT8_MAX, INT8_MAX).astype(np.int8)


def decode(codes: np.ndarray, codec: str, scale: float = INT8_DEFAULT_SCALE) -> np.ndarray:
    """Stored codes -> float32 values (int8: ``q / scale``; not re-normalised)."""
    c = np.asarray(codes)
    if stored_codec(codec) == "int8":
        return c.astype(np.float32) / np.float32(scale)
    return c.astype(np.float32)


def normalised(codec: str) -> bool:
    """Whether queries score the codes of ``codec`` as cosines with the decoded vector (every codec but float32,
    whose stored vectors are unit length as written)."""
    return check_codec(codec) != "float32"


def unit_decoded(codes: np.ndarray, codec: str) -> np.ndarray:
    """Stored codes [n, d] -> the float64 vectors queries score against: float32 values as they are, the
    other codecs' decoded vectors normalised to unit length (for int8 the scale cancels)."""
    x = np.asarray(codes).astype(np.float64)
    if not normalised(codec):
        return x
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def inverse_norms(codes: np.ndarray) -> np.ndarray:
    """float32 1/|c| per row of codes [n, d] (0 for an all-zero row), for scoring ``c . q / |c|``."""
    x = np.asarray(codes).astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    with np.errstate(divide="ignore"):
        inv = np.where(sq > 0, 1.0 / np.sqrt(sq.astype(np.float64)), 0.0)
    return inv.astype(np.float32)


def bits(codes: np.ndarray) -> np.ndarray:
    """Packed sign bits [n, ceil(d/8)] (uint8, first dimension in the high bit) of int8 codes: 1 where >= 0."""
    return np.packbits(np.asarray(codes) >= 0, axis=-1)


_BYTE_SIGNS = (2.0 * np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1) - 1.0)  # [256, 8]: +-1


def bit_tables(query: np.ndarray) -> np.ndarray:
    """For a unit query [d]: table [ceil(d/8), 256] whose sum over a row's bytes is the cosine of the query
    with that row's decoded sign vector ``sign(x) / sqrt(d)`` (asymmetric: the query stays exact)."""
    q = np.asarray(query, dtype=np.float64)
    d = q.shape[0]
    padded = np.zeros(bit_bytes(d) * 8)
    padded[:d] = q / math.sqrt(d)
    return (padded.reshape(-1, 8) @ _BYTE_SIGNS.T).astype(np.float32)


def bit_cosines(packed: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """float32 cosines of a query (its ``bit_tables``) with the decoded sign vectors of ``packed`` rows."""
    out = np.zeros(len(packed), np.float32)
    for j in range(tables.shape[0]):
        out += tables[j][packed[:, j]]
    return out


# -- error bounds ----------------------------------------------------------------------------------
def query_codes(query: np.ndarray) -> np.ndarray:
    """int8 codes of a query vector [d] at the scale that maps its largest component to 127 (the finest
    the codes allow; a cosine does not depend on the scale)."""
    q = np.asarray(query, dtype=np.float64)
    top = float(np.abs(q).max()) if q.size else 0.0
    if top == 0.0:
        return np.zeros(q.shape, np.int8)
    return np.clip(np.rint(q * (INT8_MAX / top)), -INT8_MAX, INT8_MAX).astype(np.int8)


def scoring_query(query: np.ndarray, codec: str) -> np.ndarray:
    """The unit float64 query a store scores codes of ``codec`` against: the query itself for float codes,
    its normalised ``query_codes`` for int8 and binary (both stores: the same scores)."""
    q = np.asarray(query, dtype=np.float64)
    if stored_codec(codec) != "int8":
        return q
    c = query_codes(q).astype(np.float64)
    n = float(np.linalg.norm(c))
    return c / n if n > 0 else c


def int8_step_error(d: int, scale: float) -> float:
    """The largest ``|q / scale - x|`` (L2) for a unit x whose components stay within 127/scale: half a step per dimension."""
    return math.sqrt(int(d)) * 0.5 / float(scale)


def cosine_error_bound(codec: str, d: int, scale: float = INT8_DEFAULT_SCALE) -> float:
    """The largest ``|score - q . x|`` for unit q and x, where score is what a query computes on the codes:

    - float32: float arithmetic only;
    - float16: the cosine with the decoded vector x', where ``|x' - x| <= e = 2^-11 + sqrt(d) * 2^-25``
      (relative rounding of normal numbers, absolute below the smallest normal), so ``|q . x'/|x'| - q . x|
      <= 2 e`` (as for int8 below);
    - int8 (and binary, whose final scores come from its int8 codes): the cosine of the normalised
      decoded vectors u = x'/|x'| and p = q'/|q'|, where ``|x' - x| <= e_x = sqrt(d) / (2 scale)`` and
      ``|q' - q| <= e_q = sqrt(d) / 254`` (the query's codes: its largest component, at most 1, maps to
      127), and ``|u - x| <= |u - x'| + |x' - x| <= 2 e_x`` (the same for p), so
      ``|p . u - q . x| <= 2 e_q + 2 e_x``; valid while no component is clipped (|x_i| <= 127 / scale:
      always for the default scale 127, which the unit norm bounds). A worst case: measured errors are
      about ten times smaller (tests/test_codecs.py).
    ``binary``'s candidate scores (on the sign bits) have no such bound: its final scores are its int8 codes'."""
    kind = stored_codec(codec)
    if kind == "float32":
        return FLOAT_SLACK
    if kind == "float16":
        return 2.0 * (FP16_RELATIVE + math.sqrt(int(d)) * FP16_ABSOLUTE) + FLOAT_SLACK
    return 2.0 * int8_step_error(d, scale) + 2.0 * int8_step_error(d, INT8_MAX) + FLOAT_SLACK


def quantize(vectors: Mapping[str, np.ndarray], dtype: str, *, scales: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Per-attribute ``encode`` of float32 unit vectors (``dtype``: float32, float16 or int8)."""
    if dtype not in ("float32", "float16", "int8"):
        raise ValueError(f"dtype must be one of float32, float16, int8; got {dtype!r}")
    return {a: encode(v, dtype, (scales or {}).get(a, INT8_DEFAULT_SCALE)) for a, v in vectors.items()}


def dequantize(vectors: Mapping[str, np.ndarray], *, scales: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Back to float32 (int8: ``v = q / scale_a``); re-normalise before comparing with cosines."""
    out = {}
    for a, v in vectors.items():
        v = np.asarray(v)
        codec = "int8" if v.dtype == np.int8 else "float32"
        out[a] = decode(v, codec, (scales or {}).get(a, INT8_DEFAULT_SCALE))
    return out
