"""Errors a user can cause: each stage prints one line naming itself and exits non-zero, without a traceback;
nothing is unpickled from a run directory."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from conftest import write_synthetic_run

REPO = Path(__file__).resolve().parents[1]


def stage(script, *args, env=None):
    """Run a stage script as a command; (exit status, stderr lines)."""
    p = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return p.returncode, p.stderr.strip().splitlines()


def assert_one_error_line(lines, name, *parts):
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: "), text
    for part in parts:
        assert part in lines[0], text


def test_malformed_csv_through_01(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "items.csv").write_text("item,text\na,Plain\nb,Café\n", encoding="latin-1")
    (data / "interactions.csv").write_text("user,item,timestamp\nu1,a,1\n")
    rc, err = stage("01_neighbors.py", "--run", tmp_path / "run", "--dataset", "csv", "--data-dir", data)
    assert rc == 1
    assert_one_error_line(err, "01_neighbors", f"{data / 'items.csv'}:3: not valid UTF-8", "re-encode")


def test_08_on_an_empty_run_and_a_bad_argument(tmp_path):
    rc, err = stage("08_eval.py", "--run", tmp_path)
    assert rc == 1
    assert_one_error_line(err, "08_eval", "no trained models under", "run 07_train_cf.py first")
    rc, err = stage("08_eval.py", "--run", tmp_path, "--bogus")
    assert rc == 2
    assert_one_error_line(err, "08_eval.py", "unrecognized arguments: --bogus", "--help")


def test_truncated_split_under_force_and_a_missing_key(tmp_path):
    run = write_synthetic_run(tmp_path / "run")
    rc, err = stage("02_distill.py", "--run", run, "--teacher", "api", "--api-model", "m", "--no-probe",
                    "--api-key-env", "RECLM_TEST_NO_SUCH_KEY")
    assert rc == 2
    assert_one_error_line(err, "02_distill", "the environment variable RECLM_TEST_NO_SUCH_KEY is not set")
    path = run / "data" / "split.npz"
    path.write_bytes(path.read_bytes()[:300])
    rc, err = stage("02_distill.py", "--run", run, "--force", "--no-probe")
    assert rc == 1 and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("02_distill: error: ") and f"{path}: not a readable .npz file" in err[-1], err
    assert sum("error" in line for line in err) == 1  # the --force warnings before it are log lines


@pytest.fixture
def denormals_restored():
    """run_stage turns on flush-to-zero for the calling thread; the other tests in this process must not see it."""
    yield
    torch.set_flush_denormal(False)


def test_run_stage_flushes_denormals(monkeypatch, denormals_restored):
    """07's tower weights decay into denormal floats late in training, and x86 computes on those many times slower:
    each stage runs with denormals flushed to zero (bench/RESULTS.md, section "Augment's overhead per epoch")."""
    monkeypatch.setattr(sys, "argv", ["07_train_cf.py"])
    tiny = torch.tensor([1e-40])   # a float32 denormal
    torch.set_flush_denormal(False)
    assert float(tiny * 1.0) > 0
    assert common.run_stage(lambda argv=None: float(tiny * 1.0)) == 0.0


def test_run_stage_formats_known_errors_and_keeps_other_tracebacks(capsys, monkeypatch, denormals_restored):
    monkeypatch.setattr(sys, "argv", ["07_train_cf.py"])

    def raising(exc):
        def main(argv=None):
            raise exc
        return main
    cases = [(common.DataError("x.csv:3: bad\nthing"), 1, "07_train_cf: error: x.csv:3: bad thing"),
             (common.StaleInputError("a.npz changed; re-run 01"), 1, "07_train_cf: error: a.npz changed; re-run 01"),
             (common.UsageError("--k must be > 0"), 2, "07_train_cf: error: --k must be > 0"),
             (common.StageError("data/split.npz has no validation rows"), 1,
              "07_train_cf: error: data/split.npz has no validation rows"),
             (FileNotFoundError(2, "No such file or directory", "run/x.npy"), 1,
              "07_train_cf: error: run/x.npy: file not found")]
    for exc, status, line in cases:
        with pytest.raises(SystemExit) as e:
            common.run_stage(raising(exc))
        assert e.value.code == status and capsys.readouterr().err == line + "\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        common.run_stage(raising(ZeroDivisionError("bug")))
    with pytest.raises(SystemExit) as e:
        common.run_stage(raising(SystemExit(0)))
    assert e.value.code == 0 and capsys.readouterr().err == ""


def test_no_torch_load_without_weights_only():
    """Nothing is unpickled: every torch.load call in the repository (tests included) passes weights_only=True."""
    bad = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if any(part.startswith(".") or part in ("runs", "__pycache__", "build") for part in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(rel))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    bad.append(f"{rel}:{node.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"
