"""Benchmark `cd4ml.simulate.generate` at 1 M and 10 M train rows, each in a fresh subprocess.

Prints rows, seconds, rows/s and peak RSS per size, with pass/fail against the targets
(10 M rows: < 60 s and < 4 GB peak RSS on 2 cores). Exit code 1 if a target is missed.
Run: `.venv/bin/python bench/bench_simulate.py` (called by `make bench`).
"""
import json, resource, subprocess, sys, tempfile

TARGETS = {1_000_000: None, 10_000_000: (60.0, 4096.0)}   # rows -> (max seconds, max peak RSS MB)

CHILD = """
import json, resource, sys, time
from cd4ml.simulate import generate, sim_size
rows, out = int(sys.argv[1]), sys.argv[2]
size = sim_size(rows)
facts = generate(out, **size)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({**size, "rows": facts["rows"], "seconds": facts["seconds"], "peak_mb": peak}))
"""

def run(rows: int) -> dict:
    "Generate about `rows` train rows in a fresh interpreter; its facts and peak RSS."
    with tempfile.TemporaryDirectory() as d:
        done = subprocess.run([sys.executable, "-c", CHILD, str(rows), f"{d}/data"], capture_output=True, text=True)
        if done.returncode: sys.exit(f"generate({rows:,} rows) failed:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])

def main() -> int:
    print(f"{'target':>11} {'rows':>11} {'stores':>6} {'items':>6} {'days':>5} {'seconds':>8} {'rows/s':>10} {'peak MB':>8}  verdict")
    ok = True
    for target, limits in TARGETS.items():
        r = run(target)
        verdict = "info"
        if limits:
            passed = r["seconds"] < limits[0] and r["peak_mb"] < limits[1] and abs(r["rows"] / target - 1) <= 0.1
            verdict = f"{'PASS' if passed else 'FAIL'} (< {limits[0]:.0f} s, < {limits[1]:.0f} MB, rows ±10 %)"
            ok &= passed
        print(f"{target:>11,} {r['rows']:>11,} {r['stores']:>6} {r['items']:>6} {r['days']:>5} {r['seconds']:>8.1f} "
              f"{r['rows'] / r['seconds']:>10,.0f} {r['peak_mb']:>8.0f}  {verdict}", flush=True)
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
