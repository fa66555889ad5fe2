"""The training loop behind `fgplugin train`: triplet batches, the variant's loss, validation MAP,
checkpoints that resume, a time budget.

Run folder layout::

    RUN/last/   weights.safetensors, config.json (config, schema, step, stage, history), optimizer.pt
    RUN/best/   the checkpoint with the best validation MAP so far (what evaluation/export should use)

Reproducibility: the model is initialised from ``seed``; the triplets and the augmentation of step
``k`` are drawn from generators seeded by ``(seed, k)``, so a resumed run sees the same batches an
uninterrupted one would.

Data: images are decoded once and kept in memory as uint8 at the model's input size when they fit
(``cache``: auto/memory), else decoded per step by DataLoader workers. Augmentation (a small random
resized crop and a horizontal flip; neither changes any garment attribute) runs batched on the
device with ``roi_align``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..catalog import Catalog, find_schema, load_catalog
from ..dataset import CatalogImages
from ..errors import FgpluginError, ModelCardError
from ..models import (
    AttributeModel,
    ModelConfig,
    build_model,
    load_checkpoint,
    load_training_state,
    read_checkpoint_meta,
    save_checkpoint,
)
from ..models.attention import crop_rois
from ..schema import AttributeSchema
from ..splits import Splits
from .samplers import TripletSampler

LAST, BEST = "last", "best"


@dataclass
class TrainResult:
    checkpoint: Path  # best validation checkpoint if any validation ran, else the last one
    last: Path
    best: Path | None
    steps: int  # optimiser steps done in total (including earlier runs when resumed)
    total_steps: int
    stopped: str  # "done", "budget" or "already done"
    seconds: float  # wall time of this call
    best_map: float | None
    history: list[dict[str, Any]] = field(default_factory=list)  # loss log: step, stage, lr, loss parts
    validations: list[dict[str, Any]] = field(default_factory=list)  # step, map, per_attribute


# -- small helpers -----------------------------------------------------------------------------------
_BUDGET_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)?", re.IGNORECASE)


def parse_budget(text: str | float | int | None) -> float | None:
    """'90s', '10m', '1h30m', '600' (seconds) -> seconds; None/''/'none' -> None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower().replace(" ", "")
    if s in ("", "none", "0"):
        return None
    pos, total = 0, 0.0
    for m in _BUDGET_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, None: 1}[m.group(2)]
        pos = m.end()
    if pos != len(s) or total <= 0:
        raise FgpluginError(f"cannot read time budget {text!r}; use e.g. 90s, 10m, 1h30m or seconds")
    return total


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FgpluginError(f"device {device!r} requested but CUDA is not available")
    return dev


def _uint8_transform(size: int):
    # The shared preprocessing up to (not including) the float conversion: identical pixels.
    from torchvision.transforms import v2 as T

    return T.Compose([T.ToImage(), T.Resize((size, size), antialias=True)])


class _Normalise:
    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def augment(x: torch.Tensor, generator: torch.Generator, crop_scale: float) -> torch.Tensor:
    """Random resized crop (area in [crop_scale, 1], aspect in [3/4, 4/3]) and horizontal flip, batched.

    ``x`` float [N, 3, S, S]; parameters come from ``generator`` (CPU) so a step is reproducible.
    """
    n, _, s, _ = x.shape
    area = torch.empty(n).uniform_(crop_scale, 1.0, generator=generator)
    log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = torch.exp(log_r)
    w = (torch.sqrt(area * ratio) * s).clamp(max=s)
    h = (torch.sqrt(area / ratio) * s).clamp(max=s)
    x0 = torch.rand(n, generator=generator) * (s - w)
    y0 = torch.rand(n, generator=generator) * (s - h)
    flip = torch.rand(n, generator=generator) < 0.5
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=1).to(x.device)
    out = crop_rois(x, boxes, s)
    return torch.where(flip.to(x.device).view(n, 1, 1, 1), out.flip(-1), out)


class _ImageSource:
    """uint8 images [N, 3, S, S] by row: from a memory cache, or decoded on demand."""

    def __init__(self, data: CatalogImages, cached: torch.Tensor | None):
        self.data = data
        self.cached = cached

    def get(self, rows: np.ndarray) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[torch.as_tensor(rows)]
        return torch.stack([self.data[int(r)][0] for r in rows])


class _StepBatches(Dataset):
    """Item k = the uint8 images and triplets of step ``start + k`` (for DataLoader prefetching)."""

    def __init__(self, source: _ImageSource, sampler: TripletSampler, start: int, stop: int):
        self.source, self.sampler, self.start, self.stop = source, sampler, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        trip = self.sampler.batch(self.start + k)
        rows = np.concatenate([trip[:, 1], trip[:, 2], trip[:, 3]])
        return self.source.get(rows), torch.as_tensor(trip)


def _decode_all(data: CatalogImages, workers: int, progress: Any, what: str) -> torch.Tensor:
    loader = DataLoader(data, batch_size=64, shuffle=False, num_workers=workers)
    out = torch.empty((len(data), 3, *data[0][0].shape[1:]), dtype=torch.uint8) if len(data) else torch.empty(0)
    task = progress.add_task(f"decoding {what}", total=len(data), info="") if progress else None
    for x, idx in loader:
        out[idx] = x
        if progress:
            progress.advance(task, len(idx))
    if progress:
        progress.remove_task(task)
    return out


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not enabled)


def _load_inputs(catalog: Catalog | str | Path, splits: Splits | str | Path | None) -> tuple[Catalog, Splits]:
    if not isinstance(catalog, Catalog):
        path = Path(catalog)
        catalog = load_catalog(path, AttributeSchema.load(find_schema(path)))
    if splits is None:
        splits = catalog.base_dir / "splits.json"
    if not isinstance(splits, Splits):
        splits = Splits.load(splits)
    return catalog, splits


def _total_steps(config: ModelConfig, n_train: int) -> tuple[int, int]:
    """(total steps, steps per epoch)."""
    t = config.train
    per_epoch = max(1, math.ceil((t.triplets_per_epoch or n_train) / t.batch_size))
    total = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * per_epoch))
    return total, per_epoch


def _check_resumable(meta: dict[str, Any], had: ModelConfig, config: ModelConfig, schema: AttributeSchema,
                     where: Path) -> None:
    """``had``: the run's saved config (parsed from ``meta``), ``config``: the one asked for now."""
    saved, want = had.model_fields(), config.model_fields()
    for k in ("trunk_weights", "local_trunk_weights"):  # only used to initialise; the checkpoint has the weights
        saved.pop(k, None)
        want.pop(k, None)
    diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {want.get(k)!r}" for k in diff[:6])
        raise ModelCardError(f"{where}: the run was started with another model config ({detail}); "
                             "use a new --out folder, or the run's own settings")
    had_proxies = had.train.cls_weight > 0
    if had_proxies != (config.train.cls_weight > 0):  # the proxy classifier's parameters come or go
        raise ModelCardError(f"{where}: the run was started with cls_weight "
                             f"{'> 0' if had_proxies else '= 0'}; it cannot be switched "
                             f"{'off' if had_proxies else 'on'} on resume; use a new --out folder")
    if AttributeSchema.from_dict(meta["schema"]).fingerprint() != schema.fingerprint():
        raise ModelCardError(f"{where}: the run was trained for another schema than {schema.name!r}; use a new --out folder")


def _check_optimiser_settings(had_config: ModelConfig, config: ModelConfig, stage: int, where: Path) -> None:
    """Before restoring a stage's optimiser and scheduler state: they carry their own rates, decay and
    parameter groups, so a changed value would be silently ignored (or fail on the group count)."""
    keys = (("lr", "lr_step_epochs") if stage == 1 else ("stage2_lr_local", "stage2_lr_global", "stage2_lr_step_epochs"))
    keys += ("trunk_lr_scale", "weight_decay", "lr_decay", "freeze_stages")
    had, want = had_config.train, config.train
    changed = [k for k in keys if float(getattr(had, k)) != float(getattr(want, k))]
    if changed:
        detail = ", ".join(f"{k}: {getattr(had, k)!r} -> {getattr(want, k)!r}" for k in changed)
        raise ModelCardError(f"{where}: the saved optimiser state (stage {stage}) was made with other optimisation "
                             f"settings ({detail}); resume with the run's own values, or train into a new --out folder")


# -- the loop ----------------------------------------------------------------------------------------
def train(
    config: ModelConfig,
    catalog: Catalog | str | Path,
    splits: Splits | str | Path | None,
    out_dir: str | Path,
    *,
    budget_s: float | None = None,
    device: str | torch.device = "auto",
    resume: bool = False,
    progress: bool = True,
    validate: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``config.variant`` on the catalog's training split; returns where the checkpoints are.

    ``resume``: continue the run in ``out_dir`` (weights, optimiser, scheduler, step, history) if it
    has one, else start fresh. Without ``resume`` an existing run there is refused (nothing is lost).
    ``budget_s``: stop after this many seconds of training (then validate and save as usual).
    """
    t_start = time.monotonic()
    catalog, splits = _load_inputs(catalog, splits)
    schema = catalog.schema
    tc = config.train
    dev = resolve_device(device)
    out = Path(out_dir)
    last_dir, best_dir = out / LAST, out / BEST

    lookup = catalog.by_id()
    missing = [i for i in splits.train if i not in lookup]
    if missing:
        raise FgpluginError(f"{len(missing)} training ids of the splits are not in {catalog.path} "
                            f"(first: {missing[0]!r}); re-split the catalog (`fgplugin data split`)")
    train_ids = list(splits.train)
    if len(train_ids) < 3:
        raise FgpluginError(f"only {len(train_ids)} training items in the splits; need at least 3")
    total, per_epoch = _total_steps(config, len(train_ids))
    size = config.image_size
    base_tf = _uint8_transform(size)
    train_data = CatalogImages(catalog, train_ids, base_tf)
    sampler = TripletSampler(train_data.labels, tc.batch_size, seed=tc.seed, mode=tc.sampling)

    # -- model: fresh or resumed -----------------------------------------------------------------
    state: dict[str, Any] = {}
    has_run = (last_dir / "config.json").is_file()
    if has_run and not resume:
        raise FgpluginError(f"{out} already holds a training run; pass --resume to continue it, or choose a new --out")
    if has_run:
        meta = read_checkpoint_meta(last_dir)
        saved_config = ModelConfig.from_dict(meta["config"])
        _check_resumable(meta, saved_config, config, schema, last_dir)
        model, state = load_checkpoint(last_dir, map_location="cpu")
        model.config = config  # the new training settings (e.g. more steps) apply from here on
    else:
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed % (2**32))
        model = build_model(config, schema)
    model.to(dev)
    model.freeze_trunk_stages()
    step = int(state.get("step", 0))
    history: list[dict[str, Any]] = list(state.get("history", []))
    validations: list[dict[str, Any]] = list(state.get("validations", []))
    best_map = state.get("best_map")
    stage1_steps = round(total * tc.stage1_fraction) if len(model.training_stages) > 1 else total
    stage_of = lambda s: 1 if s < stage1_steps or len(model.training_stages) == 1 else 2  # noqa: E731
    if step >= total:
        last = last_dir
        best = best_dir if (best_dir / "config.json").is_file() else None
        return TrainResult(best or last, last, best, step, total, "already done", time.monotonic() - t_start,
                           best_map, history, validations)

    stage = stage_of(step)
    model.start_stage(stage)
    amp = tc.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    def make_optimizer(stage: int):
        opt = torch.optim.Adam(model.parameter_groups(stage), lr=tc.lr, weight_decay=tc.weight_decay)
        every = tc.lr_step_epochs if stage == 1 else tc.stage2_lr_step_epochs
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, round(every * per_epoch)), gamma=tc.lr_decay)
        return opt, sched

    optimizer, scheduler = make_optimizer(stage)
    if has_run and int(state.get("stage", 1)) == stage:
        _check_optimiser_settings(saved_config, config, stage, last_dir)
        load_training_state(last_dir, optimizer, scheduler, scaler, map_location=dev)

    eval_every = tc.eval_every or max(1, total // 10)
    ckpt_every = tc.checkpoint_every or eval_every
    norm = _Normalise(config.mean, config.std, dev)
    cache_bytes = 3 * size * size
    valid_q, valid_c = _valid_ids(splits, tc.valid_max_items, tc.seed) if validate else ([], [])
    n_cache = len(train_ids) + len(valid_q) + len(valid_c)
    use_cache = tc.cache == "memory" or (tc.cache == "auto" and n_cache * cache_bytes <= tc.cache_max_mb * 2**20)

    def state_dict() -> dict[str, Any]:
        return {"step": step, "stage": stage, "total_steps": total, "history": history, "validations": validations,
                "best_map": best_map, "data": {"catalog": str(catalog.path), "n_train": len(train_ids),
                                               "schema_fingerprint": schema.fingerprint()}}

    def save_last() -> None:
        save_checkpoint(last_dir, model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state_dict())

    stopped = "done"
    budget_end = None if budget_s is None else time.monotonic() + budget_s
    with _progress(progress) as bar:
        cached = _decode_all(train_data, tc.workers, bar, "training images") if use_cache else None
        source = _ImageSource(train_data, cached)
        valid = None
        if validate and valid_q and valid_c:
            vq = CatalogImages(catalog, valid_q, base_tf)
            vc = CatalogImages(catalog, valid_c, base_tf)
            valid = (_decode_all(vq, tc.workers, bar, "validation queries"), vq.labels,
                     _decode_all(vc, tc.workers, bar, "validation candidates"), vc.labels)

        def run_validation() -> None:
            nonlocal best_map
            if valid is None:
                return
            res = validation_map(model, valid, norm, names=schema.names)
            validations.append({"step": step, "stage": stage, "map": res["overall_weighted"],
                                "per_attribute": res["per_attribute"]})
            if res["overall_weighted"] == res["overall_weighted"] and (best_map is None or res["overall_weighted"] > best_map):
                best_map = res["overall_weighted"]
                save_checkpoint(best_dir, model, state=state_dict())

        task = bar.add_task(f"training {config.variant}", total=total, completed=step, info="")
        loader = DataLoader(_StepBatches(source, sampler, step, total), batch_size=None, shuffle=False,
                            num_workers=0 if use_cache else tc.workers,
                            persistent_workers=False, pin_memory=dev.type == "cuda")
        running: dict[str, float] = {}
        all_labels = torch.as_tensor(train_data.labels, device=dev)
        model.train()
        try:
            for images, trip in loader:
                new_stage = stage_of(step)
                if new_stage != stage:  # ASEN_v2: stage 1 (global) -> stage 2 (joint)
                    run_validation()
                    stage = new_stage
                    model.start_stage(stage)
                    optimizer, scheduler = make_optimizer(stage)
                gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
                x = norm(images.to(dev, non_blocking=True))
                if tc.augment:
                    x = augment(x, gen, tc.crop_scale)
                trip = trip.to(dev)
                rows = torch.cat([trip[:, 1], trip[:, 2], trip[:, 3]])
                labels = all_labels[rows]
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                    parts = model.training_losses(x, trip[:, 0], labels, stage=stage)
                loss = parts["loss"]
                if not torch.isfinite(loss):
                    raise FgpluginError(f"training diverged at step {step} (loss {float(loss)}); "
                                        "lower the learning rate (--lr) and resume from the last checkpoint")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                vals = {k: float(v.detach()) for k, v in parts.items()}
                for k, v in vals.items():  # running average for the display
                    running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
                if step % max(1, min(50, eval_every)) == 0 or step == total:
                    history.append({"step": step, "stage": stage, "lr": optimizer.param_groups[0]["lr"],
                                    **{k: round(v, 5) for k, v in running.items()}})
                if on_step is not None:
                    on_step(step, vals)
                if step % eval_every == 0 and step < total:
                    run_validation()
                    model.train()
                if step % ckpt_every == 0 and step < total:
                    save_last()
                last_map = validations[-1]["map"] if validations else None
                info = f"loss {running['loss']:.4f}" + (f" | val MAP {100 * last_map:.1f}" if last_map is not None else "")
                bar.update(task, completed=step, info=info + (f" | stage {stage}" if len(model.training_stages) > 1 else ""))
                if budget_end is not None and time.monotonic() >= budget_end and step < total:
                    stopped = "budget"
                    break
        except KeyboardInterrupt:
            save_last()  # resumable from exactly here
            raise
        run_validation()
        save_last()
    best = best_dir if (best_dir / "config.json").is_file() else None
    return TrainResult(best or last_dir, last_dir, best, step, total, stopped, time.monotonic() - t_start,
                       best_map, history, validations)


def _valid_ids(splits: Splits, max_items: int, seed: int) -> tuple[list[str], list[str]]:
    """Validation queries and candidates, subsampled (keeping their 1:4 ratio) to at most ``max_items``."""
    q, c = list(splits.valid_query), list(splits.valid_candidate)
    n = len(q) + len(c)
    if n <= max_items or n == 0:
        return q, c
    rng = np.random.default_rng(seed)
    keep_q = max(1, round(max_items * len(q) / n))
    keep_c = max(1, max_items - keep_q)
    return ([q[i] for i in sorted(rng.choice(len(q), keep_q, replace=False))],
            [c[i] for i in sorted(rng.choice(len(c), keep_c, replace=False))])


@torch.no_grad()
def encode_uint8(model: AttributeModel, images: torch.Tensor, norm: _Normalise, batch_size: int = 64) -> torch.Tensor:
    """embed_all over uint8 images [N, 3, S, S] in eval mode -> float32 [N, A, D] on CPU."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = [model.embed_all(norm(images[i:i + batch_size].to(dev))).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def validation_map(model: AttributeModel, valid: tuple, norm: _Normalise, *, names: list[str]) -> dict[str, Any]:
    """Retrieval MAP (the papers' protocol, fgplugin.evaluation) of queries vs candidates."""
    from ..evaluation import query_vectors, retrieval_map

    q_img, q_lab, c_img, c_lab = valid
    queries = query_vectors(model, encode_uint8(model, q_img, norm))
    return retrieval_map(queries, q_lab, encode_uint8(model, c_img, norm), c_lab, attribute_names=names)


__all__ = ["train", "TrainResult", "parse_budget", "resolve_device", "augment", "validation_map"]
