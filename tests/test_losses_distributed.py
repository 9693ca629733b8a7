"""Two gloo ranks: gathered per-sample CMA losses and their gradients equal a single process on the global batch."""
import datetime
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harmony.model.losses import asymmetric_nce

pytestmark = pytest.mark.distributed

WORLD = 2
TIMEOUT_S = 120
# (local batch sizes per rank, candidates L): equal, unequal, and a rank without samples.
CASES = [((3, 3), 3), ((2, 3), 1), ((0, 2), 3), ((4, 1), 1)]
DIM = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(sizes, n_cand, seed):
    """The same global inputs in every process: anchors, candidates, masks, per-sample weights."""
    gen = torch.Generator().manual_seed(seed)
    g = sum(sizes)
    anchor = torch.randn(g, DIM, generator=gen, dtype=torch.float64)
    cands = torch.randn(g, n_cand, DIM, generator=gen, dtype=torch.float64)
    mask = torch.rand(g, generator=gen) > 0.25
    cand_mask = torch.rand(g, n_cand, generator=gen) > 0.25
    weights = torch.rand(g, generator=gen, dtype=torch.float64) + 0.5
    return anchor, cands, mask, cand_mask, weights


DEFINITIONS = ("path", "own_row", "own_pair")


def _run_case(sizes, n_cand, seed, gather, rank, definition="path"):
    """One rank's local loss and gradients on its slice of the global batch."""
    anchor, cands, mask, cand_mask, weights = _global_batch(sizes, n_cand, seed)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    a = anchor[lo:hi].clone().requires_grad_()
    c = cands[lo:hi].clone().requires_grad_()
    loss = asymmetric_nce(a, c, mask[lo:hi], cand_mask[lo:hi], gather=gather, definition=definition)
    (loss * weights[lo:hi]).sum().backward()
    return {"loss": loss.detach(), "grad_anchor": a.grad, "grad_cands": c.grad}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        results = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for k, (sizes, n_cand) in enumerate(CASES):
                results[("gather", k)] = _run_case(sizes, n_cand, seed=k, gather=True, rank=rank)
                for d in DEFINITIONS[1:]:
                    results[(d, k)] = _run_case(sizes, n_cand, seed=k, gather=True, rank=rank, definition=d)
        results["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
        results[("local", 0)] = _run_case(*CASES[0], seed=0, gather=False, rank=rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process(sizes, n_cand, seed, definition="path"):
    """Reference: the whole global batch in one process (no process group)."""
    anchor, cands, mask, cand_mask, weights = _global_batch(sizes, n_cand, seed)
    a, c = anchor.clone().requires_grad_(), cands.clone().requires_grad_()
    loss = asymmetric_nce(a, c, mask, cand_mask, gather=False, definition=definition)
    (loss * weights).sum().backward()
    return loss.detach(), a.grad, c.grad


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out_dir = str(tmp_path_factory.mktemp("gloo"))
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, out_dir)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.terminate()
    assert all(p.exitcode == 0 for p in procs), f"rank exit codes {[p.exitcode for p in procs]}"
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("definition", DEFINITIONS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gathered_loss_and_gradients_equal_single_process(rank_results, case, definition):
    """Also for the own_row / own_pair definitions: a sample's own row is found at its global index on every
    rank (unequal and empty local batches included), and no gradient crosses ranks."""
    sizes, n_cand = CASES[case]
    loss, grad_a, grad_c = _single_process(sizes, n_cand, seed=case, definition=definition)
    errs = []
    for rank in range(WORLD):
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        got = rank_results[rank][("gather" if definition == "path" else definition, case)]
        assert got["loss"].shape == (sizes[rank],)
        for name, ref in (("loss", loss), ("grad_anchor", grad_a), ("grad_cands", grad_c)):
            errs.append((got[name] - ref[lo:hi]).abs().max().item() if hi > lo else 0.0)
    print(f"sizes={sizes} L={n_cand}: max abs err over ranks (loss, grad_anchor, grad_cands) = {errs}")
    assert max(errs) < 1e-12


def test_gather_false_stays_local(rank_results):
    sizes, n_cand = CASES[0]
    anchor, cands, mask, cand_mask, _ = _global_batch(sizes, n_cand, seed=0)
    errs, gaps = [], []
    for rank in range(WORLD):
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        local = asymmetric_nce(anchor[lo:hi], cands[lo:hi], mask[lo:hi], cand_mask[lo:hi], gather=False)
        got = rank_results[rank][("local", 0)]["loss"]
        gathered = rank_results[rank][("gather", 0)]["loss"]
        errs.append((got - local).abs().max().item())
        gaps.append((gathered - local).abs().max().item())
    print("gather=False max err", errs, "| gathered vs local gap", gaps)
    assert max(errs) < 1e-12
    assert min(gaps) > 1e-3  # the gathered loss does see the other rank's negatives


def test_gather_emits_no_warnings(rank_results):
    """The gather with gradient is our own autograd function: no deprecation warnings from the collective."""
    for rank in range(WORLD):
        print(f"rank {rank} warnings: {rank_results[rank]['warnings']}")
        assert rank_results[rank]["warnings"] == []
