#!/usr/bin/env python
"""Time a peer library's DMD2 training iteration on the same network, batch, precision and update ratio as bench_dmd2.py.

    python bench/peers.py dmd2 PATH_TO_tianweiy_DMD2 --batch_size 128 --ratio 5 --json rows.json
    python bench/peers.py fastgen PATH_TO_NVlabs_FastGen --tiny --json rows.json

Nothing of the peers is copied into this project: their modules are imported from PATH at run time (sys.path insertion).
The network is the EDM DDPM++ SongUNet CIFAR-10 config of bench_dmd2.py (its tiny config with --tiny), built with the peer's
own EDMPrecond class; weights are random (the timing does not depend on them). Work unit: one *cycle* = 1 generator update +
`ratio` fake-score updates, as in our DMD2 (`dfake_gen_update_ratio`): DMD2 does it in `ratio` iterations (guidance every
iteration, generator every ratio-th), FastGen in `ratio + 1` iterations (its `student_update_freq = ratio + 1`: one student
phase, then `ratio` critic phases). images/s = cycles x ratio x batch / seconds, the same count as bench_dmd2.py's images/s.
Modes: 'fp32' (the peer's default) and 'best' (the fastest settings the peer exposes: DMD2 `use_fp16` = bf16 UNet bodies on
CUDA; FastGen `precision_amp=bfloat16` autocast + fused AdamW; both with TF32 on CUDA as their trainers set it).
A package the peer needs and we lack: the JSON is {"skipped": "missing package X (pip install X)"} and the exit status 0.
"""
from __future__ import annotations
import argparse, contextlib, gc, importlib, json, sys, time, types
from pathlib import Path
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent)); sys.path.insert(0, str(HERE))
from distill_nb.core import UserError  # noqa: E402

# what must exist in a checkout (the module the adapter imports first), and the suite flag that names it
PEERS = {'dmd2': ('--peer_dmd2', 'DMD2', 'main/edm/edm_unified_model.py'),
         'fastgen': ('--peer_fastgen', 'FastGen', 'fastgen/methods/distribution_matching/dmd2.py')}
# import name -> pip name, where they differ
PIP_NAMES = {'attr': 'attrs', 'hydra': 'hydra-core', 'yaml': 'pyyaml', 'PIL': 'pillow', 'cv2': 'opencv-python-headless',
             'antlr4': 'antlr4-python3-runtime', 'dateutil': 'python-dateutil', 'sklearn': 'scikit-learn', 'pynvml': 'nvidia-ml-py'}


def check_checkout(peer: str, path) -> Path:
    "The checkout's root, or a one-line UserError naming the suite flag and the file that was expected."
    flag, name, marker = PEERS[peer]
    root = Path(path).expanduser()
    if not (root / marker).is_file(): raise UserError(f'{flag} {path}: not a {name} checkout (expected {marker})')
    return root.resolve()


def missing_package(e: ModuleNotFoundError, root: Path, peer: str) -> str:
    "'missing package X (pip install X)' for a third-party module; a module of the checkout itself is a broken checkout."
    top = (e.name or '').split('.')[0]
    if top and ((root / top).exists() or (root / f"{top}.py").exists()):
        flag, name, marker = PEERS[peer]
        raise UserError(f'{flag} {root}: incomplete {name} checkout ({e.name} cannot be imported)') from e
    return f'missing package {top} (pip install {PIP_NAMES.get(top, top)})'


@contextlib.contextmanager
def on_path(root: Path):
    "Import from the checkout (first on sys.path) for the duration."
    sys.path.insert(0, str(root))
    try: yield
    finally:
        with contextlib.suppress(ValueError): sys.path.remove(str(root))


def tf32(device):
    "Both peers' trainers switch TF32 on for CUDA fp32 (DMD2's Trainer.__init__, FastGen's set_cuda_backend)."
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True; torch.backends.cudnn.benchmark = True


def build_dmd2(root: Path, cfg_net: dict, a, best: bool, device):
    "tianweiy/DMD2: its EDMUniModel (generator + EDMGuidance) on our network config; a function running one cycle."
    uni = importlib.import_module('main.edm.edm_unified_model')
    guid = importlib.import_module('main.edm.edm_guidance')
    nets = importlib.import_module('third_party.edm.training.networks')
    kw = {k: v for k, v in cfg_net.items() if k not in ('img_resolution', 'img_channels', 'label_dim', 'model_type')}

    def net(args=None):  # their EDMPrecond with the same SongUNet config (their get_edm_network only knows ImageNet's ADM)
        return nets.EDMPrecond(img_resolution=cfg_net['img_resolution'], img_channels=cfg_net['img_channels'], label_dim=cfg_net['label_dim'],
                               use_fp16=best, sigma_min=0, sigma_max=float('inf'), sigma_data=0.5, model_type=cfg_net['model_type'], **kw)
    # EDMGuidance reads the teacher with pickle from args.model_id: hand it a freshly built network instead (no file, no pickle)
    guid.get_edm_network = net
    guid.dnnlib = types.SimpleNamespace(util=types.SimpleNamespace(open_url=lambda url: contextlib.nullcontext()))
    guid.pickle = types.SimpleNamespace(load=lambda f: {'ema': net()})
    args = types.SimpleNamespace(model_id='', dataset_name='cifar10', resolution=cfg_net['img_resolution'], label_dim=cfg_net['label_dim'],
                                 use_fp16=best, sigma_data=0.5, sigma_max=80., sigma_min=0.002, rho=7., gan_classifier=False, diffusion_gan=False,
                                 diffusion_gan_max_timestep=0, num_train_timesteps=1000, min_step_percent=0.02, max_step_percent=0.98,
                                 initialie_generator=True)
    model = uni.EDMUniModel(args, None).to(device)
    # the optimisers of their Trainer: AdamW (0.9, 0.999), weight decay 0.01; grad clip 10; lr 2e-6 as our row
    opt_g = torch.optim.AdamW([p for p in model.feedforward_model.parameters() if p.requires_grad], lr=2e-6, betas=(0.9, 0.999), weight_decay=0.01)
    opt_d = torch.optim.AdamW([p for p in model.guidance_model.parameters() if p.requires_grad], lr=2e-6, betas=(0.9, 0.999), weight_decay=0.01)
    B, C, R, L = a.batch_size, cfg_net['img_channels'], cfg_net['img_resolution'], cfg_net['label_dim']
    eye, state = torch.eye(L, device=device), {'step': 0}

    def iteration():  # the order of Trainer.train_one_step (main/edm/train_edm.py) without its data loader and logging
        model.train()
        noise = torch.randn(B, C, R, R, device=device) * 80.
        sigma = torch.ones(B, device=device) * 80.
        labels = eye[torch.randint(0, L, (B,), device=device)]
        gen_turn = state['step'] % a.ratio == 0
        loss_g, log_g = model(noise, sigma, labels, real_train_dict=None, compute_generator_gradient=gen_turn, generator_turn=True, guidance_turn=False)
        if gen_turn:
            loss_g['loss_dm'].backward()
            torch.nn.utils.clip_grad_norm_(model.feedforward_model.parameters(), 10)
            opt_g.step(); opt_g.zero_grad(); opt_d.zero_grad()
        loss_d, _ = model(noise, sigma, labels, real_train_dict=None, compute_generator_gradient=False, generator_turn=False,
                          guidance_turn=True, guidance_data_dict=log_g['guidance_data_dict'])
        loss_d['loss_fake_mean'].backward()
        torch.nn.utils.clip_grad_norm_(model.guidance_model.parameters(), 10)
        opt_d.step(); opt_d.zero_grad(); opt_g.zero_grad()
        state['step'] += 1

    def cycle():
        for _ in range(a.ratio): iteration()
    return cycle, {'peer_iterations_per_cycle': a.ratio, 'settings': 'use_fp16 (bf16 UNet bodies on CUDA)' if best else 'fp32 (mixed_precision "no")'}


def build_fastgen(root: Path, cfg_net: dict, a, best: bool, device):
    "NVlabs/FastGen: DMD2Model from its ModelConfig on our network, stepped by its Trainer.train_step with its grad-clip callback."
    conf = importlib.import_module('fastgen.configs.methods.config_dmd2')
    DMD2Model = importlib.import_module('fastgen.methods').DMD2Model
    Trainer = importlib.import_module('fastgen.trainer').Trainer
    GradClipCallback = importlib.import_module('fastgen.callbacks.grad_clip').GradClipCallback
    log = importlib.import_module('fastgen.utils.logging_utils')
    if hasattr(log, 'set_log_level'): log.set_log_level('WARNING')  # its DEBUG lines (one per clip) would drown the output
    # the DMD2 method defaults (create_config: no LR warm-up, polynomial time sampling), not the experiment's EMAs and W&B
    cfg = conf.create_config().model if hasattr(conf, 'create_config') else conf.ModelConfig()
    for k, v in cfg_net.items():
        if k != 'img_channels' or 'img_channels' in cfg.net: cfg.net[k] = v
    cfg.input_shape = [cfg_net['img_channels'], cfg_net['img_resolution'], cfg_net['img_resolution']]
    cfg.device, cfg.pretrained_model_path, cfg.student_update_freq, cfg.gan_loss_weight_gen = str(device), '', a.ratio + 1, 0.
    cfg.precision, cfg.precision_amp = 'float32', ('bfloat16' if best else None)
    for o in (cfg.net_optimizer, cfg.fake_score_optimizer):
        o.lr = 2e-6
        if best and device.type == 'cuda': o.fused = True
    model = DMD2Model(cfg); model.on_train_begin(); model.init_optimizers()
    clip = GradClipCallback(grad_norm=10.0, model_key='net')  # their default callback list's clip (student only, norm 10)
    callbacks = types.SimpleNamespace(on_backward_begin=lambda *x, **k: None, on_optimizer_step_begin=clip.on_optimizer_step_begin)
    trainer = types.SimpleNamespace(config=types.SimpleNamespace(trainer=types.SimpleNamespace(grad_accum_rounds=1, fsdp=False)), callbacks=callbacks)
    B, C, R, L = a.batch_size, cfg_net['img_channels'], cfg_net['img_resolution'], cfg_net['label_dim']
    state = {'it': 0}

    def cycle():
        for _ in range(a.ratio + 1):
            data = {'real': torch.randn(B, C, R, R, device=device), 'condition': torch.eye(L, device=device)[torch.randint(0, L, (B,), device=device)],
                    'neg_condition': torch.zeros(B, L, device=device)}
            Trainer.train_step(trainer, model, model, data, state['it'], 0)
            state['it'] += 1
    return cycle, {'peer_iterations_per_cycle': a.ratio + 1, 'settings': ('precision_amp=bfloat16, fused AdamW' if device.type == 'cuda' else
                   'precision_amp=bfloat16') if best else 'precision=float32 (default)'}


def time_mode(peer: str, root: Path, cfg_net: dict, a, best: bool, device) -> dict:
    "One mode's row: images/s over a.cycles timed cycles after a.warmup untimed ones."
    from bench_dmd2 import peak_mem
    torch.manual_seed(0); tf32(device)
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
    cycle, info = (build_dmd2 if peer == 'dmd2' else build_fastgen)(root, cfg_net, a, best, device)
    tw = time.perf_counter()
    for _ in range(a.warmup): cycle()
    if device.type == 'cuda': torch.cuda.synchronize(device)
    warm = time.perf_counter() - tw
    t0 = time.perf_counter()
    for _ in range(a.cycles): cycle()
    if device.type == 'cuda': torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {'peer': peer, 'mode': 'best' if best else 'fp32', 'matches': 'fast' if best else 'fp32-eager', **info, 'cycles': a.cycles,
            'images_per_s': a.cycles * a.ratio * a.batch_size / dt, 'sec_per_cycle': dt / a.cycles, 'warmup_s': warm,
            'peak_mem_gib': peak_mem(device)}


def run(peer: str, path, a, device) -> dict | list:
    "The rows of one peer (fp32, then best), or {'skipped': why} when a package it needs is missing."
    from bench_dmd2 import DDPMPP_CIFAR, TINY
    root = check_checkout(peer, path)
    cfg_net = dict(TINY if a.tiny else DDPMPP_CIFAR)
    rows = []
    with on_path(root):
        for best in ([False] if a.no_best else [False, True]):
            try: rows.append(time_mode(peer, root, cfg_net, a, best, device))
            except ModuleNotFoundError as e: return {'peer': peer, 'skipped': missing_package(e, root, peer)}
            except ImportError as e: return {'peer': peer, 'skipped': f'import error (a package version it does not support?): {e}'}
            except RuntimeError as e:  # e.g. out of memory in the best mode: the fp32 row still counts (one GPU run, no retries)
                if not best: raise
                rows.append({'peer': peer, 'mode': 'best', 'matches': 'fast', 'error': f'failed: {str(e).splitlines()[0][:200]}'})
            finally:
                gc.collect()
                if device.type == 'cuda': torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('peer', choices=sorted(PEERS), help='which peer library')
    p.add_argument('path', help='its checkout')
    p.add_argument('--tiny', action='store_true', help="bench_dmd2.py's tiny SongUNet (CPU-friendly)")
    p.add_argument('--batch_size', type=int, default=None, help='per-iteration batch (default 128, tiny 8: as the suite row)')
    p.add_argument('--ratio', type=int, default=5, help='fake-score updates per generator update')
    p.add_argument('--cycles', type=int, default=None, help='timed cycles (default 4, tiny 1)')
    p.add_argument('--warmup', type=int, default=1, help='untimed cycles first')
    p.add_argument('--no_best', action='store_true', help="only the peer's fp32 default")
    p.add_argument('--device', default=None)
    p.add_argument('--json', default=None, help='write the rows here')
    a = p.parse_args(argv)
    from distill_nb.core import get_device, check_positive
    for f in ('ratio', 'warmup'): check_positive(f'--{f}', getattr(a, f), allow_zero=f == 'warmup')
    device = get_device(a.device)
    a.batch_size = a.batch_size or (8 if a.tiny else 128)
    a.cycles = a.cycles or (1 if a.tiny else 4)
    res = run(a.peer, a.path, a, device)
    for r in (res if isinstance(res, list) else [res]):
        print(f"{r['peer']}: skipped: {r['skipped']}" if 'skipped' in r else f"{r['peer']} {r['mode']}: {r['error']}" if 'error' in r else
              f"{r['peer']} {r['mode']:>4} ({r['settings']}): {r['images_per_s']:8.1f} images/s, {r['sec_per_cycle']*1e3:.1f} ms/cycle, "
              f"peak {r['peak_mem_gib']:.2f} GiB")
    if a.json: Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == '__main__':
    from distill_nb.core import run_cli
    run_cli(main, {}, 'peers.py')
