"""Progress bars for long work: on a terminal only, and tqdm is imported only then.

    bar = progress_bar(progress, "merge", total=nbytes)   # None when off or stderr is not a terminal
    ...
    if bar is not None:
        bar.update(n)
"""

from __future__ import annotations

import sys


def progress_bar(enabled: bool, desc: str, total: int | None = None, unit: str = "B"):
    """A tqdm bar on stderr when `enabled` and stderr is a terminal, else None. Units "B" scale (kB, MB...)."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, leave=False)
