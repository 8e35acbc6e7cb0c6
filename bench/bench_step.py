"""Benchmark: one router training step, as a fraction of this machine's measured matmul peak, before and after.

Demo shapes (the embedded default's tables): batch 16, d = 128, grid 24 x 24, 2-3 crops per
sample, k = 32, ladder 36..576 (L = 1,148 tokens per crop). A step = forward, RGLF loss,
backward, gradient clipping and AdamW.

- before: the router's forward as it was (``bench/router_reference.py``): pooling and the text
  filter inside the step, padded crops, ``nn.TransformerEncoderLayer`` on ``(B*L, C, d)`` with a
  key-padding mask, ``(R, L, N)`` token logits, torch's serial-RNG dropout.
- after: ``GranularityRouter.forward_prepared`` on ``prepare``'s output (the trainer's data
  thread runs ``prepare``; "after, incl. prepare" also times it inside the step).

Useful FLOPs, the same for both (the computation is the same): the trainable layers' matrix
products, 36 d^2 per crop token (forward 14 d^2: in_proj 3, out_proj, linear1, linear2,
router.0; backward twice that, minus in_proj's input gradient: the sequence needs none) plus
the attention across c crops. Peak: ``torch.matmul`` of two 1024 x 1024 fp32 matrices, timed
interleaved with the steps on the same threads (the machine is shared: ratios measured side by
side are what matters). Also checks that both give the same logits (eval mode) and gradients
(dropout 0).

    python -m bench.bench_step               # ~1 minute, 1 thread
    python -m bench.bench_step --threads 2 --steps 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch


def demo_batch(bsz: int = 16, d: int = 128, grid: int = 24, t_max: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n_crops = torch.randint(2, 4, (bsz,), generator=gen)  # the demo's images: 2 or 3 crops
    c = int(n_crops.max())
    feats = torch.randn(bsz, c, grid * grid, d, generator=gen)
    crop_mask = torch.arange(c)[None] < n_crops[:, None]
    text = torch.randn(bsz, t_max, d, generator=gen)
    text_mask = torch.arange(t_max)[None] < torch.randint(8, t_max + 1, (bsz,), generator=gen)[:, None]
    nll = torch.rand(bsz, 5, generator=gen)
    return feats, crop_mask, text, text_mask, nll, nll.argsort(dim=1)


def step_flops(router, crop_mask: torch.Tensor) -> float:
    """Useful FLOPs of one training step (see the module docstring)."""
    d, length = router.config.hidden_size, router.seq_len
    counts = crop_mask.sum(dim=1).tolist()
    tokens = sum(counts) * length
    attention = sum(c * c for c in counts) * length * 4 * d  # scores + weighted sum, forward
    return tokens * 36 * d * d + 3 * attention


def matmul_peak(n: int = 1024, reps: int = 8) -> tuple[float, float]:
    """(FLOP per wall second, FLOP per CPU second of this process) of fp32 ``a @ b``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t, c = time.perf_counter(), time.process_time()
    for _ in range(reps):
        a @ b
    flops = 2 * n**3 * reps
    return flops / (time.perf_counter() - t), flops / max(1e-9, time.process_time() - c)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    from bench.router_reference import reference_forward
    from rglf.model.rglf import rglf_loss
    from rglf.model.router import GranularityRouter, RouterConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine a 2nd OpenMP thread mostly waits at barriers)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    feats, crop_mask, text, text_mask, nll, order = demo_batch(args.batch_size, args.hidden)

    # same computation: logits in eval mode, gradients with dropout 0
    torch.manual_seed(0)
    check = GranularityRouter(RouterConfig(hidden_size=args.hidden, voter_init="balanced", dropout=0.0)).train()
    grads = []
    for forward in (lambda: reference_forward(check, feats, crop_mask, text, text_mask),
                    lambda: check(feats, crop_mask, text, text_mask)):
        loss, _ = rglf_loss(forward(), nll, order)
        grads.append(torch.autograd.grad(loss, list(check.parameters())))
    grad_diff = max(float((a - b).norm() / a.norm().clamp_min(1e-12)) for a, b in zip(*grads, strict=True))
    check.eval()
    with torch.no_grad():
        logit_diff = float((reference_forward(check, feats, crop_mask, text, text_mask)
                            - check(feats, crop_mask, text, text_mask)).abs().max())

    torch.manual_seed(0)
    router = GranularityRouter(RouterConfig(hidden_size=args.hidden, voter_init="balanced")).train()
    opt = torch.optim.AdamW(router.parameters(), lr=1e-3)
    with torch.no_grad():
        prepared = router.prepare(feats, crop_mask, text, text_mask)

    def step(logits_fn) -> None:
        loss, _ = rglf_loss(logits_fn(), nll, order)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(router.parameters(), 1.0)
        opt.step()

    variants = {
        "before": lambda: step(lambda: reference_forward(router, feats, crop_mask, text, text_mask)),
        "after": lambda: step(lambda: router.forward_prepared(prepared)),
        "after, incl. prepare": lambda: step(lambda: router(feats, crop_mask, text, text_mask)),
    }
    wall = dict.fromkeys(variants, 0.0)
    cpu = dict.fromkeys(variants, 0.0)
    peaks = []
    for i in range(args.steps + 1):  # interleaved: load from other processes hits every variant alike
        peaks.append(matmul_peak())
        for name, fn in variants.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            if i:  # the first round warms up
                wall[name] += time.perf_counter() - t
                cpu[name] += time.process_time() - c
    peak = sorted(p for p, _ in peaks)[len(peaks) // 2]
    peak_cpu = sorted(c for _, c in peaks)[len(peaks) // 2]
    flops = step_flops(router, crop_mask)
    print(f"router step, demo shapes: batch {args.batch_size}, d {args.hidden}, crops "
          f"{crop_mask.sum(1).tolist()}, L {router.seq_len}; {flops / 1e9:.1f} useful GFLOP per step; "
          f"{args.threads} threads")
    print(f"matmul peak (1024^3 fp32, median of {len(peaks)}): {peak / 1e9:.1f} GFLOP/s wall, "
          f"{peak_cpu / 1e9:.1f} GFLOP per CPU-second (the CPU-time fraction is robust to other jobs' time slices)")
    out: dict[str, float] = {"peak_gflops": peak / 1e9, "logit_max_abs_diff": logit_diff, "grad_max_rel_diff": grad_diff}
    for name in variants:
        seconds = wall[name] / args.steps
        frac = flops / seconds / peak
        cpu_s = cpu[name] / args.steps
        frac_cpu = flops / cpu_s / peak_cpu
        out[f"{name}_seconds"], out[f"{name}_fraction"], out[f"{name}_cpu_fraction"] = seconds, frac, frac_cpu
        print(f"  {name:22s} {seconds:7.3f} s/step  {args.batch_size / seconds:6.1f} samples/s  "
              f"{100 * frac:5.1f}% of the matmul peak;  CPU time {cpu_s:.3f} s/step: {100 * frac_cpu:5.1f}%")
    print(f"speed-up: {wall['before'] / wall['after']:.2f}x wall, {cpu['before'] / cpu['after']:.2f}x CPU ({wall['before'] / wall['after, incl. prepare']:.2f}x with "
          f"prepare in the step); same computation: logits max |diff| {logit_diff:.1e} (eval), "
          f"gradients max rel. diff {grad_diff:.1e} (dropout 0)")
    return out


if __name__ == "__main__":
    main()
