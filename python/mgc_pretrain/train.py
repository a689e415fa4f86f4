"""The training loop: schedules, AMP, per-parameter clipping, DDP, checkpoints, signals, logs."""

from __future__ import annotations

import csv
import inspect
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mgc_kernels import cosine_momentum
from mgc_kernels.transforms import TwoViewTransform

from . import checkpoint
from .config import RESUMABLE_CHANGES, Config
from .data import build_dataset
from .export import export_backbone
from .loader import batches, steps_per_epoch
from .methods import PRETRAIN_METHODS, Method
from .models import no_weight_decay


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stops at that step."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was checkpointed at ``step`` and stopped."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}, saved {path}")


def clip_per_parameter(params: list[torch.Tensor], max_norm: float) -> None:
    """Clip each parameter's gradient to norm ``max_norm`` on its own (MGC's recipe), not the
    global norm; no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and max_norm > 0:
        norms = torch._foreach_norm(grads)
        scales = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
        torch._foreach_mul_(grads, scales)


class Schedule:
    """Where each step sits on the run's schedules (lr, EMA momentum, ADCLR's teacher
    temperature), as a *position* in ``[0, length]`` of the run's first length.

    A run that keeps its length has position == step. A resume that changes the length re-times
    what is left: from the checkpoint's step on, the position runs linearly from where it was to
    the end at the new last step. So the lr and momentum continue from their current values with
    no jump (a finished run, at the end already, continues at --min-lr and momentum 1).
    ``knots`` are the ``(step, position)`` corners of that piecewise-linear map.
    """

    def __init__(self, knots: list[tuple[int, float]]):
        self.knots = [(int(s), float(p)) for s, p in knots]

    @classmethod
    def straight(cls, total_steps: int) -> Schedule:
        return cls([(0, 0.0), (total_steps, float(total_steps))])

    @property
    def length(self) -> float:
        return self.knots[-1][1]

    @property
    def total_steps(self) -> int:
        return self.knots[-1][0]

    def position(self, step: float) -> float:
        for (s0, p0), (s1, p1) in zip(self.knots, self.knots[1:]):
            if step <= s1:
                return p0 + (p1 - p0) * (step - s0) / (s1 - s0)
        return self.length

    def retimed(self, at_step: int, total_steps: int) -> Schedule:
        """The same schedule up to ``at_step``, then the rest stretched to end at
        ``total_steps``."""
        if total_steps == self.total_steps:
            return self
        kept = [k for k in self.knots if k[0] < at_step]
        return Schedule([*kept, (at_step, self.position(at_step)), (total_steps, self.length)])


def build_method(cfg: Config, distributed: bool, schedule_epochs: float) -> Method:
    backend = None if cfg.backend == "auto" else cfg.backend
    arch, common = cfg.architecture, dict(gather_distributed=distributed, backend=backend)
    options = {
        "mgc": dict(mode=cfg.mgc_mode, weighting=cfg.mgc_weighting),
        "densecl": dict(queue_size=cfg.queue_size),
        "smog": dict(
            num_groups=cfg.num_groups,
            reset_every=cfg.smog_reset_every,
            bank_size=cfg.bank_size,
            seed=cfg.seed,
        ),
        "adclr": dict(
            num_prototypes=cfg.num_prototypes,
            num_queries=cfg.num_queries,
            warmup_teacher_temperature_epochs=min(30, max(1, round(schedule_epochs))),
        ),
        "mcl": {},
    }[cfg.method]
    return PRETRAIN_METHODS[cfg.method](arch, cfg.drop_path, **options, **common)


def build_optimizer(cfg: Config, method: Method) -> torch.optim.Optimizer:
    no_decay = {f"backbone.{n}" for n in no_weight_decay(method.backbone)}
    groups = param_groups_weight_decay(method, cfg.weight_decay, no_weight_decay_list=no_decay)
    lr = cfg.lr * cfg.batch_size / 256
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def build_scheduler(cfg: Config, optimizer, length: int, steps_per_epoch: int) -> CosineLRScheduler:
    """timm's warm-up + cosine over ``length`` steps (the schedule's first length). timm warns
    that a one-step cosine "will have no effect"; that is what a run of warm-up + 1 step asks
    for, so the warning is silenced (the README says why)."""
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), length - 1)
    timm_log = logging.getLogger("timm.scheduler.cosine_lr")
    level, timm_log.level = timm_log.level, logging.ERROR
    try:
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=max(length - warmup, 1),
            lr_min=cfg.min_lr,
            warmup_t=warmup,
            warmup_lr_init=0.0,
            warmup_prefix=True,
            t_in_epochs=False,
        )
    finally:
        timm_log.level = level
    return scheduler


class Distributed:
    """torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), a process group the
    caller already started, or one process."""

    def __init__(self, device: str):
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if use_cuda else "gloo")
        joined = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if joined else 1
        self.rank = dist.get_rank() if joined else 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        """``flag`` on every rank (so that all ranks stop together)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on GPU, full precision on CPU (bf16 matmuls are slow on most CPUs)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class Log:
    """Rank 0's per-step log: ``log.csv`` and TensorBoard events (``tb/``); on resume the rows
    after the checkpoint's step are dropped so the log has each step once. ``bad_images`` counts
    the images of the step that failed to decode and were replaced (see ``data.ImageFolder``)."""

    COLUMNS = ("step", "epoch", "loss", "lr", "momentum", "images_per_s", "bad_images")

    def __init__(self, output: Path, start_step: int, extra: tuple[str, ...]):
        self.path = output / "log.csv"
        self.columns = self.COLUMNS + extra
        self._rewrite(self._rows_before(start_step))
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, self.columns, extrasaction="ignore")
        self.tensorboard = _summary_writer(output / "tb", start_step)

    def _rows_before(self, start_step: int) -> list[dict]:
        """The whole rows of the steps before ``start_step`` (a kill mid-write leaves a torn
        last row: it lacks fields)."""
        if start_step == 0 or not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return [
                row
                for row in csv.DictReader(f)
                if None not in row.values() and int(row["step"]) < start_step
            ]

    def _rewrite(self, rows: list[dict]) -> None:
        """Header and ``rows`` to a temporary file renamed over the log: a kill meanwhile
        leaves the old log, never a truncated one."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _summary_writer(path: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the "train" extra; the CSV log is always written
        print("mgc-pretrain: tensorboard is not installed; writing log.csv only", file=sys.stderr)
        return None
    return SummaryWriter(str(path), purge_step=start_step)


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


class Trainer:
    """One run of ``mgc-pretrain``: builds everything from a :class:`Config`, then :meth:`fit`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist = Distributed(cfg.device)
        self.output = Path(cfg.output)
        self.dataset = build_dataset(
            cfg.data, length=cfg.num_images, image_size=cfg.source_size, seed=cfg.seed
        )
        self.batch_per_rank = self._batch_per_rank()
        self.steps_per_epoch = steps_per_epoch(
            len(self.dataset), self.batch_per_rank, self.dist.world_size
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"--batch-size {cfg.batch_size} is larger than the "
                f"{len(self.dataset)} images of --data {cfg.data!r}"
            )
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        ckpt = self._read_checkpoint() if cfg.resume else None
        self.start_step = int(ckpt["step"]) if ckpt else 0
        self.schedule = self._schedule(ckpt)
        torch.manual_seed(cfg.seed)  # every rank builds the same model, queues and groups
        self.method = build_method(
            cfg, self.dist.enabled, self.schedule.length / self.steps_per_epoch
        )
        self.method.to(self.dist.device)
        self.model = self._wrap(self.method)
        torch.manual_seed(cfg.seed + 1000 * (1 + self.dist.rank))  # per-rank drop-path etc.
        self.params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, self.method)
        self.scheduler = build_scheduler(
            cfg, self.optimizer, round(self.schedule.length), self.steps_per_epoch
        )
        self.amp_dtype = autocast_dtype(cfg.amp, self.dist.device)
        self.scaler = torch.amp.GradScaler(
            self.dist.device.type, enabled=self.amp_dtype == torch.float16
        )
        if ckpt is not None:
            self._restore(ckpt)

    def _batch_per_rank(self) -> int:
        cfg, world = self.cfg, self.dist.world_size
        if cfg.batch_size % world:
            raise ValueError(
                f"--batch-size {cfg.batch_size} (the global batch) must be a "
                f"multiple of the number of processes, {world}"
            )
        return cfg.batch_size // world

    def _wrap(self, method: Method) -> torch.nn.Module:
        if not self.dist.enabled:
            return method
        ids = None
        if self.dist.device.type == "cuda":  # SyncBatchNorm runs on GPUs only; CPU ranks
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)  # keep local BN
            self.method, ids = method, [self.dist.device.index]
        # buffers (queues, groups, centres) start equal and the losses keep them so: no
        # broadcast at every forward (torch >= 2.15 renamed the switch)
        no_sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        return DistributedDataParallel(method, device_ids=ids, **{no_sync: False})

    @property
    def checkpoint_path(self) -> Path:
        return self.output / "last.pt"

    @property
    def resume_path(self) -> Path:
        return self.checkpoint_path if self.cfg.resume == "auto" else Path(self.cfg.resume)

    def _read_checkpoint(self) -> dict:
        """The checkpoint to resume, checked against this run before anything is built."""
        path = self.resume_path
        ckpt = checkpoint.read(path, self.dist.device)
        fixed = tuple(n for n in Config.field_names() if n not in RESUMABLE_CHANGES)
        checkpoint.check_compatible(
            Config.from_dict(ckpt["config"]).as_dict(), self.cfg.as_dict(), fixed, path
        )
        step = int(ckpt["step"])
        if self.total_steps < step:
            raise checkpoint.CheckpointError(
                f"checkpoint {str(path)!r} is at step {step}, past this run's last step "
                f"{self.total_steps}: a resumed run can only go forward (give --steps or "
                f"--epochs of at least {step} steps, or start a new run with --output)"
            )
        return ckpt

    def _schedule(self, ckpt: dict | None) -> Schedule:
        if ckpt is None:
            return Schedule.straight(self.total_steps)
        # checkpoints of mgc-pretrain/1 before the schedule was saved ran straight
        first = Config.from_dict(ckpt["config"])
        saved = (
            ckpt.get("schedule")
            or Schedule.straight(first.steps or first.epochs * self.steps_per_epoch).knots
        )
        return Schedule(saved).retimed(int(ckpt["step"]), self.total_steps)

    def _restore(self, ckpt: dict) -> None:
        path = self.resume_path
        checkpoint.load_state(self.method, ckpt["model"], "model", path)
        for what, obj in (("optimizer", self.optimizer), ("scaler", self.scaler)):
            try:
                obj.load_state_dict(ckpt[what])
            except (ValueError, KeyError, RuntimeError, TypeError) as e:
                raise checkpoint.CheckpointError(
                    f"checkpoint {str(path)!r}: its {what} state does not fit this run: {e}"
                ) from e
        states = ckpt["rng"]
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank], self.dist.device)
        elif self.dist.is_main:
            print(
                f"mgc-pretrain: {path} was written by {len(states)} process(es), this run has "
                f"{self.dist.world_size}: random streams restart (not a bit-exact resume)",
                file=sys.stderr,
            )

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps (every rank's RNG state; rank 0 writes)."""
        states = self.dist.gather_objects(
            {k: v.cpu() for k, v in rng_state(self.dist.device).items()}
        )
        if self.dist.is_main:
            checkpoint.save_atomic(
                {
                    "format": checkpoint.FORMAT,
                    "config": self.cfg.as_dict(),
                    "step": step,
                    "schedule": self.schedule.knots,
                    "model": self.method.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": states,
                },
                self.checkpoint_path,
            )

    def _step(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        position = self.schedule.position(step)
        self.scheduler.step_update(position)
        self.method.update_momentum(cosine_momentum(position, self.schedule.length, cfg.momentum))
        autocast = (
            torch.autocast(self.dist.device.type, dtype=self.amp_dtype)
            if self.amp_dtype
            else nullcontext()
        )
        with autocast:
            loss, terms = self.model(batch, position / self.steps_per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip_per_parameter(self.params, cfg.clip)
        return loss.detach(), {k: float(v) for k, v in terms.items()}

    def _finish_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step()

    def _agree(
        self, loss: torch.Tensor, stop: bool, save_due: bool, bad_images: int
    ) -> tuple[bool, bool, bool, int]:
        """``(any rank's loss is not finite, any rank was signalled, a save is due, bad images
        over all ranks)``: one all-reduce a step, so that every rank takes the same branch."""
        counts = torch.tensor([0.0, stop, save_due, bad_images], device=self.dist.device)
        counts[0] = (~torch.isfinite(loss.float())).float()
        if self.dist.enabled:
            dist.all_reduce(counts)
        bad, signalled, due, images = counts.tolist()
        return bad > 0, signalled > 0, due > 0, int(images)

    def _non_finite(self, loss: float, step: int) -> NonFiniteLoss:
        last = (
            f"the last good checkpoint is {self.checkpoint_path}"
            if self.checkpoint_path.exists()
            else "no checkpoint was written yet"
        )
        return NonFiniteLoss(
            f"the loss is not finite at step {step} (this rank: {loss}); "
            f"training stopped, {last}. Lower --lr or try --amp off."
        )

    def fit(self, until: int | None = None) -> None:
        """Train from ``start_step`` to the end (or to step ``until``, checkpointed there).

        Checkpoints come every ``save_every`` steps (default: every epoch), every
        ``save_minutes``, at the end, and when SIGINT or SIGTERM arrives: the step in flight
        finishes, is saved, and :class:`Interrupted` is raised (a second signal stops at once;
        the last checkpoint is still whole, as every write is atomic)."""
        cfg, main = self.cfg, self.dist.is_main
        stop = self.total_steps if until is None else min(until, self.total_steps)
        if main:
            self.output.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_stale_temporaries(self.checkpoint_path)
        self.method.train()
        save_every = cfg.save_every or self.steps_per_epoch
        log, last_save = None, time.monotonic()
        bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            disable=not main,
            desc=f"{cfg.method} {cfg.arch}",
            unit="step",
            dynamic_ncols=True,
        )
        tick, rate = time.perf_counter(), 0.0
        try:
            with _signals_caught() as caught:
                stream = batches(
                    self.dataset,
                    TwoViewTransform(cfg.architecture.img_size),
                    batch_size=self.batch_per_rank,
                    seed=cfg.seed,
                    start_step=self.start_step,
                    workers=cfg.workers,
                    world_size=self.dist.world_size,
                    rank=self.dist.rank,
                    level_ratios=self.method.level_ratios,
                )
                for step in range(self.start_step, stop):
                    batch = next(stream)
                    bad_images = int(batch.pop("bad_images", torch.zeros(1)).sum())  # on CPU
                    loss, terms = self._step(to_device(batch, self.dist.device), step)
                    timed_out = (
                        cfg.save_minutes > 0
                        and time.monotonic() - last_save >= 60 * cfg.save_minutes
                    )
                    bad, signalled, timed_out, bad_images = self._agree(
                        loss, bool(caught), timed_out, bad_images
                    )
                    if bad:
                        raise self._non_finite(float(loss), step)
                    self._finish_step()
                    now = time.perf_counter()
                    rate = (
                        cfg.batch_size / max(now - tick, 1e-9)
                        if step == self.start_step
                        else 0.9 * rate + 0.1 * cfg.batch_size / max(now - tick, 1e-9)
                    )
                    tick = now
                    if main:
                        log = log or Log(self.output, self.start_step, tuple(terms))
                        lr = self.optimizer.param_groups[0]["lr"]
                        position = self.schedule.position(step)
                        log.write(
                            {
                                "step": step,
                                "epoch": step / self.steps_per_epoch,
                                "loss": float(loss),
                                "lr": lr,
                                "images_per_s": rate,
                                "bad_images": bad_images,
                                **terms,
                                "momentum": cosine_momentum(
                                    position, self.schedule.length, cfg.momentum
                                ),
                            }
                        )
                        bar.set_postfix(
                            loss=f"{float(loss):.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}"
                        )
                        bar.update()
                    if (step + 1) % save_every == 0 or step + 1 == stop or signalled or timed_out:
                        self.save(step + 1)
                        last_save = time.monotonic()
                    if signalled:  # here or on another rank (then say SIGTERM here)
                        raise Interrupted(
                            caught[0] if caught else signal.SIGTERM, step + 1, self.checkpoint_path
                        )
        finally:
            bar.close()
            if log is not None:
                log.close()
        if main and stop == self.total_steps:
            export_backbone(self.method.backbone, cfg.architecture, self.output / "backbone.pth")


@contextmanager
def _signals_caught():
    """SIGINT and SIGTERM append their number to the yielded list instead of stopping the
    process, so the loop can save first; a second one exits at once (status 128 + signal).
    Data-loader workers ignore both (``loader._ignore_stop_signals``)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught  # signal handlers can only be set from the main thread
        return

    def handle(signum, frame):
        if caught:
            print(
                f"\nmgc-pretrain: second {signal.Signals(signum).name}: stopped without "
                "saving this step; the last checkpoint is intact",
                file=sys.stderr,
            )
            raise SystemExit(128 + signum)
        caught.append(signum)
        print(
            f"\nmgc-pretrain: {signal.Signals(signum).name}: saving at the end of this step "
            "(send it again to stop at once)",
            file=sys.stderr,
        )

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
