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

Progress goes to an ``on_progress`` callback (fgplugin.progress); the CLI draws it.
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
from torchvision.transforms import v2 as T

from ..catalog import Catalog, find_schema, load_catalog
from ..dataset import CatalogImages
from ..devices import resolve_device
from ..errors import FgpluginError, ModelCardError
from ..evaluation import query_vectors, retrieval_map
from ..models import (
    AttributeModel,
    ModelConfig,
    TrainConfig,
    build_model,
    load_checkpoint,
    load_training_state,
    read_checkpoint_meta,
    save_checkpoint,
)
from ..models.attention import crop_rois
from ..progress import OnProgress, report
from ..schema import AttributeSchema, require_same_schema
from ..splits import Splits
from .samplers import TripletSampler

LAST, BEST = "last", "best"
OnStep = Callable[[int, dict[str, float]], None]  # (step, the step's loss parts) after every step


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


def _uint8_transform(size: int) -> T.Compose:
    # The shared preprocessing up to (not including) the float conversion: identical pixels.
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


def _decode_all(data: CatalogImages, workers: int, on_progress: OnProgress | None, what: str) -> torch.Tensor:
    loader = DataLoader(data, batch_size=64, shuffle=False, num_workers=workers)
    out = torch.empty((len(data), 3, *data[0][0].shape[1:]), dtype=torch.uint8) if len(data) else torch.empty(0)
    done = 0
    report(on_progress, f"decoding {what}", done, len(data))
    for x, idx in loader:
        out[idx] = x
        done += len(idx)
        report(on_progress, f"decoding {what}", done, len(data))
    return out


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
    require_same_schema(AttributeSchema.from_dict(meta["schema"]), schema, have_is=f"the run in {where}",
                        want_is="the catalog", error=ModelCardError, hint="use a new --out folder")


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


# -- the run's parts ---------------------------------------------------------------------------------
@dataclass
class _Folders:
    """The run folder: ``last/`` (resumable) and ``best/`` (best validation MAP so far)."""

    out: Path

    @property
    def last(self) -> Path:
        return self.out / LAST

    @property
    def best(self) -> Path:
        return self.out / BEST

    def saved_best(self) -> Path | None:
        return self.best if (self.best / "config.json").is_file() else None


@dataclass
class _TrainingData:
    """The training split, checked, as images and a reproducible triplet sampler."""

    catalog: Catalog
    splits: Splits
    train_ids: list[str]
    images: CatalogImages
    sampler: TripletSampler
    transform: Any  # uint8 resize, shared with the validation images
    total: int  # optimiser steps of the whole run
    per_epoch: int


def _training_data(config: ModelConfig, catalog: Catalog, splits: Splits) -> _TrainingData:
    lookup = catalog.by_id()
    missing = [i for i in splits.train if i not in lookup]
    if missing:
        raise FgpluginError(f"{len(missing)} training ids of the splits are not in {catalog.path} "
                            f"(first: {missing[0]!r}); re-split the catalog (`fgplugin data split`)")
    train_ids = list(splits.train)
    if len(train_ids) < 3:
        raise FgpluginError(f"only {len(train_ids)} training items in the splits; need at least 3")
    total, per_epoch = _total_steps(config, len(train_ids))
    tc = config.train
    transform = _uint8_transform(config.image_size)
    images = CatalogImages(catalog, train_ids, transform)
    sampler = TripletSampler(images.labels, tc.batch_size, seed=tc.seed, mode=tc.sampling)
    return _TrainingData(catalog, splits, train_ids, images, sampler, transform, total, per_epoch)


@dataclass
class _Resumed:
    """What a run folder held when training resumes it."""

    config: ModelConfig  # the config the run was saved with
    stage: int  # the stage its optimiser state belongs to


def _open_model(config: ModelConfig, schema: AttributeSchema, folders: _Folders, resume: bool,
                start: AttributeModel | None = None) -> tuple[AttributeModel, dict[str, Any], _Resumed | None]:
    """(model, saved training state, what was resumed): the run in ``folders`` when resuming, else
    ``start`` or a fresh model initialised from ``train.seed``. An existing run is never overwritten."""
    last = folders.last
    has_run = (last / "config.json").is_file()
    if has_run and not resume:
        raise FgpluginError(f"{folders.out} already holds a training run; pass --resume to continue it, "
                            "or choose a new --out")
    if not has_run and start is not None:
        return start, {}, None
    if not has_run:
        torch.manual_seed(config.train.seed)
        np.random.seed(config.train.seed % (2**32))
        return build_model(config, schema), {}, None
    meta = read_checkpoint_meta(last)
    saved_config = ModelConfig.from_dict(meta["config"])
    _check_resumable(meta, saved_config, config, schema, last)
    model, state = load_checkpoint(last, map_location="cpu")
    model.config = config  # the new training settings (e.g. more steps) apply from here on
    return model, state, _Resumed(saved_config, int(state.get("stage", 1)))


def _make_optimizer(model: AttributeModel, tc: TrainConfig, stage: int, per_epoch: int) -> tuple[Any, Any]:
    """Adam over the stage's parameter groups, and its StepLR schedule."""
    opt = torch.optim.Adam(model.parameter_groups(stage), lr=tc.lr, weight_decay=tc.weight_decay)
    every = tc.lr_step_epochs if stage == 1 else tc.stage2_lr_step_epochs
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, round(every * per_epoch)), gamma=tc.lr_decay)
    return opt, sched


@dataclass
class _Run:
    """The loop's state: what it changes step by step and what a checkpoint's ``state`` records."""

    model: AttributeModel
    total: int
    step: int
    history: list[dict[str, Any]]
    validations: list[dict[str, Any]]
    best_map: float | None
    stage1_steps: int
    stage: int = 1
    optimizer: torch.optim.Optimizer | None = None  # the current stage's (_Loop.start_optimiser)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    running: dict[str, float] = field(default_factory=dict)  # running averages of the loss parts

    @classmethod
    def from_state(cls, model: AttributeModel, state: dict[str, Any], total: int, stage1_fraction: float) -> "_Run":
        stage1_steps = round(total * stage1_fraction) if len(model.training_stages) > 1 else total
        run = cls(model, total, int(state.get("step", 0)), list(state.get("history", [])),
                  list(state.get("validations", [])), state.get("best_map"), stage1_steps)
        run.stage = run.stage_at(run.step)
        return run

    def stage_at(self, step: int) -> int:
        return 1 if step < self.stage1_steps or len(self.model.training_stages) == 1 else 2

    def state(self, data: _TrainingData) -> dict[str, Any]:
        return {"step": self.step, "stage": self.stage, "total_steps": self.total, "history": self.history,
                "validations": self.validations, "best_map": self.best_map,
                "data": {"catalog": str(data.catalog.path), "n_train": len(data.train_ids),
                         "schema_fingerprint": data.catalog.schema.fingerprint()}}

    def result(self, folders: _Folders, stopped: str, t_start: float) -> TrainResult:
        best = folders.saved_best()
        return TrainResult(best or folders.last, folders.last, best, self.step, self.total, stopped,
                           time.monotonic() - t_start, self.best_map, self.history, self.validations)


@dataclass
class _Loop:
    """What the steps share and never change: device, precision, schedule of validations and
    checkpoints, the callbacks (``valid`` is filled in once, when the images are decoded)."""

    config: ModelConfig
    data: _TrainingData
    folders: _Folders
    device: torch.device
    norm: _Normalise
    amp: bool
    amp_dtype: torch.dtype
    eval_every: int
    ckpt_every: int
    budget_end: float | None
    all_labels: torch.Tensor  # the training items' labels on the device
    on_step: OnStep | None
    on_progress: OnProgress | None
    valid: tuple | None = None  # decoded validation (query images, labels, candidate images, labels)

    @classmethod
    def create(cls, config: ModelConfig, data: _TrainingData, folders: _Folders, dev: torch.device,
               budget_s: float | None, on_step: OnStep | None, on_progress: OnProgress | None) -> "_Loop":
        tc = config.train
        amp = tc.amp and dev.type == "cuda"
        amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        eval_every = tc.eval_every or max(1, data.total // 10)
        return cls(config, data, folders, dev, _Normalise(config.mean, config.std, dev), amp, amp_dtype, eval_every,
                   tc.checkpoint_every or eval_every, None if budget_s is None else time.monotonic() + budget_s,
                   torch.as_tensor(data.images.labels, device=dev), on_step, on_progress)

    def start_optimiser(self, run: _Run) -> None:
        """The gradient scaler (float16 autocast only) and the current stage's optimiser, into ``run``."""
        run.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        run.optimizer, run.scheduler = _make_optimizer(run.model, self.config.train, run.stage, self.data.per_epoch)

    def save_last(self, run: _Run) -> None:
        save_checkpoint(self.folders.last, run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        scaler=run.scaler, state=run.state(self.data))

    def validate(self, run: _Run) -> None:
        """Validation MAP now; a new best is saved to ``best/``."""
        if self.valid is None:
            return
        res = validation_map(run.model, self.valid, self.norm, names=self.data.catalog.schema.names)
        run.validations.append({"step": run.step, "stage": run.stage, "map": res["overall_weighted"],
                                "per_attribute": res["per_attribute"]})
        got = res["overall_weighted"]
        if got == got and (run.best_map is None or got > run.best_map):  # NaN (nothing to rank) never counts
            run.best_map = got
            save_checkpoint(self.folders.best, run.model, state=run.state(self.data))

    def report(self, run: _Run, info: str = "") -> None:
        report(self.on_progress, f"training {self.config.variant}", run.step, run.total, info)


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
    validate: bool = True,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
    start: AttributeModel | None = None,
) -> TrainResult:
    """Train ``config.variant`` on the catalog's training split; returns where the checkpoints are.

    ``resume``: continue the run in ``out_dir`` (weights, optimiser, scheduler, step, history) if it
    has one, else start fresh. Without ``resume`` an existing run there is refused (nothing is lost).
    ``budget_s``: stop after this many seconds of training (then validate and save as usual).
    ``on_step(step, loss parts)`` after every step; ``on_progress``: decoding and training progress.
    ``start``: the model a new run starts from instead of a fresh one (an extension, training/extend.py).
    """
    t_start = time.monotonic()
    catalog, splits = _load_inputs(catalog, splits)
    dev = resolve_device(device)
    folders = _Folders(Path(out_dir))
    data = _training_data(config, catalog, splits)
    model, state, resumed = _open_model(config, catalog.schema, folders, resume, start)
    model.to(dev)
    model.freeze_trunk_stages()
    run = _Run.from_state(model, state, data.total, config.train.stage1_fraction)
    if run.step >= run.total:
        return run.result(folders, "already done", t_start)
    model.start_stage(run.stage)
    loop = _Loop.create(config, data, folders, dev, budget_s, on_step, on_progress)
    loop.start_optimiser(run)
    if resumed is not None and resumed.stage == run.stage:
        _check_optimiser_settings(resumed.config, config, run.stage, folders.last)
        load_training_state(folders.last, run.optimizer, run.scheduler, run.scaler, map_location=dev)
    cached, loop.valid = _decode_inputs(config, data, validate, on_progress)
    stopped = _run_steps(run, loop, _step_loader(config, data, run.step, cached, dev))
    loop.validate(run)
    loop.save_last(run)
    return run.result(folders, stopped, t_start)


def _decode_inputs(config: ModelConfig, data: _TrainingData, validate: bool,
                   on_progress: OnProgress | None) -> tuple[torch.Tensor | None, tuple | None]:
    """(the training images decoded into memory when they fit ``train.cache``, else None (decoded per
    step); the validation queries and candidates, decoded, with their labels, or None)."""
    tc = config.train
    valid_q, valid_c = _valid_ids(data.splits, tc.valid_max_items, tc.seed) if validate else ([], [])
    n_cache = len(data.train_ids) + len(valid_q) + len(valid_c)
    cache_bytes = 3 * config.image_size * config.image_size
    use_cache = tc.cache == "memory" or (tc.cache == "auto" and n_cache * cache_bytes <= tc.cache_max_mb * 2**20)
    cached = _decode_all(data.images, tc.workers, on_progress, "training images") if use_cache else None
    if not (validate and valid_q and valid_c):
        return cached, None
    vq = CatalogImages(data.catalog, valid_q, data.transform)
    vc = CatalogImages(data.catalog, valid_c, data.transform)
    return cached, (_decode_all(vq, tc.workers, on_progress, "validation queries"), vq.labels,
                    _decode_all(vc, tc.workers, on_progress, "validation candidates"), vc.labels)


def _step_loader(config: ModelConfig, data: _TrainingData, start: int, cached: torch.Tensor | None,
                 dev: torch.device) -> DataLoader:
    """The batches of steps ``start`` .. total, prefetched by workers when images are decoded per step."""
    return DataLoader(_StepBatches(_ImageSource(data.images, cached), data.sampler, start, data.total),
                      batch_size=None, shuffle=False, num_workers=0 if cached is not None else config.train.workers,
                      persistent_workers=False, pin_memory=dev.type == "cuda")


def _run_steps(run: _Run, loop: _Loop, loader: DataLoader) -> str:
    """Train until the loader is done ("done") or the budget is spent ("budget"); an interrupt saves
    ``last/`` first, so the run resumes from exactly there."""
    loop.report(run)
    run.model.train()
    try:
        for images, trip in loader:
            _enter_stage(run, loop, run.stage_at(run.step))
            losses = _train_step(run, loop, images, trip)
            _after_step(run, loop, losses)
            if loop.budget_end is not None and time.monotonic() >= loop.budget_end and run.step < run.total:
                return "budget"
    except KeyboardInterrupt:
        loop.save_last(run)
        raise
    return "done"


def _enter_stage(run: _Run, loop: _Loop, stage: int) -> None:
    """ASEN_v2: stage 1 (global) -> stage 2 (joint): validate the first, then a new optimiser."""
    if stage == run.stage:
        return
    loop.validate(run)
    run.stage = stage
    run.model.start_stage(stage)
    run.optimizer, run.scheduler = _make_optimizer(run.model, loop.config.train, stage, loop.data.per_epoch)


def _train_step(run: _Run, loop: _Loop, images: torch.Tensor, trip: torch.Tensor) -> dict[str, float]:
    """One optimiser step on a triplet batch (the augmentation drawn from ``(seed, step)``); its loss parts."""
    tc = loop.config.train
    gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + run.step)
    x = loop.norm(images.to(loop.device, non_blocking=True))
    if tc.augment:
        x = augment(x, gen, tc.crop_scale)
    trip = trip.to(loop.device)
    labels = loop.all_labels[torch.cat([trip[:, 1], trip[:, 2], trip[:, 3]])]
    with torch.autocast(loop.device.type, dtype=loop.amp_dtype, enabled=loop.amp):
        parts = run.model.training_losses(x, trip[:, 0], labels, stage=run.stage)
    loss = parts["loss"]
    if not torch.isfinite(loss):
        raise FgpluginError(f"training diverged at step {run.step} (loss {float(loss)}); "
                            "lower the learning rate (--lr) and resume from the last checkpoint")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    vals = {k: float(v.detach()) for k, v in parts.items()}
    for k, v in vals.items():  # running average for the log and the progress line
        run.running[k] = v if k not in run.running else 0.9 * run.running[k] + 0.1 * v
    return vals


def _after_step(run: _Run, loop: _Loop, losses: dict[str, float]) -> None:
    """The loss log, ``on_step``, validation and ``last/`` on their schedules, the progress report."""
    step, total = run.step, run.total
    if step % max(1, min(50, loop.eval_every)) == 0 or step == total:
        run.history.append({"step": step, "stage": run.stage, "lr": run.optimizer.param_groups[0]["lr"],
                            **{k: round(v, 5) for k, v in run.running.items()}})
    if loop.on_step is not None:
        loop.on_step(step, losses)
    if step % loop.eval_every == 0 and step < total:
        loop.validate(run)
        run.model.train()
    if step % loop.ckpt_every == 0 and step < total:
        loop.save_last(run)
    last_map = run.validations[-1]["map"] if run.validations else None
    info = f"loss {run.running['loss']:.4f}" + (f" | val MAP {100 * last_map:.1f}" if last_map is not None else "")
    loop.report(run, info + (f" | stage {run.stage}" if len(run.model.training_stages) > 1 else ""))


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
    out = [model.embed_all(norm(images[i:i + batch_size].to(model.device))).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def validation_map(model: AttributeModel, valid: tuple, norm: _Normalise, *, names: list[str]) -> dict[str, Any]:
    """Retrieval MAP (the papers' protocol, fgplugin.evaluation) of queries vs candidates."""
    q_img, q_lab, c_img, c_lab = valid
    queries = query_vectors(model, encode_uint8(model, q_img, norm))
    return retrieval_map(queries, q_lab, encode_uint8(model, c_img, norm), c_lab, attribute_names=names)


__all__ = ["train", "TrainResult", "parse_budget", "augment", "validation_map"]
