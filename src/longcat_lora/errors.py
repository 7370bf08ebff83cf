"""One exception type for everything a user can get wrong.

The CLI turns it into a single line on stderr and exit code 2; the library raises it so callers can
catch bad input without catching programming errors.
"""


class LoraError(Exception):
    """Bad input: a file, tensor or argument that cannot be used as asked. The message is one line."""


class UnmappedModulesError(LoraError):
    """Modules the target cannot name (a format without a name for them, or a model without them)."""

    def __init__(self, what: str, modules: list[str]):
        self.modules = list(modules)
        shown = ", ".join(self.modules[:8]) + (f", ... ({len(self.modules)} in all)" if len(self.modules) > 8 else "")
        super().__init__(f"{what}: {shown}")
