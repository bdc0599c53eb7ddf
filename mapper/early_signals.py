"""SIGHUP and SIGTERM from the very start of `mapper run`: noted until its event loop takes them over.

A SIGHUP's default action ends the process, and `mapper run` heard it (a reload) only once its
event loop ran, after the config's checks, the twin's lock, the imports and the models: a
`kill -HUP` in between (logrotate, an operator, `systemctl kill -s HUP mapper`) ended a mapper
that was starting. `hold()` is the first thing `mapper run` does (mapper.entry); from then on a
SIGHUP is only noted. Once the event loop's own handler is installed, `heard()` says whether
one came before it: the mapper then reloads once it runs, as it does for a SIGHUP that comes
while the loop waits for the twin. Not ignored: whoever sent it may have edited the files after
the mapper read them, and the reload reads them again (a reload that finds nothing new changes
nothing).

SIGTERM likewise: its default action ended a starting mapper (exit by the signal, 143, as a
`systemctl stop` or `restart` right after a start met it, for the second or so before the loop's
handler), not the clean stop the systemd unit relies on. Held, it is noted, and `stop_heard()`
says so to `mapper run`, which then stops before running anything (mapper.cli.cmd_run). (SIGINT
keeps Python's KeyboardInterrupt, which `mapper` turns into exit 130: a Ctrl-C at a terminal.)

What no code of the mapper can cover is the interpreter's own start before mapper.entry runs
(a few tens of milliseconds after the exec).
"""

from __future__ import annotations

import signal

_heard = False
_stop: str | None = None


def _note(signum: int, frame: object) -> None:
    global _heard
    _heard = True


def _note_stop(signum: int, frame: object) -> None:
    global _stop
    _stop = signal.Signals(signum).name


def hold() -> None:
    """Note SIGHUP and SIGTERM instead of dying of them, until the event loop takes them over
    (add_signal_handler)."""
    for sig, note in ((signal.SIGHUP, _note), (signal.SIGTERM, _note_stop)):
        signal.signal(sig, note)
        # System calls it interrupts go on (SA_RESTART), as under asyncio's handler: a read of a model
        # or a device file in progress must not fail with EINTR.
        signal.siginterrupt(sig, False)


def heard() -> bool:
    """Whether a SIGHUP came while held. Asked after the loop's handler is installed: one that
    comes after that is the loop's, so none falls between the two."""
    return _heard


def stop_heard() -> str | None:
    """The name of the stop signal (SIGTERM) that came while held, or None. Asked after the loop's
    handler is installed, as heard(); also before, to skip the rest of a start that will not run."""
    return _stop
