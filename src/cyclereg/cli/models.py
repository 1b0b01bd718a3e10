"""``cyclereg models``: the models that ship with cyclereg, with their provenance."""

from __future__ import annotations

import json


def add(sub) -> None:
    md = sub.add_parser("models", help="list the models that ship with cyclereg (used when --model is not given)")
    md.add_argument("--json", action="store_true", help="one JSON object per model, with its whole provenance")
    md.set_defaults(run=run)


def run(args) -> int:
    from cyclereg.models.shipped import DEFAULT, describe, shipped

    models = shipped()
    if not models:
        print("no model ships with this cyclereg: register without --model runs without a network (--model none); "
              "train one (README) and pass it with --model")
        return 0
    for name, path in models.items():
        info = describe(path)
        if args.json:
            print(json.dumps(info))
            continue
        scores = info.get("heldout", {})
        tuning = ", ".join(f"--io-{k.replace('_', '-')} {v}" for k, v in info["tuning"].items()) or "none"
        print(f"{name}{' (default)' if name == DEFAULT else ''}: {info['method']}, {info['dim']}D, "
              f"{info['spacing_mm']} mm grid, {info['megabytes']} MB, commit {info.get('commit', '?')}, "
              f"trained on {len(info.get('subjects', []))} subjects for {info.get('steps', '?')} steps; "
              f"registers with {tuning} unless told otherwise; held-out: {json.dumps(scores)}")
    return 0
