"""One exception type for everything a user can get wrong.

The CLI turns it into a single line on stderr and exit code 2; the library raises it so callers can
catch bad input without catching programming errors.

A message that tells the user which option to change mentions it as data, a `Param`, never as text:
`LoraError("3 modules have no name (pass ", Param("skip_unmapped"), " to leave them out)")`. `str(e)`
shows the library's spelling (`skip_unmapped=True`); the CLI renders the same error with its own flag
(`--skip-unmapped`) through `e.render(spell)`, so the text around it (a user's path) is never touched.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_PLAIN = re.compile(r"[A-Za-z0-9_.\-/:\[\]]+")


def q(name: str) -> str:
    """A name read from a file, for a message: as is when it is a plain module or tensor path, else
    quoted with repr() so that no newline, control character or separator it holds reaches the log."""
    return name if _PLAIN.fullmatch(name) else repr(name)


NAME_ONLY = object()  # Param value meaning "the parameter itself, not a setting of it" ("a wider dtype")


@dataclass(frozen=True)
class Param:
    """A library parameter named in a message: `name=value` in the library (`overwrite=True`), just
    `name` when value is NAME_ONLY; front ends spell it their way (see `LoraError.render`)."""

    name: str
    value: object = True

    def __str__(self) -> str:
        return self.name if self.value is NAME_ONLY else f"{self.name}={self.value!r}"


Part = str | Param


class LoraError(Exception):
    """Bad input: a file, tensor or argument that cannot be used as asked. The message is one line,
    given as pieces: text, and `Param`s for the options it names."""

    def __init__(self, *parts: Part):
        super().__init__(*parts)
        self.parts: tuple[Part, ...] = parts

    def __str__(self) -> str:
        return self.render(str)

    def render(self, spell: Callable[[Param], str]) -> str:
        """The message with every `Param` spelled by `spell` (the CLI: its flag) and the text as is."""
        return "".join(p if isinstance(p, str) else spell(p) for p in self.parts)

    def prefixed(self, where: str) -> LoraError:
        """This error (same type and fields) with its message starting `where: `, unless it already does."""
        if str(self).startswith(where):
            return self
        e = type(self).__new__(type(self))
        e.__dict__.update(self.__dict__)
        e.parts = e.args = (f"{where}: ", *self.parts)
        return e


class UnmappedModulesError(LoraError):
    """Modules the target cannot name (a format without a name for them, or a model without them)."""

    def __init__(self, what: Part | tuple[Part, ...], modules: list[str]):
        self.modules = list(modules)
        shown = ", ".join(q(m) for m in self.modules[:8]) + (f", ... ({len(self.modules)} in all)" if len(self.modules) > 8 else "")
        super().__init__(*(what if isinstance(what, tuple) else (what,)), f": {shown}")


class UnknownModulesError(UnmappedModulesError):
    """Modules that no LongCat model has, in any naming the table knows: refused (skip_unmapped leaves them out)."""

    def __init__(self, modules: list[str]):
        from .model.naming import hint

        hints = sorted({h for m in modules if (h := hint(m))})
        super().__init__((f"{len(modules)} modules are not modules of LongCat-Video or LongCat-Video-Avatar in any "
                          f"naming known here" + (f" ({'; '.join(hints)})" if hints else "") + " (pass ",
                          Param("skip_unmapped"), " to leave them out)"), modules)

