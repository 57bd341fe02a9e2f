#!/usr/bin/env python
"""Benchmark DKDM training: step throughput and peak memory of the student per precision, and the cost of the teacher step vs the student update.

    python bench/bench_dkdm.py                       # ADM CIFAR-10 teacher config (57M) -> 57M student, batch 128 (the cifar10 preset's)
    python bench/bench_dkdm.py --student 14M         # the cifar10 preset's student
    python bench/bench_dkdm.py --tiny                # tiny ADM teacher and student at 8 px, CPU-friendly

One DKDM iteration = one teacher ancestral step on B pool states (no gradients; fp16 autocast on CUDA like the reference's fp16
teacher) + one student update (forward, DKDM loss, backward, AdamW) in the given precision (fp16 uses dynamic loss scaling).
Rows: `teacher step` (TeacherPool.next_batch alone), `student update <prec>` (the Learner update on a fixed teacher batch),
`DKDM step <prec>` (the whole dkdm_fit iteration, EMA included). Weights are random: speed and memory do not depend on them.
Peak memory is torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU (cumulative, so only the first row is meaningful).
"""
import argparse, json, resource, sys, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill_nb.core import get_device
from distill_nb.adm import ADMUNet, adm_kwargs_from_flags
from distill_nb.ddpm import diffusion_from_flags
from distill_nb.dkdm import DKDM_DIFFUSION, TeacherPool, dkdm_fit, get_preset, student_flags

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult='1,2', attention_resolutions='4', num_head_channels=16,
            dropout=0.0)


def peak_mem(device) -> float:
    "Peak memory in GiB (CUDA allocator, else process peak RSS)."
    if device.type == 'cuda': return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def reset_mem(device):
    if device.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)


def make_pool(teacher, diff, B, shape, t_amp, device, seed=0):
    "A dynamic pool of 4B random states at random t (the cost of a step does not depend on the states)."
    g = torch.Generator().manual_seed(seed)
    P = 4 * B
    states = {'x': torch.randn(P, *shape, generator=g), 't': torch.randint(1, diff.num_timesteps, (P,), generator=g)}
    return TeacherPool(teacher, diff, B, 'dynamic', pool=states, amp=t_amp, seed=seed, device=device)


class FixedBatches:
    "The same teacher batch forever: isolates the student update."
    def __init__(self, b): self.b = b
    def __iter__(self):
        while True: yield self.b


def timed(fn, n, device) -> float:
    sync(device); t0 = time.perf_counter()
    for _ in range(n): fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def bench(args, device):
    torch.manual_seed(0)
    pr = get_preset('cifar10')
    tflags = dict(pr['teacher'], **(TINY if args.tiny else {}))
    sflags = student_flags(args.student, **(TINY if args.tiny else {}))
    teacher = ADMUNet(**adm_kwargs_from_flags('teacher', **tflags)).to(device).eval().requires_grad_(False)
    diff = diffusion_from_flags('teacher', **{**DKDM_DIFFUSION, 'timestep_respacing': ''})
    shape = (teacher.in_channels, teacher.image_size, teacher.image_size)
    t_amp = 'fp16' if device.type == 'cuda' else None
    B = args.batch_size
    n_t = sum(p.numel() for p in teacher.parameters()); n_s = sum(p.numel() for p in ADMUNet(**adm_kwargs_from_flags('s', **sflags)).parameters())
    rows = []
    # teacher step alone
    reset_mem(device)
    pool = make_pool(teacher, diff, B, shape, t_amp, device)
    for _ in range(args.warmup): pool.next_batch()
    dt = timed(pool.next_batch, args.iters, device)
    rows.append({'what': f'teacher step ({t_amp or "fp32"})', 'ms': dt * 1e3, 'img_s': B / dt, 'mem': peak_mem(device)})
    batch = pool.next_batch()
    for prec in args.precisions:
        amp = None if prec == 'fp32' else prec
        # student update on a fixed batch
        torch.manual_seed(0); student = ADMUNet(**adm_kwargs_from_flags('student', **sflags))
        reset_mem(device)
        learn = dkdm_fit(teacher, diff, student, FixedBatches(batch), args.warmup, ema=None, amp=amp, device=device)
        dt = timed(lambda: learn.fit(learn.step + 1), args.iters, device)
        rows.append({'what': f'student update {prec}', 'ms': dt * 1e3, 'img_s': B / dt, 'mem': peak_mem(device),
                     'skipped': learn.n_skipped})
        del learn, student
        # the whole DKDM iteration (teacher step + student update + EMA)
        torch.manual_seed(0); student = ADMUNet(**adm_kwargs_from_flags('student', **sflags))
        reset_mem(device)
        learn = dkdm_fit(teacher, diff, student, make_pool(teacher, diff, B, shape, t_amp, device), args.warmup, ema=0.9999, amp=amp,
                         device=device)
        dt = timed(lambda: learn.fit(learn.step + 1), args.iters, device)
        rows.append({'what': f'DKDM step {prec}', 'ms': dt * 1e3, 'img_s': B / dt, 'mem': peak_mem(device), 'skipped': learn.n_skipped})
        del learn, student
    return rows, n_t, n_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tiny', action='store_true', help='tiny ADM teacher/student at 8 px (CPU-friendly)')
    p.add_argument('--student', type=str, default='57M', help='student preset (57M, 44M, 32M, 24M, 14M)')
    p.add_argument('--batch_size', type=int, default=None, help='batch B (default 128 = the cifar10 preset, tiny 16)')
    p.add_argument('--iters', type=int, default=None, help='timed iterations (default 20, tiny 5)')
    p.add_argument('--warmup', type=int, default=None, help='untimed iterations first (default 5, tiny 2)')
    p.add_argument('--precisions', type=str, default=None, help='comma list of fp32,bf16,fp16 (default: all three on CUDA, fp32 on CPU, where fp16 kernels are very slow)')
    p.add_argument('--device', type=str, default=None)
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: 1 with --tiny, avoiding OpenMP spin-waits; else torch default)')
    p.add_argument('--json', default=None, help='also write the rows here')
    args = p.parse_args(argv)
    device = get_device(args.device)
    args.batch_size = args.batch_size or (16 if args.tiny else 128)
    args.iters = args.iters or (5 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 5)
    args.precisions = (args.precisions or ('fp32,bf16,fp16' if device.type == 'cuda' else 'fp32')).split(',')
    for q in args.precisions:
        if q not in ('fp32', 'bf16', 'fp16'): p.error(f'--precisions: {q!r} is not one of fp32, bf16, fp16')
    if device.type == 'cpu' and (args.threads or args.tiny): torch.set_num_threads(args.threads or 1)
    if device.type == 'cuda': torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows, n_t, n_s = bench(args, device)
    print(f'device {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}), torch {torch.__version__}, '
          f'teacher ADM {n_t/1e6:.1f}M, student {"tiny" if args.tiny else args.student} {n_s/1e6:.2f}M, batch {args.batch_size}, '
          f'{args.iters} timed iterations')
    print(f'{"":28s} {"ms/iter":>9s} {"images/s":>10s} {"peak GiB":>9s} {"skipped":>8s}')
    for r in rows:
        print(f'{r["what"]:28s} {r["ms"]:9.1f} {r["img_s"]:10.1f} {r["mem"]:9.2f} {r.get("skipped", ""):>8}')
    t = rows[0]['ms']
    for r in rows:
        if r['what'].startswith('student update'):
            print(f'teacher step / {r["what"]}: {t / r["ms"]:.2f}x')
    if args.json: Path(args.json).write_text(json.dumps([{'mode': r['what'], 'img_s': r['img_s'], 'ms': r['ms'], 'peak_gib': r['mem']} for r in rows], indent=1))
    return rows


if __name__ == '__main__': main()
