"""Pictures of a LoRA: where it acts (||dW||_F per block x module kind) and how fast its singular values
fall; for a resize, the ranks it chose and the errors they cost.

Everything is computed through the factors, never the full weight change: for a module with parts
`dW[rows_i] += s_i up_i @ down_i`, `||dW||_F^2 = sum_ij s_i s_j sum((up_i^T up_j) * (down_i down_j^T))`
over the rows parts i and j share, and its singular values are those of the small matrix
`blockdiag(R_i) @ down` (R_i from a QR of s_i up_i) when parts own disjoint rows (the native layout),
else `factored_svd` of the placed factors. matplotlib is optional (`pip install longcat-lora[plot]`);
it is imported only here, through its Agg canvas (no GUI backend, no global pyplot state).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..model import naming
from ..model.adapter import LoraAdapter, LoraModule
from ..errors import LoraError
from ..formats import load_lora
from ..io.outputs import atomic_output, check_output
from .lowrank import Report, factored_svd

if TYPE_CHECKING:
    import numpy as np
    import torch

NEEDS_MATPLOTLIB = "plot needs matplotlib: pip install longcat-lora[plot]"
DPI = 100
LORA_SIZE = (14.0, 6.0)  # inches: 1400 x 600 pixels
RESIZE_SIZE = (14.0, 11.0)  # with the LoRA's own panels above the ranks and errors: 1400 x 1100
RESIZE_ONLY_SIZE = (14.0, 5.5)  # ranks and errors alone: 1400 x 550
SPECTRA = 6  # modules whose singular values are drawn
OTHER = "other"  # column of modules not in a block

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _matplotlib():
    """(Figure, FigureCanvasAgg), or the one-line LoraError saying how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LoraError(NEEDS_MATPLOTLIB) from None
    return Figure, FigureCanvasAgg


def kind_and_block(module: str) -> tuple[str, int | None]:
    """('attn.qkv', 3) for 'blocks.3.attn.qkv'; (module, None) for a module outside the blocks."""
    m = _BLOCK.match(module)
    return (m.group(2), int(m.group(1))) if m else (module, None)


def module_norm2(m: LoraModule) -> float:
    """||dW||_F^2 of a module at multiplier 1, in float64, through its factors (see the module docstring)."""
    import torch

    ps = [(p.rows, p.scale, p.up.load().to(torch.float64), p.down.load().to(torch.float64)) for p in m.parts]
    total = 0.0
    for i, (ri, si, ui, di) in enumerate(ps):
        for j in range(i, len(ps)):
            rj, sj, uj, dj = ps[j]
            lo, hi = max(ri[0], rj[0]), min(ri[1], rj[1])
            if lo >= hi:
                continue
            a, b = ui[lo - ri[0]:hi - ri[0]], uj[lo - rj[0]:hi - rj[0]]
            v = si * sj * float(((a.T @ b) * (di @ dj.T)).sum())
            total += v if i == j else 2.0 * v
    return max(total, 0.0)


def module_spectrum(m: LoraModule) -> torch.Tensor:
    """All singular values of a module's weight change (float64, descending), through its factors."""
    import torch

    parts = sorted(m.parts, key=lambda p: p.rows)
    down = torch.cat([p.down.load().to(torch.float64) for p in parts], 0)
    if all(a.rows[1] <= b.rows[0] for a, b in zip(parts, parts[1:])):
        # disjoint rows: blockdiag(s_i up_i) = blockdiag(Q_i) blockdiag(R_i), and blockdiag(Q_i) has
        # orthonormal columns, so dW has the singular values of blockdiag(R_i) @ down
        rs = [torch.linalg.qr(p.scale * p.up.load().to(torch.float64), mode="r")[1] for p in parts]
        return factored_svd(torch.block_diag(*rs), down)[1]
    up = torch.zeros(m.out_features, down.shape[0], dtype=torch.float64)
    col = 0
    for p in parts:
        up[p.rows[0]:p.rows[1], col:col + p.rank] = p.scale * p.up.load().to(torch.float64)
        col += p.rank
    return factored_svd(up, down)[1]


def _select(adapter: LoraAdapter, kinds: Iterable[str] | None, where: str) -> list[LoraModule]:
    mods = sorted(adapter.modules.values(), key=lambda m: m.name)
    if kinds is None:
        return mods
    want = list(dict.fromkeys(kinds))
    present = {kind_and_block(m.name)[0] for m in mods}
    missing = [k for k in want if k not in present]
    if missing:
        raise LoraError(f"{where}: no module of kind {', '.join(missing)} (kinds there: {', '.join(sorted(present))})")
    return [m for m in mods if kind_and_block(m.name)[0] in want]


def _grid(values: dict[str, float]) -> tuple[np.ndarray, list[str], list[str]]:
    """(matrix [kinds, columns] with NaN where no module, kind labels, column labels) for module values."""
    import numpy as np

    order = {k.kind: i for i, k in enumerate(naming.TABLE)}
    cells = {kind_and_block(name): v for name, v in values.items()}
    kinds = sorted({k for k, _ in cells}, key=lambda k: (order.get(k, len(order)), k))
    blocks = sorted({b for _, b in cells if b is not None})
    cols: list[int | None] = list(blocks) + ([None] if any(b is None for _, b in cells) else [])
    grid = np.full((len(kinds), len(cols)), np.nan)
    for (k, b), v in cells.items():
        grid[kinds.index(k), cols.index(b)] = v
    return grid, kinds, [OTHER if b is None else str(b) for b in cols]


def _heatmap(fig, ax, grid, kinds: list[str], cols: list[str], title: str, label: str, cmap: str = "viridis",
             log: bool = False) -> None:
    import numpy as np
    from matplotlib.colors import LogNorm

    data = np.ma.masked_invalid(grid)
    norm = None
    if log and data.count() and float(data.min()) > 0 and float(data.max()) > float(data.min()):
        norm = LogNorm(vmin=float(data.min()), vmax=float(data.max()))
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.set_facecolor("#dddddd")  # no module there
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    step = max(1, math.ceil(len(cols) / 24))
    ticks = list(range(0, len(cols), step))
    if cols and cols[-1] == OTHER and len(cols) - 1 not in ticks:
        ticks.append(len(cols) - 1)
    ax.set_xticks(ticks, [cols[i] for i in ticks], fontsize=7, rotation=90 if len(ticks) > 30 else 0)
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label, fraction=0.05, pad=0.02)


def _spectra(ax, mods: list[LoraModule], norms: dict[str, float], n: int) -> dict[str, list[float]]:
    biggest = sorted(mods, key=lambda m: -norms[m.name])[:n]
    out = {}
    for m in biggest:
        s = module_spectrum(m)
        s = s[s > 0]
        out[m.name] = [float(x) for x in s]
        if len(s):
            ax.semilogy(range(1, len(s) + 1), s.numpy(), marker=".", markersize=3, linewidth=1, label=m.name)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(f"singular values of the {len(biggest)} largest modules", fontsize=10)
    if out:
        ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    return out


def _lora_panels(fig, ax_heat, ax_spec, adapter: LoraAdapter, kinds: Iterable[str] | None, where: str) -> dict:
    mods = _select(adapter, kinds, where)
    norms = {m.name: math.sqrt(module_norm2(m)) for m in mods}
    grid, krows, cols = _grid(norms)
    _heatmap(fig, ax_heat, grid, krows, cols, f"||dW||_F per block and module kind ({where})", "||dW||_F",
             cmap="magma", log=True)
    spectra = _spectra(ax_spec, mods, norms, SPECTRA)
    return {"norms": norms, "spectra": spectra}


def _save(fig, canvas_cls, out_png: str, overwrite: bool, inputs: list[str]) -> None:
    canvas = canvas_cls(fig)
    with atomic_output(str(out_png), overwrite=overwrite, inputs=inputs) as tmp:
        canvas.print_figure(tmp, format="png", dpi=DPI)


def _precheck(out_png: str, overwrite: bool, inputs: Iterable[str] = ()) -> None:
    """Refuse an output that cannot be written before drawing (atomic_output checks again when saving)."""
    check_output(out_png, overwrite=overwrite, inputs=list(inputs))


def check_plot_output(out_png: str, overwrite: bool = False, inputs: Iterable[str] = ()) -> None:
    """What a command that also plots (resize --plot) checks before its work: matplotlib is importable
    and `out_png` may be written (not an existing file without `overwrite`, not one of `inputs`)."""
    _matplotlib()
    _precheck(str(out_png), overwrite, [str(p) for p in inputs])


def _open(lora: str | LoraAdapter) -> tuple[LoraAdapter, bool]:
    return (lora, False) if isinstance(lora, LoraAdapter) else (load_lora(str(lora)), True)


def plot_lora(lora: str | LoraAdapter, out_png: str, *, modules: Iterable[str] | None = None,
              overwrite: bool = False) -> dict:
    """Draw a LoRA (any format, or an adapter) to `out_png` (1400 x 600 pixels).

    Left: ||dW||_F per block x module kind (log colour scale; grey where no module). Right: the singular
    values of the SPECTRA largest modules. `modules`: only these kinds (e.g. ["attn.qkv", "ffn.w2"]).
    Returns what was drawn: {"norms": {module: ||dW||_F}, "spectra": {module: [singular values]}}.
    """
    figure, canvas = _matplotlib()
    _precheck(str(out_png), overwrite)
    adapter, opened = _open(lora)
    try:
        where = adapter.path or "adapter"
        fig = figure(figsize=LORA_SIZE, dpi=DPI, layout="constrained")
        ax_heat, ax_spec = fig.subplots(1, 2, width_ratios=[3, 2])
        data = _lora_panels(fig, ax_heat, ax_spec, adapter, modules, where)
        _save(fig, canvas, out_png, overwrite, [] if not opened else [str(lora)])
        return data
    finally:
        if opened:
            adapter.close()


def plot_resize(report: Report, out_png: str, *, lora: str | LoraAdapter | None = None,
                overwrite: bool = False) -> None:
    """Draw what a resize (or any algebra Report) chose: rank per block x module kind and the relative
    Frobenius error it cost. With `lora` (the input), its ||dW|| heatmap and spectra are drawn above
    (1400 x 1100 pixels); without, the two panels alone (1400 x 550)."""
    figure, canvas = _matplotlib()
    _precheck(str(out_png), overwrite)
    adapter, opened = (None, False) if lora is None else _open(lora)
    try:
        size = RESIZE_SIZE if adapter is not None else RESIZE_ONLY_SIZE
        fig = figure(figsize=size, dpi=DPI, layout="constrained")
        if adapter is not None:
            (ax_heat, ax_spec), (ax_rank, ax_err) = fig.subplots(2, 2, width_ratios=[1, 1])
            _lora_panels(fig, ax_heat, ax_spec, adapter, None, adapter.path or "input")
        else:
            ax_rank, ax_err = fig.subplots(1, 2)
        ranks = {m.module: float(m.rank_after) for m in report.modules}
        errors = {m.module: m.rel_error for m in report.modules}
        grid, kinds, cols = _grid(ranks)
        _heatmap(fig, ax_rank, grid, kinds, cols, f"rank kept per up block ({report.rule})", "rank")
        grid, kinds, cols = _grid(errors)
        _heatmap(fig, ax_err, grid, kinds, cols, f"relative Frobenius error (worst {report.worst_error:.2e})",
                 "||dW_out - dW_in|| / ||dW_in||", cmap="inferno")
        inputs = [str(lora)] if opened else []
        _save(fig, canvas, out_png, overwrite, inputs)
    finally:
        if opened and adapter is not None:
            adapter.close()


__all__ = ["NEEDS_MATPLOTLIB", "check_plot_output", "kind_and_block", "module_norm2", "module_spectrum", "plot_lora", "plot_resize"]
