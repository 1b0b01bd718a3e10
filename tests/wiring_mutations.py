"""Not a test: checks the tests. Applies, one at a time, the eight wiring mistakes that once left every
test green (issue 17), runs the method-level tests on each, and prints whether they caught it:

    python tests/wiring_mutations.py [TESTS...]     # default: tests/test_wiring.py

Each mistake is a one-line edit of the source, undone afterwards whatever happens.
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
M = [
 ("icon on grid", "src/cyclereg/models/methods.py", "points = random_points(2 * n, fixed.shape[2:], fixed.device, fixed.dtype)",
  "points = identity_grid(fixed.shape[2:], fixed.device, fixed.dtype).expand(2 * n, -1, *fixed.shape[2:])"),
 ("one direction", "src/cyclereg/models/methods.py", "inverse_consistency(phi, swapped, points, settings.noise).view(2, n).sum(0)",
  "inverse_consistency(phi, swapped, points, settings.noise).view(2, n)[0]"),
 ("cycle via g_ab", "src/cyclereg/models/methods.py", "back_a = warp(warped_a, g_ba(warped_a, warped_b))", "back_a = warp(warped_a, g_ab(warped_a, warped_b))"),
 ("cycle args swapped", "src/cyclereg/models/methods.py", "back_a = warp(warped_a, g_ba(warped_a, warped_b))", "back_a = warp(warped_a, g_ba(warped_b, warped_a))"),
 ("identity on moving,fixed", "src/cyclereg/models/methods.py", "local_ncc(warp(fixed, g_ab(fixed, fixed)), fixed)", "local_ncc(warp(fixed, g_ab(moving, fixed)), fixed)"),
 ("lambda_R ignored", "src/cyclereg/models/methods.py", 'settings.lam * terms["smooth"]', 'terms["smooth"]'),
 ("window ignored", "src/cyclereg/models/methods.py", "return LossSettings(m.method, m.similarity, m.lam if lam is None else lam, m.noise, m.sigma, m.window, m.alpha, m.beta)",
  "return LossSettings(m.method, m.similarity, m.lam if lam is None else lam, m.noise, m.sigma, 9, m.alpha, m.beta)"),
 ("betas ignored", "src/cyclereg/training/train.py", "lr=cfg.train.lr, betas=tuple(cfg.train.betas))", "lr=cfg.train.lr)"),
]
tests = sys.argv[1:] or ["tests/test_wiring.py"]
missed = 0
for name, path, old, new in M:
    p = ROOT / path
    src = p.read_text()
    assert src.count(old) == 1, (name, src.count(old))
    p.write_text(src.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                           capture_output=True, text=True, cwd=ROOT)
        last = r.stdout.strip().splitlines()[-1]
        print(f"{name:28s} {'CAUGHT' if r.returncode else 'MISSED'}  {last}", flush=True)
        missed += r.returncode == 0
    finally:
        p.write_text(src)
sys.exit(1 if missed else 0)
