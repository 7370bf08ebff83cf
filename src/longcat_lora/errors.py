"""One exception type for everything a user can get wrong.

The CLI turns it into a single line on stderr and exit code 2; the library raises it so callers can
catch bad input without catching programming errors.
"""

import re

_PLAIN = re.compile(r"[A-Za-z0-9_.\-/:\[\]]+")


def q(name: str) -> str:
    """A name read from a file, for a message: as is when it is a plain module or tensor path, else
    quoted with repr() so that no newline, control character or separator it holds reaches the log."""
    return name if _PLAIN.fullmatch(name) else repr(name)


class LoraError(Exception):
    """Bad input: a file, tensor or argument that cannot be used as asked. The message is one line."""


class UnmappedModulesError(LoraError):
    """Modules the target cannot name (a format without a name for them, or a model without them)."""

    def __init__(self, what: str, modules: list[str]):
        self.modules = list(modules)
        shown = ", ".join(q(m) for m in self.modules[:8]) + (f", ... ({len(self.modules)} in all)" if len(self.modules) > 8 else "")
        super().__init__(f"{what}: {shown}")
