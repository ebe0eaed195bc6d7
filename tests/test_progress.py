"""The CLI's progress line: one line redrawn in place on a terminal, nothing at all otherwise."""

from __future__ import annotations

import io

from sdtrt.cli.progress import progress_line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_redrawn_line_per_phase():
    stream = Terminal()
    draw = progress_line(stream, quiet=False)
    assert draw is not None
    for done in range(3):
        draw("prompts", done, 2)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.startswith("\r\x1b[Kprompts 0/2\r\x1b[Kprompts 1/2\r\x1b[Kprompts 2/2 (")


def test_no_terminal_or_quiet_draws_nothing():
    assert progress_line(io.StringIO(), quiet=False) is None
    assert progress_line(Terminal(), quiet=True) is None
