"""Seconds per training step: cyclereg against icon_registration, same loss, batch and data.

ICON (MSE, λ = 256) and GradICON (MSE, λ = 0.05) on batches of 128 MNIST-sized pairs (28×28), against
icon_registration's tallUNet2 in its own ICON/GradICON loss. Three cyclereg networks in cyclereg's loss
and training step (channels-last layout on CPU, as ``cyclereg train`` runs them):

- its default U-Net (widths 16-32-64-128, 0.44 M parameters);
- icon_registration's tallUNet2 itself (the same network in both: the difference is the rest of the
  training step: warping, composition, the regulariser);
- a cyclereg U-Net with tallUNet2's number of parameters (widths 52-104-208-416, 4.6 M against 4.8 M;
  wider at high resolution, so more arithmetic).

With tallUNet2, two more rows: cyclereg's step under bfloat16 autocast (``train.precision``), and the
network's forward and backward alone on the same batch, which no training step with this network
can beat: its ratio bounds what a faster loss, warp or optimiser could gain.

Throughput is pairs per second (both directions of a pair count once, in both implementations). Steps alternate between
the two implementations so that a noisy machine affects both alike; the median of the timed steps
is reported, with the ratio. Appends to BENCHMARKS.md.

    python benchmarks/step_time.py --steps 20
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_icon  # noqa: E402
from common import append_report  # noqa: E402

from cyclereg.data.datasets import triangles_and_circles  # noqa: E402
from cyclereg.models.methods import LossSettings, loss_terms
from cyclereg.models.registration import RegistrationModel, Step, build_model, use_channels_last


class _PairInput(torch.nn.Module):
    """icon_registration's networks take (A, B); cyclereg's steps pass cat([A, B], 1)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pair):
        return self.net(pair[:, :1], pair[:, 1:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=28)
    args = p.parse_args(argv)
    images = triangles_and_circles(2 * args.batch, args.size, seed=0)
    moving, fixed = images[: args.batch], images[args.batch:]
    lines = ["| method | cyclereg network | cyclereg params | tallUNet2 params | cyclereg s/step | icon_registration s/step "
             "| cyclereg pairs/s | icon_registration pairs/s | throughput ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    networks = (("U-Net 16-32-64-128", [16, 32, 64, 128]), ("tallUNet2 (the same network)", None),
                ("U-Net 52-104-208-416 (tallUNet2's parameters)", [52, 104, 208, 416]))
    for (method, lam), (net_name, channels) in itertools.product((("icon", 256.0), ("gradicon", 0.2)), networks):
        torch.manual_seed(0)
        if channels is None:
            ours = RegistrationModel([Step(_PairInput(reference_icon.networks.tallUNet2(dimension=2)), units="domain")])
        else:
            ours = build_model([{"network": "unet", "params": {"channels": channels}}], 2, (args.size, args.size))
        use_channels_last(ours, 2)
        ours_opt = torch.optim.Adam(ours.parameters(), lr=1e-3)
        ref = reference_icon.make_icon_model(method, lam, (args.size, args.size), "mse")
        ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
        settings = LossSettings(method, "mse", lam)

        def step_ours():
            loss, _ = loss_terms(ours, moving, fixed, settings)
            ours_opt.zero_grad(set_to_none=True)
            loss.backward()
            ours_opt.step()

        def step_ref():
            reference_icon.train_step(ref, ref_opt, moving, fixed)

        def step_ours_bf16():
            with torch.autocast("cpu", torch.bfloat16):  # what train.precision = "bfloat16" does
                loss, _ = loss_terms(ours, moving, fixed, settings)
            ours_opt.zero_grad(set_to_none=True)
            loss.backward()
            ours_opt.step()

        def network_alone():
            # tallUNet2's forward and backward on both directions of every pair, nothing else: a
            # floor for any training step built on this network
            out = ours.steps[0].network(pair_batch)
            out.square().mean().backward()

        fns = {"ours": step_ours, "ref": step_ref}
        if channels is None:
            pair_batch = torch.cat([torch.cat([moving, fixed], 1), torch.cat([fixed, moving], 1)])
            pair_batch = pair_batch.contiguous(memory_format=torch.channels_last)
            fns.update(bf16=step_ours_bf16, alone=network_alone)
        times = {name: [] for name in fns}
        for i in range(args.steps + 3):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if i >= 3:  # warm-up
                    times[name].append(time.perf_counter() - t0)
        median = {name: statistics.median(t) for name, t in times.items()}
        b = median["ref"]
        n_ours = sum(p.numel() for p in ours.parameters())
        n_ref = sum(p.numel() for p in ref.regis_net.parameters())
        rows = [(net_name, median["ours"])]
        if channels is None:
            rows += [("tallUNet2, bfloat16 autocast", median["bf16"]),
                     ("tallUNet2 forward + backward alone (no loss, no warp, no optimiser): the floor", median["alone"])]
        for name, a in rows:
            line = (f"| {method}, MSE, λ={lam:g} | {name} | {n_ours:,} | {n_ref:,} | {a:.3f} | {b:.3f} | "
                    f"{args.batch / a:.0f} | {args.batch / b:.0f} | {b / a:.2f}× |")
            print(line, flush=True)
            lines.append(line)
    append_report("Training step time against icon_registration (benchmarks/step_time.py)",
                  f"Batch {args.batch} of {args.size}×{args.size} pairs, median of {args.steps} steps after 3 warm-up "
                  "steps, the two implementations alternating step by step.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
