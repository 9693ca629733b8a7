"""Process groups, parallel wrappers and every collective of the project (docs/HARMONIZER.md "4. Data parallelism",
docs/DESIGN.md "Collectives and wrappers").

The trainer, the harmonizer, the losses, the evaluation and the sampler ask this module, and only this
module, how many ranks there are, what a wrapper holds (``unwrap``, ``is_ddp``, ``is_fsdp``), and to move
tensors between ranks: a dict of sums (``reduce_dict``), rows of different counts per rank (``gather_rows``,
with or without gradient), the global masked mean (``global_masked_means``), the unsharded-backward context
of FSDP2 (``unsharded_through_backward``).

Launch with ``torchrun [--nproc_per_node N] train.py ...``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT come from torchrun's environment; without them the run is one process and every helper here
degrades to the identity. gloo on the CPU, NCCL on CUDA. Every collective, and the rendezvous itself, gives
up after ``train.dist_timeout_s`` (a peer that died or froze ends the run with an error torchrun can restart,
never a wait without end). A group restarted by torchrun meets in a namespace of its own in the agent's
store (``_fresh_namespace``). Multi-node is torchrun's own (``--nnodes``,
``--rdzv-backend=c10d --rdzv-endpoint=HOST:PORT``), e.g. under SLURM::

    srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 --rdzv-id=$SLURM_JOB_ID \\
         --rdzv-backend=c10d --rdzv-endpoint=$(scontrol show hostnames | head -n1):29500 train.py ...
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    """Where this process sits: rank among world_size, its local rank and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" when no process group was created

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when a GPU is visible, else cpu; 'cuda' without a GPU is an error."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available (use train.device=auto or cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _free_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_namespace(store: dist.Store, rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The part of ``store`` that only this group of workers uses: a prefix named by a token rank 0 draws now.

    torchrun's agent hosts one store for the whole job (TORCHELASTIC_USE_AGENT_STORE=True) and hands every
    restarted group the same one, while ``init_process_group`` writes its keys (gloo: each rank's address)
    under the same names in every round. A restarted rank could then read a dead peer's address from the
    previous round and fail ("connectFullMesh ... Connection refused") or wait on it (a hang in
    ``_new_process_group_helper``). The restart count cannot name the round: each agent counts its own.

    So rank 0 draws a token, and every other rank asks for it with a nonce of its own (``hello/<rank>``) and
    waits for the answer under a key holding that nonce, which no earlier round can have written; rank 0
    answers whatever nonce it reads (a stale one too: nobody waits for that answer) until each rank has
    acknowledged under the new token. Every wait ends after ``timeout``."""
    nonce = uuid.uuid4().hex
    if rank != 0:
        store.set(f"harmony/hello/{rank}", nonce)
        token = store.get(f"harmony/answer/{rank}/{nonce}").decode()  # waits up to the store's timeout
        store.set(f"harmony/ack/{token}/{rank}", "1")
        return dist.PrefixStore(f"harmony/{token}", store)
    token, answered, pending = nonce, {}, set(range(1, world))
    deadline = time.monotonic() + timeout.total_seconds()
    while pending:
        for r in sorted(pending):
            if store.check([f"harmony/ack/{token}/{r}"]):
                pending.discard(r)
            elif store.check([f"harmony/hello/{r}"]):
                asked = store.get(f"harmony/hello/{r}").decode()
                if answered.get(r) != asked:
                    store.set(f"harmony/answer/{r}/{asked}", token)
                    answered[r] = asked
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"rank 0: ranks {sorted(pending)} did not join the process group within "
                               f"{timeout.total_seconds():g} s (train.dist_timeout_s)")
        time.sleep(0.01 if pending else 0)
    return dist.PrefixStore(f"harmony/{token}", store)


def init_distributed(device_pref: str = "auto", parallel: str = "none", timeout_s: float = 600.0) -> DistEnv:
    """Read torchrun's env and create the default process group when WORLD_SIZE > 1 (gloo CPU, NCCL CUDA).

    ``timeout_s``: how long the rendezvous and every collective wait for a peer before they raise.
    FSDP2 needs a process group even in one process: with parallel='fsdp' and no torchrun env, a
    one-rank group on a free local port is created, so the sharded code path runs on a single device too."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    backend = ""
    if (world > 1 or parallel == "fsdp") and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if "MASTER_ADDR" not in os.environ:  # one process started without torchrun
            kwargs["init_method"] = f"tcp://127.0.0.1:{_free_local_port()}"
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the agent's store, shared by every round
            agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                                  is_master=False, timeout=timeout)
            kwargs["store"] = _fresh_namespace(agent, rank, world, timeout)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    elif dist.is_initialized():
        backend = dist.get_backend()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def shutdown() -> None:
    """Destroy the default process group, and with it its threads, now: the objects that held it are collected
    first (reference cycles too), so that destroying it drops its last reference. A group left alive until the
    interpreter exits ends its gloo threads during finalization, which can abort the process (SIGABRT,
    'terminate called without an active exception')."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """The number of ranks of the default process group (1 without one)."""
    return dist.get_world_size() if is_dist() else 1


def data_parallel_world(model: nn.Module) -> int:
    """The ranks ``model`` averages its gradients over: the group's size for a DDP or FSDP2 model, else 1 (a
    plain module in a process group trains on its own rank's batch)."""
    return get_world_size() if is_ddp(model) or is_fsdp(model) else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` with op sum|mean|max|min; identity in one process. Returns ``t``."""
    if not is_dist():
        return t
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(t, op=ops[op])
    if op == "mean":
        t.div_(dist.get_world_size())
    return t


def reduce_scalars(values: Iterable[float], op: str = "sum", device=None) -> List[float]:
    """All-reduce a list of Python numbers in one float64 collective."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    return all_reduce(t, op).tolist()


def reduce_dict(values: Dict[str, Union[float, List[float]]], op: str = "sum", device=None
                ) -> Dict[str, Union[float, List[float]]]:
    """All-reduce a dict of numbers and lists of numbers in one float64 collective -> the same structure.

    Every rank must pass the same keys with lists of the same lengths (they are flattened in key order)."""
    keys = sorted(values)
    flat: List[float] = []
    for k in keys:
        v = values[k]
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    red = reduce_scalars(flat, op, device=device)
    out, o = {}, 0
    for k in keys:
        v = values[k]
        n = len(v) if isinstance(v, (list, tuple)) else 1
        out[k] = red[o:o + n] if isinstance(v, (list, tuple)) else red[o]
        o += n
    return out


def average_across_ranks(tensors: List[torch.Tensor], world: int) -> None:
    """In place: each tensor becomes its mean over ``world`` ranks (one flat collective), as DDP / FSDP2
    average gradients; nothing to do when ``world`` is 1."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    o = 0
    for t in tensors:
        t.copy_(flat[o:o + t.numel()].view_as(t))
        o += t.numel()


def any_nonfinite(*tensors: Optional[torch.Tensor], device=None) -> bool:
    """True on EVERY rank if any rank has a NaN/inf in any of ``tensors`` (None entries are ignored).

    The flag is one MAX all-reduce, so all ranks take the same branch (skip the step or not) and the
    collectives that follow stay matched.
    """
    bad = any(t is not None and not bool(torch.isfinite(t.detach()).all()) for t in tensors)
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    return bool(all_reduce(flag, "max").item() > 0)


def global_masked_means(*pairs: Tuple[torch.Tensor, torch.Tensor], world: Optional[int] = None
                        ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """This rank's share of each GLOBAL masked mean Σ_i m_i ℓ_i / Σ_i m_i (i over every rank's samples).

    pairs: (losses [b], mask [b] bool) -> ([local Σ m ℓ / (max(global Σ m, 1) / W)], differentiable; [the global
    masked means], detached fp32). Data-parallel gradient averaging (÷ W) then yields exactly the gradient of
    the global mean however the masked samples are spread over ranks — a per-rank masked mean would not. The
    sums travel in one float64 collective. ``world``: the W to divide by and reduce over (default: the
    process group's size); 1 gives the plain masked means of this rank's samples.
    """
    W = get_world_size() if world is None else world
    sums = [torch.where(m, l, torch.zeros_like(l)).sum() for l, m in pairs]
    dtype = sums[0].dtype
    stats = torch.stack([x for s, (_, m) in zip(sums, pairs) for x in (s.detach().to(dtype), m.sum().to(dtype))])
    stats = stats.double()
    if W > 1:
        dist.all_reduce(stats)
    shares, means = [], []
    for k, s in enumerate(sums):
        n = stats[2 * k + 1].clamp(min=1)
        shares.append(s / (n / W).to(s.dtype))
        means.append((stats[2 * k] / n).float())
    return shares, means


def global_masked_mean(losses: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """losses [b], mask [b] -> scalar: this rank's share of the global masked mean (``global_masked_means``)."""
    m = torch.ones_like(losses, dtype=torch.bool) if mask is None else mask.to(losses.device, torch.bool)
    return global_masked_means((losses, m))[0][0]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. the run folder, whose name has rank 0's clock in it)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's ``obj`` in rank order on rank ``dst`` (None on the others); one process: [obj]."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def first_message(msg: str) -> str:
    """The first non-empty ``msg`` over ranks, in rank order ('' when every rank passes ''): one rank's
    failure becomes every rank's decision (e.g. a checkpoint write). Collective; identity in one process."""
    return next((m for m in all_gather_object(msg) if m), "")


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather equal-sized blocks [m, ...] from every rank -> [world·m, ...] in rank order, differentiable.

    Each rank differentiates its own loss, which reads every rank's rows; the gradient of this rank's block is
    therefore the sum over ranks of the gradient each one computed for it: an all_reduce (sum) of the full
    gathered gradient, then this rank's slice. Every rank must run the backward (as with any collective).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()  # all_reduce works in place; autograd's buffer must stay untouched
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(t: torch.Tensor, differentiable: bool = False) -> Tuple[torch.Tensor, int]:
    """Every rank's rows t [n_r, ...] -> ([Σ n_r, ...] in rank order, the index of this rank's first row).

    Ranks may hold different n_r: rows are zero-padded to the largest for the collective and cut off after it.
    ``differentiable``: the backward sums every rank's gradient for a row into the rank that owns it (the
    contrastive losses' negatives); otherwise no gradient flows. One process: (t, 0).
    """
    if not is_dist():
        return t, 0
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    m = max(sizes)
    if differentiable:
        pad = torch.cat([t, t.new_zeros((m - t.shape[0],) + tuple(t.shape[1:]))]) if m > t.shape[0] else t
        full = _AllGatherWithGrad.apply(pad)
        parts = [full[r * m:r * m + k] for r, k in enumerate(sizes)]
    else:
        pad = t.new_zeros((m,) + tuple(t.shape[1:]))
        pad[: t.shape[0]] = t
        bufs = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(bufs, pad.contiguous())
        parts = [b[:k] for b, k in zip(bufs, sizes)]
    return torch.cat(parts, dim=0), sum(sizes[: dist.get_rank()])


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` [n_r, ...] along dim 0 -> [Σ n_r, ...] in rank order, without gradient."""
    return gather_rows(t)[0]


# ----------------------------------------------------------------------------------------------- wrapping

def fsdp_units(model: nn.Module) -> List[nn.Module]:
    """Modules sharded as their own FSDP2 unit: ``model.fsdp_units()`` if the model defines it, else every
    element of every nn.ModuleList (the Transformer blocks), innermost lists first."""
    if hasattr(model, "fsdp_units"):
        return list(model.fsdp_units())
    units = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            units.extend(m for m in module if sum(p.numel() for p in m.parameters()) > 0)
    # fully_shard must see children before parents: sort by depth, deepest first
    depth = {id(m): name.count(".") for name, m in model.named_modules()}
    return sorted(dict.fromkeys(units), key=lambda m: -depth.get(id(m), 0))


def wrap_model(model: nn.Module, parallel: str, env: DistEnv, precision: str = "fp32") -> nn.Module:
    """none: the model; ddp: DistributedDataParallel; fsdp: FSDP2 ``fully_shard`` on each unit and the root
    (bf16 params / fp32 gradient reduction when precision=bf16). The model must already be on env.device
    and have identical weights on every rank (same seed; DDP also broadcasts rank 0's)."""
    if parallel == "none":
        if env.world_size > 1:
            raise RuntimeError("train.parallel=none with WORLD_SIZE > 1: use train.parallel=ddp or fsdp under torchrun")
        return model
    if parallel == "ddp":
        if not is_dist():
            return model  # one process: DDP would only add hooks
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    raise ValueError(f"train.parallel={parallel!r}; choose one of ['none', 'ddp', 'fsdp']")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return model.module if is_ddp(model) else model


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _fsdp_units_of(model: nn.Module) -> List[nn.Module]:
    """The FSDP2 units (``fully_shard``-ed modules) inside ``model``, itself included."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp(model: nn.Module) -> bool:
    """Whether any module of ``model`` is sharded by FSDP2 ``fully_shard``."""
    return bool(_fsdp_units_of(model))


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Gradient reduction on (final micro-step) or off (earlier micro-steps of gradient accumulation)."""
    if enabled:
        yield
        return
    if is_ddp(model):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def _reshard_after_backward(unit: nn.Module) -> bool:
    """The unit's current reshard-after-backward setting (FSDP2 keeps it in its parameter group; default True)."""
    try:
        return bool(unit._get_fsdp_state()._fsdp_param_group.reshard_after_backward)
    except AttributeError:
        return True


@contextlib.contextmanager
def unsharded_through_backward(model: nn.Module):
    """FSDP2: keep the units unsharded across several backward passes through one graph (the harmonizer's
    measurement passes, then its update) and reshard once after the last; a no-op for other models.

    FSDP2 frees a unit's unsharded parameters after its backward; a later backward through the same graph
    then finds the saved weights' storage gone (seen with torch 2.11 on CUDA). Gradient reduce-scatter is
    unaffected. Each unit's setting is restored on exit (nested use keeps the outer one's)."""
    units = _fsdp_units_of(model)
    before = [_reshard_after_backward(m) for m in units]
    for m in units:
        m.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for m, b in zip(units, before):
            m.set_reshard_after_backward(b, recurse=False)
            if b:
                m.reshard()


def clip_grad_norm(params: List[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient L2 norm (a plain tensor on every rank), clipping to ``max_norm`` when > 0.

    Works on DTensor gradients (FSDP2: the norm is reduced over the shards). Non-finite norms are returned,
    not raised: the caller skips the step."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


def scale_grads(params: List[nn.Parameter], factor: float) -> None:
    """grad *= factor for every parameter with a gradient (the 1/grad_accum of accumulated micro-steps)."""
    if factor == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)
