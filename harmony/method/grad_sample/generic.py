"""Generic sampler: any per-sample-independent module, by vmap of the module's VJP row by row.

For each recorded call with N rows, row r's output is recomputed from the call's inputs (row r of every
input with N rows, the others shared) and the module's direct parameters (values kept at call time); the
VJP with that row's output gradient gives the row's gradient of those parameters; rows fold into samples.
Children's parameters are constants here (they have their own samplers). Costs one extra forward of the
module per column and materializes [C, B, n] — fine for the small modules it is meant for. The forward
must be deterministic (no dropout inside) and must not mix rows; neither can be checked here.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from harmony.method.grad_sample.base import Call, GradSampler, PerSampleError, fold_rows, live


def row_grads(module, name: str, call: Call, g: torch.Tensor, names) -> Dict[str, torch.Tensor]:
    """{param: [C, N, *shape]}: per-row gradients of the direct parameters for each column of g [C, N, ...]."""
    if not isinstance(call.output, torch.Tensor):
        raise PerSampleError(f"module '{name}' ({type(module).__name__}) returns {type(call.output).__name__}; the "
                             "generic sampler handles modules returning one tensor — register a sampler for it")
    N = call.output.shape[0]
    leaves, spec = tree_flatten((call.args, call.kwargs))
    rowed = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == N for t in leaves]
    params = {n: call.params[n] for n in names}

    def one_row(p, g_row, *row_leaves):
        it = iter(row_leaves)
        full = [next(it).unsqueeze(0) if r else t for t, r in zip(leaves, rowed)]
        args, kwargs = tree_unflatten(full, spec)
        _, pullback = vjp(lambda q: functional_call(module, q, args, kwargs).squeeze(0), p)
        return vmap(pullback)(g_row)[0]                 # {param: [C, *shape]}

    try:
        out = vmap(one_row, in_dims=(None, 1) + (0,) * sum(rowed))(params, g, *[t for t, r in zip(leaves, rowed) if r])
    except RuntimeError as e:
        raise PerSampleError(f"the generic per-sample sampler failed on module '{name}' ({type(module).__name__}): "
                             f"{e}. Register a sampler for this module type "
                             "(harmony.method.grad_sample.register_grad_sampler).") from e
    return {n: v.transpose(0, 1) for n, v in out.items()}


class GenericSampler(GradSampler):
    needs_params = True

    def per_sample(self, module, name, calls, grads, B, names):
        res = {}
        for c, g in live(calls, grads):
            for n, v in row_grads(module, name, c, g, names).items():
                v = fold_rows(v, B, 1, name).sum(2)           # [C, B, *shape]
                res[n] = v if n not in res else res[n] + v
        return res


GENERIC = GenericSampler()
