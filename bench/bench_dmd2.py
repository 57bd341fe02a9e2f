#!/usr/bin/env python
"""Benchmark DMD2 training throughput, peak memory and one-step vs 35-NFE sampling speed.

    python bench/bench_dmd2.py                 # CIFAR-10 DDPM++ teacher config (55.7M params), fp32 eager vs fast path
    python bench/bench_dmd2.py --tiny          # tiny SongUNet, CPU-friendly
    python bench/bench_dmd2.py --config '{"model_channels": 64}' --batch_size 32 --gan

"fast" = bf16 autocast + channels_last + torch.compile of the trained networks (+ fused AdamW, used on CUDA in both modes).
Peak memory is torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU.
"""
import argparse, json, resource, sys, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_nb.core import get_device
from distill_nb import networks as _networks  # registers SongUNet / DhariwalUNet
from distill_nb.precond import EDMPrecond
from distill_nb.learner import Learner
from distill_nb.dmd2 import DMD2, DMD2Config, dmd2_steps, memory_estimate, format_memory_estimate
from distill_nb.samplers import edm_sampler

DDPMPP_CIFAR = dict(img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet', augment_dim=9, model_channels=128,
                    channel_mult=[2, 2, 2], dropout=0.13, embedding_type='positional', encoder_type='standard',
                    decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1])
TINY = dict(DDPMPP_CIFAR, img_resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
            channel_mult_emb=2, augment_dim=0)


assert _networks.SongUNet


def peak_mem(device) -> float:
    "Peak memory in GiB (CUDA allocator, else process peak RSS)."
    if device.type == 'cuda': return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def bench_train(cfg_net, args, fast: bool, device) -> dict:
    torch.manual_seed(0)
    teacher = EDMPrecond(**cfg_net)
    model = DMD2(teacher, gan_classifier=args.gan, cls_hidden_channels=args.cls_hidden, gen_cls_loss_weight=3e-3 if args.gan else 0.,
                 cls_loss_weight=1e-2, diffusion_gan=args.gan, diffusion_gan_max_timestep=1000 if args.gan else 0).to(device)
    if fast: model = model.to(memory_format=torch.channels_last)
    cfg = DMD2Config(batch=args.batch_size, dfake_gen_update_ratio=args.ratio, warmup_step=0, device=str(device),
                     generator_lr=2e-6, guidance_lr=2e-6, gan_classifier=args.gan)
    real = None
    if args.gan:  # constant real batch; the loader is not what we measure
        x = torch.rand(args.batch_size, 3, cfg_net['img_resolution'], cfg_net['img_resolution']) * 2 - 1
        real = [(x, torch.randint(cfg_net['label_dim'], (args.batch_size,)))] * 1
    learn = Learner({'teacher': model.real, 'generator': model.generator, 'guidance': model.guidance}, dmd2_steps(model, cfg, args.batch_size), real,
                    cbs=[], device=device, amp='bf16' if fast else None, compile=fast and args.compile, batch_size=args.batch_size)
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
    tw = time.perf_counter(); learn.fit(args.warmup)  # includes torch.compile's warm-up: reported apart
    if device.type == 'cuda': torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - tw
    t0 = time.perf_counter(); learn.fit(args.warmup + args.iters)
    if device.type == 'cuda': torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {'mode': 'fast' if fast else 'fp32-eager', 'iters': args.iters, 'images_per_s': args.iters * args.batch_size / dt,
            'sec_per_iter': dt / args.iters, 'peak_mem_gib': peak_mem(device), 'estimate': memory_estimate(model), 'compile_warmup_s': warm_s,
            'mfu': mfu(cfg_net, args, dt / args.iters, device)}


def mfu(cfg_net, args, sec_per_iter: float, device) -> float | None:
    "bf16 model FLOPs utilisation of one iteration (bench/mfu.py's count), None off CUDA or for an unknown GPU."
    from bench_sampling import forward_flops, peak_tflops
    from mfu import iteration_flops
    pk = peak_tflops(device)
    if pk is None: return None
    return iteration_flops(forward_flops(cfg_net), args.batch_size, 'dmd2', args.ratio, args.gan) / sec_per_iter / (pk * 1e12)


@torch.no_grad()
def bench_sampling(cfg_net, args, device) -> dict:
    torch.manual_seed(0)
    net = EDMPrecond(**cfg_net).to(device).eval()
    z = torch.randn(args.sample_batch, cfg_net['img_channels'], cfg_net['img_resolution'], cfg_net['img_resolution'], device=device)
    y = torch.eye(cfg_net['label_dim'], device=device)[torch.randint(cfg_net['label_dim'], (args.sample_batch,), device=device)]
    out = {}
    for name, fn in [('one_step', lambda: net(80 * z, torch.full((len(z),), 80., device=device), y)),
                     ('heun_35nfe', lambda: edm_sampler(net, z, y, num_steps=18))]:
        fn()
        if device.type == 'cuda': torch.cuda.synchronize(device)
        t0 = time.perf_counter(); n = args.sample_reps
        for _ in range(n): fn()
        if device.type == 'cuda': torch.cuda.synchronize(device)
        out[name] = n * len(z) / (time.perf_counter() - t0)
    out['speedup'] = out['one_step'] / out['heun_35nfe']
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tiny', action='store_true', help='tiny SongUNet (CPU-friendly)')
    p.add_argument('--net', default=None, choices=['cifar10', 'imagenet64'], help='teacher config: EDM CIFAR-10 DDPM++ (default) or ImageNet-64 ADM')
    p.add_argument('--no_sampling', action='store_true', help='skip the one-step vs Heun sampling timing')
    p.add_argument('--json', default=None, help='also write the rows here')
    p.add_argument('--config', type=str, default=None, help='JSON overrides of the EDMPrecond/SongUNet config')
    p.add_argument('--batch_size', type=int, default=None, help='per-iteration batch (default 64 CIFAR, 8 tiny)')
    p.add_argument('--iters', type=int, default=None, help='timed iterations (default 20, tiny 6)')
    p.add_argument('--warmup', type=int, default=None, help='untimed iterations first (default 5, tiny 2)')
    p.add_argument('--ratio', type=int, default=5, help='dfake_gen_update_ratio')
    p.add_argument('--gan', action='store_true', help='with the GAN head and diffusion GAN')
    p.add_argument('--cls_hidden', type=int, default=768, help='GAN head width')
    p.add_argument('--no_fast', action='store_true', help='only fp32 eager')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None, help='torch.compile in the fast path (default: on CUDA)')
    p.add_argument('--sample_batch', type=int, default=None, help='sampling batch (default 64, tiny 8)')
    p.add_argument('--sample_reps', type=int, default=3, help='timed sampling repetitions')
    p.add_argument('--device', type=str, default=None)
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (CPU; 1 is fastest for --tiny on a shared CPU)')
    args = p.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    device = get_device(args.device)
    from bench_sampling import NETS
    base = TINY if args.tiny else NETS['imagenet64'] if args.net == 'imagenet64' else DDPMPP_CIFAR
    cfg_net = dict(base, **(json.loads(args.config) if args.config else {}))
    args.batch_size = args.batch_size or (8 if args.tiny else 64)
    args.iters = args.iters or (6 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 5)
    args.sample_batch = args.sample_batch or (8 if args.tiny else 64)
    if args.compile is None: args.compile = device.type == 'cuda'
    n = sum(p.numel() for p in EDMPrecond(**cfg_net).parameters())
    print(f'device {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}), torch {torch.__version__}, '
          f'threads {torch.get_num_threads()}, teacher {cfg_net["model_type"]} {n/1e6:.2f}M params, batch {args.batch_size}, '
          f'ratio {args.ratio}, gan {args.gan}')
    rows = [bench_train(cfg_net, args, False, device)]
    print(format_memory_estimate(rows[0]['estimate']))
    if not args.no_fast: rows.append(bench_train(cfg_net, args, True, device))
    for r in rows:
        print(f"train {r['mode']:>10}: {r['images_per_s']:8.1f} images/s ({r['sec_per_iter']*1e3:.1f} ms/iter), peak memory {r['peak_mem_gib']:.2f} GiB")
    s = None
    if not args.no_sampling:
        s = bench_sampling(cfg_net, args, device)
        print(f"sampling: one-step {s['one_step']:.1f} images/s, 35-NFE Heun {s['heun_35nfe']:.1f} images/s, speed-up {s['speedup']:.1f}x")
    if len(rows) == 2: rows[1]['speedup'] = rows[1]['images_per_s'] / rows[0]['images_per_s']
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != 'estimate'} for r in rows] + ([{'mode': 'sampling', **s}] if s else []), indent=1))
    return rows, s


if __name__ == '__main__': main()
