"""What orbax / tensorstore leave behind when a damaged checkpoint fails to restore, kept off the
user's screen: the restore itself raises (and amg_jax names the file), but the sibling reads still
in flight then report into an event loop orbax has already closed ("Exception ignored ...
RuntimeError: Event loop is closed", once per array) or leave errors never retrieved. Both filters
match only those leftovers; everything else reaches the usual hooks.
"""
from __future__ import annotations

import gc
import logging
import sys


class _FailedReadFilter(logging.Filter):
    """Drops asyncio's 'exception was never retrieved' records for tensorstore read errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("never retrieved" in record.getMessage() and exc is not None
                    and "tensorstore_spec" in str(exc))


def is_closed_loop_leftover(unraisable) -> bool:
    """An unraisable ``RuntimeError('Event loop is closed')`` raised inside ``call_soon_threadsafe``:
    a finished read calling back into the loop of a restore that has already failed."""
    exc = getattr(unraisable, "exc_value", None)
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    tb, names = getattr(unraisable, "exc_traceback", None), []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "call_soon_threadsafe" in names


class _UnraisableFilter:
    """``sys.unraisablehook`` that drops ``is_closed_loop_leftover`` and passes the rest on."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        if not is_closed_loop_leftover(unraisable):
            self.previous(unraisable)


def quiet_failed_reads(collect: bool = False) -> None:
    """Install both filters (once each); ``collect``: then collect what the failed restore left."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _FailedReadFilter) for f in log.filters):
        log.addFilter(_FailedReadFilter())
    if not isinstance(sys.unraisablehook, _UnraisableFilter):
        sys.unraisablehook = _UnraisableFilter(sys.unraisablehook)
    if collect:
        gc.collect()


__all__ = ["is_closed_loop_leftover", "quiet_failed_reads"]
