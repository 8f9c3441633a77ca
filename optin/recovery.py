"""Recovery after the search, before removal: PTF's later phases and least-squares reconstruction.

Any searcher's masks pass through these steps (``--recover``), in this order:

- ``rearrange`` (PTF mask rearrangement, DESIGN.md 3.8): keep how many units each layer keeps, re-choose
  which. The damage of removing a set S of one layer's units is ``sum over micro-batches (sum_{j in S}
  g_j)^2`` with g the loss gradient with respect to the masks (block-diagonal Fisher: interactions inside
  a layer count); units are swapped in and out, best swap first, while the damage falls.
- ``tune`` (PTF mask tuning): the kept units of each layer get free scales s so that the layer that reads
  them reproduces the unpruned model's output on the calibration data: ``min_s ||sum_j s_j X_j W_j^T -
  (Y - b)||^2`` (a small linear least-squares problem per layer, damped); the scales are folded into the
  reading layer's weights, so the exported model has no masks.
- ``reconstruct`` (beyond PTF, DESIGN.md 3.9): the reading layer's weights for its kept inputs and its bias
  are refit in closed form, ``min ||X_k W'^T + b' - Y||^2 + lam ||W' - W_k||^2``, X_k the kept units'
  activations computed through the already-recovered earlier layers, Y the unpruned layer's output; lam
  is chosen on a grid by fitting on the rows of the even calibration examples and scoring on those of the
  odd ones (walking downhill from the grid's middle), then the fit uses all rows. Whole examples, not
  alternate rows: neighbouring tokens or positions of one example are alike, and a ridge judged on them
  chose too little regularisation (docs/benchmarks.md). A reading layer that loses every input
  keeps only its bias, set to the mean output (FLAP's bias compensation).

Layers are recovered in the order the forward reaches them, in one pass over the calibration examples
(``optin.lockstep``); ``recovery_size`` says how many examples a refit should see (``--recover-size``). The reading layer of a unit kind is
``Adapter.unit_reader``: the Linear or Conv2d whose input holds the units (attention output projection for
heads, FFN output projection for neurons, the next convolution for CNN channels). Everything here changes
weights of the unpruned model in place, consistently with the masks, so removing the units afterwards
gives exactly the recovered masked model.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .contracts import Adapter, Batch, UnitSite
from .errors import OptinError
from .gradients import frozen, micro_batches
from .hooking import removing
from .lockstep import Lockstep
from .units import UnitTensors

STEPS = ("rearrange", "tune", "reconstruct")
DEFAULT_RECOVER = "auto"  # reconstruct where the adapter names its reading layers: measured best (docs/benchmarks.md)
AUTO = ("reconstruct",)
ALIASES = {"none": (), "ptf": ("rearrange", "tune")}
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative to the mean diagonal of X^T X
# Where the search for the ridge starts. The held-out error had one valley along this grid in all 379 layers
# refit on minilm-trec, vgg-fmnist, vit-fmnist and m2f-mosaic (docs/benchmarks.md, recovery time), so
# ``downhill`` picks the grid's minimum there, in 3.6 fits instead of 6.
RIDGE_START = 3
PASS = 16  # examples per forward when gathering a layer's statistics (a convolution's patches grow with maps)
ROWS_PER_COLUMN = 2  # --recover-size auto: design rows per fitted column wanted in every reading layer
DEFAULT_RECOVER_SIZE = "auto"  # --recover-size: the rows-per-column rule of ``recovery_size``
MAX_RECOVER_EXAMPLES = 2048  # --recover-size auto draws at most this many examples
# --recover-size auto draws no more examples than keep the activations the paused micro-batch forwards hold
# (``optin.lockstep``: every example's input and output of one reading layer, in both models) under this
RECOVER_MEMORY = 2 * 2 ** 30


def _parts(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The names in a ``--recover`` value: comma-separated text or a list."""
    if text is None:
        return []
    return [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]


def parse_steps(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"auto"`` (= reconstruct, see ``steps_for``), ``"none"``, ``"ptf"`` (= rearrange,tune) or a
    comma-separated list of steps, in the order above."""
    parts = _parts(text)
    if parts == ["auto"]:
        return AUTO
    steps: list[str] = []
    for p in parts:
        if p in ALIASES:
            steps += ALIASES[p]
        elif p in STEPS:
            steps.append(p)
        else:
            raise OptinError(f"unknown recovery step {p!r}; use auto, none, ptf, or a comma-separated list of "
                             f"{', '.join(STEPS)} (e.g. --recover rearrange,reconstruct)")
    if "tune" in steps and "reconstruct" in steps:
        raise OptinError("--recover: tune and reconstruct both refit the reading layers; pick one")
    return tuple(s for s in STEPS if s in steps)


def steps_for(text: str | list[str] | tuple[str, ...] | None, adapter: Adapter) -> tuple[tuple[str, ...], str | None]:
    """The recovery steps to run on ``adapter``, and a note when ``auto`` runs none: ``auto`` is
    ``reconstruct`` where the adapter names the layer reading every kind of unit it has
    (``Adapter.unit_reader``; every built-in adapter does), else no recovery. Explicit steps are run as given
    (and refused by ``recover`` where a reading layer is missing)."""
    steps = parse_steps(text)
    if _parts(text) != ["auto"]:
        return steps, None
    missing = [k for k, ns in adapter.unit_counts().items()
               if any(n and adapter.unit_reader(k, i) is None for i, n in enumerate(ns))]
    if missing:
        return (), (f"recovery: none (adapter {adapter.name!r} names no layer reading its {', '.join(missing)}; "
                    "--recover auto reconstructs only where Adapter.unit_reader does)")
    return steps, None


# --- pure algorithms on tensors ----------------------------------------------------------------------
def rearranged(grads: torch.Tensor, removed: torch.Tensor, max_swaps: int | None = None) -> torch.Tensor:
    """PTF's mask rearrangement for one layer: ``grads`` (micro-batches, n) mask gradients, ``removed`` (n,)
    bool. Returns a removed set of the same size whose damage ``||sum_{j in S} grads[:, j]||^2`` is lower,
    swapping one unit in and one out at a time (the best swap each time) while the damage falls."""
    removed = removed.clone()
    g = grads.double()
    n = removed.numel()
    max_swaps = n if max_swaps is None else max_swaps
    norms = g.pow(2).sum(0)
    for _ in range(max_swaps):
        out_idx, in_idx = torch.nonzero(removed).flatten(), torch.nonzero(~removed).flatten()
        if not out_idx.numel() or not in_idx.numel():
            break
        a = g[:, out_idx].sum(1)
        # damage(S - i + j) - damage(S) for i removed (rows) and j kept (columns)
        delta = (norms[out_idx] - 2 * (a @ g[:, out_idx]))[:, None] + \
            (norms[in_idx] + 2 * (a @ g[:, in_idx]))[None, :] - 2 * (g[:, out_idx].T @ g[:, in_idx])
        best = int(torch.argmin(delta))
        i, j = divmod(best, in_idx.numel())
        if not float(delta[i, j]) < -1e-12 * max(1.0, float(a.pow(2).sum())):
            break
        removed[out_idx[i]] = False
        removed[in_idx[j]] = True
    return removed


def downhill(value: Callable[[int], float], n: int, start: int) -> int:
    """The index of a local minimum of ``value`` over ``0..n-1``, walking from ``start`` toward the lower
    neighbour while the value falls (each index evaluated at most once). On a curve with one valley (the
    held-out error of a ridge fit against the log of the ridge) it is the grid's minimum, found in about
    half the evaluations."""
    seen: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in seen:
            seen[i] = value(i)
        return seen[i]

    i = start
    step = 1 if i + 1 < n and at(i + 1) < at(i) else -1
    while 0 <= i + step < n and at(i + step) < at(i):
        i += step
    return i


def ridge_fit(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, lam: float) -> torch.Tensor:
    """``argmin_W ||X W^T - Y||^2 + lam ||W - W0||^2`` from ``gram = X^T X`` (p, p) and ``cross = X^T Y``
    (p, out), the design's last column being the constant 1 of the bias, which is not regularised:
    ``W^T = (X^T X + lam D)^-1 (X^T Y + lam D W0^T)``, D = diag(1, ..., 1, 0)."""
    p = gram.shape[0]
    reg = torch.full((p,), float(lam), dtype=gram.dtype)
    reg[-1] = 0.0
    lhs = gram + torch.diag(reg)
    rhs = cross + reg[:, None] * w0.T.to(gram.dtype)
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).T
    return torch.linalg.lstsq(lhs, rhs).solution.T


def tuned_scales(gram: torch.Tensor, cross_w: torch.Tensor, w: torch.Tensor, unit_size: int, damping: float
                 ) -> torch.Tensor:
    """PTF mask tuning for one layer: scales s (k,) of the k kept units minimising
    ``||sum_j s_j X_j W_j^T - T||^2`` with ``gram = X^T X`` (k*u, k*u), ``cross_w`` (k*u,) =
    ``diag(X^T T W)`` summed per feature, ``w`` (out, k*u) the reading weights. Normal equations
    ``G s = c`` with ``G_jl = sum over the unit blocks of (X^T X) * (W^T W)``, damped by ``damping`` x
    mean(diag G) towards s = 1."""
    k = gram.shape[0] // unit_size
    ww = w.double().T @ w.double()
    g = (gram * ww).reshape(k, unit_size, k, unit_size).sum(dim=(1, 3))
    c = cross_w.reshape(k, unit_size).sum(1)
    lam = damping * float(torch.diagonal(g).mean()) if k else 0.0
    lhs = g + lam * torch.eye(k, dtype=g.dtype)
    return torch.linalg.solve(lhs, c + lam) if k else c


# --- what a reading layer sees --------------------------------------------------------------------
def design_rows(reader: nn.Module, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The rows of a reading layer's input, as a linear map sees them: (rows, in_features) for a Linear
    (padding positions dropped), (positions, in_channels x kernel) for a Conv2d (``F.unfold``)."""
    if isinstance(reader, nn.Conv2d):
        if reader.groups != 1:
            raise OptinError(f"cannot recover a grouped convolution {reader}")
        patches = F.unfold(x, reader.kernel_size, reader.dilation, reader.padding, reader.stride)  # (N, C*k*k, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if valid is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(valid.shape):
        x = x[valid.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def output_rows(reader: nn.Module, y: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """A reading layer's output as rows matching ``design_rows``."""
    if isinstance(reader, nn.Conv2d):
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    if valid is not None and y.dim() >= 3 and tuple(y.shape[:2]) == tuple(valid.shape):
        y = y[valid.to(y.device)]
    return y.reshape(-1, y.shape[-1])


@dataclass
class Reader:
    """One reading layer to recover: its kind/layer, the module, and which of its input columns are kept."""

    kind: str
    layer: int
    module: nn.Module
    unit_size: int
    kept: torch.Tensor  # (n,) bool over the units
    columns_per_unit: int  # input columns of ``module`` per unit (unit_size, or unit_size x kernel for convs)
    rows_per_example: float = 0.0  # design rows one example gives (tokens, or a convolution's output positions)
    bytes_per_example: float = 0.0  # the layer's input and output for one example (what a paused forward holds)

    def columns(self) -> torch.Tensor:
        """The module's input columns owned by the kept units."""
        idx = torch.nonzero(self.kept).flatten()
        c = self.columns_per_unit
        return (idx[:, None] * c + torch.arange(c)[None, :]).flatten()


def readers(adapter: Adapter, masks: UnitTensors, batch: Batch, rows: bool = True) -> list[Reader]:
    """The reading layers of every (kind, layer) that loses units, in the order the forward reaches them, with
    (``rows``) the design rows an example of ``batch`` gives each: one forward of ``batch`` by trimmed
    micro-batches (of its first micro-batch only, without ``rows``)."""
    found: list[tuple[str, int, UnitSite]] = []
    for kind, per_layer in masks.items():
        for layer, mask in enumerate(per_layer):
            if mask is None or not mask.numel() or bool((mask > 0).all()):
                continue
            site = adapter.unit_reader(kind, layer)
            if site is None:
                raise OptinError(f"adapter {adapter.name!r} does not say which layer reads its {kind} (layer {layer}); "
                                 "recovery needs Adapter.unit_reader")
            found.append((kind, layer, site))
    order: list[nn.Module] = []
    counted: dict[int, int] = {}
    held: dict[int, int] = {}
    valid: list[torch.Tensor | None] = [None]

    def seen(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
        if not any(m is x for x in order):
            order.append(m)
        counted[id(m)] = counted.get(id(m), 0) + output_rows(m, o, valid[0]).shape[0]
        held[id(m)] = held.get(id(m), 0) + a[0].numel() * a[0].element_size() + o.numel() * o.element_size()

    modules = {id(site.module): site.module for _, _, site in found}
    micro = adapter.split(batch, PASS)
    micro = micro if rows else micro[:1]
    with removing([m.register_forward_hook(seen) for m in modules.values()]), torch.no_grad():
        for mb in micro:
            valid[0] = adapter.valid_tokens(mb)
            adapter.logits(mb)
    rank = {id(m): i for i, m in enumerate(order)}
    examples = max(1, sum(adapter.batch_size(mb) for mb in micro))
    out = []
    for kind, layer, site in sorted(found, key=lambda f: rank.get(id(f[2].module), len(order))):
        module = site.module
        kernel = module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) else 1
        out.append(Reader(kind, layer, module, site.unit_size, masks[kind][layer] > 0, site.unit_size * kernel,
                          counted.get(id(module), 0) / examples, held.get(id(module), 0) / examples))
    return out


# --- how many examples recovery uses -----------------------------------------------------------------
def parse_recover_size(value: str | int | None) -> str | int:
    """``"auto"`` (see ``recovery_size``), ``"calibration"`` (the calibration sample only) or a number of examples."""
    if value is None:
        return DEFAULT_RECOVER_SIZE
    if isinstance(value, str) and value.strip().lower() in ("auto", "calibration"):
        return value.strip().lower()
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if isinstance(value, bool) or n < 1:
        raise OptinError(f"--recover-size must be auto, calibration or a positive number of examples, got {value!r}")
    return n


def examples_for_rows(columns: list[int], rows_per_example: list[float], ratio: float = ROWS_PER_COLUMN) -> int:
    """The fewest examples that give every reading layer ``ratio`` design rows per fitted column (its kept
    input columns and the bias): ``max ceil(ratio * (columns + 1) / rows_per_example)``; 0 for no layer."""
    need = [math.ceil(ratio * (c + 1) / r) for c, r in zip(columns, rows_per_example) if r > 0]
    return max(need, default=0)


def recovery_size(adapter: Adapter, masks: UnitTensors, batches: list[Batch], setting: str | int) -> tuple[int, str]:
    """How many examples recovery should use in all, and why: the calibration sample (``"calibration"``), a
    given number, or (``"auto"``) enough for ``ROWS_PER_COLUMN`` rows per fitted column in every reading layer
    (never fewer than the calibration sample, at most ``MAX_RECOVER_EXAMPLES``, and no more than keep the
    activations the lockstep's paused forwards hold under ``RECOVER_MEMORY``). A least-squares refit with
    fewer rows than columns is underdetermined; the ridge is chosen on one half of the rows and checked on the
    other, so each half should be as large as the columns. Text and ViT layers see a row per token and have
    enough; a CNN's last convolutions on small maps see a few positions per image and may not."""
    have = sum(adapter.batch_size(b) for b in batches)
    setting = parse_recover_size(setting)
    if setting == "calibration":
        return have, "the calibration sample"
    if isinstance(setting, int):
        return max(have, setting), f"--recover-size {setting}"
    todo = readers(adapter, masks, batches[0]) if batches else []
    need = examples_for_rows([int(r.columns().numel()) for r in todo], [r.rows_per_example for r in todo])
    if need <= have:
        return have, f"the calibration sample gives every reading layer {ROWS_PER_COLUMN} rows per column"
    held = 2 * max(r.bytes_per_example for r in todo)  # both models' forwards wait at a layer with these
    fits = int(RECOVER_MEMORY // held) if held > 0 else need
    want = min(need, MAX_RECOVER_EXAMPLES, fits)
    why = f"{ROWS_PER_COLUMN} rows per fitted column in every reading layer need {need} examples"
    if want < need:
        why += f", at most {MAX_RECOVER_EXAMPLES}" if want == MAX_RECOVER_EXAMPLES else \
            f"; {want} keep the paused forwards' activations under {RECOVER_MEMORY / 2 ** 30:g} GiB"
    return max(have, want), why


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    """A reading layer's weights as (out, in_columns) in ``design_rows`` order."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def _set_columns(module: nn.Module, columns: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        flat = module.weight.view(module.weight.shape[0], -1)
        flat[:, columns.to(flat.device)] = w.to(device=flat.device, dtype=flat.dtype)
        if bias is not None:
            if module.bias is None:
                raise OptinError(f"cannot refit the bias of {module}: it has none")
            module.bias.copy_(bias.to(device=module.bias.device, dtype=module.bias.dtype))


# --- the stage --------------------------------------------------------------------------------------
def recover(adapter: Adapter, original: Adapter, masks: UnitTensors, batches: list[Batch], steps: tuple[str, ...],
            micro_batch: int = 8, advance: Callable[[int], None] = lambda n: None) -> tuple[UnitTensors, dict]:
    """Run the recovery ``steps`` on ``adapter`` (the unpruned model, changed in place) against ``original``
    (an unchanged copy). Returns the (possibly rearranged) masks and a record of what was done: per reading
    layer the relative output error on the calibration rows before and after, and the ridge chosen."""
    info: dict = {"steps": list(steps), "layers": []}
    if not steps:
        return masks, info
    masks = {k: [m.clone() if m is not None else None for m in v] for k, v in masks.items()}
    if "rearrange" in steps:
        masks = _rearrange(adapter, masks, batches, micro_batch)
    refit = "tune" if "tune" in steps else "reconstruct" if "reconstruct" in steps else None
    if refit is None:
        return masks, info
    todo = readers(adapter, masks, batches[0], rows=False)
    with adapter.masked(masks):
        info["layers"] = _refit_in_one_pass(adapter, original, todo, batches, refit, advance)
    return masks, info


def _rearrange(adapter: Adapter, masks: UnitTensors, batches: list[Batch], micro_batch: int) -> UnitTensors:
    """PTF rearrangement of every layer's removed units from per-micro-batch mask gradients of the task loss
    (labels sampled from the model's own predictions where the data has none)."""
    counts = adapter.unit_counts()
    leaves = {k: [torch.ones(n, requires_grad=True) for n in ns] for k, ns in counts.items()}
    flat = [m for ms in leaves.values() for m in ms]
    rows: list[list[torch.Tensor]] = [[] for _ in flat]
    with frozen(adapter.model):
        for mb in [m for b in batches for m in micro_batches(b, micro_batch)]:
            with adapter.masked(leaves):
                loss = _loss(adapter, mb)
            for acc, g, m in zip(rows, torch.autograd.grad(loss, flat, allow_unused=True), flat):
                acc.append(g.detach().double().cpu() if g is not None else torch.zeros(m.numel(), dtype=torch.float64))
    it = iter(rows)
    out: UnitTensors = {}
    for kind, ns in counts.items():
        out[kind] = []
        for layer in range(len(ns)):
            g = torch.stack(next(it))
            mask = masks.get(kind, [None] * len(ns))[layer]
            if mask is None or not mask.numel():
                out[kind].append(mask)
                continue
            removed = rearranged(g, mask <= 0)
            out[kind].append((~removed).to(mask.dtype))
    return {k: out[k] for k in masks}


def _loss(adapter: Adapter, batch: Batch) -> torch.Tensor:
    """The task loss, or (unlabelled data) the cross-entropy against labels drawn from the model's own
    predictive distribution: its expected Hessian is the model's Fisher."""
    if "labels" in batch or "masks" in batch:
        return adapter.loss(batch)
    logits = adapter.logits(batch)
    with torch.no_grad():
        probs = torch.softmax(logits.detach().double(), dim=1).movedim(1, -1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]).float(), 1,
                                  generator=torch.Generator().manual_seed(0)).reshape(probs.shape[:-1])
    return F.cross_entropy(logits, drawn.to(logits.device))


def _refit_in_one_pass(adapter: Adapter, original: Adapter, todo: list[Reader], batches: list[Batch], how: str,
                       advance: Callable[[int], None]) -> list[dict]:
    """Every reading layer, in order, from the whole calibration sample seen in one forward pass of each
    model: the sample runs as micro-batches (``Adapter.split``: trimmed to their own length where inputs are
    padded), every micro-batch's forward stops at each reading layer (``optin.lockstep``), and once all of
    them are there the layer is refit from their statistics (its input as the layers refit before it shaped
    it; the unpruned model's output as the target) and they go on with the new weights. The sequential
    algorithm at the cost of two forward passes, with one layer's statistics in memory at a time."""
    micro = [mb for b in batches for mb in adapter.split(b, PASS)]
    valid = [adapter.valid_tokens(mb) for mb in micro]
    examples = sum(adapter.batch_size(mb) for mb in micro)
    twins = [_twin(original, adapter, r.module) for r in todo]
    calls = [lambda mb=mb: original.logits(mb) for mb in micro] + [lambda mb=mb: adapter.logits(mb) for mb in micro]
    records: list[dict] = []
    with Lockstep(calls) as steps:
        hooks = [t.register_forward_hook(lambda m, a, o, i=i: steps.pause((i, o))) for i, t in enumerate(twins)]
        hooks += [r.module.register_forward_pre_hook(lambda m, a, i=i: steps.pause((i, a[0])))
                  for i, r in enumerate(todo)]
        with removing(hooks):
            for i, r in enumerate(todo):
                cols, halves, seen = r.columns(), [None, None], 0
                for b in range(len(micro)):
                    y = _reached(steps.advance(b), i, adapter)
                    x = _reached(steps.advance(len(micro) + b), i, adapter)
                    rows = design_rows(r.module, x, valid[b]).cpu()[:, cols]
                    n = adapter.batch_size(micro[b])
                    halves = _accumulate(halves, rows, output_rows(r.module, y, valid[b]).cpu(),
                                         (seen + row_examples(rows.shape[0], n, valid[b])) % 2 if examples > 1 else None)
                    seen += n
                records.append(_solve(r, halves, how))
                advance(1)
    return records


def _reached(value: object, i: int, adapter: Adapter) -> torch.Tensor:
    """What a forward handed over at reading layer ``i``; an error when it ended or stopped elsewhere."""
    if value is Lockstep.FINISHED or value[0] != i:  # type: ignore[index]
        where = "ended" if value is Lockstep.FINISHED else f"reached reading layer {value[0]}"  # type: ignore[index]
        raise OptinError(f"adapter {adapter.name!r}: the forward {where} where reading layer {i} of the pruned "
                         "units was due (recovery needs each reading layer to run once per forward, in one order)")
    return value[1]  # type: ignore[index]


def row_examples(rows: int, batch_size: int, valid: torch.Tensor | None) -> torch.Tensor:
    """The example each design row comes from (rows are example-major: a text's real tokens, an image's
    positions); each row its own example when the count does not say."""
    if valid is not None and int(valid.sum()) == rows:
        return torch.repeat_interleave(torch.arange(valid.shape[0]), valid.sum(1).cpu())
    if batch_size and rows % batch_size == 0:
        return torch.arange(batch_size).repeat_interleave(rows // batch_size)
    return torch.arange(rows)


def _accumulate(halves: list, x: torch.Tensor, y: torch.Tensor, half: torch.Tensor | None = None,
                chunk: int = 16384) -> list:
    """Add the statistics of the rows of (x, y) to ``halves`` (in place, float64, in row chunks), split by
    ``half`` (0 or 1 per row: the parity of its example, so that the ridge is judged on other examples, not
    on neighbouring positions of the same ones) or, without it, into even and odd rows: per half, the Gram
    of the design with a column of ones appended, its cross product with the targets, and the sum of the
    squared targets."""
    for i in (0, 1):
        xs, ys = (x[i::2], y[i::2]) if half is None else (x[half == i], y[half == i])
        for at in range(0, xs.shape[0], chunk):
            xd, yd = xs[at:at + chunk].double(), ys[at:at + chunk].double()
            x1 = torch.cat([xd, torch.ones(xd.shape[0], 1, dtype=xd.dtype, device=xd.device)], 1)
            if halves[i] is None:
                halves[i] = [x1.T @ x1, x1.T @ yd, float(yd.pow(2).sum())]
            else:
                halves[i][0].addmm_(x1.T, x1)
                halves[i][1].addmm_(x1.T, yd)
                halves[i][2] += float(yd.pow(2).sum())
    return halves


def _solve(r: Reader, halves: list, how: str) -> dict:
    """Tune the kept units' scales, or reconstruct the reading layer's kept weights and bias, from the
    statistics of the even and odd calibration rows; write them into the layer; return the record."""
    cols = r.columns()
    w = _weight_matrix(r.module).double().cpu()
    bias = r.module.bias.detach().double().cpu() if r.module.bias is not None else None
    (a1, c1, y1), (a2, c2, y2) = halves
    gram, cross, ysq = a1 + a2, c1 + c2, y1 + y2
    b0 = bias if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    wk = torch.cat([w[:, cols], b0[:, None]], 1)
    record = {"kind": r.kind, "layer": r.layer, "kept": int(r.kept.sum()), "rows": int(gram[-1, -1]),
              "error_before": _residual(gram, cross, ysq, wk) / max(ysq, 1e-30)}
    if not cols.numel():  # no input left: the best constant is the mean output (FLAP's bias compensation)
        if bias is not None:
            mean = cross[-1] / gram[-1, -1]
            _set_columns(r.module, cols, w[:, cols], mean)
            record["error_after"] = _residual(gram, cross, ysq, mean[:, None]) / max(ysq, 1e-30)
        return record
    if how == "tune":
        target = cross[:-1] - gram[:-1, -1:] * b0[None, :]  # X^T (Y - b)
        s = tuned_scales(gram[:-1, :-1], (target * w[:, cols].T).sum(1), w[:, cols], r.columns_per_unit, 1e-2)
        new = w[:, cols] * s.repeat_interleave(r.columns_per_unit)[None, :]
        _set_columns(r.module, cols, new, None)
        record["error_after"] = _residual(gram, cross, ysq, torch.cat([new, b0[:, None]], 1)) / max(ysq, 1e-30)
        record["scale_range"] = [float(s.min()), float(s.max())]
        return record
    scale = float(torch.diagonal(gram)[:-1].mean())
    best = RIDGES[downhill(lambda i: _residual(a2, c2, y2, ridge_fit(a1, c1, wk, RIDGES[i] * scale)), len(RIDGES),
                           RIDGE_START)]
    fitted = ridge_fit(gram, cross, wk, best * scale)
    _set_columns(r.module, cols, fitted[:, :-1], fitted[:, -1] if bias is not None else None)
    record["ridge"] = best
    record["error_after"] = ridge_residual(cross, ysq, fitted, wk, best * scale) / max(ysq, 1e-30)
    return record


def _residual(gram: torch.Tensor, cross: torch.Tensor, ysq: float, w: torch.Tensor) -> float:
    """``||X1 W^T - Y||^2`` from the statistics (X1 the design with its column of ones)."""
    w = w.double()
    return float(ysq - 2 * (w * cross.T).sum() + ((w @ gram) * w).sum())  # trace(W G W^T) without W G W^T


def ridge_residual(cross: torch.Tensor, ysq: float, w: torch.Tensor, w0: torch.Tensor, lam: float) -> float:
    """``||X1 W^T - Y||^2`` for the ridge solution ``W`` of ``ridge_fit`` with these statistics, without the
    Gram: its normal equations give ``G W^T = C + lam D (W0 - W)^T``, so ``tr(W G W^T) = tr(W C) + lam
    sum(W (W0 - W))`` over the regularised columns (all but the bias)."""
    w, w0 = w.double(), w0.double()
    fit = float((w * cross.T).sum())
    return float(ysq - fit + lam * (w[:, :-1] * (w0[:, :-1] - w[:, :-1])).sum())


def _twin(original: Adapter, adapter: Adapter, module: nn.Module) -> nn.Module:
    """The module of ``original`` at the same place as ``module`` in ``adapter`` (same qualified name)."""
    names = {id(m): n for n, m in adapter.model.named_modules()}
    name = names.get(id(module))
    if name is None:
        raise OptinError("the reading layer is not part of the adapter's model")
    return dict(original.model.named_modules())[name]
