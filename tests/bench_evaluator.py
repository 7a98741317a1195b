"""Benchmark of the binned evaluator against the official lvis-api and faster-coco-eval.

Generates an LVIS-shaped set with the real LVIS v0.5 long tail (categories drawn in proportion to their training
instance counts from the shipped table 'lvis_v0.5'), 300 detections per image (segm: masks as compressed RLE), and
times each engine in its own subprocess (load included), with its peak resident memory:

    python tests/bench_evaluator.py                 # 2,000 images (lvis-api takes minutes per IoU type)
    python tests/bench_evaluator.py --images 200    # a quick run

Seconds are wall-clock seconds of the evaluation in its process, imports and loading included; CPU seconds (user +
system, all threads) are shown beside them because a shared machine's load moves wall-clock times. Memory is the peak
resident set size of the process. Every engine's headline metrics are compared with lvis-api's.
"""
from __future__ import annotations
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

ENGINES = ('simcal', 'lvis-api', 'faster-coco-eval', 'simcal-checks')   # simcal-checks: simcal's input validation alone
KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'APr', 'APc', 'APf', 'AR@300')


def _polygons(rng, boxes, n=8):
    "A star-shaped polygon inside each box (x, y, w, h): flat lists [x1, y1, x2, y2, ...]."
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    t = np.sort(rng.uniform(0, 2 * np.pi, (len(boxes), n)), 1)
    r = rng.uniform(0.6, 1.0, (len(boxes), n))
    cx, cy = boxes[:, :1] + boxes[:, 2:3] / 2, boxes[:, 1:2] + boxes[:, 3:4] / 2
    px, py = cx + boxes[:, 2:3] / 2 * r * np.cos(t), cy + boxes[:, 3:4] / 2 * r * np.sin(t)
    return np.stack([px, py], 2).reshape(len(boxes), -1).round(2).tolist()


def _random_boxes(rng, k, w, h):
    bw = np.exp(rng.uniform(np.log(8), np.log(w * 0.8), k))
    bh = np.clip(bw * np.exp(rng.normal(0, 0.4, k)), 6, h * 0.9)
    return np.stack([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh], 1)


def make_lvis_longtail(out_dir, n_images=2000, dets_per_image=300, seed=0):
    """Write `gt.json`, `bbox_results.json` and `segm_results.json` to `out_dir`: LVIS v0.5 categories with the real
    long tail; the results files as the paper's code (mmdetection v1, `results2json`) writes them: boxes in one, the
    same detections' compressed RLE masks (without boxes) in the other."""
    from pycocotools import mask as mask_utils
    from simcal.core import table_path
    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table = json.loads(table_path('lvis_v0.5').read_text())
    cat_ids = np.array([r['id'] for r in table])
    p_cat = np.array([r['instance_count'] for r in table], float); p_cat /= p_cat.sum()
    categories = [{k: r[k] for k in ('id', 'name', 'frequency', 'synset', 'image_count', 'instance_count')}
                  for r in table]
    images, annotations, bbox_results, segm_results = [], [], [], []
    for i in range(n_images):
        img_id = i + 1
        h, w = int(rng.integers(360, 641)), int(rng.integers(360, 641))
        cats = rng.choice(cat_ids, size=1 + rng.poisson(9), p=p_cat)  # instances follow the real training counts
        boxes = _random_boxes(rng, len(cats), w, h)
        polys = _polygons(rng, boxes, 12)
        areas = mask_utils.area(mask_utils.frPyObjects(polys, h, w))
        for c, b, poly, area in zip(cats, boxes, polys, areas):
            annotations.append({'id': len(annotations) + 1, 'image_id': img_id, 'category_id': int(c),
                                'bbox': [round(float(v), 2) for v in b], 'area': float(area), 'segmentation': [poly]})
        present = sorted(set(int(c) for c in cats))
        neg = sorted(set(int(c) for c in rng.choice(cat_ids, size=int(rng.integers(2, 9)), p=p_cat)) - set(present))
        images.append({'id': img_id, 'height': h, 'width': w, 'file_name': f'{img_id:012d}.jpg',
                       'neg_category_ids': neg, 'not_exhaustive_category_ids': [c for c in present if rng.random() < 0.1]})
        # detections: jittered copies of the ground truth (masks: the shifted polygon), some with another category,
        # then false positives on the image's categories or anywhere in the long tail
        k = rng.integers(1, 5, len(cats))
        src = np.repeat(np.arange(len(cats)), k)
        jit = boxes[src] * np.exp(np.c_[np.zeros((len(src), 2)), rng.normal(0, 0.1, (len(src), 2))])
        jit[:, :2] += rng.normal(0, 0.08, (len(src), 2)) * boxes[src, 2:]
        dcat = np.where(rng.random(len(src)) < 0.6, cats[src], rng.choice(cat_ids, len(src), p=p_cat))
        dpoly = [(np.asarray(polys[s]).reshape(-1, 2) + (jit[j, :2] - boxes[s, :2])).ravel().tolist()
                 for j, s in enumerate(src)]
        score = rng.beta(4, 2, len(src))
        n_fp = max(0, dets_per_image - len(src))
        fp = _random_boxes(rng, n_fp, w, h)
        local = np.array(present + neg)
        fcat = np.where(rng.random(n_fp) < 0.5, rng.choice(local, n_fp), rng.choice(cat_ids, n_fp, p=p_cat))
        dets_box = np.r_[jit, fp][:dets_per_image]
        dets_cat = np.r_[dcat, fcat][:dets_per_image]
        dets_poly = (dpoly + _polygons(rng, fp, 8))[:dets_per_image]
        dets_score = np.r_[score, rng.beta(1.5, 5, n_fp)][:dets_per_image].astype(np.float32)
        x0, y0 = np.clip(dets_box[:, 0], 0, w), np.clip(dets_box[:, 1], 0, h)
        x1 = np.clip(dets_box[:, 0] + dets_box[:, 2], 0, w); y1 = np.clip(dets_box[:, 1] + dets_box[:, 3], 0, h)
        rles = mask_utils.frPyObjects(dets_poly, h, w)
        for j, rle in enumerate(rles):
            bbox_results.append({'image_id': img_id, 'category_id': int(dets_cat[j]),
                                 'bbox': [round(float(x0[j]), 2), round(float(y0[j]), 2), round(float(x1[j] - x0[j]), 2),
                                          round(float(y1[j] - y0[j]), 2)], 'score': float(dets_score[j])})
            segm_results.append({'image_id': img_id, 'category_id': int(dets_cat[j]), 'score': float(dets_score[j]),
                                 'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()}})
    gt = {'info': {'description': 'LVIS-shaped benchmark set (synthetic)'}, 'licenses': [],
          'images': images, 'annotations': annotations, 'categories': categories}
    paths = {'gt': out_dir / 'gt.json', 'bbox': out_dir / 'bbox_results.json', 'segm': out_dir / 'segm_results.json'}
    for key, obj in (('gt', gt), ('bbox', bbox_results), ('segm', segm_results)):
        with open(paths[key], 'w') as f: json.dump(obj, f)
    return paths


def _run_engine(engine, gt_path, res_path, iou_type, stats_name='lvis_v0.5'):
    "Evaluate in this process; returns the headline metrics (the caller measures time and memory)."
    if engine == 'simcal':
        from simcal.evaluate import evaluate_detections
        m = evaluate_detections(str(gt_path), str(res_path), iou_type=iou_type, protocol='lvis', stats=stats_name)
        return {k: m[k] for k in KEYS} | {'bAP': m['bAP'], 'bins': [b['AP'] for b in m['bins']]}
    if engine == 'simcal-checks':   # what simcal's validation costs inside the 'simcal' row: load + check both files
        from simcal.evaluate import GroundTruth, check_results
        gt = GroundTruth(str(gt_path)); gt.check()
        with open(res_path) as f: check_results(json.load(f), gt, iou_type, str(res_path))
        return {}
    if engine == 'lvis-api':
        from simcal.evaluate import lvis_api_numpy_compat
        with lvis_api_numpy_compat():
            from lvis import LVIS, LVISResults, LVISEval
            gt = LVIS(str(gt_path))
            ev = LVISEval(gt, LVISResults(gt, str(res_path)), iou_type)
            ev.run()
        return {k: float(ev.results[k]) for k in KEYS}
    if engine == 'faster-coco-eval':
        from faster_coco_eval import COCO, COCOeval_faster
        gt = COCO(str(gt_path))
        ev = COCOeval_faster(gt, gt.loadRes(str(res_path)), iou_type, lvis_style=True, print_function=lambda *a: None)
        ev.params.maxDets = [300]
        ev.evaluate(); ev.accumulate(); ev.summarize()
        st = ev.stats_as_dict
        names = {'AP': 'AP_all', 'AP50': 'AP_50', 'AP75': 'AP_75', 'APs': 'AP_small', 'APm': 'AP_medium',
                 'APl': 'AP_large', 'APr': 'APr', 'APc': 'APc', 'APf': 'APf', 'AR@300': 'AR_all'}
        return {k: float(st[v]) for k, v in names.items()}
    raise ValueError(engine)


def _worker(args):
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = _run_engine(args.worker, args.gt, args.results, args.iou_type)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({'seconds': seconds, 'cpu_seconds': cpu, 'peak_bytes': peak, 'metrics': metrics}))


def run_one(engine, gt, results, iou_type):
    "Run one engine in a fresh interpreter; its report (time, memory, metrics)."
    cmd = [sys.executable, __file__, '--worker', engine, '--gt', str(gt), '--results', str(results),
           '--iou-type', iou_type]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0: raise RuntimeError(f"{engine} {iou_type} failed:\n{p.stderr[-3000:]}")
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    rep['process_seconds'] = time.perf_counter() - t0
    return rep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--images', type=int, default=2000, help='images in the generated set')
    ap.add_argument('--dets', type=int, default=300, help='detections per image')
    ap.add_argument('--engines', nargs='+', default=list(ENGINES), choices=ENGINES)
    ap.add_argument('--iou-types', nargs='+', default=['bbox', 'segm'], choices=['bbox', 'segm'])
    ap.add_argument('--data-dir', default=None, help='keep the generated set here (reused if present)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--gt', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--results', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--iou-type', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker: return _worker(args)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    tmp = None
    if args.data_dir is None: tmp = tempfile.TemporaryDirectory(); data_dir = Path(tmp.name)
    else: data_dir = Path(args.data_dir) / f'lvis_longtail_{args.images}x{args.dets}_s{args.seed}'
    paths = {'gt': data_dir / 'gt.json', 'bbox': data_dir / 'bbox_results.json', 'segm': data_dir / 'segm_results.json'}
    if not all(p.exists() for p in paths.values()):
        t0 = time.perf_counter()
        paths = make_lvis_longtail(data_dir, args.images, args.dets, args.seed)
        print(f"generated {args.images} images x {args.dets} detections in {time.perf_counter() - t0:.0f} s "
              f"(results: {paths['bbox'].stat().st_size / 2**20:.0f} MiB boxes, "
              f"{paths['segm'].stat().st_size / 2**20:.0f} MiB masks)", flush=True)
    rows = []
    for iou_type in args.iou_types:
        reps = {}
        for engine in args.engines:
            reps[engine] = run_one(engine, paths['gt'], paths[iou_type], iou_type)
            r = reps[engine]
            ap = f"AP {r['metrics']['AP']:.6f}" if 'AP' in r['metrics'] else '(validation only)'
            print(f"  {iou_type:<5} {engine:<17} {r['seconds']:8.2f} s  cpu {r['cpu_seconds']:8.2f} s  "
                  f"peak {r['peak_bytes'] / 2**20:7.0f} MiB  {ap}", flush=True)
        ref = reps.get('lvis-api')
        for engine, r in reps.items():
            diff = None
            if ref is not None and r['metrics']:
                diff = max(abs(r['metrics'][k] - ref['metrics'][k]) for k in KEYS
                           if r['metrics'].get(k) is not None and ref['metrics'].get(k) is not None)
            rows.append((iou_type, engine, r, ref, diff))
    print()
    print(f"LVIS-shaped set: {args.images} images, {args.dets} detections per image, 1230 categories (LVIS v0.5 long "
          f"tail); seconds include loading; ratios vs lvis-api")
    head = (f"| IoU  | engine            | seconds | CPU s  | peak MiB | speed-up (wall) | speed-up (CPU) | "
            f"memory vs lvis-api | max abs diff vs lvis-api |")
    print(head); print('|' + '|'.join('-' * (len(c)) for c in head.split('|')[1:-1]) + '|')
    for iou_type, engine, r, ref, diff in rows:
        sp = f"{ref['seconds'] / r['seconds']:.1f}x" if ref else '-'
        spc = f"{ref['cpu_seconds'] / r['cpu_seconds']:.1f}x" if ref else '-'
        mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else '-'
        print(f"| {iou_type:<4} | {engine:<17} | {r['seconds']:7.2f} | {r['cpu_seconds']:6.2f} | "
              f"{r['peak_bytes'] / 2**20:8.0f} | {sp:>15} | {spc:>14} | {mem:>18} | "
              f"{'-' if diff is None else format(diff, '.1e'):>23} |")
    if tmp is not None: tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
