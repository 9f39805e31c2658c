"""`llmctl quantize` as a terminal shows it (pexpect): every phase named with its own counter that never goes
backwards, a summary whose totals are the sums of its rows, and Ctrl-C answered by one line, exit code 130
and nothing left on disk."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR_LINE = re.compile(r"^(?P<phase>\S.*?)\s+━+.*?(?:(?P<unit>tensors|windows) (?P<done>\d+)/(?P<total>\d+))?\s+\d+:\d\d:\d\d")


def spawn(args: list[str], cwd: Path, env: dict | None = None):
    import pexpect

    return pexpect.spawn(
        sys.executable,
        ["-m", "llmctl", "quantize", *args],
        cwd=str(cwd),
        encoding="utf-8",
        timeout=300,
        dimensions=(50, 220),
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def screen_lines(raw: str) -> list[str]:
    """What the terminal was sent, one entry per line drawn (each redraw of the bar is a line)."""
    return [ANSI.sub("", part).rstrip() for part in re.split(r"[\r\n]+", raw) if ANSI.sub("", part).strip()]


def phases(lines: list[str]) -> dict[str, list[tuple[int, int]]]:
    """Each phase the bar showed, in order of appearance, with the (done, total) counters it showed."""
    seen: dict[str, list[tuple[int, int]]] = {}
    for line in lines:
        m = BAR_LINE.match(line)
        if m:
            counts = seen.setdefault(m["phase"], [])
            if m["done"] is not None:
                counts.append((int(m["done"]), int(m["total"])))
    return seen


def hundredths(cell: str) -> int:
    value, unit = cell.split()
    assert unit in ("KiB", "MiB", "GiB"), cell  # every figure of a column in one unit
    whole, frac = value.split(".")
    return int(whole) * 100 + int(frac)


def summary(lines: list[str]) -> tuple[list[list[str]], list[str]]:
    """The summary table's rows (format, tensors, params, before, after, bits/weight) and its total row."""
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in lines if line.startswith("│")]
    rows = [r for r in rows if len(r) == 6]
    body = [r for r in rows if r[0] != "total"]
    (total,) = [r for r in rows if r[0] == "total"]
    return body, total


CASES = {  # args, the phases in order, the summary's non-tensor row
    # a GGUF source to a folder, its tokenizer converted by transformers (a fresh cache: the slow case)
    "int8-folder": (["-f", "int8", "--out", "out"],
                    ["reading smollm2-135m", "quantizing", "converting the GGUF tokenizer (transformers, once per file)"],
                    "safetensors headers"),
    "q8_0-gguf-by-llmctl": (["-f", "q8_0", "--out", "out.gguf"], ["reading smollm2-135m", "quantizing"],
                            "metadata + tokenizer"),
    "q4_k_m-gguf-by-llama.cpp": (["-f", "q4_k_m", "--out", "out.gguf"],
                                 ["reading smollm2-135m", "writing the f16 intermediate", "llama.cpp quantizing to q4_k_m"],
                                 "metadata + tokenizer"),
}  # fmt: skip


@pytest.mark.parametrize(("args", "expected", "extra_row"), CASES.values(), ids=CASES.keys())
def test_each_phase_shows_its_own_counter_and_the_totals_add_up(args, expected, extra_row, tmp_path):
    import pexpect

    child = spawn(["smollm2-135m", *args], tmp_path, {"LLMCTL_CACHE": str(tmp_path / "cache")})
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    lines = screen_lines(child.before)
    shown = phases(lines)
    assert list(shown) == expected, list(shown)
    for phase, counts in shown.items():
        done = [d for d, _ in counts]
        assert done == sorted(done), f"{phase}: the counter went backwards: {done}"
        assert len({t for _, t in counts}) <= 1, f"{phase}: the total changed: {counts}"
        if counts:
            assert done[-1] == counts[-1][1] == 272, (phase, counts[-1])  # each counted phase ends full

    body, total = summary(lines)
    assert body[-1][0] == extra_row and body[-1][1:3] == ["-", "-"], body
    assert sum(int(r[1]) for r in body[:-1]) == int(total[1])
    assert sum(int(r[2].replace(",", "")) for r in body[:-1]) == int(total[2].replace(",", ""))
    for col in (3, 4):  # before, after: the shown rows add up to the shown total, to the last digit
        assert sum(hundredths(r[col]) for r in body) == hundredths(total[col]), [r[col] for r in (*body, total)]


@pytest.mark.parametrize(
    ("args", "wait_for"),
    [
        (["-f", "int8", "--out", "out"], r"quantizing[^\r\n]*tensors [1-9]"),
        # in llama.cpp's quantizer, which runs in a child process so that Ctrl-C reaches it at once
        (["-f", "q4_k_m", "--out", "out.gguf"], r"llama.cpp quantizing to q4_k_m[^\r\n]*tensors [1-9]"),
    ],
    ids=["int8-folder", "q4_k_m-gguf-in-llama.cpp"],
)
def test_ctrl_c_says_nothing_was_written_and_leaves_nothing(args, wait_for, tmp_path):
    import pexpect

    child = spawn(["smollm2-135m", *args], tmp_path)
    child.expect(wait_for)
    child.sendintr()
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    lines = screen_lines(child.before)
    assert child.exitstatus == 130, lines[-5:]
    assert lines[-1] == "interrupted: nothing written (the partial output was removed)", lines[-5:]
    assert "Traceback" not in child.before
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no .out.partial-PID folder


def test_ctrl_c_with_force_keeps_the_previous_output(tmp_path):
    import pexpect

    old = tmp_path / "out.gguf"
    old.write_bytes(b"the previous output")
    child = spawn(["smollm2-135m", "-f", "q8_0", "--out", "out.gguf", "--force"], tmp_path)
    child.expect(r"quantizing[^\r\n]*tensors [1-9]")
    child.sendintr()
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    lines = screen_lines(child.before)
    assert child.exitstatus == 130
    assert lines[-1] == (
        "interrupted: nothing written (the partial output was removed); out.gguf is unchanged"
    ), lines[-5:]
    assert old.read_bytes() == b"the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
