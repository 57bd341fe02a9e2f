#!/usr/bin/env python
"""Sampling throughput: one-step generator vs EDM's 35-evaluation Heun sampler (images/s, peak memory).

    python bench/bench_sampling.py --tiny                        # tiny SongUNet on CPU (seconds)
    python bench/bench_sampling.py --device cuda --net cifar10   # EDM CIFAR-10 DDPM++ (55.7M), one-step batch 1024
    python bench/bench_sampling.py --device cuda --net imagenet64 --batch 256 --heun_batch 256
    python bench/bench_sampling.py --config '{"model_channels": 64}' --net cifar10

One step = one network evaluation G(80 z; 80, y) (DMD2 / GDD / consistency one-step generators have the teacher's
architecture, so the teacher network with random weights times the same work). Heun = `edm_sampler(num_steps=18)`,
i.e. 18 steps, 2 evaluations each except the last: 35 NFE (Karras et al. 2022, Algorithm 1). Weights are random:
only speed is measured. `--amp bf16` runs the network under bf16 autocast (the sampler's ODE arithmetic stays float64).
MFU = achieved FLOP/s / the GPU's dense bf16 peak, with FLOPs = images/s x NFE x forward FLOPs per image (counted with
torch's FlopCounterMode on the meta device: 2 x multiply-adds of matmuls and convolutions).
Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU (a high-water mark, so the
one-step and Heun rows share it on CPU).
"""
import argparse, contextlib, json, resource, sys, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill_nb.core import get_device
import distill_nb.networks  # noqa: F401  (registers SongUNet / DhariwalUNet)
from distill_nb.precond import EDMPrecond
from distill_nb.samplers import edm_sampler, one_step_sample

NETS = {
    # EDM's edm-cifar10-32x32-cond-vp (DDPM++), 55.7M parameters
    'cifar10': dict(img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet', augment_dim=9, model_channels=128,
                    channel_mult=[2, 2, 2], dropout=0.13, embedding_type='positional', encoder_type='standard',
                    decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1]),
    # EDM's edm-imagenet-64x64-cond-adm (ADM), 295.9M parameters
    'imagenet64': dict(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet', model_channels=192,
                       channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.0),
    # tiny SongUNet for CPU smoke figures
    'tiny': dict(img_resolution=16, img_channels=3, label_dim=10, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[8], channel_mult_emb=2, augment_dim=0, dropout=0.0),
}


# dense bf16 tensor-core peaks in TFLOP/s (no sparsity), for MFU
PEAK_BF16_TFLOPS = {'H200': 989., 'H100': 989., 'A100': 312., 'L40S': 362., 'A10': 125., 'RTX 4090': 165., 'V100': 125.}


def peak_tflops(device) -> float | None:
    "Dense bf16 peak of the CUDA device (None on CPU or for an unknown GPU: give --peak_tflops)."
    if device.type != 'cuda': return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def forward_flops(cfg: dict) -> float:
    "FLOPs of one forward pass per image (2 x multiply-adds of matmuls/convolutions, torch FlopCounterMode on the meta device)."
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'): net = EDMPrecond(**cfg).eval()
    R, L = cfg['img_resolution'], cfg['label_dim']
    x = torch.empty(1, cfg['img_channels'], R, R, device='meta')
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, torch.full((1,), 2.0, device='meta'), torch.zeros(1, L, device='meta') if L else None)
    return float(fc.get_total_flops())


def peak_mem_gib(device) -> float:
    "Peak memory in GiB (CUDA allocator, else the process's peak RSS)."
    if device.type == 'cuda': return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


@torch.no_grad()
def time_sampler(fn, n_images: int, reps: int, device) -> tuple[float, float]:
    "Images/s and peak memory of `fn()` (one warm-up call, then `reps` timed calls)."
    fn(); sync(device)
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(reps): fn()
    sync(device)
    return reps * n_images / (time.perf_counter() - t0), peak_mem_gib(device)


def bench(cfg: dict, device, batch: int, heun_batch: int, reps: int, heun_reps: int, amp: str | None = None, steps: int = 18,
          cuda_graphs: bool = False) -> dict:
    "One-step vs Heun (2·steps−1 NFE) images/s for a random-weight EDMPrecond of config `cfg`."
    torch.manual_seed(0)
    net = EDMPrecond(**cfg).to(device).eval()
    one_net, warm_s = net, 0.
    if cuda_graphs:  # one-step sampling is launch-bound at small sizes: compile with CUDA graphs (warm-up timed separately)
        one_net = torch.compile(net, mode='reduce-overhead' if device.type == 'cuda' else 'default')
    ac = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == 'bf16' else contextlib.nullcontext
    def inputs(b):
        z = torch.randn(b, cfg['img_channels'], cfg['img_resolution'], cfg['img_resolution'], device=device)
        y = torch.eye(cfg['label_dim'], device=device)[torch.randint(cfg['label_dim'], (b,), device=device)] if cfg['label_dim'] else None
        return z, y
    z1, y1 = inputs(batch); zh, yh = inputs(heun_batch)
    def one():
        with ac(): return one_step_sample(one_net, z1, y1, sigma=80.)
    if cuda_graphs:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(3): one()  # compile + graph capture
        sync(device); warm_s = time.perf_counter() - t0
    def heun():
        with ac(): return edm_sampler(net, zh, yh, num_steps=steps)
    one_ips, one_mem = time_sampler(one, batch, reps, device)
    heun_ips, heun_mem = time_sampler(heun, heun_batch, heun_reps, device)
    F = forward_flops(cfg)
    return {'gflop_per_forward': F / 1e9, 'one_step_tflops': one_ips * F / 1e12, 'heun_tflops': heun_ips * (2 * steps - 1) * F / 1e12, 'params_M': sum(p.numel() for p in net.parameters()) / 1e6, 'one_step_batch': batch, 'one_step_img_s': one_ips,
            'one_step_peak_gib': one_mem, 'heun_nfe': 2 * steps - 1, 'heun_batch': heun_batch, 'heun_img_s': heun_ips,
            'heun_peak_gib': heun_mem, 'speedup': one_ips / heun_ips, 'amp': amp or 'fp32', 'device': str(device),
            'one_step_compiled': ('reduce-overhead' if device.type == 'cuda' else 'default') if cuda_graphs else None, 'compile_warmup_s': warm_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tiny', action='store_true', help='tiny SongUNet on CPU, small batches')
    p.add_argument('--net', default=None, choices=sorted(NETS), help='network config (default: cifar10, tiny with --tiny)')
    p.add_argument('--config', default=None, help='JSON overrides of the network config')
    p.add_argument('--batch', type=int, default=None, help='one-step batch (default 1024; tiny 32)')
    p.add_argument('--heun_batch', type=int, default=None, help='Heun batch (default 1024 on CUDA, 64 on CPU; tiny 32)')
    p.add_argument('--reps', type=int, default=None, help='timed one-step calls (default 10; tiny 3)')
    p.add_argument('--heun_reps', type=int, default=None, help='timed Heun calls (default 2; tiny 1)')
    p.add_argument('--steps', type=int, default=18, help='Heun steps (NFE = 2*steps - 1)')
    p.add_argument('--amp', default=None, choices=['bf16'], help='bf16 autocast for the network')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--device', default=None, help='cpu | cuda (default: cuda if available; cpu with --tiny)')
    p.add_argument('--peak_tflops', type=float, default=None, help='bf16 peak of the GPU for MFU (default: known GPUs)')
    p.add_argument('--json', default=None, help='also write the result here')
    p.add_argument('--cuda_graphs', action='store_true', help="one-step sampling through torch.compile(mode='reduce-overhead') (CUDA graphs)")
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    device = get_device(a.device or ('cpu' if a.tiny else None))
    name = a.net or ('tiny' if a.tiny else 'cifar10')
    cfg = dict(NETS[name], **(json.loads(a.config) if a.config else {}))
    batch = a.batch or (32 if a.tiny else 1024)
    heun_batch = a.heun_batch or (32 if a.tiny else (1024 if device.type == 'cuda' else 64))
    reps, heun_reps = a.reps or (3 if a.tiny else 10), a.heun_reps or (1 if a.tiny else 2)
    r = dict(net=name, torch=torch.__version__, threads=torch.get_num_threads(),
             **bench(cfg, device, batch, heun_batch, reps, heun_reps, a.amp, a.steps, a.cuda_graphs))
    dev = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f"{name} ({r['params_M']:.2f}M params) on {dev}, torch {r['torch']}, {r['amp']}, {r['threads']} threads")
    print(f"one-step  batch {batch:5d}: {r['one_step_img_s']:10.1f} images/s, peak {r['one_step_peak_gib']:.2f} GiB")
    print(f"Heun {r['heun_nfe']} NFE batch {heun_batch:4d}: {r['heun_img_s']:10.1f} images/s, peak {r['heun_peak_gib']:.2f} GiB")
    print(f"speed-up one-step / Heun: {r['speedup']:.1f}x; forward {r['gflop_per_forward']:.2f} GFLOP/image; achieved "
          f"{r['one_step_tflops']:.2f} (one-step) and {r['heun_tflops']:.2f} (Heun) TFLOP/s")
    pk = a.peak_tflops or peak_tflops(device)
    if pk:
        r['peak_tflops'], r['one_step_mfu'], r['heun_mfu'] = pk, r['one_step_tflops'] / pk, r['heun_tflops'] / pk
        print(f"MFU against the {pk:g} TFLOP/s bf16 peak: one-step {100*r['one_step_mfu']:.1f}%, Heun {100*r['heun_mfu']:.1f}%")
    if a.json: Path(a.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == '__main__': main()
