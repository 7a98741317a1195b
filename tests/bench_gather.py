"""Memory per rank of gathering inference results: every rank gets every result (`all_gather_object`, what the
training loop did first) vs rank 0 only (`simcal.comm.gather_to_main`, what `simcal test`, the oracle and the
`BinnedEvaluator` use).

Each rank of a 2-process torchrun job (gloo, CPU) makes `--per-rank` LVIS-style mask result records (box, score,
a compressed RLE string of typical length) and gathers them; the table gives the peak resident memory of each rank
above its level before the gather, and the gather's time. LVIS v0.5 val at 300 detections per image is 1.5M records
(750k per rank on 2 GPUs; 187.5k per rank on 8).

    python tests/bench_gather.py                       # 150k records per rank
    python tests/bench_gather.py --per-rank 750000
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

WORKER = r'''
import json, os, random, resource, sys, time
import torch.distributed as dist
from simcal.comm import all_gather_objects, gather_to_main

def rss_mb():   # current resident set size
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

method, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group('gloo')
rank = dist.get_rank()
rng = random.Random(rank)
alphabet = ''.join(chr(c) for c in range(48, 112))
records = [{'image_id': rng.randrange(5000), 'category_id': rng.randrange(1, 1231),
            'bbox': [rng.random() * 600, rng.random() * 400, rng.random() * 200, rng.random() * 200],
            'score': rng.random(),
            'segmentation': {'size': [480, 640], 'counts': ''.join(rng.choice(alphabet) for _ in range(120))}}
           for _ in range(n)]
dist.barrier()
base = rss_mb(); peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
got = (all_gather_objects if method == 'all_gather' else gather_to_main)(records)
seconds = time.perf_counter() - t0
received = sum(len(p) for p in got) if got is not None else 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
row = {'method': method, 'rank': rank, 'records_held': received, 'extra_peak_mb': round(max(peak, peak0) - base, 1),
       'held_after_mb': round(rss_mb() - base, 1), 'seconds': round(seconds, 2)}
with open(f'{out}.{rank}', 'w') as f: json.dump(row, f)
dist.barrier(); dist.destroy_process_group()
'''


def _table(rows, cols):
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = lambda vals: '  '.join(str(v).rjust(w) for v, w in zip(vals, widths))
    return '\n'.join([line(cols), line(['-' * w for w in widths])] + [line([r[c] for c in cols]) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--per-rank', type=int, default=150_000, help='result records made by each rank')
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / 'worker.py'; script.write_text(WORKER)
        for method in ('all_gather', 'gather_to_main'):
            env = {**os.environ, 'OMP_NUM_THREADS': '1'}
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', str(script),
                   method, str(args.per_rank), str(Path(d) / method)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode: sys.exit(p.stdout[-2000:] + p.stderr[-2000:])
            rows += [json.loads((Path(d) / f'{method}.{r}').read_text()) for r in (0, 1)]
    print(f'gathering {args.per_rank:,} mask result records per rank, 2 ranks (gloo)\n')
    print(_table(rows, ['method', 'rank', 'records_held', 'extra_peak_mb', 'held_after_mb', 'seconds']))
    by = {(r['method'], r['rank']): r for r in rows}
    for rank in (0, 1):
        a, g = by[('all_gather', rank)], by[('gather_to_main', rank)]
        ratio = a['extra_peak_mb'] / g['extra_peak_mb'] if g['extra_peak_mb'] > 0 else float('inf')
        print(f"rank {rank}: peak memory of the gather, all_gather / gather_to_main = {ratio:.1f}x")


if __name__ == '__main__':
    main()
