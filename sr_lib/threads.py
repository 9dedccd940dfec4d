"""Thread pools driven from the main thread, safe against signals.

Python runs a signal's handler in the main thread between any two bytecodes, also inside the
pure-Python lock code of `threading` (Condition, Semaphore, Event) that `concurrent.futures`
submits and waits with. A KeyboardInterrupt raised there can leave a pool's lock held, so that its
threads block and joining them hangs the exit for ever, or release a lock twice ("RuntimeError:
release unlocked lock", a traceback instead of the one-line `interrupted`). Both happened to
`sr_train.py` on Ctrl-C while it decoded its images (tests/test_threads.py sweeps the moments).

So the scripts install their raising handlers through `when_not_held`, and code here talks to a
pool only inside `signals_held()`: a signal arriving there is recorded, and its handler runs when
the block ends, outside any lock. Waits are cut into 0.1 s slices (`result`), each its own block,
so Ctrl-C still acts at once. The last reference to a pool is dropped inside a block too: that
runs the pool's weakref callback (it wakes the threads), and Python prints an exception raised in
a weakref callback as "Exception ignored" and drops it, Ctrl-C with it. A signal can still arrive
in the few bytecodes before a `finally` reaches its block, and skip `finish`: `exit_on_error`
then shuts down the pools left (`stop_pools`), so that their queued items do not run at exit
(sr_sample.py's Signals, on SIGTERM, lets them finish their queued writes).
"""

import contextlib
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # builtin TimeoutError only from 3.11

_held = {"depth": 0, "pending": None}  # main thread only: nesting depth, (handler, signum)
_live: set = set()  # the pools made by `new_pool` and not yet finished


def when_not_held(handler):
    """The signal handler `handler`, run at once, or at the end of the `signals_held()` block the
    main thread is in. Only the first signal of a block is kept: its handler ends the run. One
    that comes while a stop is on its way out (`stopping`) is dropped."""

    def deliver(signum, frame):
        if stopping():
            return
        if not _held["depth"]:
            _stop_by(handler, signum, frame)
        elif _held["pending"] is None:
            _held["pending"] = (handler, signum)

    return deliver


def held_here() -> bool:
    """Whether this is the main thread inside a `signals_held()` block: a wait there (a lock
    another process holds) keeps a stop that comes meanwhile waiting as long (`stop_pending`)."""
    return threading.current_thread() is threading.main_thread() and _held["depth"] > 0


def stop_pending() -> bool:
    """Whether a signal waits for the end of the `signals_held()` block the main thread is in."""
    return _held["pending"] is not None


def _stop_by(handler, signum, frame):
    """handler(signum, frame), its exception (the stop) marked as raised here (`stopping`)."""
    try:
        handler(signum, frame)
    except BaseException as e:
        e._sr_signal_stop = True  # (no weakref to an exception; a reference would keep its frames)
        raise


def stopping() -> bool:
    """Whether the main thread is handling a stop: the KeyboardInterrupt or Preempted a handler
    from `when_not_held` raised, or what it became (a SystemExit raised while handling it: its
    __context__). Any other exception being handled is none: a KeyboardInterrupt or SystemExit
    that a caller of main() from Python caught and calls main() again in its `except` would have
    every signal of that run dropped (sr_train.py's loop never told of SLURM's SIGTERM). A stop's
    cleanup (a report's half files removed, the pools shut down) must run whole: Ctrl-C pressed
    twice or thrice, or the SIGINT that `timeout` passes on to its process group after the
    terminal's, cut it short with a second KeyboardInterrupt, which left sr_eval.py's half report
    in place and a traceback at exit."""
    e = sys.exc_info()[1]
    while e is not None and not getattr(e, "_sr_signal_stop", False):
        e = e.__context__
    return e is not None


@contextlib.contextmanager
def signals_held():
    """Signals (handlers from `when_not_held`) wait for the end of this block; a no-op outside
    the main thread, where Python never runs handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"] and _held["pending"] is not None:
            (handler, signum), _held["pending"] = _held["pending"], None
            if not stopping():  # (the block left by a stop already)
                _stop_by(handler, signum, None)  # raises KeyboardInterrupt, Preempted, ...


def result(future: Future):
    """future.result(), waited for in 0.1 s slices with signals held in each: a signal's handler
    runs between two slices."""
    while True:
        with signals_held():
            try:
                return future.result(timeout=0.1)
            except FutureTimeout:
                pass


def done(future: Future) -> bool:
    with signals_held():
        return future.done()


def submit(pool: ThreadPoolExecutor, fn, *args) -> Future:
    with signals_held():
        return pool.submit(fn, *args)


def new_pool(workers: int, name: str = "") -> ThreadPoolExecutor:
    with signals_held():
        pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        _live.add(pool)
    return pool


def finish(pool: ThreadPoolExecutor, cancel: bool = True, wait: bool = True) -> None:
    """Shut the pool down, dropping its items not started if `cancel`, and (if `wait`) join its
    threads once they have run the rest, in 0.1 s slices as `result` waits: never for ever with
    signals held. Errors of the items are left to `result`."""
    with signals_held():
        pool.shutdown(wait=False, cancel_futures=cancel)
        _live.discard(pool)
    for thread in list(getattr(pool, "_threads", ())) if wait else ():  # the pool's own set
        while True:
            with signals_held():  # is_alive() too runs lock code
                thread.join(timeout=0.1)
                if not thread.is_alive():
                    break


def stop_pools(cancel: bool = True) -> None:
    """Shut down, without waiting, the pools whose `finish` a signal skipped, dropping their items
    not started if `cancel`: their threads end after those."""
    with signals_held():
        while _live:
            _live.pop().shutdown(wait=False, cancel_futures=cancel)


def thread_map(fn, args: list, workers: int) -> list:
    """[fn(*a) for a in args] on `workers` threads; the first error (or Ctrl-C) drops the items
    not yet started, instead of running all of them first."""
    pool, futures = new_pool(workers), []
    try:
        for a in args:
            futures.append(submit(pool, fn, *a))
        return [result(f) for f in futures]
    finally:
        finish(pool)
        with signals_held():
            del pool
