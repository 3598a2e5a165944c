"""Progress bars for long work: tqdm on a terminal, sparse whole lines in a log.

tqdm redraws its bar with carriage returns several times a second; redirected to a file
that is one "line" that grows by every frame of every bar. When the stream is not
a terminal, :func:`progress` gives tqdm a stream that turns each frame into a line of its
own and asks for a frame at most every ``log_every`` seconds (plus the first and the last).
"""
from __future__ import annotations

import re
import sys
from typing import Any, Iterable, TextIO

from tqdm.auto import tqdm

__all__ = ["progress"]


# Terminal control sequences (tqdm moves the cursor up to redraw nested bars: ESC [ A).
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A file for tqdm: its ``\\r``-prefixed frames become whole lines; cursor moves and blank
    writes vanish."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> None:
        s = _ANSI.sub("", s.replace("\r", "")).rstrip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, log_every: float = 30.0, file: TextIO | None = None,
             **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; on anything else a line every ``log_every``
    seconds. Set postfixes with ``refresh=False`` so that they do not force a frame."""
    stream = file if file is not None else sys.stderr
    kwargs["file"] = stream
    if not getattr(stream, "isatty", lambda: False)():
        # No bar in a log: counts, rate and the postfix read better than a squeezed bar.
        kwargs.update(file=_Lines(stream), mininterval=log_every, dynamic_ncols=False,
                      bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
    return tqdm(iterable, **kwargs)
