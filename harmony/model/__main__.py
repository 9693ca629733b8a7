"""Describe a VATT config and time its training step (forward, both CMA losses, backward) on random inputs.

    python -m harmony.model --size tiny --batch 32 [--variant agnostic] [--steps 20] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from harmony.config import DataConfig, ModelConfig
from harmony.model.losses import masked_mean, mil_nce, nce
from harmony.model.vatt import VATT


def random_batch(data: DataConfig, batch: int, device: torch.device):
    """video [B,3,T,H,W] in [0,1], audio [B,S] in [-1,1], text [B,L,N] word ids (no padding)."""
    video = torch.rand(batch, 3, data.frames, data.image_size, data.image_size, device=device)
    audio = torch.rand(batch, int(round(data.sample_rate * data.audio_seconds)), device=device) * 2 - 1
    text = torch.randint(1, 1 << 16, (batch, data.candidates, data.max_words), device=device)
    return video, audio, text


def step(model: VATT, video, audio, text) -> None:
    out = model(video, audio, text)
    loss = masked_mean(nce(out.z_va_v, out.z_va_a)) + masked_mean(mil_nce(out.z_vt_v, out.z_vt_t))
    model.zero_grad(set_to_none=True)
    loss.backward()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "base", "medium"))
    parser.add_argument("--variant", default="agnostic", choices=("agnostic", "specific"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = DataConfig()
    model = VATT(ModelConfig(size=args.size, variant=args.variant), data).to(device).train()
    print(model.describe())
    video, audio, text = random_batch(data, args.batch, device)
    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(model, video, audio, text)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    print(f"batch {args.batch} (video {data.frames}x{data.image_size}x{data.image_size}, audio "
          f"{data.audio_seconds:g} s at {data.sample_rate} Hz, {data.candidates}x{data.max_words} words), "
          f"{torch.get_num_threads()} threads: forward+losses+backward median {1e3 * statistics.median(times):.1f} ms, "
          f"min {1e3 * min(times):.1f} ms over {len(times)} steps; process CPU time median "
          f"{1e3 * statistics.median(cpu_times):.1f} ms (CPU seconds the step used, all threads)")


if __name__ == "__main__":
    main()
