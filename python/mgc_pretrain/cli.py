"""``mgc-pretrain``: train (the default command), ``eval`` and ``export``."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

try:
    from .config import PRESETS, Config
    from .methods import PRETRAIN_METHODS
    from .models import ARCHS
except ModuleNotFoundError as err:  # mgc_kernels installed without its train extra
    if err.name not in ("timm", "torchvision", "PIL", "tqdm", "matplotlib", "tensorboard"):
        raise
    raise SystemExit(
        f"mgc-pretrain needs the 'train' extra of mgc_kernels ({err.name} is not "
        "installed): pip install 'mgc_kernels[train]'"
    ) from None

COMMANDS = ("train", "eval", "export")
# a flag left out stays out of the namespace, so Config's default (or the --arch preset) applies
UNSET = argparse.SUPPRESS


def _number(kind: Callable, low: float, name: str, strict: bool = False) -> Callable:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} takes a {kind.__name__}, got {text!r}"
            ) from None
        if value < low or (strict and value == low):
            bound = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"{name} must be {bound} {low}, got {text!r}")
        return value

    return parse


def _preset_note(name: str) -> str:
    return ", ".join(f"{arch}: {PRESETS[arch][name]}" for arch in PRESETS)


def typed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """Only the flags given on the command line (a resumed run takes the rest from its
    ``config.json``, so a default must not pass for a choice)."""
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgc-pretrain",
        description="Self-supervised pretraining of a timm ViT or ResNet-50 with MGC (default), "
        "DenseCL, SMoG, ADCLR or MCL, on the built-in synthetic scenes or an image "
        "folder. One process on CPU or GPU, or many with torchrun. A run folder "
        "holds one run: its settings (config.json), checkpoint (last.pt, saved "
        "every epoch, every --save-minutes and on SIGINT/SIGTERM), logs, figures "
        "and backbone; --resume continues it with its saved settings.",
        epilog="Other commands: 'mgc-pretrain eval --help' (linear and k-NN probes of a trained "
        "backbone against a random one), 'mgc-pretrain export --help' (backbone.pth from "
        "a checkpoint). Defaults marked 'preset' depend on --arch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = Config()
    run = p.add_argument_group("run")
    run.add_argument(
        "--method", choices=tuple(PRETRAIN_METHODS), default=d.method, help="the SSL method"
    )
    run.add_argument(
        "--arch",
        choices=tuple(ARCHS),
        default=d.arch,
        help="backbone: 'tiny' (4-layer ViT, 112 px, 14x14 patches of 8 px; CPU), "
        "'vit_s16' (MGC's ViT-S/16, 8 heads, fixed sin-cos positions) or "
        "'resnet50' (timm's, 224 px, its 7x7 last map as the token grid; for "
        "densecl, smog and mcl, the methods published on it)",
    )
    run.add_argument(
        "--output",
        default=UNSET,
        help="run folder (checkpoint, logs, figures, backbone.pth); default runs/<method>-<arch>",
    )
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=d.device,
        help="auto: CUDA when available",
    )
    run.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default=d.backend,
        help="mgc_kernels backend of the losses: auto (Triton on CUDA, else the "
        "PyTorch reference), torch, or triton (CUDA only). The native "
        "backend's kernels cover only the correspondence ops, a negligible "
        "part of a training step, so it is not offered here",
    )
    run.add_argument(
        "--seed",
        type=_number(int, 0, "--seed"),
        default=d.seed,
        help="seed of the model, the data order and the augmentations",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=d.resume,
        help="continue the run in --output (no value) or the run of a checkpoint "
        "or run folder (a path), with the settings saved in its config.json; "
        "only --steps/--epochs (the rest of the schedules is re-timed to the "
        "new length), --device, --backend, --workers, --amp, --save-every, "
        "--save-minutes, --eval and --probe-data may change",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        default=d.data,
        help="'synthetic' (built-in procedural scenes, no download) or a folder of "
        "images (COCO train2017, ImageNet layout, any nested folder)",
    )
    data.add_argument(
        "--num-images",
        type=_number(int, 1, "--num-images"),
        default=UNSET,
        help=f"synthetic scenes per epoch (preset: {_preset_note('num_images')})",
    )
    data.add_argument(
        "--source-size",
        type=_number(int, 32, "--source-size"),
        default=UNSET,
        help=f"side of the synthetic scenes in px (preset: {_preset_note('source_size')})",
    )
    data.add_argument(
        "--workers",
        type=_number(int, 0, "--workers"),
        default=d.workers,
        help="data-loader worker processes per training process",
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument(
        "--batch-size",
        type=_number(int, 1, "--batch-size"),
        default=UNSET,
        help=f"global batch over all processes (preset: {_preset_note('batch_size')})",
    )
    opt.add_argument(
        "--epochs",
        type=_number(int, 1, "--epochs"),
        default=UNSET,
        help=f"passes over the data (preset: {_preset_note('epochs')})",
    )
    opt.add_argument(
        "--steps",
        type=_number(int, 0, "--steps"),
        default=d.steps,
        help="total optimiser steps, overriding --epochs (0: from --epochs)",
    )
    opt.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default=UNSET,
        help=f"AdamW (0.9, 0.999) or SGD with momentum 0.9 (preset: {_preset_note('optimizer')})",
    )
    opt.add_argument(
        "--warmup-epochs",
        type=_number(float, 0, "--warmup-epochs"),
        default=UNSET,
        help=f"linear lr warm-up (preset: {_preset_note('warmup_epochs')})",
    )
    opt.add_argument(
        "--lr",
        type=_number(float, 0, "--lr", strict=True),
        default=UNSET,
        help=f"lr per 256 images (scaled by batch/256), then cosine decay "
        f"(preset: {_preset_note('lr')})",
    )
    opt.add_argument(
        "--min-lr",
        type=_number(float, 0, "--min-lr"),
        default=UNSET,
        help=f"lr at the end of the cosine (preset: {_preset_note('min_lr')})",
    )
    opt.add_argument(
        "--weight-decay",
        type=_number(float, 0, "--weight-decay"),
        default=UNSET,
        help=f"weight decay, not on biases, norms, position "
        f"embedding, CLS token (preset: "
        f"{_preset_note('weight_decay')})",
    )
    opt.add_argument(
        "--clip",
        type=_number(float, 0, "--clip"),
        default=UNSET,
        help=f"per-parameter gradient-norm clip, 0: off (preset: {_preset_note('clip')})",
    )
    opt.add_argument(
        "--momentum",
        type=_number(float, 0, "--momentum"),
        default=UNSET,
        help=f"EMA momentum at step 0, raised to 1 on a cosine (preset: "
        f"{_preset_note('momentum')})",
    )
    opt.add_argument(
        "--drop-path",
        type=_number(float, 0, "--drop-path"),
        default=UNSET,
        help=f"drop-path rate of the online ViT (preset: {_preset_note('drop_path')})",
    )
    opt.add_argument(
        "--amp",
        choices=("auto", "off", "bf16", "fp16"),
        default=d.amp,
        help="autocast; auto: bf16 on GPU, off on CPU",
    )
    log = p.add_argument_group("checkpoints, logs, evaluation")
    log.add_argument(
        "--save-every",
        type=_number(int, 0, "--save-every"),
        default=UNSET,
        help="checkpoint every N steps (0: every epoch); always at the end and on SIGINT/SIGTERM",
    )
    log.add_argument(
        "--save-minutes",
        type=_number(float, 0, "--save-minutes"),
        default=d.save_minutes,
        help="also checkpoint every N minutes (0: off)",
    )
    log.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=UNSET,
        help="probe the trained and a random backbone at the end (default: on for "
        "--data synthetic or with --probe-data)",
    )
    log.add_argument(
        "--probe-data",
        default=d.probe_data,
        help="a labelled image folder (one subfolder per class; train/ and val/ "
        "if it has them) for the end-of-run k-NN probe, instead of the "
        "synthetic scenes' probes",
    )
    m = p.add_argument_group("method options")
    m.add_argument(
        "--mgc-mode",
        choices=("sparse", "dense"),
        default=d.mgc_mode,
        help="MGC: sampled pairs (paper) or all regions with geometric soft targets",
    )
    m.add_argument(
        "--mgc-weighting",
        choices=("uniform", "overlap"),
        default=d.mgc_weighting,
        help="MGC sparse mode: released (uniform) or overlap-weighted rows",
    )
    m.add_argument(
        "--queue-size",
        type=_number(int, 1, "--queue-size"),
        default=UNSET,
        help=f"DenseCL queue length (preset: {_preset_note('queue_size')})",
    )
    m.add_argument(
        "--num-groups",
        type=_number(int, 1, "--num-groups"),
        default=UNSET,
        help=f"SMoG groups (preset: {_preset_note('num_groups')})",
    )
    m.add_argument(
        "--bank-size",
        type=_number(int, 1, "--bank-size"),
        default=UNSET,
        help=f"SMoG feature bank for the k-means resets (preset: {_preset_note('bank_size')})",
    )
    m.add_argument(
        "--smog-reset-every",
        type=_number(int, 0, "--smog-reset-every"),
        default=d.smog_reset_every,
        help="SMoG: re-cluster every N steps (0: never)",
    )
    m.add_argument(
        "--num-prototypes",
        type=_number(int, 1, "--num-prototypes"),
        default=UNSET,
        help=f"ADCLR output width K (preset: {_preset_note('num_prototypes')})",
    )
    m.add_argument(
        "--num-queries",
        type=_number(int, 1, "--num-queries"),
        default=d.num_queries,
        help="ADCLR query tokens per view",
    )
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgc-pretrain eval",
        description="Frozen-backbone probes of a trained backbone and of a randomly "
        "initialised one of the same architecture, printed side by side: on "
        "held-out synthetic scenes, a dense linear probe (per-patch classes from the "
        "scene masks, mIoU) and a k-NN image probe (the scene's main object); with "
        "--data, a k-NN probe on a labelled image folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "backbone",
        help="a run folder, a backbone.pth export (with its "
        "backbone.json) or a training checkpoint (last.pt)",
    )
    p.add_argument(
        "--data",
        default="",
        help="a labelled image folder (one subfolder per class; train/ and val/ if "
        "it has them, else a fixed 80/20 split per class): k-NN top-1 on the "
        "global feature (ViT: CLS token; CNN: pooled map)",
    )
    p.add_argument(
        "--num-train",
        type=_number(int, 1, "--num-train"),
        default=1024,
        help="scenes the probes are fitted on",
    )
    p.add_argument(
        "--num-test",
        type=_number(int, 1, "--num-test"),
        default=512,
        help="scenes the probes are scored on",
    )
    p.add_argument(
        "--source-size",
        type=_number(int, 0, "--source-size"),
        default=0,
        help="side of the scenes (0: the backbone's input size)",
    )
    p.add_argument(
        "--seed",
        type=_number(int, 0, "--seed"),
        default=1,
        help="seed of the probe scenes (training uses --seed 0 by default)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available",
    )
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgc-pretrain export",
        description="Write the online backbone of a training checkpoint as backbone.pth (plain "
        "timm keys) plus backbone.json (how to build it with timm.create_model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", help="a training checkpoint (last.pt)")
    p.add_argument("--out", default="backbone.pth", help="where to write the backbone")
    return p


def main(argv: list[str] | None = None) -> None:
    from .checkpoint import CheckpointError
    from .train import Interrupted, NonFiniteLoss

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    parser = {"train": train_parser, "eval": eval_parser, "export": export_parser}[command]()
    try:
        if command == "train":
            from .run import train_command

            train_command(typed_flags(parser, argv))
            return
        args = parser.parse_args(argv)
        if command == "eval":
            from .run import evaluate

            evaluate(
                args.backbone,
                num_train=args.num_train,
                num_test=args.num_test,
                source_size=args.source_size,
                seed=args.seed,
                device=args.device,
                data=args.data,
            )
        else:
            from .run import export

            export(args.checkpoint, args.out)
    except Interrupted as e:
        _stop(
            f"{signal.Signals(e.signum).name}: saved {e.path} at step {e.step}; continue "
            f"with: mgc-pretrain --resume {e.path.parent}",
            128 + e.signum,
        )
    except KeyboardInterrupt:
        _stop("interrupted outside the training loop (nothing new to save)", 128 + signal.SIGINT)
    except NonFiniteLoss as e:
        sys.exit(f"mgc-pretrain: {e}")
    except (ValueError, OSError, CheckpointError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def _stop(message: str, status: int) -> None:
    print(f"mgc-pretrain: {message}", file=sys.stderr)
    sys.exit(status)
