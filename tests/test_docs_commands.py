"""The commands in README.md and docs/*.md are ones that exist, so the docs cannot drift from the code.

Every shell block is fenced as ```bash runnable (output examples are ```text). For each command in those blocks
the test checks what it names: the repository's files, each script's flags (read from its source), each `mbib`
subcommand's flags (from its `--help`, which is quick), `mbib train`'s presets, methods, data sets and `--set` keys,
`serve run`'s import path, config file and settings, and the install extra. A command whose program the test does
not know fails, so a new kind of command comes with its check. The `--help` commands in the docs are run.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, fields
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
SHELLS = {"bash", "sh", "shell", "console", "zsh"}
# a token naming one of these is a file of this repository, and must exist
REPO_PARTS = ("bench/", "cluster/", "docs/", "mbib/", "serve/", "studies/", "tests/", "cluster.yaml",
              "cluster-onprem.yaml", "pyproject.toml")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
OUTPUT_FLAGS = {"--out"}  # its value is written by the command, not read
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")
HELP_TIMEOUT_S = 300  # a loaded 2-core machine imports Ray, torch and MLflow slowly


def shell_blocks() -> list[tuple[str, str, str]]:
    """(page, info string, body) of every fenced shell block."""
    found = []
    for page in PAGES:
        for info, body in FENCE.findall(page.read_text()):
            if info.split()[:1] and info.split()[0] in SHELLS:
                found.append((page.relative_to(ROOT).as_posix(), info.strip(), body))
    return found


def commands(body: str) -> list[list[str]]:
    """The block's commands as argv lists: continuation lines joined, comments dropped."""
    return [argv for line in body.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))]


def runnable_commands() -> list[tuple[str, list[str]]]:
    return [(page, argv) for page, info, body in shell_blocks() if "runnable" in info.split()
            for argv in commands(body)]


def repo_path(token: str) -> str | None:
    """The repository path a token names (`sqlite:///bench/...`, `key=bench/...` included), or None."""
    token = token.split("=", 1)[-1].removeprefix("sqlite:///").lstrip("@")
    return token if token.startswith(REPO_PARTS) and "<" not in token else None


def run(argv: list[str]) -> subprocess.CompletedProcess:
    # this checkout's mbib, also for scripts under bench/ (their own folder heads sys.path), whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HELP_TIMEOUT_S)


@cache
def help_text(*program: str) -> str:
    """`program --help` (a script through this Python, or `mbib SUB`); it must succeed."""
    argv = [sys.executable, *program] if program[0].endswith(".py") else [sys.executable, "-m", "mbib.cli",
                                                                           *program[1:]]
    done = run([*argv, "--help"])
    assert done.returncode == 0, f"{' '.join(program)} --help failed:\n{done.stderr[-2000:]}"
    return done.stdout


@cache
def argparse_flags(source: Path) -> frozenset[str]:
    """The flags a module's `add_argument` calls define, read from its source (BooleanOptionalAction's --no-X too)."""
    flags = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            named = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
            negated = any(k.arg == "action" and "BooleanOptional" in ast.unparse(k.value) for k in node.keywords)
            flags |= set(named) | ({"--no-" + f[2:] for f in named} if negated else set())
    return frozenset(flags)


def script_flags(script: Path) -> set[str]:
    """A Python script's flags, from its source and the mbib modules it imports (studies/*.py take theirs from
    mbib.study.cli): read, not run, since a script's --help imports Ray and MLflow, seconds each."""
    flags = {"--help", *argparse_flags(script)}
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mbib"):
            base = ROOT / node.module.replace(".", "/")
            for source in (base.with_suffix(".py"), base / "__init__.py"):
                flags |= argparse_flags(source) if source.is_file() else set()
    return flags


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == flag]


def unknown_flags(argv: list[str], known: set[str]) -> list[str]:
    return [t.split("=")[0] for t in argv if t.startswith("--") and t.split("=")[0] not in known]


@cache
def train_vocabulary() -> dict[str, set[str]]:
    from mbib.config import PRESETS, TrainConfig, flatten
    from mbib.data.datasets import NAMES
    from mbib.data.filelist import FILE_LISTS
    from mbib.methods import METHODS

    return {"--preset": set(PRESETS), "--method": set(METHODS),
            "--dataset": {n.split(":")[0] for n in NAMES} | set(FILE_LISTS),
            "--set": set(flatten(asdict(TrainConfig())))}


def check_mbib(argv: list[str]) -> list[str]:
    sub = argv[1]
    problems = unknown_flags(argv, set(FLAG.findall(help_text("mbib", sub))))  # --help of a subcommand: 0.3-2 s
    if sub == "train":
        vocab = train_vocabulary()
        for flag in ("--preset", "--method"):
            problems += [f"{flag} {v}" for v in values(argv, flag) if v not in vocab[flag]]
        problems += [f"--dataset {v}" for v in values(argv, "--dataset") if v.split(":")[0] not in vocab["--dataset"]]
        problems += [f"--set {v}" for v in values(argv, "--set") if v.split("=")[0] not in vocab["--set"]]
    return problems


def check_serve(argv: list[str]) -> list[str]:
    from mbib.serving import ServeSettings

    assert argv[1] == "run", argv
    target, settings = argv[2], argv[3:]
    problems = []
    if target.endswith(".yaml"):
        problems += [] if (ROOT / target).is_file() else [target]
    else:  # module:attribute, read from the source (the builder itself would start loading a model)
        module, _, attr = target.partition(":")
        source = ROOT / (module.replace(".", "/") + ".py")
        problems += [] if source.is_file() and attr in top_level_names(source) else [target]
    known = {f.name for f in fields(ServeSettings)}
    return problems + [s for s in settings if s.split("=")[0] not in known]


def top_level_names(source: Path) -> set[str]:
    """What a module defines at its top: functions, classes, assignments and imports."""
    names = set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def check_pip(argv: list[str]) -> list[str]:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^([\w-]+)\s*=", section, re.M)  # read as text: tomllib is Python 3.11+
    asked = [e for t in argv if (m := re.fullmatch(r"\.\[([\w,-]+)\]", t)) for e in m.group(1).split(",")]
    return [e for e in asked if e not in extras] + ([] if asked else ["no .[extra] installed"])


def check_script(argv: list[str]) -> list[str]:
    """`python SCRIPT ...` and `bash SCRIPT ...`: the script exists; a Python script's flags are in its --help,
    a shell script's in its text."""
    script = ROOT / argv[1]
    if not script.is_file():
        return [argv[1]]
    known = script_flags(script) if argv[0] == "python" else set(FLAG.findall(script.read_text())) | {"--help"}
    return unknown_flags(argv[2:], known)


def check(argv: list[str]) -> list[str]:
    """What in one command does not exist (empty when all does)."""
    outputs = {v for flag in OUTPUT_FLAGS for v in values(argv, flag)}
    problems = [t for t in argv if (p := repo_path(t)) and t not in outputs and not (ROOT / p.rstrip("/")).exists()]
    while argv and ENV.match(argv[0]):  # VAR=value command ...: the values were checked above
        argv = argv[1:]
    program = argv[0]
    if program == "python" and argv[1:3] == ["-m", "pytest"]:
        return problems
    if program in ("python", "bash"):
        return problems + check_script(argv)
    if program == "mbib":
        return problems + check_mbib(argv)
    if program == "serve":
        return problems + check_serve(argv)
    if program == "pip":
        return problems + check_pip(argv)
    if program == "ray":  # Ray's own flags are Ray's; a job's entrypoint after `--` is ours
        return problems + (check(argv[argv.index("--") + 1:]) if "--" in argv else [])
    if program in ("mlflow", "curl"):
        return problems
    return problems + [f"unknown program {program!r}: teach tests/test_docs_commands.py to check it"]


def test_every_shell_block_is_marked_runnable():
    blocks = shell_blocks()
    assert {page for page, _, _ in blocks} >= {"README.md", "docs/serving.md", "docs/studies.md"}
    assert [(page, info) for page, info, _ in blocks if "runnable" not in info.split()] == []


def test_readme_keeps_the_ci_commands_and_stays_short():
    """.ci/run installs and tests with the README's commands; the README stays a five-minute read."""
    readme = [" ".join(argv) for page, argv in runnable_commands() if page == "README.md"]
    assert readme[:3] == ['pip install -e .[dev]', "python studies/cifar_grid.py --smoke", "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in ci and "python -m pytest -q" in ci
    assert len((ROOT / "README.md").read_text().splitlines()) <= 120


def test_every_doc_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme] == []


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_and_images_point_at_files_and_headings():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            if re.match(r"\w+://", path):
                continue
            linked = page.parent / path if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert missing == []


# files the docs name before they exist: results a running job or a GPU call will write
PENDING = {"bench/results/gpu_fast_h200.{json,md}"}  # written by bench/gpu_fast.sh when a GPU is lent


def test_files_named_in_the_prose_exist():
    """Paths in inline code (`bench/reproduce.py`, `python bench/x.py --flag`) name files that are there."""
    missing = []
    for page in PAGES:
        prose = FENCE.sub("", page.read_text())
        for code in re.findall(r"`([^`]+)`", prose):
            for token in code.split():
                path = repo_path(token.strip("(),;:"))
                if path and path not in PENDING and not any((ROOT / path.rstrip("/")).parent.glob(Path(path).name)):
                    missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert missing == []


def test_every_named_file_flag_preset_and_setting_exists():
    found = runnable_commands()
    assert len(found) > 40  # the blocks were read
    assert [(page, " ".join(argv), problems) for page, argv in found if (problems := check(argv))] == []


def test_script_flags_read_from_the_source_are_the_ones_help_shows():
    """The flags read from a script's source are its --help's, for a script that takes them from mbib.study.cli."""
    script = "studies/cifar_grid.py"
    assert script_flags(ROOT / script) >= set(FLAG.findall(help_text(script))) >= {"--smoke", "--resume", "--help"}


def test_the_help_commands_run():
    helps = [argv for _, argv in runnable_commands() if argv[-1] == "--help"]
    assert len(helps) >= 3
    for argv in helps:
        help_text(*(argv[1:-1] if argv[0] == "python" else argv[:-1]))


@pytest.mark.parametrize("command, problem", [
    ("mbib train --preset cifar100 --epochs 1", "--preset cifar100"),
    ("mbib train --set optim.lr_typo=1", "--set optim.lr_typo=1"),
    ("python bench/no_such_bench.py --rounds 3", "bench/no_such_bench.py"),
    ("serve run serve.app:app model_path=m.onnx num_replica=2", "num_replica=2"),
    ("make docs", "unknown program 'make': teach tests/test_docs_commands.py to check it"),
])
def test_the_check_catches_what_it_is_for(command, problem):
    assert problem in check(shlex.split(command))
