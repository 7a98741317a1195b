"""Memory of the class-agnostic mask path at LVIS size (1231 classes, 300 detections per image, 28x28 masks).

torchvision's `maskrcnn_inference` picks each detection's channel from C-channel logits, so a class-agnostic head
(the paper's r50-ag) used to be expanded to C channels first; `simcal.model.mask_probabilities` keeps the one
channel. Each variant runs in its own process; the table gives the peak resident memory above the level after the
inputs were made, and the time.

    python tests/bench_masks.py [--dets 300] [--classes 1231]
"""
from __future__ import annotations
import argparse, json, subprocess, sys

WORKER = r'''
import json, os, resource, sys, time
import torch
from torchvision.models.detection.roi_heads import maskrcnn_inference
from simcal.model import mask_probabilities
variant, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
logits = torch.randn(n, 1, 28, 28, generator=g)
labels = [torch.randint(1, c, (n,), generator=g)]
def rss_mb():
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
base = rss_mb()
t = time.perf_counter()
if variant == 'expanded to C channels':
    probs = maskrcnn_inference(logits.expand(n, c, 28, 28).contiguous(), labels)
else:
    probs = mask_probabilities(logits, labels)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({'variant': variant, 'extra_peak_mb': round(peak - base, 1), 'seconds': round(dt, 3),
                  'out_shape': list(probs[0].shape)}))
'''


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--dets', type=int, default=300)
    ap.add_argument('--classes', type=int, default=1231)
    args = ap.parse_args(argv)
    rows = []
    for v in ('expanded to C channels', 'one channel (simcal)'):
        p = subprocess.run([sys.executable, '-c', WORKER, v, str(args.dets), str(args.classes)], capture_output=True, text=True)
        if p.returncode: sys.exit(p.stderr[-2000:])
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f'class-agnostic mask inference, {args.dets} detections, {args.classes} classes, one image\n')
    w = max(len(r['variant']) for r in rows)
    print(f"{'variant':<{w}}  {'extra peak MB':>13}  {'seconds':>8}  output")
    for r in rows: print(f"{r['variant']:<{w}}  {r['extra_peak_mb']:>13}  {r['seconds']:>8}  {r['out_shape']}")
    a, b = rows
    print(f"\npeak memory ratio: {a['extra_peak_mb'] / max(b['extra_peak_mb'], 0.1):.0f}x; "
          f"time ratio: {a['seconds'] / max(b['seconds'], 1e-6):.0f}x")


if __name__ == '__main__':
    main()
