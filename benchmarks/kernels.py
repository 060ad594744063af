"""Fused LM-head log-prob + entropy: the Triton kernel against the eager and chunked references.

For each hidden size H and token count N (vocabulary V = 151936, bf16), every implementation computes
log π(y) and H(π) of N tokens from hidden [N, H] and the LM-head weight [V, H], and backpropagates
Σ g_lp·logprobs + Σ g_H·entropy (random g) to both inputs:
  - triton:          rlprims.kernels.triton_logprobs_and_entropy (fused, no [N, V] logits);
  - chunked:         rlprims.ops.logprobs_and_entropy (chunk_size 1024, the reference);
  - chunked+compile: the same under torch.compile;
  - eager:           materialized [N, V] logits, fp32 log_softmax, autograd (what a plain HF loss does).
Columns: forward time; forward+backward time; TFLOP/s of forward+backward counting 8·N·H·V (forward
2NHV, backward recompute + two gradient matmuls 6NHV); that as % of a bf16 matmul peak measured in this
run (8192³ torch.mm); peak memory above the inputs during forward+backward, with and without the two
gradients (unavoidable outputs: [N, H] + [V, H] in bf16). Times are medians of CUDA-event timings.

    PYTHONPATH=. python benchmarks/kernels.py              # full table (about 2 minutes on an H100)
    PYTHONPATH=. python benchmarks/kernels.py --quick      # triton + chunked at N = 16384 only
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch

from rlprims.kernels import triton_logprobs_and_entropy
from rlprims.ops.logprobs import logprobs_and_entropy as chunked_logprobs_and_entropy

V = 151936


def eager_logprobs_and_entropy(hidden, weight, targets, *, temperature):
    logits = (hidden @ weight.t()).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def time_ms(fn, *, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_peak_tflops() -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16, generator=g)
    ms = time_ms(lambda: a @ b, warmup=5, reps=20)
    return 2 * 8192**3 / ms / 1e9


def make_inputs(n, h, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # logits with std ≈ 4: a realistic spread (a few dominant tokens, a long tail)
    hidden = (torch.randn(n, h, device="cuda", generator=g) * (4.0 / h**0.5)).bfloat16().requires_grad_(True)
    weight = torch.randn(V, h, device="cuda", generator=g).bfloat16().requires_grad_(True)
    targets = torch.randint(0, V, (n,), device="cuda", generator=g)
    g_lp = torch.randn(n, device="cuda", generator=g)
    g_ent = torch.randn(n, device="cuda", generator=g)
    return hidden, weight, targets, g_lp, g_ent


def measure(fn, n, h, *, warmup, reps):
    hidden, weight, targets, g_lp, g_ent = make_inputs(n, h)

    def fwd():
        with torch.no_grad():
            fn(hidden, weight, targets, temperature=1.0)

    def fwd_bwd():
        lp, ent = fn(hidden, weight, targets, temperature=1.0)
        loss = (lp * g_lp).sum() + (ent * g_ent).sum()
        return torch.autograd.grad(loss, (hidden, weight))

    fwd_ms = time_ms(fwd, warmup=warmup, reps=reps)
    fwd_bwd_ms = time_ms(fwd_bwd, warmup=warmup, reps=reps)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grad_bytes = sum(gr.numel() * gr.element_size() for gr in grads)
    del grads
    return fwd_ms, fwd_bwd_ms, peak / 2**30, (peak - grad_bytes) / 2**30


def check_against_fp64(n, h):
    """max|Δ|/max|exact| of the kernel and of the bf16 chunked reference against fp64 on the same inputs."""
    hidden, weight, targets, g_lp, g_ent = make_inputs(n, h, seed=1)
    outs = []
    for fn, dtype in (
        (chunked_logprobs_and_entropy, torch.float64),
        (triton_logprobs_and_entropy, torch.bfloat16),
        (chunked_logprobs_and_entropy, torch.bfloat16),
    ):
        hh = hidden.detach().to(dtype).requires_grad_(True)
        ww = weight.detach().to(dtype).requires_grad_(True)
        lp, ent = fn(hh, ww, targets, temperature=0.7)
        gh, gw = torch.autograd.grad(
            (lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(lp.dtype)).sum(), (hh, ww)
        )
        outs.append([t.double() for t in (lp, ent, gh, gw)])
    exact = outs[0]
    return [
        [
            (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
            for a, b in zip(got, exact, strict=True)
        ]
        for got in outs[1:]
    ]


def tune(hidden_sizes, n) -> None:
    """Times the forward kernel and the backward (kernel alone, and with the two matmuls) per tile config."""
    from rlprims.kernels import logprobs as k

    configs = [
        dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=64, GROUP_N=8, num_warps=w, num_stages=st)
        for bn, bv, w, st in [
            (128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 3), (256, 128, 8, 4),
            (128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3),
        ]
    ]  # fmt: skip
    for h in hidden_sizes:
        hidden, weight, targets, g_lp, g_ent = (t.detach() for t in make_inputs(n, h))
        lp, ent, lse = k._forward(hidden, weight, targets, 1.0)
        flop = 2 * n * h * V
        for cfg in configs:
            name = (
                f"{cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
            )
            try:
                f = time_ms(lambda: k._forward(hidden, weight, targets, 1.0, cfg), warmup=1, reps=3)
                args = (hidden, weight, targets, lse, ent, g_lp, g_ent, 1.0, 1024)
                b0 = time_ms(lambda: k._backward(*args, False, False, cfg), warmup=1, reps=3)
                b = time_ms(lambda: k._backward(*args, True, True, cfg), warmup=1, reps=3)
            except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is reported
                print(f"# tune H={h} {name}: failed {type(e).__name__}: {str(e)[:80]}")
                continue
            print(
                f"# tune H={h} {name}: fwd {f:.1f} ms ({flop / f / 1e9:.0f} TF/s) | "
                f"bwd dlogits kernel {b0:.1f} ms ({flop / b0 / 1e9:.0f} TF/s) | "
                f"bwd total {b:.1f} ms ({3 * flop / b / 1e9:.0f} TF/s)",
                flush=True,
            )


def measure_row(name, fn, n, h, args, *, peak) -> None:
    try:
        f_ms, fb_ms, extra, extra_ng = measure(fn, n, h, warmup=args.warmup, reps=args.reps)
    except torch.OutOfMemoryError:
        print(f"| {name:<16} | {h:>5} | {n:>6} | out of memory |", flush=True)
        torch.cuda.empty_cache()
        return
    tflops = 8 * n * h * V / fb_ms / 1e9
    print(
        f"| {name:<16} | {h:>5} | {n:>6} | {f_ms:6.1f} | {fb_ms:10.1f} | {tflops:7.0f} | "
        f"{100 * tflops / peak:5.1f}% | {extra:9.2f} | {extra_ng:15.2f} |",
        flush=True,
    )
    torch.cuda.empty_cache()


def run_in_subprocess(name, h, n, args) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--impl", name, "--hidden", str(h), "--tokens", str(n),
           "--warmup", str(args.warmup), "--reps", str(args.reps),
           "--peak", str(args.peak_measured)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    if proc.returncode != 0 or not rows:
        # the exception's own line ("torch.AcceleratorError: CUDA error: ..."), not a C++ stack frame
        err = [ln for ln in proc.stderr.splitlines() if "Error:" in ln and not ln.startswith("frame #")]
        print(
            f"| {name:<16} | {h:>5} | {n:>6} | failed: {(err or ['exit ' + str(proc.returncode)])[-1][:90]} |"
        )
        return False
    for line in rows:
        print(line, flush=True)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="triton and chunked at N = 16384 only")
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 3584])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peak", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["chunked+compile"], help="only this implementation (subprocess)")
    parser.add_argument("--tune", action="store_true", help="time tile configurations of the kernel only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    if args.tune:
        tune(args.hidden, max(args.tokens))
        return

    import triton

    if args.impl:
        for h in args.hidden:
            for n in args.tokens:
                measure_row(
                    args.impl, torch.compile(chunked_logprobs_and_entropy), n, h, args, peak=float(args.peak)
                )
        return
    print(
        f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"{datetime.date.today()} | V = {V}, bf16"
    )
    peak = matmul_peak_tflops()
    args.peak_measured = peak
    print(f"# bf16 matmul peak (8192^3 torch.mm, this run): {peak:.0f} TFLOP/s")
    for h in args.hidden:
        kernel_err, chunked_err = check_against_fp64(1000, h)
        print(
            f"# H={h}, N=1000, τ=0.7: max|Δ|/max|fp64| of (logprobs, entropy, dhidden, dweight): kernel "
            + ", ".join(f"{e:.1e}" for e in kernel_err)
            + " | bf16 chunked reference "
            + ", ".join(f"{e:.1e}" for e in chunked_err)
        )

    impls = {"triton": triton_logprobs_and_entropy, "chunked": chunked_logprobs_and_entropy}
    if not args.quick:
        impls["chunked+compile"] = None  # in a subprocess: an Inductor crash must not end this run
        impls["eager"] = eager_logprobs_and_entropy
    top = max(args.tokens)
    header = (
        f"| {'impl':<16} | {'H':>5} | {'N':>6} | fwd ms | fwd+bwd ms | TFLOP/s | % peak | extra GiB "
        "| excl. grads GiB |"
    )
    if not args.impl:
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for h in args.hidden:
        for name, fn in impls.items():
            if fn is None:
                if not run_in_subprocess(name, h, top, args):
                    run_in_subprocess(name, h, min(args.tokens), args)
                continue
            # the scaling rows (three N) for the kernel and the reference; the others at the largest N
            tokens = args.tokens if name in ("triton", "chunked") and not args.quick else [top]
            for n in tokens:
                measure_row(name, fn, n, h, args, peak=peak)


if __name__ == "__main__":
    main()
