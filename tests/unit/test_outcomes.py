"""sdk.outcomes: the one exit-code contract, and the Airflow side's copy of it held equal to it.

The Airflow package never imports podtrain, so it keeps its own table (``podtrain_airflow/exitcodes.py``); it is
loaded here by its path, without importing Airflow, kubernetes or the rest of ``podtrain_airflow``.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest

from sdk import outcomes
from sdk.errors import (
    ConfigError,
    PodtrainError,
    StorageNotFoundError,
    ThrottledStorageError,
    TransientStorageError,
    exit_code,
)

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_TABLE = ROOT / "examples" / "airflow" / "podtrain_airflow" / "exitcodes.py"


def _load_airflow_table() -> ModuleType:
    """``podtrain_airflow/exitcodes.py`` as a module of its own name, its package's ``__init__`` not run."""
    spec = importlib.util.spec_from_file_location("podtrain_airflow_exitcodes_under_test", AIRFLOW_TABLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _differences(ours: Mapping[int, tuple[str, str]], theirs: Mapping[int, tuple[str, str]]) -> list[str]:
    """One line per code where the two tables differ, naming the code and both sides."""
    lines = []
    for code in sorted(set(ours) | set(theirs)):
        if code not in theirs:
            lines.append(f"exit {code}: sdk.outcomes has {ours[code]}, podtrain_airflow has no such code")
        elif code not in ours:
            lines.append(f"exit {code}: podtrain_airflow has {theirs[code]}, sdk.outcomes has no such code")
        elif tuple(ours[code]) != tuple(theirs[code]):
            lines.append(f"exit {code}: sdk.outcomes has {ours[code]}, podtrain_airflow has {tuple(theirs[code])}")
    return lines


def _supervisor_table() -> dict[int, tuple[str, str]]:
    return {row.code: (row.outcome, row.retry) for row in outcomes.CODES.values() if row.supervisor}


def test_the_airflow_copy_of_the_exit_codes_equals_the_contract() -> None:
    """Every code podtrain run exits with has the same outcome and retry meaning on the Airflow side, and the
    Airflow side knows no other code."""
    airflow = _load_airflow_table()
    differences = _differences(_supervisor_table(), airflow.PODTRAIN_EXIT_CODES)
    assert not differences, "the exit-code tables differ:\n" + "\n".join(differences)
    assert dict(outcomes.SUPERVISOR_OUTCOMES) == airflow.PODTRAIN_OUTCOMES
    assert {row.retry for row in outcomes.CODES.values() if row.retry.startswith("retry")} == airflow.RETRIED


def test_a_difference_between_the_tables_is_named() -> None:
    """A changed outcome, a changed retry meaning, a code only one side has: each is a line naming the code."""
    ours = {0: ("succeeded", "done"), 69: ("storage_unavailable", "retry_later"), 75: ("preempted", "retry")}
    theirs = {0: ("succeeded", "done"), 69: ("storage_unavailable", "retry"), 76: ("preempted", "retry")}
    assert _differences(ours, theirs) == [
        "exit 69: sdk.outcomes has ('storage_unavailable', 'retry_later'), podtrain_airflow has "
        "('storage_unavailable', 'retry')",
        "exit 75: sdk.outcomes has ('preempted', 'retry'), podtrain_airflow has no such code",
        "exit 76: podtrain_airflow has ('preempted', 'retry'), sdk.outcomes has no such code",
    ]
    assert _differences(ours, dict(ours)) == []


def test_the_airflow_copy_imports_only_the_standard_library() -> None:
    """The copy stays loadable where neither Airflow nor podtrain is installed (this suite, the DAG's image)."""
    tree = ast.parse(AIRFLOW_TABLE.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= set(sys.stdlib_module_names) | {"__future__"}


def test_every_code_has_one_row_with_its_outcome_and_retry_meaning() -> None:
    """The table is keyed by its own codes; outcomes are distinct; each retry meaning is one of the four."""
    assert all(code == row.code for code, row in outcomes.CODES.items())
    assert len({row.outcome for row in outcomes.CODES.values()}) == len(outcomes.CODES)
    assert {row.retry for row in outcomes.CODES.values()} <= {"done", "retry", "retry_later", "never"}
    assert dict(outcomes.SUPERVISOR_OUTCOMES) == {
        0: "succeeded",
        1: "failed",
        2: "config_error",
        69: "storage_unavailable",
        75: "preempted",
    }
    interrupted = outcomes.CODES[outcomes.EXIT_INTERRUPTED]
    assert (interrupted.code, interrupted.outcome, interrupted.supervisor) == (130, "interrupted", False)


def test_only_preemption_and_unavailable_storage_are_retried() -> None:
    """75 is retried at once (the next attempt resumes), 69 later; nothing else is retried."""
    retried = {row.code: row.retry for row in outcomes.CODES.values() if row.retry.startswith("retry")}
    assert retried == {75: "retry", 69: "retry_later"}


def test_an_unknown_code_has_no_outcome() -> None:
    """A code outside the contract is a KeyError, never a guessed word."""
    with pytest.raises(KeyError):
        outcomes.outcome_name(3)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TransientStorageError("503"), outcomes.EXIT_UNAVAILABLE),
        (ThrottledStorageError("SlowDown"), outcomes.EXIT_UNAVAILABLE),
        (ConfigError("PODTRAIN_X"), outcomes.EXIT_CONFIG),
        (StorageNotFoundError("no bucket"), outcomes.EXIT_CONFIG),
        (PodtrainError("other"), None),
    ],
)
def test_errors_map_onto_the_contract_s_codes(error: BaseException, code: int | None) -> None:
    """sdk.errors.exit_code gives codes of this table: storage down → 69, a setting to fix → 2, else None (1)."""
    assert exit_code(error) == code


def test_exit_codes_are_imported_from_the_contract_only() -> None:
    """Every ``from X import EXIT_...`` in podtrain's code, benchmarks, examples and tests names sdk.outcomes: no
    module keeps or passes on a copy of a code (the Airflow package's own table aside)."""
    found = []
    for folder in ("sdk", "entrypoint", "bench", "examples", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "airflow" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.module != "sdk.outcomes":
                    names = [alias.name for alias in node.names if alias.name.startswith("EXIT_")]
                    if names:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {names} from {node.module}")
    assert not found, "exit codes imported from elsewhere than sdk.outcomes:\n" + "\n".join(found)


def test_importing_the_contract_imports_nothing_of_podtrain_or_torch() -> None:
    """The supervisor's start-up pays for the table only: no other podtrain module, no torch."""
    code = (
        "import sys, sdk.outcomes; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sdk', 'entrypoint', 'torch', 'dataclasses')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['sdk', 'sdk.outcomes']"
