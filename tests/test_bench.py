"""The benchmark scripts still run: each one's --quick mode, end to end, with its correctness checks.

Nothing here is timed or compares speeds (that is the scripts' own job, run by hand); a script that no
longer runs against the library, or whose implementations no longer agree, fails here.
"""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

# script -> (needs torch, a line every complete run prints, correctness lines it prints)
SCRIPTS = {
    "bench_core.py": (True, "distbp / torch", 7),
    "bench_digits.py": (False, "distbp / sklearn wall time", 0),
    "bench_mpi.py": (True, "targets met", 6),
    "bench_ps.py": (False, "distbp / raw echo", 3),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quick_run_completes_with_its_checks_passing(script):
    needs_torch, summary, checks = SCRIPTS[script]
    if needs_torch:
        pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--quick"], cwd=BENCH,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert summary in proc.stdout, output[-3000:]
    assert "MISMATCH" not in output
    assert sum(line.rstrip().endswith("  ok") for line in proc.stdout.splitlines()) == checks, proc.stdout
