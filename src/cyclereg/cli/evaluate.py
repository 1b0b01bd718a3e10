"""``cyclereg evaluate``: score a model on dataset pairs or on the pairs of a CSV (keys: ``docs/metrics.md``)."""

from __future__ import annotations

import json

from cyclereg.cli.common import MODEL_HELP, PASSES_HELP, add_affine_options, add_series_option, add_io_options, csv_affine, device_of, load, passes, tuning_of
from cyclereg.core.errors import UsageError


def add(sub) -> None:
    ev = sub.add_parser("evaluate", help="score a model on held-out pairs")
    ev.add_argument("--model", help=MODEL_HELP)
    ev.add_argument("--dataset", choices=["mnist", "triangles"], default=None)
    ev.add_argument("--root", default=None, help="mnist: folder of the IDX files (default: the model's)")
    ev.add_argument("--split", choices=["train", "heldout", "test"], default="heldout",
                    help="mnist: 'heldout' (training file's images kept out of training; default), 'test' (t10k files) or 'train'")
    ev.add_argument("--digit", type=int, default=None, help="mnist digit (default: the model's)")
    ev.add_argument("--size", type=int, default=None, help="triangles: image size (default: the model's)")
    ev.add_argument("--pairs-csv", default=None, help="CSV with columns fixed, moving[, fixed_labels, moving_labels, affine]")
    ev.add_argument("--labels", default=None, help="--pairs-csv: labels scored (a file with one per line, or 2,3,4; default: all in the fixed labels)")
    ev.add_argument("--per-pair", default=None, help="--pairs-csv: write the per-pair scores to this CSV (after every "
                    "pair; a rerun after a crash scores only the pairs not in it)")
    ev.add_argument("--overwrite", action="store_true", help="--pairs-csv: score every pair again, ignoring --per-pair's rows")
    ev.add_argument("--pairs", type=int, default=100, help="number of random pairs (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0)
    add_affine_options(ev)
    add_io_options(ev)
    ev.add_argument("--passes", type=int, default=1, help=PASSES_HELP)
    ev.add_argument("--json", default=None, help="write the summary here")
    ev.add_argument("--device", default=None)
    ev.add_argument("--compile", action="store_true", help="torch.compile the networks first (pays off over many pairs)")

    add_series_option(ev)

    ev.set_defaults(run=run)


def run(args) -> int:
    from cyclereg.core.atomic import check_output, write_text

    if args.pairs < 1:
        raise UsageError(f"--pairs: expected at least 1, got {args.pairs}")
    for name, out in (("--json", args.json), ("--per-pair", args.per_pair)):
        if out:
            check_output(out, name)
    if args.pairs_csv:
        from cyclereg.core import distributed
        from cyclereg.evaluation.files import evaluate_csv, parse_labels

        labels, affine = parse_labels(args.labels), csv_affine(args)
        with distributed.session(device_of(args.device)) as ctx:  # under torchrun: the pairs are split across processes
            model, info = load(args, ctx.device)
            tuning = tuning_of(args, info, networkfree=model is None)
            model = passes(args, model)
            summary = evaluate_csv(model, info, args.pairs_csv, tuning=tuning,
                                   labels=labels, per_pair=args.per_pair, ctx=ctx, affine=affine,
                                   affine_similarity=args.affine_similarity, overwrite=args.overwrite)
        if summary is None:  # not rank 0: rank 0 reports
            return 0
    else:
        from cyclereg.evaluation.datasets import evaluate_dataset

        model, info = load(args)
        if model is None:
            raise UsageError("--model none registers image files: use --pairs-csv (--dataset scores a model on its "
                             "kind of data)")
        tuning = tuning_of(args, info)
        summary = evaluate_dataset(passes(args, model), info, args.dataset, args.root, args.digit, args.size,
                                   args.split, args.pairs, args.seed, tuning)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        write_text(args.json, text + "\n")
    return 0
