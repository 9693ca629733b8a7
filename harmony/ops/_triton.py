"""How the Triton launchers of harmony.kernels become torch ops: ``torch.library.triton_op``, with the same
schema as the C++ op of the same name (docs/KERNELS.md "Under torch.compile").

A triton_op is decomposed by AOT autograd (torch.compile's aot_eager and inductor backends): its body is traced,
and the ``wrap_triton`` launches inside it become graph nodes that Inductor compiles with the rest of the graph.
The launchers take the tensors themselves when traced (gram and combine, which eagerly launch once for a whole list
of buckets through a table of addresses, launch once per bucket then: a traced tensor has no address).

Under Triton's interpreter (TRITON_INTERPRET=1) the kernels are plain Python functions that read tensor memory and
cannot be traced; the ops are then registered opaque (a fake that only says "out is mutated", no decomposition),
so torch.compile keeps each as one call, as it does the C++ ops.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode


def interpreting() -> bool:
    """True when the kernels run under the Triton interpreter (CPU tensors only)."""
    from harmony.kernels._common import interpreting as kernels_interpreting
    return kernels_interpreting()


def _no_decomposition(mode, op, types, args, kwargs):
    """Functionalise the op as a whole (an opaque mutating op) instead of tracing its body."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


def triton_op(name: str, launch: Callable, mutates_args: Iterable[str], fake: Callable):
    """Registers ``launch`` (annotated with the op's argument types) as the torch op ``name``; opaque to
    torch.compile under the interpreter, decomposed into its kernels otherwise."""
    op = torch.library.triton_op(name, launch, mutates_args=set(mutates_args))
    if interpreting():
        op.register_fake(fake)
        op.register_torch_dispatch(FunctionalTensorMode, _no_decomposition)
    return op
