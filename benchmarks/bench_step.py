"""Step benchmark (targets and results: benchmarks/RESULTS.md): harmonized training step time and peak memory relative
to a plain step.

One run times, on the project's VATT model at a realistic batch (random inputs of the data contract's shapes):
  plain                 forward + backward of L_va + λ·L_vt
  <mode>/<scope>        forward + GradientHarmonizer.backward (PCGrad), mode ∈ {ghost, materialize, feature,
                        sketch}, scope ∈ {shared, backbone, last_block}; bookkeeping (the update formed from the
                        kept activations instead of a second backward) as the harmonizer picks it (column bk).
                        feature measures at the pooled video feature whatever the scope; sketch reports next to
                        its time the mean |Δcos| of its estimated cosines against the exact ones (column |dcos|)
  <mode>/<scope>/2bw    the same with bookkeeping off: the update by a second, weighted backward
  ghost/shared/<rule>   (--rules) ghost/shared with another realignment rule (none, project_va, gradvac, ...)
  torch.func/<scope>    a straightforward torch.func implementation of the same per-sample PCGrad:
                        vmap over samples of the per-sample forward's VJP (the two losses' upstream
                        gradients) for the scope's parameters, torch ops for the dots, the PCGrad
                        coefficients and Σ_i α_i g^va_i + β_i g^vt_i; the other parameters get the
                        weighted plain gradient by one backward
Variants run round-robin (repeat r of every variant, then repeat r+1; the order rotates each round, so no
variant always runs right after the same one), so machine noise hits all of them alike; the table gives medians, the
ratio to plain, and the peak memory of one step above the memory held before it (CPU: peak RSS, reset through
/proc/self/clear_refs; CUDA: max_memory_allocated). Column F x: the variant's counted FLOPs over the plain step's
(benchmarks/flop_floor.py: matrix products, convolutions, attention, per-sample dots). Column floor: the plain step's
time plus the variant's extra counted FLOPs at the fp32 matrix-product rate measured in the same run, over the plain
step's time. Rows are appended to a CSV with the device name and the git commit.

    python benchmarks/bench_step.py                       # CPU, VATT-tiny, batch 32
    python benchmarks/bench_step.py --device cuda --size small --batch 64
    python benchmarks/bench_step.py --size small --batch 4 --frames 16 --image-size 64 --modes ghost,sketch
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harmony import GradientHarmonizer, HarmonyConfig  # noqa: E402
from harmony.config import DataConfig, ModelConfig  # noqa: E402
from harmony.model.losses import masked_mean, mil_nce, nce  # noqa: E402
from harmony.model import VATT  # noqa: E402

from benchmarks.common import append_csv, device_name, sync  # noqa: E402
from benchmarks.flop_floor import count_flops, floor_ratio, gemm_timer  # noqa: E402


# ---------------------------------------------------------------------------------------------- helpers
def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class PeakMemory:
    """Peak memory of a region above what was held at its start, in MiB (CPU: RSS high-water mark)."""

    def __init__(self, device: torch.device):
        self.device = device

    def _rss_kib(self, field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
        return 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()                                     # return freed heap pages, so RSS ≈ live memory
            try:
                with open("/proc/self/clear_refs", "w") as f:   # resets VmHWM to the current RSS
                    f.write("5")
            except OSError:
                pass
            self.start = self._rss_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._rss_kib("VmHWM:") * 1024
        self.mib = max(peak - self.start, 0) / 2 ** 20
        return False


# ---------------------------------------------------------------------------------------------- the model
def make_batch(B: int, data: DataConfig, device, generator: torch.Generator) -> dict:
    """Random inputs with the data contract's shapes (captions of random length, 0 = padding)."""
    T, S, N, L = data.frames, round(data.sample_rate * data.audio_seconds), data.max_words, data.candidates
    video = torch.rand(B, 3, T, data.image_size, data.image_size, generator=generator)
    audio = torch.rand(B, S, generator=generator) * 2 - 1
    words = torch.randint(1, 1 << 16, (B, L, N), generator=generator)
    lengths = torch.randint(3, N + 1, (B, L, 1), generator=generator)
    text = torch.where(torch.arange(N) < lengths, words, 0)
    return {k: v.to(device) for k, v in dict(video=video, audio=audio, text=text).items()}


def losses(out):
    return nce(out.z_va_v, out.z_va_a), mil_nce(out.z_vt_v, out.z_vt_t)


def plain_step(model, batch, lam: float) -> None:
    model.zero_grad(set_to_none=True)
    l_va, l_vt = losses(model(**batch, generator=torch.Generator().manual_seed(0)))
    (masked_mean(l_va) + lam * masked_mean(l_vt)).backward()


def harmonized_step(model, harmonizer, batch, step: int = 0):
    model.zero_grad(set_to_none=True)
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    l_va, l_vt = losses(out)
    feature = out.feat_v if harmonizer.cfg.mode == "feature" else None
    return harmonizer.backward(l_va, l_vt, va_inputs=(out.z_va_v, out.z_va_a),
                               vt_inputs=(out.z_vt_v, out.z_vt_t), feature=feature, step=step)


class FuncPCGrad:
    """Per-sample PCGrad with torch.func (the baseline): vmap over samples of the per-sample forward's VJP.

    Sample i's forward runs alone inside vmap with the batch's DropToken indices (the same generator seed),
    pulled back with both losses' upstream gradients at once (one forward, two pullbacks per sample).
    """

    def __init__(self, model: VATT, scope: str, lam: float, eps: float = 1e-12):
        from torch.func import functional_call, vjp, vmap
        self.model, self.lam, self.eps = model, lam, eps
        ids = {id(p) for p in model.scope_parameters(scope)}
        self.scoped = [n for n, p in model.named_parameters() if id(p) in ids]
        self.others = [p for n, p in model.named_parameters() if id(p) not in ids]

        def one_sample(theta, video, audio, text, u_vv, u_aa, u_vt, u_tt):
            def f(th):
                o = functional_call(model, th, (video[None], audio[None], text[None]),
                                    {"generator": torch.Generator().manual_seed(0)}, strict=False)
                return o.z_va_v[0], o.z_va_a[0], o.z_vt_v[0], o.z_vt_t[0]
            _, pull = vjp(f, theta)
            zero = lambda u: torch.zeros_like(u)  # noqa: E731
            g_va = pull((u_vv, u_aa, zero(u_vt), zero(u_tt)))[0]
            g_vt = pull((zero(u_vv), zero(u_aa), u_vt, u_tt))[0]
            return g_va, g_vt

        self.per_sample = vmap(one_sample, in_dims=(None, 0, 0, 0, 0, 0, 0, 0), randomness="same")

    def step(self, batch) -> None:
        model = self.model
        model.zero_grad(set_to_none=True)
        out = model(**batch, generator=torch.Generator().manual_seed(0))
        l_va, l_vt = losses(out)
        L_va, L_vt = masked_mean(l_va), masked_mean(l_vt)
        zs_va, zs_vt = (out.z_va_v, out.z_va_a), (out.z_vt_v, out.z_vt_t)
        u_va = torch.autograd.grad(L_va, zs_va, retain_graph=True)
        u_vt = torch.autograd.grad(L_vt, zs_vt, retain_graph=True)
        params = dict(model.named_parameters())
        theta = {n: params[n].detach() for n in self.scoped}
        g_va, g_vt = self.per_sample(theta, batch["video"], batch["audio"], batch["text"], *u_va, *u_vt)
        B = l_va.shape[0]
        A = torch.cat([g_va[n].reshape(B, -1) for n in self.scoped], 1)
        V = torch.cat([g_vt[n].reshape(B, -1) for n in self.scoped], 1)
        d, na, nt = (A * V).sum(1), (A * A).sum(1), (V * V).sum(1)
        cos = d / (torch.sqrt(na * nt) + self.eps)
        conflict = cos < 0
        alpha = torch.where(conflict, 1 - self.lam * d / na.clamp(min=1e-30), torch.ones_like(d))
        beta = torch.where(conflict, self.lam - d / nt.clamp(min=1e-30), torch.full_like(d, self.lam))
        G = alpha @ A + beta @ V
        o = 0
        for n in self.scoped:
            p = params[n]
            p.grad = G[o:o + p.numel()].view_as(p).clone()
            o += p.numel()
        if self.others:                                   # apply_to=all: the same coefficients, by one backward
            grads = torch.autograd.grad(list(zs_va) + list(zs_vt), self.others,
                                        [u * alpha.view(-1, *[1] * (u.dim() - 1)) for u in u_va]
                                        + [u * beta.view(-1, *[1] * (u.dim() - 1)) for u in u_vt],
                                        allow_unused=True)
            for p, g in zip(self.others, grads):
                p.grad = g


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny", choices=("tiny", "small", "base", "medium"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="ghost,materialize")
    ap.add_argument("--scopes", default="shared,backbone,last_block")
    ap.add_argument("--func-scopes", default="shared", help="scopes of the torch.func baseline ('' to skip)")
    ap.add_argument("--second-backward", default="ghost/shared",
                    help="mode/scope pairs also timed with bookkeeping off ('' to skip)")
    ap.add_argument("--rules", default="",
                    help="extra ghost/shared variants with these realignment rules (e.g. project_va,gradvac)")
    ap.add_argument("--sketch-dim", type=int, default=16, help="sketch mode: k of the k×k per-layer sketches")
    ap.add_argument("--frames", type=int, default=0, help="video frames per clip (0: 8)")
    ap.add_argument("--image-size", type=int, default=0, help="video frame size (0: the data default)")
    ap.add_argument("--no-floor", action="store_true", help="skip the counted-FLOP floor column")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "out" / "bench_step.csv"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mcfg, dcfg = ModelConfig(size=args.size, video_patch=[2, 8, 8]), DataConfig(frames=8)  # the published shapes
    if args.frames:
        dcfg.frames = args.frames
    if args.image_size:
        dcfg.image_size = args.image_size
    model = VATT(mcfg, dcfg).to(device).train()
    batch = make_batch(args.batch, dcfg, device, torch.Generator().manual_seed(1))
    lam = 1.0

    variants: Dict[str, Callable[[], None]] = {"plain": lambda: plain_step(model, batch, lam)}
    harmonizers: Dict[str, GradientHarmonizer] = {}
    pairs = [(m, s, None, "pcgrad") for m in filter(None, args.modes.split(","))
             for s in filter(None, args.scopes.split(","))]
    pairs += [(*ms.split("/"), False, "pcgrad") for ms in filter(None, args.second_backward.split(","))]
    pairs += [("ghost", "shared", None, rule) for rule in filter(None, args.rules.split(","))]
    for mode, scope, bk, rule in pairs:
        extra = dict(sketch_dim=args.sketch_dim) if mode == "sketch" else {}
        h = GradientHarmonizer(model, HarmonyConfig(realign=rule, mode=mode, scope=scope, lam=lam, **extra),
                               bookkeeping=bk)
        h.recording = False                        # armed only while its own variant runs
        name = f"{mode}/{scope}" + ("/2bw" if bk is False else "") + (f"/{rule}" if rule != "pcgrad" else "")
        harmonizers[name] = h
        variants[name] = (lambda h=h: _armed(h, lambda: harmonized_step(model, h, batch)))
    for scope in filter(None, args.func_scopes.split(",")):
        fp = FuncPCGrad(model, scope, lam)
        variants[f"torch.func/{scope}"] = (lambda fp=fp: fp.step(batch))

    times: Dict[str, List[float]] = {k: [] for k in variants}
    mem: Dict[str, float] = {}
    flops: Dict[str, int] = {}
    for name, fn in variants.items():                      # warm-up, and one step for the memory peak
        for _ in range(args.warmup):
            fn()
        sync(device)
        with PeakMemory(device) as pm:
            fn()
        mem[name] = pm.mib
        if not args.no_floor:
            flops[name] = count_flops(fn)
    dcos = {name: _sketch_error(model, h, batch, lam) for name, h in harmonizers.items() if h.cfg.mode == "sketch"}
    order = list(variants.items())
    gemm, rates = gemm_timer(device), []
    for r in range(args.repeats):
        rates += [gemm() for _ in range(3)]
        for name, fn in order[r % len(order):] + order[:r % len(order)]:   # rotated: no variant always follows one
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["plain"])
    video_tokens = model.video_embed.num_tokens
    dev_name = device_name(device)
    print(f"\n{model.describe()}")
    print(f"device {dev_name}; batch {args.batch}; median of {args.repeats} (round-robin) after {args.warmup} warm-up")
    # the matrix-product rate under this run's load; never below what the plain step itself achieved
    rate = max(statistics.median(rates), flops["plain"] / base) if flops else float("nan")
    if flops:
        print(f"counted FLOPs of the plain step: {flops['plain'] / 1e9:.2f} G; fp32 GEMM rate {rate / 1e9:.1f} GFLOP/s")
    print(f"{'variant':<28}{'bk':>4}{'ms':>10}{'x plain':>10}{'F x':>7}{'floor':>8}{'peak MiB':>11}{'|dcos|':>9}")
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        ratio = ms / (base * 1e3)
        bk = "-" if name not in harmonizers else ("yes" if harmonizers[name].bookkeeping else "no")
        fx = flops[name] / flops["plain"] if flops else float("nan")
        floor = floor_ratio(flops[name], flops["plain"], base, rate) if flops else float("nan")
        err = f"{dcos[name]:.3f}" if name in dcos else "-"
        print(f"{name:<28}{bk:>4}{ms:>10.1f}{ratio:>10.2f}{fx:>7.2f}{floor:>8.2f}{mem[name]:>11.1f}{err:>9}")
        notes = (f"peak {mem[name]:.1f} MiB above the step's start; median of {args.repeats}; counted FLOPs "
                 f"{fx:.3f} x plain; floor {floor:.3f}")
        if name in dcos:
            notes += f"; mean |dcos| {dcos[name]:.4f} (k={args.sketch_dim})"
        rows.append(dict(bench="step", op=name, shape=f"vatt-{args.size} B={args.batch} video {video_tokens}",
                         dtype="float32", backend=f"bookkeeping={bk}", ms=round(ms, 3), rate=round(ratio, 4),
                         unit="x plain", notes=notes))
    append_csv(args.csv, rows, device)
    print(f"appended {len(rows)} rows to {args.csv}")
    return rows


def _sketch_error(model, h: GradientHarmonizer, batch, lam: float, steps: int = 3) -> float:
    """Mean |Δcos| of the sketch's cosines against an exact ghost harmonizer's on the same steps (the sketch
    is re-drawn per step: ``steps`` steps)."""
    exact = GradientHarmonizer(model, HarmonyConfig(realign="none", mode="ghost", scope=h.cfg.scope, lam=lam))
    exact.recording = False
    errs = []
    for step in range(steps):
        st = _armed(h, lambda: harmonized_step(model, h, batch, step))
        ref = _armed(exact, lambda: harmonized_step(model, exact, batch, step))
        errs.append((st.cos - ref.cos).abs().mean().item())
    exact.remove()
    return statistics.mean(errs)


def _armed(h: GradientHarmonizer, fn: Callable[[], object]):
    """Run one variant with only its harmonizer's hooks recording."""
    h.recording = True
    try:
        return fn()
    finally:
        h.recording = False


if __name__ == "__main__":
    main()
