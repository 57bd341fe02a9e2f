#!/usr/bin/env python
"""Every row of the GPU benchmark table in one command, within a time budget.

    python bench/suite.py --device cuda --budget_s 420     # the GPU table of nbs/95_benchmarks (H100/H200 class: ~6 minutes)
    python bench/suite.py --tiny                           # the same rows with tiny networks on CPU (CI: under a minute)
    python bench/suite.py --device cuda --budget_s 420 --peer_dmd2 PATH --peer_fastgen PATH   # + the peers, side by side

With --peer_dmd2 (a checkout of tianweiy/DMD2) and/or --peer_fastgen (a checkout of NVlabs/FastGen), bench/peers.py times
THEIR DMD2 iteration on the same network, batch, precision and update ratio as our first DMD2 row, importing their code from
PATH at run time, and the suite records ours/theirs (images/s) next to our row: our fp32 eager against their fp32 default,
our fast path against the best settings they expose. A peer that needs a package we lack is reported as skipped.

Each row is one of the bench/ scripts run in its own process (clean peak-memory figures, a crash or an out-of-memory ends only
that row), with a per-row time cap; rows that no longer fit in the remaining budget are skipped and listed as such. Within a
row every script reports fp32 eager and the fast path (bf16 autocast + channels_last + torch.compile + fused AdamW) and excludes
compile warm-up from its timings. Results: bench/results/<gpu>-<date>.json (every number each script printed, plus the
machine) and the same name .md (the table pasted into nbs/95_benchmarks).
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, re, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(HERE))  # bench/peers.py and distill_nb.core

# name, script, GPU arguments, tiny CPU arguments, flag that names the JSON output, time cap on the GPU (s)
ROWS = [
    ('DMD2 CIFAR-10 DDPM++ 55.7M, batch 128, ratio 5', 'bench_dmd2.py', ['--batch_size', '128', '--ratio', '5'],
     ['--tiny', '--iters', '2', '--warmup', '1', '--no_sampling'], '--json', 90),
    ('DMD2 CIFAR-10 + GAN head', 'bench_dmd2.py', ['--batch_size', '128', '--ratio', '5', '--gan'],
     ['--tiny', '--iters', '2', '--warmup', '1', '--gan', '--cls_hidden', '32', '--no_sampling'], '--json', 90),
    ('DMD2 ImageNet-64 ADM 295.9M, batch 40', 'bench_dmd2.py', ['--net', 'imagenet64', '--batch_size', '40', '--ratio', '5', '--no_sampling'],
     ['--tiny', '--iters', '2', '--warmup', '1', '--no_sampling'], '--json', 120),
    ('GDD vs GDD-I (freeze levels 0 and 3)', 'bench_gdd.py', ['--levels', '0,3'], ['--tiny', '--levels', '0,3', '--iters', '2'], '--json', 90),
    ('CD and LCM steps; 1/2/4-step sampling', 'bench_cd_lcm.py', ['--compile'], ['--tiny', '--steps', '2'], '--out', 120),
    ('DKDM student update and teacher step', 'bench_dkdm.py', [], ['--tiny', '--iters', '2'], '--json', 90),
    ('Sampling: one step vs 35-NFE Heun, batch 1024', 'bench_sampling.py', ['--net', 'cifar10', '--batch', '1024', '--amp', 'bf16', '--cuda_graphs'],
     ['--tiny', '--reps', '1', '--heun_reps', '1'], '--json', 60),
]
SCALING = ('1 vs N processes (DDP)', 'bench_scaling.py', [], ['--tiny', '--iters', '2'], '--json', 120)
OUR_DMD2 = ROWS[0][0]  # the row the peers are matched to (network, batch, ratio; fp32 eager vs fp32, fast vs best)
PEER_NAMES = {'dmd2': 'tianweiy/DMD2', 'fastgen': 'NVlabs/FastGen'}


def peer_row(peer: str, path: str) -> tuple:
    "A suite row timing a peer's DMD2 iteration with bench/peers.py, matched to OUR_DMD2."
    return (f'peer {PEER_NAMES[peer]} DMD2, same network/batch/ratio as our row', 'peers.py',
            [peer, str(path), '--batch_size', '128', '--ratio', '5'], [peer, str(path), '--tiny', '--ratio', '5'], '--json', 150)


def add_peer_ratios(results: list[dict]) -> list[dict]:
    "Put ours/theirs (images/s, matched modes) on every peer item; the list of ratios for the JSON and the console."
    ours = next((r for r in results if r['row'] == OUR_DMD2 and r['status'] == 'ok'), None)
    by_mode = {it.get('mode'): it for it in ours['results'] if isinstance(it, dict)} if ours else {}
    ratios = []
    for r in results:
        if r.get('peer') is None or r['status'] != 'ok': continue
        for it in r['results']:
            o = by_mode.get(it['matches'])
            if o is None or not it.get('images_per_s'): continue
            it['ours_images_per_s'] = o['images_per_s']
            it['ratio_ours_over_theirs'] = o['images_per_s'] / it['images_per_s']
            ratios.append({'peer': r['peer'], 'ours': it['matches'], 'theirs': it['mode'], 'settings': it.get('settings'),
                           'ratio_ours_over_theirs': it['ratio_ours_over_theirs']})
    return ratios


def machine(device: str) -> dict:
    "What the numbers were measured on."
    import torch
    m = {'host': platform.node(), 'python': platform.python_version(), 'torch': torch.__version__, 'device': device,
         'cpu': platform.processor() or platform.machine(), 'cpus': os.cpu_count(), 'date': datetime.date.today().isoformat()}
    if device.startswith('cuda') and torch.cuda.is_available():
        m.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                 gpu_mem_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), cuda=torch.version.cuda)
    return m


def run_row(row: tuple, tiny: bool, device: str, cap_s: float, env: dict) -> dict:
    "Run one benchmark script in its own process; its JSON rows, or why there are none."
    name, script, gpu_args, tiny_args, json_flag, _ = row
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / 'rows.json'
        args = (tiny_args if tiny else gpu_args + ['--device', device]) + [json_flag, str(out)]
        cmd = [sys.executable, str(HERE / script), *args]
        t0 = time.perf_counter()
        try: p = subprocess.run(cmd, capture_output=True, text=True, timeout=cap_s, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            return {'row': name, 'status': f'stopped at the {cap_s:.0f} s cap', 'cmd': cmd, 'seconds': cap_s,
                    'stdout_tail': (e.stdout or b'')[-2000:].decode(errors='replace') if isinstance(e.stdout, bytes) else (e.stdout or '')[-2000:]}
        dt = time.perf_counter() - t0
        res = {'row': name, 'cmd': cmd, 'seconds': round(dt, 1), 'stdout_tail': p.stdout[-3000:]}
        if p.returncode != 0: return {**res, 'status': f'failed (exit {p.returncode})', 'stderr_tail': p.stderr[-3000:]}
        if not out.exists(): return {**res, 'status': f'no JSON written ({json_flag})'}
        got = json.loads(out.read_text())
        if isinstance(got, dict) and 'skipped' in got: return {**res, 'status': f"skipped: {got['skipped']}"}
        return {**res, 'status': 'ok', 'results': got}


def _num(v, fmt='%.1f'):
    return fmt % v if isinstance(v, (int, float)) and v == v else '-'


def table_lines(r: dict) -> list[str]:
    "Markdown rows for one benchmark's results (whatever shape its script wrote)."
    if r['status'] != 'ok': return [f"| {r['row']} | - | {r['status']} | - | - | - |"]
    res = r['results']; items = res if isinstance(res, list) else res.get('rows', [res]) if isinstance(res, dict) else [res]
    out = []
    for it in items:
        if not isinstance(it, dict): continue
        mode = ' '.join(str(it[k]) for k in ('task', 'mode', 'precision', 'amp', 'error') if it.get(k) not in (None, '')) or \
               (f"freeze level {it['freeze']}" if 'freeze' in it else f"{it['nproc']} process(es)" if 'nproc' in it else '')
        ips = next((it[k] for k in ('images_per_s', 'samples_s', 'img_s', 'one_step_img_s') if k in it), None)
        mem = next((it[k] for k in ('peak_mem_gib', 'peak_gib', 'one_step_peak_gib') if k in it), None)
        extra = {k: it[k] for k in ('ratio_ours_over_theirs', 'speedup', 'heun_img_s', 'mfu', 'ms', 'sec_per_iter', 'compile_warmup_s', 'nproc', 'efficiency') if k in it}
        out.append(f"| {r['row']} | {mode} | ok | {_num(ips)} | {_num(mem, '%.2f')} | "
                   + ', '.join(f'{k} {_num(v, "%.3g")}' for k, v in extra.items()) + ' |')
    return out or [f"| {r['row']} | - | ok (no rows) | - | - | - |"]


def markdown(results: list[dict], m: dict) -> str:
    head = [f"Machine: {m.get('gpu', m['cpu'])} ({m.get('gpus', m['cpus'])} {'GPU' if 'gpu' in m else 'CPU core'}(s)), torch {m['torch']}, {m['date']}"
            + ('; --tiny: tiny networks (the row names give the sizes of the GPU run)' if m.get('tiny') else ''),
            '', '| row | mode | status | images/s | peak GiB | other |', '|---|---|---|---|---|---|']
    return '\n'.join(head + [l for r in results for l in table_lines(r)]) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default=None, help='cuda (default when available) or cpu')
    p.add_argument('--tiny', action='store_true', help='tiny networks on CPU: checks that every row still runs')
    p.add_argument('--budget_s', type=float, default=420., help='total wall-clock budget; rows that do not fit are skipped')
    p.add_argument('--only', default=None, help='run only rows whose name contains this text (case-insensitive)')
    p.add_argument('--out_dir', default=str(HERE / 'results'), help='where the JSON and markdown results go')
    p.add_argument('--peer_dmd2', default=None, help='a checkout of tianweiy/DMD2: time its DMD2 iteration next to ours')
    p.add_argument('--peer_fastgen', default=None, help='a checkout of NVlabs/FastGen: time its DMD2 iteration next to ours')
    a = p.parse_args(argv)
    from peers import check_checkout
    peers = {k: check_checkout(k, v) for k, v in (('dmd2', a.peer_dmd2), ('fastgen', a.peer_fastgen)) if v is not None}
    import torch
    device = a.device or ('cpu' if a.tiny or not torch.cuda.is_available() else 'cuda')
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), WANDB_MODE='disabled')
    if a.tiny: env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    rows = list(ROWS) + ([SCALING] if a.tiny or torch.cuda.device_count() > 1 else [])
    rows[1:1] = [peer_row(k, v) for k, v in peers.items()]  # right after our row: they are what it is compared with
    if a.only:  # a peer row goes with the row it is matched to
        keep = lambda name: a.only.lower() in name.lower()
        rows = [r for r in rows if keep(r[0]) or r[1] == 'peers.py' and keep(OUR_DMD2)]
    t_end, results = time.perf_counter() + a.budget_s, []
    for row in rows:
        left = t_end - time.perf_counter()
        cap = min(row[5] * (3 if a.tiny else 1), left)
        if cap < (5 if a.tiny else 20):
            results.append({'row': row[0], 'status': f'skipped: {left:.0f} s of the budget left'}); continue
        print(f'[{a.budget_s - left:5.0f} s] {row[0]} ...', flush=True)
        r = run_row(row, a.tiny, device, cap, env); results.append(r)
        if row[1] == 'peers.py': r['peer'] = row[2][0]
        print(f"          {r['status']} in {r.get('seconds', 0)} s", flush=True)
    ratios = add_peer_ratios(results)
    m = {**machine(device), 'tiny': a.tiny}
    tag = re.sub(r'[^A-Za-z0-9]+', '-', m.get('gpu', 'cpu-tiny' if a.tiny else 'cpu')).strip('-').lower()
    out = Path(a.out_dir); out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{tag}-{m['date']}"
    Path(f'{stem}.json').write_text(json.dumps({'machine': m, 'budget_s': a.budget_s, 'rows': results, 'peer_ratios': ratios}, indent=1))
    md = markdown(results, m) + ''.join(f"\nours/{PEER_NAMES[q['peer']]}: {q['ratio_ours_over_theirs']:.2f}x (our {q['ours']} vs their "
                                        f"{q['theirs']}: {q['settings']})" for q in ratios) + ('\n' if ratios else '')
    Path(f'{stem}.md').write_text(md)
    print('\n' + md + f'\nwritten: {stem}.json, {stem}.md')
    bad = [r['row'] for r in results if r['status'] != 'ok' and not r['status'].startswith('skipped')]
    return 1 if bad else 0


if __name__ == '__main__':
    from distill_nb.core import run_cli
    sys.exit(run_cli(main, {}, 'suite.py'))
