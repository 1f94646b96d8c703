"""entrypoint.termination: child endings onto the exit-code contract, the termination message's shape and size."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint import termination as term
from entrypoint.termination import classify
from sdk.outcomes import SUPERVISOR_OUTCOMES


@pytest.mark.parametrize(
    ("returncode", "preempted", "killed", "code", "words"),
    [
        (0, False, False, 0, "exited 0"),
        (3, False, False, 1, "exited 3"),
        (1, False, False, 1, "exited 1"),
        (2, False, False, 2, "configuration"),
        (69, False, False, 69, "storage"),
        (75, False, False, 75, "75"),
        (-signal.SIGKILL, False, False, 1, "SIGKILL"),
        (-signal.SIGSEGV, False, False, 1, "SIGSEGV"),
        (75, True, False, 75, "75"),
        (-signal.SIGTERM, True, False, 75, "SIGTERM"),
        (-signal.SIGKILL, True, True, 75, "deadline"),
        (143, True, False, 75, "exited 143"),
        (1, True, False, 75, "exited 1"),
        (0, True, False, 0, "exited 0"),
        (2, True, False, 2, "configuration"),
        (69, True, False, 69, "storage"),
    ],
)
def test_classify_maps_child_endings_to_the_contract(
    returncode: int, preempted: bool, killed: bool, code: int, words: str
) -> None:
    """Every child ending maps to the contract's exit code, with a message that says how it ended."""
    outcome = classify(returncode, preempted=preempted, killed_by_us=killed)
    assert outcome.exit_code == code
    assert words in outcome.message
    assert outcome.outcome == SUPERVISOR_OUTCOMES[code]


def test_forwarded_signal_death_is_named_as_forwarded() -> None:
    """A child that died of a signal we forwarded (SIGINT) fails (1) and the message says it was forwarded."""
    outcome = classify(-signal.SIGINT, forwarded=frozenset({signal.SIGINT}))
    assert outcome.exit_code == 1 and "SIGINT (forwarded)" in outcome.message


def test_signal_name_handles_unknown_numbers() -> None:
    """A number with no signal name is still described."""
    assert term.signal_name(9) == "SIGKILL"
    assert term.signal_name(250) == "signal 250"


def test_record_has_exactly_the_contract_fields() -> None:
    """The message has the nine contract fields in order; gpu_seconds is seconds times GPUs."""
    fields = term.record(
        term.Outcome(75, "preempted"),
        run_id="r1",
        attempt=2,
        step=1200,
        checkpoint="s3://b/r1/step-0000001200",
        seconds=10.0,
        gpus=8,
        note="x",
    )
    assert tuple(fields) == term.FIELDS
    assert fields["outcome"] == "preempted" and fields["gpu_seconds"] == 80.0
    assert fields["message"] == "preempted; x"


@pytest.mark.parametrize("filler", ["a", "é", '"', "\\", "\n", "\u2028", "💥"])
def test_render_cuts_the_message_to_4096_bytes_and_stays_valid_json(filler: str) -> None:
    """A huge message of any characters is cut so the line is valid JSON of at most 4,096 UTF-8 bytes."""
    fields = term.record(
        term.Outcome(1, filler * 20_000), run_id="r", attempt=1, step=None, checkpoint=None, seconds=1, gpus=0
    )
    line = term.render(fields)
    assert "\n" not in line
    assert len(line.encode("utf-8")) <= term.MAX_BYTES
    parsed = json.loads(line)
    assert parsed["message"].endswith("…") and len(parsed["message"]) > 500
    assert {k: v for k, v in parsed.items() if k != "message"} == {k: v for k, v in fields.items() if k != "message"}


def test_render_leaves_a_short_message_alone() -> None:
    """A message that fits is not touched."""
    fields = term.record(term.Outcome(0, "ok"), run_id="r", attempt=1, step=3, checkpoint="c", seconds=1, gpus=1)
    assert json.loads(term.render(fields)) == fields


def test_termination_log_written_where_writable_and_never_raises(tmp_path: Path) -> None:
    """The line is written to a writable path; an unwritable one is reported, not raised."""
    target = tmp_path / "termination-log"
    assert term.write_termination_log(str(target), '{"a": 1}')
    assert target.read_text() == '{"a": 1}\n'
    problems: list[str] = []
    assert not term.write_termination_log(str(tmp_path / "no" / "such" / "dir" / "f"), "{}", warn=problems.append)
    assert problems and "not written" in problems[0]


def test_default_termination_log_is_skipped_where_it_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/termination-log is written only where Kubernetes created it."""
    monkeypatch.setattr(term.os.path, "exists", lambda path: False)
    assert not term.write_termination_log(term.DEFAULT_TERMINATION_LOG, "{}")


def test_supervisor_modules_do_not_import_torch() -> None:
    """Importing the supervisor, the termination module, the checkpoint lookup and the CLI leaves torch unimported."""
    code = (
        "import entrypoint.supervisor, entrypoint.termination, entrypoint.cli, entrypoint._checkpointlookup; "
        "import sys; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("completed", "code", "words"),
    [
        (False, 75, "did not report completion"),
        (True, 0, "reported completion"),
        (None, 0, "no completion report"),
    ],
)
def test_exit_0_after_sigterm_succeeds_only_with_a_completion_report(
    completed: bool | None, code: int, words: str
) -> None:
    """The SDK's report decides; a child without the SDK (None) is trusted, and the message says so."""
    outcome = classify(0, preempted=True, completed=completed)
    assert outcome.exit_code == code and words in outcome.message
    assert classify(0, preempted=False, completed=False).exit_code == 0  # no SIGTERM: the exit code is the verdict


def test_render_and_write_spell_undecodable_bytes_instead_of_crashing(tmp_path: Path) -> None:
    """A run id or message holding bytes that were not UTF-8 (lone surrogates, as os.environ and sys.argv keep
    them) is written as ``\\xNN`` text: the termination message is still one line of valid UTF-8 JSON."""
    undecodable = b"r\xff\xfe".decode("utf-8", "surrogateescape")
    fields = term.record(
        term.Outcome(2, f"bad {undecodable}"),
        run_id=undecodable,
        attempt=None,
        step=None,
        checkpoint="\ud800lone",
        seconds=0.0,
        gpus=0,
    )
    target = tmp_path / "termination-log"
    assert term.write_termination_log(str(target), term.render(fields))
    written = json.loads(target.read_bytes().decode("utf-8"))
    assert written["run_id"] == "r\\xff\\xfe"
    assert written["message"] == "bad r\\xff\\xfe"
    assert written["checkpoint"] == "\\ud800lone"


def test_write_termination_log_never_fails_on_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    target = tmp_path / "termination-log"
    assert term.write_termination_log(str(target), '{"message": "\udcff"}')
    assert target.read_bytes() == b'{"message": "\\udcff"}\n'


STOPPED = "preempted with the job's other ranks (a stop signal reached one of them)"


def test_a_failure_after_the_ranks_stopped_with_another_pod_is_a_preemption() -> None:
    """torchrun exits 1 when its workers exit 75: with the child's ``stopped`` reason it is 75, and the message
    gives the reason and how the child ended."""
    outcome = classify(1, stopped=STOPPED)
    assert outcome.exit_code == 75 and outcome.outcome == "preempted"
    assert STOPPED in outcome.message and "child exited 1" in outcome.message


def test_a_child_killed_after_its_ranks_stopped_is_a_preemption() -> None:
    """A signal death (SIGKILL) after the ranks said why they stopped is 75 too, and says so."""
    outcome = classify(-signal.SIGKILL, stopped=STOPPED)
    assert outcome.exit_code == 75 and "SIGKILL" in outcome.message and STOPPED in outcome.message


def test_without_a_stopped_reason_exit_1_stays_a_failure() -> None:
    """No reason reported (or an empty one): exit 1 is a failure, not retried."""
    assert classify(1).exit_code == 1
    assert classify(1, stopped=None).exit_code == 1
    assert classify(1, stopped="").exit_code == 1


@pytest.mark.parametrize(("returncode", "code"), [(0, 0), (2, 2), (69, 69)])
def test_a_stopped_reason_does_not_change_success_bad_configuration_or_unavailable_storage(
    returncode: int, code: int
) -> None:
    """0, 2 and 69 keep their meaning whatever the report says."""
    assert classify(returncode, stopped=STOPPED).exit_code == code


@pytest.mark.parametrize(
    ("returncode", "killed", "words"),
    [
        (1, False, "preempted: SIGTERM received and forwarded; child exited 1"),
        (-signal.SIGKILL, True, "deadline"),
        (75, False, "preempted: child stopped on SIGTERM and exited 75"),
    ],
)
def test_a_sigterm_to_this_pod_is_told_as_before_with_a_stopped_reason(
    returncode: int, killed: bool, words: str
) -> None:
    """With ``preempted`` (this supervisor got SIGTERM) the message is the SIGTERM's, not the report's reason."""
    outcome = classify(returncode, preempted=True, killed_by_us=killed, stopped=STOPPED)
    assert outcome.exit_code == 75 and words in outcome.message and STOPPED not in outcome.message
