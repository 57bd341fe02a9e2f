#!/usr/bin/env python
"""Model FLOPs utilisation (MFU) of a distillation training iteration from a measured time per iteration.

    python bench/mfu.py --net cifar10 --batch 128 --ms_per_iter 310 --peak_tflops 989          # DMD2, ratio 5
    python bench/mfu.py --net imagenet64 --batch 40 --ms_per_iter 420 --peak_tflops 989 --gan

MFU = model FLOPs per iteration / seconds per iteration / peak dense bf16 FLOP/s (H100/H200 SXM: 989 TFLOP/s).
Model FLOPs count only the useful work, with F = forward FLOPs per image of the network (2 x multiply-adds of matmuls
and convolutions, FlopCounterMode on the meta device) and backward = 2 F:
  DMD2 iteration, ratio r, per-process batch B (no GAN):
    guidance update every iteration: generator forward (F) + fake-score forward and backward (3F)        = 4F
    generator update every r-th:   generator forward+backward (3F) + real and fake score forwards (2F)
                                   - the generator forward the guidance update then reuses (F)          = 4F / r
    per iteration: B (4 + 4/r) F;  with --gan add the discriminator on real and fake bottlenecks (~the encoder, counted
    as 0.5F forward + 1F backward per image for each of real and fake in the guidance update, and 1.5F / r for the
    generator's GAN term): B (3 + 1.5/r) F more.
  EDM training step: B x 3F.
Multiply by the number of processes for the global FLOPs and compare with n_gpus x peak (the figure is per GPU either way).
"""
import argparse, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_sampling import NETS, forward_flops


def iteration_flops(F: float, B: int, method: str = 'dmd2', ratio: int = 5, gan: bool = False) -> float:
    "Model FLOPs of one training iteration on one process."
    if method == 'edm': return 3 * B * F
    f = B * (4 + 4 / ratio) * F
    if gan: f += B * (3 + 1.5 / ratio) * F
    return f


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--net', default='cifar10', choices=sorted(NETS))
    p.add_argument('--method', default='dmd2', choices=['dmd2', 'edm'])
    p.add_argument('--batch', type=int, required=True, help='per-process batch')
    p.add_argument('--ratio', type=int, default=5, help='DMD2 dfake_gen_update_ratio')
    p.add_argument('--gan', action='store_true', help='DMD2 with the GAN head')
    p.add_argument('--ms_per_iter', type=float, required=True, help='measured milliseconds per iteration')
    p.add_argument('--peak_tflops', type=float, default=989., help='dense bf16 peak of one GPU (H100/H200: 989)')
    a = p.parse_args(argv)
    F = forward_flops(NETS[a.net])
    fl = iteration_flops(F, a.batch, a.method, a.ratio, a.gan)
    mfu = fl / (a.ms_per_iter / 1e3) / (a.peak_tflops * 1e12)
    print(f'{a.net}: forward {F/1e9:.2f} GFLOP/image; {a.method} iteration at batch {a.batch}: {fl/1e12:.2f} TFLOP; '
          f'{fl/(a.ms_per_iter/1e3)/1e12:.1f} TFLOP/s achieved; MFU {100*mfu:.1f}% of {a.peak_tflops:g} TFLOP/s')
    return mfu


if __name__ == '__main__': main()
