"""Which vector a query scores with: the one place that says how a query meets the stored vectors.

Every stored attribute vector is unit length, and a query scores an item by the cosine of its vector
with the item's. One kind of vector is asymmetric: a classifier posterior p stored under
``posterior = "prob"`` (``ModelConfig``) is [p, sqrt(1 - |p|^2)], whose last, slack coordinate makes it
unit length. A query zeroes that coordinate and re-normalises, so its cosine with an item is
p_q . p_x / |p_q|: for a fixed query, the probability that the item holds the query's value (under
both posteriors), which ranks items as the probability ranking principle asks. The plain cosine of two
posteriors, p_q . p_x / (|p_q| |p_x|), divides by |p_x| and so lifts the items the classifier is
unsure of. Where the posterior is only part of the vector (``proxy_share``), it comes last, so the
slack is still the vector's last coordinate.

Stores record whether an index's vectors carry the slack (``IndexLayout.query_slack``); evaluation
reads it from the model (``ModelConfig.query_slack``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # the query side (stores, OpenSearch compile) runs without importing torch
    import torch


def query_form(vector: np.ndarray, slack: bool) -> np.ndarray:
    """A stored vector [..., d] -> the unit vector a query scores with (float64): the slack
    coordinate zeroed when ``slack``, then L2-normalised. Raises ValueError for a vector with
    nothing left to normalise."""
    v = np.array(vector, dtype=np.float64)
    if slack:
        v[..., -1] = 0.0
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norm)) or np.any(norm == 0):
        raise ValueError("must be finite and non-zero" + (" once its slack value is dropped" if slack else "")
                         + "; cosine similarity is undefined otherwise")
    return v / norm


def query_form_padded(vecs: "torch.Tensor", dims: Sequence[int], slack: bool) -> "torch.Tensor":
    """``query_form`` over a model's padded output [N, A, D] (attribute i is ``[:, i, :dims[i]]``, so
    its slack sits at ``dims[i] - 1``); returns float32 unit vectors, padding still zero."""
    import torch  # local: the query side imports this module and must run without torch

    v = vecs.float().clone()
    if slack:
        for i, d in enumerate(dims):
            v[:, i, d - 1] = 0.0
    return torch.nn.functional.normalize(v, dim=-1, eps=1e-12)
