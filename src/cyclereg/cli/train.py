"""``cyclereg train``: train a model from a TOML config."""

from __future__ import annotations

from cyclereg.cli.common import device_of


def add(sub) -> None:
    tr = sub.add_parser("train", help="train a model from a TOML config")
    tr.add_argument("config", help="config file (examples in configs/)")
    tr.add_argument("--out", required=True, help="output folder: model.safetensors, checkpoint.pt, log.jsonl")
    tr.add_argument("--steps", type=int, default=None, help="total training steps (stages are rescaled)")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. model.lam=512")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    tr.set_defaults(run=run)


def run(args) -> int:
    from cyclereg.core.config import load_config
    from cyclereg.training.train import train

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    path = train(cfg, args.out, resume=args.resume, device=device_of(args.device), progress=not args.quiet)
    print(f"model written to {path}")
    return 0
