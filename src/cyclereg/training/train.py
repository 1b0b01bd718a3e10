"""The training loop: read top to bottom.

A run writes into its output folder:

- ``checkpoint.pt``: model, optimiser, step, config and random states, written atomically every
  ``train.checkpoint_every`` steps and when SIGINT or SIGTERM asks the run to stop. ``--resume``
  after a stop or a crash (even ``kill -9``) ends with the weights of an uninterrupted run, bit for
  bit on CPU.
- ``log.jsonl``: loss terms and validation scores.
- ``model.safetensors`` at the end (:mod:`cyclereg.models.modelfile`).
"""

from __future__ import annotations

import json
import math
import pickle
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cyclereg.core import distributed
from cyclereg.core.atomic import atomic_path, make_folder
from cyclereg.core.locks import folder_lock
from cyclereg.core.config import Config, config_from_dict
from cyclereg.data.datasets import training_data
from cyclereg.core.distributed import Context
from cyclereg.training.loader import Loader
from cyclereg.core.errors import DataError, Interrupted, UsageError
from cyclereg.evaluation.scores import score_pairs, summarise
from cyclereg.losses.labels import one_hot
from cyclereg.models.methods import loss_terms, settings_from_config
from cyclereg.models.registration import split_steps, use_channels_last
from cyclereg.models.multiscale import random_patches
from cyclereg.models.modelfile import ModelInfo, build_from_info, initialise_from, read_init, save_model

__all__ = ["train", "stage_schedule", "learning_rate"]


@dataclass
class Stage:
    end: int  # first step after this stage
    lam: float
    trainable: list
    patch: list  # empty: whole images; else the trained (local) steps see random patches


def stage_schedule(cfg: Config) -> list[Stage]:
    """Stages as step ranges; without ``train.stages``, one stage training every model step."""
    every = list(range(len(cfg.model.steps)))
    if not cfg.train.stages:
        return [Stage(cfg.train.steps, cfg.model.lam, every, [])]
    stages, done = [], 0.0
    for s, lam in zip(cfg.train.stages, cfg.stage_lams()):
        done += s.fraction
        stages.append(Stage(round(done * cfg.train.steps), lam, s.train or every, s.patch))
    stages[-1].end = cfg.train.steps
    return stages


def learning_rate(cfg: Config, stages: list[Stage], step: int) -> float:
    """Adam's learning rate for training step ``step`` (0-based), a function of the step alone so a
    resumed run follows the same schedule: ``train.warmup`` steps of linear warm-up at the start of
    each stage, then ``train.lr`` (``constant``) or a cosine decay from ``train.lr`` towards 0 at the
    stage's end."""
    start = 0
    for stage in stages:
        if step < stage.end:
            break
        start = stage.end
    t, warmup = step - start, cfg.train.warmup
    if t < warmup:
        return cfg.train.lr * (t + 1) / warmup
    if cfg.train.lr_schedule == "cosine":
        return cfg.train.lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(stage.end - start - warmup, 1)))
    return cfg.train.lr


def _save_checkpoint(path: Path, model, optimizer, step: int, cfg: Config, ctx: Context) -> None:
    """Every rank takes part (random states are gathered); rank 0 writes."""
    rng = ctx.gather(torch.get_rng_state())
    cuda_rng = ctx.gather(torch.cuda.get_rng_state()) if ctx.device.type == "cuda" else None
    if not ctx.main:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "config": cfg.to_dict(), "torch_rng": rng[0], "world_size": ctx.world}
    if ctx.active:
        state["torch_rng_ranks"] = rng
    if cuda_rng is not None:
        state["cuda_rng_ranks"] = cuda_rng
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read_checkpoint(path: Path, cfg: Config) -> dict:
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
    except pickle.UnpicklingError:
        raise DataError(f"checkpoint {path} cannot be read: it is not a PyTorch checkpoint; "
                        "cyclereg never unpickles arbitrary objects") from None
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is a data error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"checkpoint {path} cannot be read ({first})") from None
    saved = _completed(state.get("config", {}) if isinstance(state, dict) else {})
    key = _first_difference(saved, cfg.to_dict())
    if key is not None:
        raise UsageError(f"--resume: checkpoint {path} was trained with another config: {key} differs")
    return state


def _completed(saved: dict) -> dict:
    """A checkpoint's config with the keys added to cyclereg since it was written at their defaults (so
    that a run resumes across versions); as saved if it no longer builds."""
    try:
        return config_from_dict(saved).to_dict()
    except UsageError:
        return saved


# Keys that a resumed run may change: how long it runs (a run continued to more steps) and how it reports.
_FREE = {"train.steps", "train.val_every", "train.log_every", "train.checkpoint_every", "train.workers"}


def _first_difference(saved: dict, current: dict, prefix: str = "") -> str | None:
    """The first key (dotted, in the current config's order) whose value changes the result and differs."""
    for name in dict.fromkeys([*current, *saved]):
        key = f"{prefix}{name}"
        a, b = saved.get(name), current.get(name)
        if key in _FREE or key == "train.init":  # init: the weights come from the checkpoint
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _first_difference(a, b, f"{key}.")
            if inner:
                return inner
        elif a != b:
            return key
    return None


def _restore(state: dict, model, optimizer, ctx: Context) -> int:
    world = int(state.get("world_size", 1))
    if world != ctx.world:
        raise UsageError(f"--resume: the checkpoint was written by {world} process(es), this run has {ctx.world}; "
                         "resume with the same number (the global batch and the random streams depend on it)")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng_ranks"][ctx.rank] if ctx.active else state["torch_rng"])
    if "cuda_rng_ranks" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng_ranks"][ctx.rank], ctx.device)
    return int(state["step"])


class _Loss(nn.Module):
    """The training loss as one module, so that DistributedDataParallel sees one forward per step
    however many times the method calls the network (the two directions, CycleMorph's cycle)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, moving, fixed, settings, labels=None):
        return loss_terms(self.model, moving, fixed, settings, labels)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a run resumes from."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))


class _StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM ask training to stop: the current step ends, a checkpoint is saved
    at that step boundary, then :class:`Interrupted` is raised. A second signal stops at once (the
    last checkpoint stays). Signals can only be caught in the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def train(cfg: Config, out, resume: bool = False, device=None, progress: bool = True) -> Path:
    """Train the model described by ``cfg`` into folder ``out``; returns the model file's path.

    Started by ``torchrun``, every process runs this and they train one model together
    (:mod:`cyclereg.core.distributed`); ``train.batch_size`` is then the batch of each process."""
    with distributed.session(torch.device(device) if device else None) as ctx:
        out = make_folder(out, "--out", "a folder for the run")
        with folder_lock(out, "--out", enabled=ctx.main):  # one job per run folder (a requeued one takes it over)
            return _train(cfg, out, resume, ctx, progress and ctx.main)


@dataclass
class _Run:
    """A training run being set up or under way: its files, data, model, optimiser and step."""

    cfg: Config
    out: Path
    ctx: Context
    info: ModelInfo = None
    data: object = None
    model: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    heldout: tuple = ()
    stages: list = field(default_factory=list)
    step: int = 0

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    def log(self, record: dict) -> None:
        if self.ctx.main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def validate(self) -> dict:
        scores = summarise(score_pairs(self.model, *self.heldout), self.info.shape)
        self.model.train()
        self.log({"step": self.step, **{f"val_{k}": v for k, v in scores.items()}})
        return scores


def _open_run(cfg: Config, out: Path, resume: bool, ctx: Context) -> _Run | None:
    """Check the run folder, then build the data, the model and the optimiser, resumed if asked (None: the
    run resumed is complete)."""
    run = _Run(cfg, out, ctx)
    if resume and not run.checkpoint.exists():  # killed before its first checkpoint: a requeued job starts over
        if ctx.main:
            print(f"cyclereg: --resume: no checkpoint in {out} yet; starting from step 0", file=sys.stderr)
        resume = False
    if not resume and run.checkpoint.exists():
        raise UsageError(f"{out} already holds a run (checkpoint.pt); use --resume or another --out")
    ctx.barrier()  # every rank has looked before rank 0 writes anything

    saved = _read_checkpoint(run.checkpoint, cfg) if resume else None  # before any slow work
    if saved is not None and int(saved["step"]) >= cfg.train.steps and (out / "model.safetensors").is_file():
        if ctx.main:
            print(f"cyclereg: --resume: the run in {out} is complete (step {int(saved['step'])} of "
                  f"{cfg.train.steps}); its model is left as it is", file=sys.stderr)
        return None
    init = read_init(cfg.train.init) if cfg.train.init and not resume else None  # resumed: weights in the checkpoint
    if ctx.main:
        for stale in out.glob(".checkpoint.*.pt"):  # a write cut short by a crash (the rename never happened)
            stale.unlink()
    torch.manual_seed(cfg.train.seed + ctx.rank)
    run.data = training_data(cfg.data)
    run.heldout = run.data.heldout()
    run.info = ModelInfo(cfg, run.data.shape, run.data.preprocess)
    run.model = build_from_info(run.info).to(ctx.device)
    if ctx.device.type == "cpu" or cfg.train.precision == "bfloat16":  # faster convolutions (use_channels_last)
        use_channels_last(run.model, run.info.dim)
    run.optimizer = torch.optim.Adam(run.model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    if init:
        initialise_from(run.model, run.info, cfg.train.init, init)
    run.step = _restore(saved, run.model, run.optimizer, ctx) if resume else 0
    if ctx.main:
        _trim_log(run.log_path, run.step)
    run.stages = stage_schedule(cfg)
    for i, s in enumerate(run.stages):
        if s.patch and len(s.patch) != run.info.dim:
            raise UsageError(f"train.stages[{i}].patch: expected {run.info.dim} sizes for {run.info.dim}D images, got {s.patch}")
    return run


def _stage_loss(run: _Run, stage: Stage):
    """``(settings, global_steps, loss)`` of a stage: its λ, and with a patch the global steps that warp
    the images before the trained (last) steps learn on patches of them."""
    run.model.freeze(stage.trainable)
    settings = settings_from_config(run.cfg.model, stage.lam)
    global_steps, learner = split_steps(run.model, min(stage.trainable)) if stage.patch else (None, run.model)
    loss_fn = _Loss(learner)
    if run.ctx.active:  # rebuilt per stage: DDP syncs the parameters that train in this stage
        device = run.ctx.device
        loss_fn = DistributedDataParallel(loss_fn, device_ids=[device.index] if device.type == "cuda" else None)
    return settings, global_steps, loss_fn


def _optimise(run: _Run, loss_fn, settings, batch, autocast) -> tuple[torch.Tensor, dict]:
    """One step of Adam on a batch ``(moving, fixed[, moving_labels, fixed_labels])``; returns the loss
    terms averaged over ranks, ``[total, *terms]``."""
    moving, fixed, *labels = batch
    if labels:  # label indices -> one-hot channels, on the device
        labels = tuple(one_hot(lab, len(run.cfg.data.label_list), moving.dtype) for lab in labels)
    with autocast:
        loss, terms = loss_fn(moving, fixed, settings, labels or None)
    reduced = run.ctx.mean(torch.stack([loss, *terms.values()]))
    if not torch.isfinite(reduced).all():
        bad = [k for k, v in zip(terms, reduced[1:]) if not torch.isfinite(v)] or ["total"]
        raise DataError(f"training stopped: loss term {bad[0]!r} is not finite at step {run.step + 1}; "
                        f"the last checkpoint in {run.out} is kept")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.cfg, run.stages, run.step)
    run.optimizer.step()
    run.step += 1
    return reduced, dict(zip(terms, reduced[1:].tolist()))


def _train(cfg: Config, out: Path, resume: bool, ctx: Context, progress: bool) -> Path:
    run = _open_run(cfg, out, resume, ctx)
    if run is None:  # resumed a complete run
        return out / "model.safetensors"
    total, every = cfg.train.steps, cfg.train
    bar = tqdm(total=total, initial=run.step, desc="train", disable=not progress, dynamic_ncols=True)
    current = None
    run.model.train()
    run.model.checkpointing(cfg.train.checkpointing)
    autocast = torch.autocast(ctx.device.type, torch.bfloat16, enabled=cfg.train.precision == "bfloat16")
    t_start, waited = time.perf_counter(), 0.0
    loader = Loader(run.data, cfg.train.seed, cfg.train.batch_size, ctx.rank, ctx.world, run.step, total, cfg.train.workers)
    with _StopOnSignal() as stop, loader:
        while run.step < total:
            stage = next(s for s in run.stages if run.step < s.end)
            if stage is not current:
                (settings, global_steps, loss_fn), current = _stage_loss(run, stage), stage
            batch = [part.to(ctx.device, non_blocking=True) for part in loader.next()]
            waited += loader.wait
            if stage.patch:  # not with labels (refused by the config)
                batch = random_patches(global_steps, *batch, stage.patch)
            reduced, values = _optimise(run, loss_fn, settings, batch, autocast)
            step = run.step
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
            if step % every.log_every == 0 or step == total:
                run.log({"step": step, "loss": float(reduced[0]), **values, "lam": stage.lam,
                         "lr": run.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t_start,
                         "data_wait": loader.wait})
            if step % every.val_every == 0 and step < total and ctx.main:
                scores = run.validate()
                bar.write(f"step {step}: held-out dice {scores['dice']:.3f}, folds {scores['folds']:.2f}")
            stopping = ctx.any(stop.signal is not None)
            if step % every.checkpoint_every == 0 or step == total or stopping:
                _save_checkpoint(run.checkpoint, run.model, run.optimizer, step, cfg, ctx)
            if stopping and step < total:
                bar.close()
                sig = stop.signal or signal.SIGTERM
                raise Interrupted(sig, f"training stopped by {sig.name} after step {step}; "
                                       f"checkpoint saved in {out} (continue with --resume)")
    bar.close()
    return _finish(run, progress, waited / max(time.perf_counter() - t_start, 1e-9))


def _finish(run: _Run, progress: bool, wait_fraction: float) -> Path:
    """Score the held-out pairs once more and write the model file (rank 0)."""
    model_path = run.out / "model.safetensors"
    if not run.ctx.main:
        return model_path
    scores = run.validate()
    if progress:
        print(f"held-out dice {scores['dice']:.3f}, folds {scores['folds']:.2f} per pair, "
              f"ic error {scores['ic_error']:.3f} mm")
    run.info.training = {"data": run.data.summary(), "steps": run.step, "processes": run.ctx.world,
                         "data_wait_fraction": wait_fraction,
                         "final_heldout": {k: v for k, v in scores.items() if isinstance(v, (int, float))}}
    save_model(model_path, run.model.eval(), run.info)
    return model_path
