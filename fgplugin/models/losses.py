"""The variants' training objectives (each variant's ``training_losses`` combines these), on cosine similarity.

- Triplet ranking loss (ASEN, ASEN_v2, CSN, AG-MLAN, global): max(0, m - cos(a, p) + cos(a, n)), m = 0.2,
  i.e. ``nn.MarginRankingLoss`` on the two cosines as in the reference code.
- Alignment (ASEN_v2 stage 2): the global and local embeddings of the same image should agree;
  sum over anchor, positive and negative of mean(max(0, 1 - cos(global, local))) as in asenpp.
- Multi-task cross-entropy (mtc, AG-MLAN branch 1), ignoring unlabelled / not-visible items (-1).
- Uncertainty weighting (AG-MLAN; Kendall, Gal & Cipolla 2018): sum_i exp(-s_i) L_i + s_i with learned s_i.
- Proxy classification on the attribute-specific embedding (not in the papers; ``train.cls_weight``):
  normalised softmax (Zhai & Wu 2019) over one learned proxy per (attribute, value), so each
  attribute's space is also pulled into one cluster per value, as a classifier's posterior is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vectors import posterior_vector


def split_triplets(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[3T, ...] ordered (anchors, positives, negatives) -> three [T, ...] tensors."""
    t = x.shape[0] // 3
    return x[:t], x[t:2 * t], x[2 * t:]


def triplet_ranking_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                         margin: float = 0.2) -> torch.Tensor:
    """mean(max(0, margin - cos(anchor, positive) + cos(anchor, negative)))."""
    sp = F.cosine_similarity(anchor.float(), positive.float(), dim=-1)
    sn = F.cosine_similarity(anchor.float(), negative.float(), dim=-1)
    return F.relu(margin - sp + sn).mean()


def mean_over_present(per_attr: list[torch.Tensor], present: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the per-attribute losses over the attributes marked present (1.0) in this batch."""
    has = torch.stack(present)
    return (torch.stack(per_attr) * has).sum() / has.sum().clamp_min(1)


def attribute_pairs(emb: torch.Tensor, labels: torch.Tensor):
    """For each attribute a of ``emb`` [N, A, E] / ``labels`` [N, A] (-1 = unknown): (cosine [N, N],
    positive pairs [N, N]: same value, both labelled, not the image itself, negative pairs [N, N]:
    different values, both labelled)."""
    n = labels.shape[0]
    e = F.normalize(emb.float(), dim=-1)
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    for a in range(labels.shape[1]):
        y = labels[:, a]
        both = (y >= 0)[:, None] & (y >= 0)[None, :]
        same = (y[:, None] == y[None, :]) & both
        yield e[:, a] @ e[:, a].T, same & ~eye, ~same & both


def batch_all_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2,
                           max_block: int = 1 << 24) -> torch.Tensor:
    """Every valid triplet in the batch, per attribute (Hermans et al. 2017, "batch all").

    ``emb`` [N, A, E] (each image's embedding under each attribute), ``labels`` [N, A] (-1 = unknown).
    For attribute a, (i, j, k) is valid when i != j, y_i = y_j and y_k != y_i, all labelled. The loss
    is the triplet ranking loss averaged over the active (non-zero) valid triplets, then over the
    attributes that have any valid triplet. A batch of T sampled triplets holds far more than T valid
    ones, so each trunk pass teaches much more (what makes short CPU runs learn).
    """
    n = labels.shape[0]
    per_attr, present = [], []
    chunk = max(1, max_block // max(1, n * n))
    for sim, pos, neg in attribute_pairs(emb, labels):
        total = sim.new_zeros(())
        active = sim.new_zeros(())
        for s in range(0, n, chunk):  # anchors in blocks: the [n, n, n] cube never materialises at once
            l = F.relu(margin - sim[s:s + chunk, :, None] + sim[s:s + chunk, None, :])
            valid = pos[s:s + chunk, :, None] & neg[s:s + chunk, None, :]
            l = l * valid
            total = total + l.sum()
            active = active + (l > 0).sum()
        per_attr.append(total / active.clamp_min(1))
        present.append((pos.any() & neg.any()).float())
    return mean_over_present(per_attr, present)


def batch_hard_triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """The hardest triplet per anchor in the batch, per attribute (Hermans et al. 2017, "batch hard").

    Same inputs as ``batch_all_triplet_loss``. For attribute a and each labelled anchor with a
    positive and a negative in the batch: max(0, margin - min cos(anchor, positive) + max cos(anchor,
    negative)), averaged over those anchors, then over the attributes that have any.
    """
    per_attr, present = [], []
    for sim, pos, neg in attribute_pairs(emb, labels):
        hardest_pos = sim.masked_fill(~pos, 2.0).min(dim=1).values  # cosines lie in [-1, 1]
        hardest_neg = sim.masked_fill(~neg, -2.0).max(dim=1).values
        ok = (pos.any(dim=1) & neg.any(dim=1)).float()
        l = F.relu(margin - hardest_pos + hardest_neg) * ok
        per_attr.append(l.sum() / ok.sum().clamp_min(1))
        present.append((ok.sum() > 0).float())
    return mean_over_present(per_attr, present)


def alignment_loss(global_emb: torch.Tensor, local_emb: torch.Tensor) -> torch.Tensor:
    """ASEN_v2: sum over the (anchor, positive, negative) thirds of mean(max(0, 1 - cos(g, l)))."""
    cos = F.cosine_similarity(global_emb.float(), local_emb.float(), dim=-1)
    return sum(F.relu(1.0 - c).mean() for c in split_triplets(cos))  # type: ignore[return-value]


def multitask_cross_entropy(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean over attributes (those with a labelled item in the batch) of each attribute's mean
    cross-entropy; items labelled -1 (unknown / not visible) are ignored."""
    per_attr, present = [], []
    for a, lg in enumerate(logits):
        y = labels[:, a]
        n = (y >= 0).sum()
        ce = F.cross_entropy(lg.float(), y.masked_fill(y < 0, -100), ignore_index=-100, reduction="sum")
        per_attr.append(ce / n.clamp_min(1))
        present.append((n > 0).float())
    return mean_over_present(per_attr, present)


class ProxyClassifier(nn.Module):
    """Normalised-softmax loss per attribute: logits = scale * cos(embedding, proxy of each value).

    ``sizes[a]`` is attribute a's number of visible values. Called with embeddings [N, K, E] under
    attributes ``idx`` [N, K] and the images' labels [N, A] (-1 = unknown, ignored): the mean
    cross-entropy over the labelled (image, attribute) pairs, each attribute weighted equally.
    """

    def __init__(self, sizes: list[int], dim: int, scale: float = 16.0):
        super().__init__()
        self.sizes = list(sizes)
        self.scale = float(scale)
        self.proxies = nn.ParameterList(nn.Parameter(torch.randn(k, dim) / dim ** 0.5) for k in self.sizes)

    def forward(self, emb: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        e = F.normalize(emb.float(), dim=-1)
        y = labels.gather(1, idx)  # [N, K]: each image's label under the attribute it was embedded for
        per_attr, present = [], []
        for a in torch.unique(idx).tolist():
            sel = (idx == a) & (y >= 0)
            n = sel.sum()
            logits = self.scale * e[sel] @ F.normalize(self.proxies[a].float(), dim=-1).T
            per_attr.append(F.cross_entropy(logits, y[sel], reduction="sum") / n.clamp_min(1))
            present.append((n > 0).float())
        if not per_attr:
            return emb.new_zeros(())
        return mean_over_present(per_attr, present)

    def posteriors(self, emb: torch.Tensor, idx: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
        """Embeddings [B, K, E] under attributes ``idx`` [B, K] -> each one's softmax posterior over its
        attribute's values as a unit vector (``kind``: see ``posterior_vector``), zero-padded to the
        largest value count [B, K, V].

        A fixed loop over attributes with masks (no data-dependent control flow: traceable).
        """
        e = F.normalize(emb.float(), dim=-1)
        width = max(self.sizes) + (1 if kind == "prob" else 0)  # prob appends the slack value
        out = e.new_zeros(*idx.shape, width)
        for a in range(len(self.sizes)):
            p = posterior_vector(self.scale * e @ F.normalize(self.proxies[a].float(), dim=-1).T, kind)
            out = torch.where((idx == a).unsqueeze(-1), F.pad(p, (0, width - p.shape[-1])), out)
        return out.to(emb.dtype)


def uncertainty_weighted(losses: list[torch.Tensor], log_vars: torch.Tensor) -> torch.Tensor:
    """sum_i exp(-s_i) * L_i + s_i (learned task weights; s_i = log variance)."""
    return sum(torch.exp(-log_vars[i]) * loss + log_vars[i] for i, loss in enumerate(losses))  # type: ignore[return-value]


def csn_norm_penalties(embeddings: torch.Tensor, masks: torch.Tensor, n_triplets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSN's regularisers as in its code: ||embeddings||_2 / sqrt(T) and ||masks||_1 / T.

    ``embeddings`` [3T, E] (before masking; the code sums the three images' batch norms), ``masks``
    [T, E] the masks used (after ReLU).
    """
    t = max(1, n_triplets)
    embed = sum(e.float().norm(2) for e in split_triplets(embeddings)) / t ** 0.5
    mask = masks.float().abs().sum() / t
    return embed, mask  # type: ignore[return-value]


__all__ = ["ProxyClassifier", "triplet_ranking_loss", "batch_all_triplet_loss", "batch_hard_triplet_loss",
           "alignment_loss", "multitask_cross_entropy", "uncertainty_weighted", "csn_norm_penalties", "split_triplets"]
