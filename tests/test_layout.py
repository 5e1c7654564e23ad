"""The repository's shape, which a researcher relies on to edit one stage: no stage loads another stage, each
stage's main reads as its steps (at most MAIN_LINES lines), and no file edits sys.path (pyproject.toml sets
pytest's pythonpath; bench/ and scripts/ run as modules from the repository root)."""
import ast

import pytest

import common

STAGES = sorted(common.REPO.glob("0[1-8]_*.py"))
SKIP = {".venv", "runs", "build"}
PY_FILES = [p for p in common.REPO.rglob("*.py") if not SKIP & set(p.relative_to(common.REPO).parts)]
MAIN_LINES = 80
SHARED = ("data", "generate", "llm", "prompts", "teachers")  # and common.py, whose run_stage is the one exit


def calls(tree):
    """Names of every function called in `tree`, as written (`importlib.import_module`, `load_stage`, ...)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func)


def test_the_stages_are_found():
    assert [p.name[:2] for p in STAGES] == [f"0{k}" for k in range(1, 9)]


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_no_stage_loads_another_stage(path):
    tree = ast.parse(path.read_text())
    loaders = [c for c in calls(tree) if c.split(".")[-1] in ("import_module", "load_stage", "spec_from_file_location",
                                                               "run_path", "__import__")]
    assert not loaders, f"{path.name} loads modules dynamically ({loaders}): share code through a module instead"
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    stage_names = {p.stem for p in STAGES}
    assert not imported & stage_names


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_main_reads_in_one_screen(path):
    main = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= MAIN_LINES, f"{path.name}: main is longer than {MAIN_LINES} lines"


@pytest.mark.parametrize("path", STAGES + [common.REPO / f"{m}.py" for m in SHARED], ids=lambda p: p.name)
def test_one_error_convention(path):
    """Known errors are raised as common.UsageError (exit 2) or StageError / DataError / StaleInputError (exit 1),
    which common.run_stage prints as one line; a stage never exits by itself."""
    exits = [c for c in calls(ast.parse(path.read_text())) if c in ("SystemExit", "sys.exit", "exit", "quit")]
    assert not exits, f"{path.name} calls {exits}"


def test_no_file_edits_sys_path():
    edits = [f"{p.relative_to(common.REPO)}:{n.lineno}" for p in PY_FILES for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("sys.path.")]
    assert not edits


def test_load_stage_gives_the_stage_module():
    stage = common.load_stage("08_eval")
    assert stage.__file__ == str(common.REPO / "08_eval.py") and callable(stage.main)
