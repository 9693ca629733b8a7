"""Ghost mode (docs/HARMONIZER.md "3. The measurement tiers"): per-sample dots from activations and output gradients,
then one weighted backward.

Three pieces, used by the harmonizer in this order:

* ``output_grads``: ONE batched activation-gradient backward from the loss inputs to the kept layer
  outputs Y that both losses reach, two columns — the L_va upstream gradients with zeros at the L_vt
  inputs and vice versa — so every kept Y gets G [2, *Y.shape] = (G^va, G^vt). A Y that only one loss
  reaches (VATT: the audio and text calls of the shared Transformer) gets its one column from a plain
  pass from that loss's inputs, so no work is spent carrying a zero column through its branch. No
  parameter gradient is computed (DDP does not reduce, FSDP2 reduce-scatters nothing). Falls back to two
  plain calls where an op cannot be batched.
* ``layer_dots``: per layer, the samplers turn (X, G^va, G^vt) into [B, 3] dots; summed over the scope.
* ``weighted_backward``: one ordinary backward from the loss inputs with per-row upstream gradients
  ca_i·∂L_va/∂(z_v, z_a)_i and cv_i·∂L_vt/∂(z_vt, z_t)_i. Row i of a loss input depends only on
  sample i's private parameters (docs/METHOD.md "Which gradient is sample i's"), so by linearity this is exactly Σ_i
  ca_i g^va_i + cv_i g^vt_i for every parameter, and the parallel wrapper's hooks run as in plain training.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch

from harmony.method.grad_sample import Call, find_sampler


def row_scale(coef: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """coef [B] broadcast over the rows of t [B, ...] (k rows per sample when t has k·B rows)."""
    k = t.shape[0] // max(coef.shape[0], 1)
    c = coef.to(device=t.device, dtype=t.dtype)
    if k != 1:
        c = c.repeat_interleave(k)
    return c.view(-1, *([1] * (t.dim() - 1)))


def _pairs(va_inputs, u_va, vt_inputs, u_vt):
    """(loss input, its upstream gradient, column) for every input that takes part in the graph."""
    out = [(z, u, 0) for z, u in zip(va_inputs, u_va)] + [(z, u, 1) for z, u in zip(vt_inputs, u_vt)]
    return [(z, u, c) for z, u, c in out if z.requires_grad]


def _reached_nodes(roots: Sequence[torch.Tensor]) -> set:
    """The autograd nodes below ``roots`` (their grad_fn and everything it leads to)."""
    seen, stack = set(), [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        stack.extend(n for n, _ in fn.next_functions if n is not None and n not in seen)
    return seen


def output_grads(va_inputs: Sequence[torch.Tensor], u_va: Sequence[torch.Tensor], vt_inputs: Sequence[torch.Tensor],
                 u_vt: Sequence[torch.Tensor], ys: List[torch.Tensor], batched: bool = True) -> tuple:
    """Per kept output y: G [2, *y.shape] (column 0: from L_va, 1: from L_vt) or None if y reaches neither.

    The kept outputs both losses reach get both columns from one batched backward; those only one loss
    reaches get their column from a plain backward from that loss's inputs (the other column is zero).
    Returns (grads, batched_worked). ``batched``: try ``is_grads_batched`` first.
    """
    pairs = _pairs(va_inputs, u_va, vt_inputs, u_vt)
    if not ys or not pairs:
        return [None] * len(ys), batched
    by_col = [[(z, u) for z, u, c in pairs if c == col] for col in (0, 1)]
    reached = [_reached_nodes([z for z, _ in sel]) for sel in by_col]
    where = [[], [], []]                                  # indices of ys reached by: both, only va, only vt
    for j, y in enumerate(ys):
        a, b = y.grad_fn in reached[0], y.grad_fn in reached[1]
        if a and b:
            where[0].append(j)
        elif a or b:
            where[1 if a else 2].append(j)
    grads: List[Optional[torch.Tensor]] = [None] * len(ys)
    if where[0]:
        got, batched = _two_columns(va_inputs, u_va, vt_inputs, u_vt, [ys[j] for j in where[0]], batched)
        for j, g in zip(where[0], got):
            grads[j] = g
    for col, sel in ((0, by_col[0]), (1, by_col[1])):
        idx = where[1 + col]
        if not idx:
            continue
        got = torch.autograd.grad([z for z, _ in sel], [ys[j] for j in idx], [u for _, u in sel],
                                  retain_graph=True, allow_unused=True)
        for j, g in zip(idx, got):
            if g is not None:
                grads[j] = torch.stack([g, torch.zeros_like(g)] if col == 0 else [torch.zeros_like(g), g])
    return grads, batched


def _two_columns(va_inputs, u_va, vt_inputs, u_vt, ys: List[torch.Tensor], batched: bool) -> tuple:
    """Both columns for ys [2, *y.shape] (or None): one batched backward, or two plain ones."""
    pairs = _pairs(va_inputs, u_va, vt_inputs, u_vt)
    if not ys or not pairs:
        return [None] * len(ys), batched
    outs = [z for z, _, _ in pairs]
    if batched:
        cols = [torch.stack([u, torch.zeros_like(u)] if c == 0 else [torch.zeros_like(u), u]) for _, u, c in pairs]
        try:
            g = torch.autograd.grad(outs, ys, cols, retain_graph=True, allow_unused=True, is_grads_batched=True)
            return list(g), True
        except RuntimeError as e:  # an op without a batching rule for its backward
            warnings.warn(f"harmony: batched activation-gradient backward failed ({str(e).splitlines()[0]}); "
                          "using two plain backward passes from now on")
    per_col = []
    for col in (0, 1):
        sel = [(z, u) for z, u, c in pairs if c == col]
        if not sel:
            per_col.append([None] * len(ys))
            continue
        per_col.append(list(torch.autograd.grad([z for z, _ in sel], ys, [u for _, u in sel],
                                                retain_graph=True, allow_unused=True)))
    grads = []
    for ga, gb in zip(*per_col):
        if ga is None and gb is None:
            grads.append(None)
        else:
            ga = torch.zeros_like(gb) if ga is None else ga
            gb = torch.zeros_like(ga) if gb is None else gb
            grads.append(torch.stack([ga, gb]))
    return grads, False


def layer_dots(modules: Dict[str, torch.nn.Module], records: Dict[str, List[Call]],
               grads: Dict[str, List[Optional[torch.Tensor]]], scoped: Dict[str, Sequence[str]], B: int,
               method: str, device) -> torch.Tensor:
    """[B, 3] fp32 Σ over scoped layers of the per-sample (⟨g^va, g^vt⟩, ‖g^va‖², ‖g^vt‖²)."""
    total = torch.zeros(B, 3, dtype=torch.float32, device=device)
    for name, names in scoped.items():
        gs = grads.get(name)
        if not gs or all(g is None for g in gs):
            continue          # the layer did not reach the losses this step: zero per-sample gradient
        module = modules[name]
        total += find_sampler(module, name).dots(module, name, records[name], gs, B, names, method).to(device)
    return total


def weighted_backward(va_inputs, u_va, vt_inputs, u_vt, ca: torch.Tensor, cv: torch.Tensor) -> None:
    """One ordinary backward with upstream rows ca_i·u^va_i at the L_va inputs and cv_i·u^vt_i at the L_vt inputs."""
    pairs = _pairs(va_inputs, u_va, vt_inputs, u_vt)
    if not pairs:
        return
    tensors = [z for z, _, _ in pairs]
    grads = [u * row_scale(ca if c == 0 else cv, u) for _, u, c in pairs]
    torch.autograd.backward(tensors, grads)


def weighted_grads(modules, records, grads, names: Dict[str, Sequence[str]], B: int, da: torch.Tensor,
                   dv: torch.Tensor) -> Dict:
    """{(module name, param name): Σ_i da_i g^va_i + dv_i g^vt_i} for the given parameters of each layer, from the
    kept X and the measured G (bookkeeping: no backward pass)."""
    scoped = names
    out = {}
    for name, names in scoped.items():
        gs = grads.get(name)
        if not names or not gs or all(g is None for g in gs):
            continue
        comb = [None if g is None else torch.addcmul(g[0] * row_scale(da, g[0]), g[1], row_scale(dv, g[1])) for g in gs]
        module = modules[name]
        for pname, g in find_sampler(module, name).weighted(module, name, records[name], comb, B, names).items():
            out[(name, pname)] = g
    return out
