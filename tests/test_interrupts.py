"""handle_signals(): SIGINT and SIGTERM raise in the main thread, except a signal the process was started
with ignored (a background job's SIGINT), which stays ignored; the old handlers come back on exit."""

import os
import signal

import pytest

from longcat_lora.io.interrupts import Terminated, critical, handle_signals


def test_an_ignored_sigint_stays_ignored_and_handlers_are_restored():
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with handle_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGINT)  # ignored: nothing is raised
            with pytest.raises(Terminated):
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pthread_sigmask(signal.SIG_BLOCK, [])  # (a bytecode boundary for the handler to run)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_inside_critical_is_raised_when_the_section_ends(sig, raised):
    old = signal.getsignal(sig)
    # as in a foreground process (a suite run as a background job starts with SIGINT ignored)
    signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    reached = []
    try:
        with handle_signals():
            with pytest.raises(raised):
                with critical():
                    os.kill(os.getpid(), sig)
                    signal.pthread_sigmask(signal.SIG_BLOCK, [])
                    reached.append("end of the section")
    finally:
        signal.signal(sig, old)
    assert reached == ["end of the section"]
