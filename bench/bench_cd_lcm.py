"""Benchmark consistency distillation (CD) and latent consistency distillation (LCM) in distill_nb.

Measures, for the real training code (`cd.cd_learner`, `lcm.lcm_learner`):
  * training-step throughput (samples/s, ms/step) and peak GPU memory, fp32 vs the fast path
    (bf16 autocast + channels_last + fused AdamW [+ torch.compile with --compile]);
  * sampling time of the distilled student at 1, 2 and 4 steps vs the teacher's 35-evaluation Heun sampler (18 steps).

Usage:
  python bench/bench_cd_lcm.py --tiny                 # CPU smoke run, tiny networks (seconds)
  python bench/bench_cd_lcm.py --device cuda           # CIFAR-size EDM (DDPM++ 56M) and MicroDiT_XL_2 at 256 px
  python bench/bench_cd_lcm.py --device cuda --lcm_res 64 --compile
Prints a table (and writes JSON with --out).
"""
import argparse, json, sys, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distill_nb.precond import EDMPrecond
import distill_nb.networks  # noqa: F401 (registers SongUNet)
from distill_nb.cd import consistency_from_teacher, ConsistencyDistillationLoss, cd_learner
from distill_nb.samplers import consistency_sampler, edm_sampler
from distill_nb.microdit import microdit_kwargs, latent_teacher, latent_student_from_teacher, count_parameters
from distill_nb.lcm import LCMLoss, lcm_learner, lcm_sample, teacher_sample
from distill_nb.learner import ResumableLoader


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def edm_teacher(tiny, dev):
    kw = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], res=16) if tiny else \
         dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], res=32)
    res = kw.pop('res')
    torch.manual_seed(0)
    net = EDMPrecond(res, 3, label_dim=10, model_type='SongUNet', dropout=0.0, augment_dim=9, embedding_type='positional',
                     encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], **kw)
    return net.to(dev).eval().requires_grad_(False)


def apply_fast(net, fast, dev):
    if fast and dev.type == 'cuda': net = net.to(memory_format=torch.channels_last)
    return net


def time_fit(learn, warmup, steps, dev):
    learn.fit(warmup); sync(dev)
    if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter(); learn.fit(warmup + steps); sync(dev)
    dt = (time.perf_counter() - t) / steps
    mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == 'cuda' else float('nan')
    return dt, mem


def time_fn(fn, dev, reps=3):
    fn(); sync(dev)
    t = time.perf_counter()
    for _ in range(reps): fn()
    sync(dev)
    return (time.perf_counter() - t) / reps


def bench_cd(args, dev, fast, compile_):
    teacher = edm_teacher(args.tiny, dev)
    student = apply_fast(consistency_from_teacher(teacher), fast, dev)
    B, R = args.cd_batch, teacher.img_resolution
    data = torch.utils.data.TensorDataset(torch.randn(max(4 * B, 64), 3, R, R).clamp(-1, 1), torch.randint(0, 10, (max(4 * B, 64),)))
    loss = ConsistencyDistillationLoss(teacher, num_scales=18, distance='l2')
    learn = cd_learner(student, teacher, ResumableLoader(data, B, seed=0), loss, lr=1e-5, target_ema=0.95, ema=0.9999,
                       optimizer='adam', device=dev, amp='bf16' if fast else None,
                       compile=compile_)
    if fast and dev.type == 'cuda':  # fused AdamW
        learn.steps[0].opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    dt, mem = time_fit(learn, args.warmup, args.steps, dev)
    return dict(task='CD train step', mode=mode_name(fast, compile_), batch=B, ms=dt * 1e3, samples_s=B / dt, peak_gib=mem,
                params_m=count_parameters(student) / 1e6), teacher, student


def bench_lcm(args, dev, fast, compile_):
    name = 'micro' if args.tiny else 'MicroDiT_XL_2'
    res = 8 if args.tiny else args.lcm_res
    kw = microdit_kwargs(name, input_size=res, pos_interp_scale=res / 32 if not args.tiny else 1.0)
    L, Dc = (5, kw['caption_channels'])
    torch.manual_seed(0)
    teacher = latent_teacher(kw, caption_len=L).to(dev).eval().requires_grad_(False)
    student = latent_student_from_teacher(teacher)
    B, mb = args.lcm_batch, args.lcm_micro
    n = max(2 * B, 32)
    data = torch.utils.data.TensorDataset(torch.randn(n, 4, res, res), torch.randn(n, L, Dc))
    learn = lcm_learner(student, teacher, ResumableLoader(data, B, seed=0), LCMLoss(teacher, num_scales=40), lr=8e-5, micro_batch=mb,
                        target_ema=0.99, device=dev, amp='bf16' if fast else None, compile=compile_)
    if fast and dev.type == 'cuda':
        learn.steps[0].opt = torch.optim.AdamW(student.parameters(), lr=8e-5, fused=True)
    dt, mem = time_fit(learn, args.warmup, args.steps, dev)
    return dict(task=f'LCM train step ({name} {res}x{res})', mode=mode_name(fast, compile_), batch=f'{B}/{mb}', ms=dt * 1e3,
                samples_s=B / dt, peak_gib=mem, params_m=count_parameters(student) / 1e6), teacher, student


FAST_NAME = 'bf16+cl+fused'  # CPU: bf16 autocast only (channels_last/fused AdamW are CUDA-only here)

def mode_name(fast, compile_): return (FAST_NAME if fast else 'fp32') + ('+compile' if compile_ else '')


def sampling_rows(task, teacher, student, dev, B, fast, lcm=False, y=None):
    rows, ctx = [], (torch.autocast(dev.type, dtype=torch.bfloat16) if fast else torch.autocast(dev.type, enabled=False))
    shape = (B, student.img_channels, student.img_resolution, student.img_resolution)
    z = torch.randn(shape, device=dev)
    lab = torch.eye(10, device=dev)[torch.arange(B, device=dev) % 10] if not lcm else None
    with torch.no_grad(), ctx:
        if lcm: t_fn = lambda: teacher_sample(teacher, z.double(), y, 7.0, num_steps=18)
        else: t_fn = lambda: edm_sampler(teacher, z.double(), lab, num_steps=18)
        rows.append(dict(task=f'{task} sampling', mode=mode_name(fast, False) + ' teacher Heun 35 NFE' + (' (CFG x2 batch)' if lcm else ''),
                         batch=B, ms=time_fn(t_fn, dev) * 1e3))
        for n in (1, 2, 4):
            if lcm: s_fn = lambda n=n: lcm_sample(student, z, y, 7.0, n)
            else: s_fn = lambda n=n: consistency_sampler(student, z, lab, sigmas=[80.0, 17.53, 2.515, 0.17][:n] if n > 1 else [80.0])
            rows.append(dict(task=f'{task} sampling', mode=mode_name(fast, False) + f' student {n} step', batch=B, ms=time_fn(s_fn, dev) * 1e3))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--tiny', action='store_true', help='tiny networks on CPU')
    ap.add_argument('--device', default=None, help='cpu | cuda (default: cuda if available, cpu with --tiny)')
    ap.add_argument('--compile', action='store_true', help='also run the fast path with torch.compile')
    ap.add_argument('--steps', type=int, default=None, help='timed training steps')
    ap.add_argument('--warmup', type=int, default=None, help='untimed training steps')
    ap.add_argument('--cd_batch', type=int, default=None); ap.add_argument('--lcm_batch', type=int, default=None)
    ap.add_argument('--lcm_micro', type=int, default=None); ap.add_argument('--lcm_res', type=int, default=32, help='latent side (32: 256 px, 64: 512 px)')
    ap.add_argument('--skip_lcm', action='store_true'); ap.add_argument('--skip_cd', action='store_true')
    ap.add_argument('--out', default=None, help='write the rows as JSON here')
    args = ap.parse_args()
    dev = torch.device(args.device or ('cpu' if args.tiny or not torch.cuda.is_available() else 'cuda'))
    global FAST_NAME
    if dev.type != 'cuda': FAST_NAME = 'bf16 autocast'
    if args.tiny: torch.set_num_threads(1)  # tiny networks: one thread avoids oversubscription
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.cd_batch = args.cd_batch or (8 if args.tiny else 128)
    args.lcm_batch = args.lcm_batch or (8 if args.tiny else 64)
    args.lcm_micro = args.lcm_micro or (4 if args.tiny else 16)
    modes = [(False, False)] + ([(True, False)] if dev.type == 'cuda' or args.tiny else []) + ([(True, True)] if args.compile else [])
    rows = []
    for fast, comp in modes:
        if not args.skip_cd:
            r, t, s = bench_cd(args, dev, fast, comp); rows.append(r); print(r, flush=True)
            if not comp: rows += sampling_rows('CD', t, s, dev, args.cd_batch, fast)
            del t, s
        if not args.skip_lcm:
            r, t, s = bench_lcm(args, dev, fast, comp); rows.append(r); print(r, flush=True)
            if not comp:
                y = torch.randn(args.lcm_micro, t.caption_len, t.caption_channels, device=dev)
                rows += sampling_rows('LCM', t, s, dev, args.lcm_micro, fast, lcm=True, y=y)
            del t, s
        if dev.type == 'cuda': torch.cuda.empty_cache()
    print(f'\ndevice: {torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}, torch {torch.__version__}')
    print(f'{"task":<42} {"mode":<44} {"batch":>7} {"ms":>10} {"samples/s":>10} {"peak GiB":>9} {"params M":>9}')
    for r in rows:
        f = lambda k, fmt: (fmt % r[k]) if k in r and r[k] == r[k] else '-'
        print(f'{r["task"]:<42} {r["mode"]:<44} {str(r["batch"]):>7} {f("ms", "%.1f"):>10} {f("samples_s", "%.1f"):>10} '
              f'{f("peak_gib", "%.2f"):>9} {f("params_m", "%.1f"):>9}')
    if args.out: Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
