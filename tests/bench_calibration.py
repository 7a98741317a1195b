"""Throughput of SimCal's calibration step on CPU.

Runs `simcal.calibration.calibrate` (16 classes x 1 image per iteration, the paper's batch) with the frozen detector
of the `demo` preset on the embedded synthetic set, and reports sampled images/s and RoIs/s per head, with the time
split between the frozen detector (RPN proposals, matching, RoIAlign) and the head's forward/backward/SGD step.
A second table times the heads alone at the paper's size (12,544-d RoI features, 1,231 LVIS classes).

    python tests/bench_calibration.py                                   # demo preset, random detector weights
    python tests/bench_calibration.py --detector work/demo/model_final.pth --train-ann ... --image-root ...
    python tests/bench_calibration.py --iters 30 --threads 2
"""
from __future__ import annotations
import argparse, json, os, statistics, sys, tempfile, time
from pathlib import Path


def _table(rows, cols):
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = lambda vals: '  '.join(str(v).rjust(w) for v, w in zip(vals, widths))
    return '\n'.join([line(cols), line(['-' * w for w in widths])] + [line([r[c] for c in cols]) for r in rows])


def demo_detector(train_ann, image_root, out_dir, seed=0):
    "A demo-preset detector with random weights, saved as a simcal checkpoint (for a throughput measurement only)."
    import torch
    from simcal.data import load_detection_dataset
    from simcal.model import PRESETS, build_mask_rcnn
    from simcal.checkpoint import make_meta, save_checkpoint
    ds = load_detection_dataset(train_ann, image_root, train=True)
    preset = PRESETS['demo']
    torch.manual_seed(seed)
    model = build_mask_rcnn(ds.label_map.num_classes, **preset.model_kwargs())
    path = Path(out_dir) / 'demo_random.pth'
    save_checkpoint(path, model, make_meta(preset, ds.label_map, stats=ds.stats))
    return path


def bench_loop(detector, train_ann, image_root, heads, iters, warmup, seed=0):
    "Per head: median per-iteration times of the detector part and the head part, images/s and RoIs/s."
    import torch
    import torch.nn.functional as F
    from simcal.calibration import (build_calibration_head, compose_calibration_batch, freeze_detector, calibrate,
                                    LOG_FILE)
    from simcal.data import load_detection_dataset
    from simcal.sampler import BiLevelSampler
    from simcal.checkpoint import load_detector
    model, meta = load_detector(detector)
    freeze_detector(model)
    ds = load_detection_dataset(train_ann, image_root, train=True)
    rows = []
    for kind in heads:
        # the real loop, end to end (image loading included)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            calibrate(model, ds, d, head=kind, iters=warmup + iters, seed=seed, progress=False, checkpoint_every=10 ** 9)
            wall = time.perf_counter() - t0
            log = [json.loads(l) for l in (Path(d) / LOG_FILE).read_text().splitlines()][warmup:]
        # the same steps, timed in two parts
        sampler = BiLevelSampler(ds.class_to_indices(), 16, 1, seed)
        head = build_calibration_head(model, kind)
        opt = torch.optim.SGD(head.parameters(), lr=0.01)
        t_det, t_head = [], []
        for it in range(warmup + iters):
            draws = sampler.draws(it)
            items = [ds[i] for _, i in draws]
            a = time.perf_counter()
            b = compose_calibration_batch(model, [x[0] for x in items], [x[1] for x in items], list(range(16)),
                                          [l for l, _ in draws], 16, seed, it)
            m = time.perf_counter()
            loss = F.cross_entropy(head(b['features']), b['labels'])
            opt.zero_grad(); loss.backward(); opt.step()
            e = time.perf_counter()
            if it >= warmup: t_det.append(m - a); t_head.append(e - m)
        med = lambda xs: statistics.median(xs)
        rows.append({'head': kind, 'iters': iters, 'images/s': f"{med([r['images_per_s'] for r in log]):.1f}",
                     'RoIs/s': f"{med([r['rois_per_s'] for r in log]):.0f}",
                     'RoIs/iter': f"{med([r['fg'] + r['bg'] for r in log]):.0f}",
                     's/iter': f"{med([16 / r['images_per_s'] for r in log]):.3f}",
                     'detector s': f'{med(t_det):.3f}', 'head s': f'{med(t_head):.4f}',
                     'total wall s': f'{wall:.1f}'})
    return rows, meta


def bench_paper_heads(rois=400, repeats=7):
    "Forward + backward + SGD step of each head at the paper's size (256x7x7 features, 1231 classes)."
    import torch
    import torch.nn.functional as F
    from simcal.calibration import CalibrationHead
    rows = []
    x = torch.randn(rois, 256, 7, 7)
    y = torch.randint(0, 1231, (rois,))
    for kind in ('2fc_rand', '3fc_rand', '3fc_ft'):
        head = CalibrationHead(kind, (256, 7, 7), 1231, 1024)
        opt = torch.optim.SGD(head.parameters(), lr=0.01)
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            loss = F.cross_entropy(head(x), y); opt.zero_grad(); loss.backward(); opt.step()
            times.append(time.perf_counter() - t)
        s = min(times[1:])   # the least disturbed repeat (the cores are shared)
        rows.append({'head': kind, 'params (M)': f'{sum(p.numel() for p in head.parameters()) / 1e6:.1f}',
                     'RoIs': rois, 'step s': f'{s:.3f}', 'RoIs/s': f'{rois / s:.0f}'})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--detector', help='a demo detector checkpoint (default: random demo weights)')
    ap.add_argument('--train-ann', help='training annotations (default: the embedded synthetic set, generated)')
    ap.add_argument('--image-root', help='their image folder')
    ap.add_argument('--heads', nargs='+', default=['3fc_ft', '2fc_rand'])
    ap.add_argument('--iters', type=int, default=12, help='timed iterations per head')
    ap.add_argument('--warmup', type=int, default=2, help='untimed iterations first')
    ap.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS', 2)))
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ann, root = args.train_ann, args.image_root
        if ann is None:
            from simcal.synth import make_synthetic
            paths = make_synthetic(Path(tmp) / 'synth', seed=0)
            ann, root = paths['train_ann'], paths['train_images']
        det = args.detector or demo_detector(ann, root, tmp)
        rows, meta = bench_loop(det, ann, root, args.heads, args.iters, args.warmup)
    print(f"calibration on CPU ({args.threads} threads), preset {meta.get('preset')!r}, {meta['num_classes'] - 1} classes, "
          f"16 classes x 1 image per iteration, detector {'trained' if args.detector else 'random weights'}")
    print(_table(rows, list(rows[0])))
    print()
    print('heads alone at the paper size (256x7x7 RoI features, 1231 classes), one SGD step:')
    prow = bench_paper_heads()
    print(_table(prow, list(prow[0])))
    return 0


if __name__ == '__main__':
    sys.exit(main())
