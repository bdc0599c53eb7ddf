"""A SIGHUP from the very start of `mapper run`: remembered, and a reload once the mapper runs.

A SIGHUP's default action ends the process, and `mapper run` heard it (a reload) only once its
event loop ran, after the config's checks, the twin's lock, the imports and the models: a
`kill -HUP` in between (logrotate, an operator, `systemctl kill -s HUP mapper`) ended a mapper
that was starting. `hold()` is the first thing `mapper run` does (mapper.entry); from then on a
SIGHUP is only noted. Once the event loop's own handler is installed, `heard()` says whether
one came before it: the mapper then reloads once it runs, as it does for a SIGHUP that comes
while the loop waits for the twin. Not ignored: whoever sent it may have edited the files after
the mapper read them, and the reload reads them again (a reload that finds nothing new changes
nothing).

What no code of the mapper can cover is the interpreter's own start before mapper.entry runs
(a few tens of milliseconds after the exec).
"""

from __future__ import annotations

import signal

_heard = False


def _note(signum: int, frame: object) -> None:
    global _heard
    _heard = True


def hold() -> None:
    """Note SIGHUP instead of dying of it, until the event loop takes it over (add_signal_handler)."""
    signal.signal(signal.SIGHUP, _note)
    # System calls it interrupts go on (SA_RESTART), as under asyncio's handler: a read of a model
    # or a device file in progress must not fail with EINTR.
    signal.siginterrupt(signal.SIGHUP, False)


def heard() -> bool:
    """Whether a SIGHUP came while held. Asked after the loop's handler is installed: one that
    comes after that is the loop's, so none falls between the two."""
    return _heard
