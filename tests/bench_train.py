"""Training and inference throughput of the base detector on CPU (demo preset, embedded synthetic set).

    python tests/bench_train.py                 # throughput table (a couple of minutes)
    python tests/bench_train.py --full          # also the demo's whole base training, timed, and its AP per bin

The machine's load average is printed with the numbers: on shared cores, wall-clock rates fall with the load.
"""
import argparse, json, os, statistics, sys, tempfile, time
from pathlib import Path

import torch


def load_average():
    try: return os.getloadavg()[0]
    except OSError: return float('nan')


def bench_training(ds, preset, iters, warmup, seed=0):
    "Median seconds per training iteration (forward, backward, clipping, SGD step) on real batches."
    from simcal.model import build_mask_rcnn
    from simcal.train import GroupedBatchSchedule, forward_losses
    torch.manual_seed(seed)
    model = build_mask_rcnn(ds.label_map.num_classes, **preset.model_kwargs()).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.002, momentum=preset.momentum, weight_decay=preset.weight_decay)
    sched = GroupedBatchSchedule(ds.image_sizes(), preset.images_per_gpu, seed=seed)
    step_times, data_times, cpu_times = [], [], []
    for it in range(warmup + iters):
        t0 = time.perf_counter()
        images, targets = zip(*[ds[i] for i in sched.batch(it)])
        t1, c1 = time.perf_counter(), time.process_time()
        loss, _ = forward_losses(model, list(images), list(targets), seed, it, 0, preset.hflip_prob)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, preset.grad_clip)
        opt.step()
        t2, c2 = time.perf_counter(), time.process_time()
        if it >= warmup: step_times.append(t2 - t1); data_times.append(t1 - t0); cpu_times.append(c2 - c1)
    return statistics.median(step_times), statistics.median(data_times), statistics.median(cpu_times), model


def bench_inference(model, ds, n_images, batch_size=1):
    "Median seconds per image of inference with conversion to LVIS results (300 dets, masks as RLE)."
    from simcal.inference import detections_to_results
    model.eval()
    times, cpu, dets = [], [], 0
    idx = list(range(min(n_images + 2, len(ds))))
    with torch.no_grad():
        for k in range(0, len(idx), batch_size):
            items = [ds[i] for i in idx[k:k + batch_size]]
            t0, c0 = time.perf_counter(), time.process_time()
            outs = model([im for im, _ in items])
            res = [detections_to_results(o, t['image_id'], ds.label_map) for o, (_, t) in zip(outs, items)]
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if k >= 2: times.append(dt / len(items)); cpu.append(dc / len(items)); dets += sum(len(r) for r in res)
    return statistics.median(times), statistics.median(cpu), dets / max(1, len(times) * batch_size)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default=None, help='synthetic dataset folder (generated there if missing; default: a temp dir)')
    ap.add_argument('--iters', type=int, default=15, help='timed training iterations')
    ap.add_argument('--warmup', type=int, default=3, help='untimed iterations first')
    ap.add_argument('--infer-images', type=int, default=20, help='timed inference images')
    ap.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS', 2)), help='torch threads')
    ap.add_argument('--set', nargs='+', default=[], metavar='NAME=VALUE', help='change demo preset settings')
    ap.add_argument('--full', action='store_true', help="also run the demo preset's whole base training and evaluate it")
    ap.add_argument('--out', default=None, help='work dir for --full (default: a temp dir)')
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from simcal.data import load_detection_dataset
    from simcal.model import PRESETS
    from simcal.synth import make_synthetic
    from simcal.train import parse_overrides
    tmp = tempfile.TemporaryDirectory()
    data = Path(args.data or Path(tmp.name) / 'synth')
    paths = make_synthetic(data, seed=0, progress=False)
    overrides = parse_overrides(args.set)
    preset = PRESETS['demo'].replace(**overrides)
    train_ds = load_detection_dataset(paths.train_ann, paths.image_root, train=True)
    val_ds = load_detection_dataset(paths.val_ann, paths.image_root)
    print(f"demo preset{' with ' + json.dumps(overrides) if overrides else ''}: {preset.backbone}-FPN{preset.fpn_channels}, "
          f"{preset.min_size}px, batch {preset.images_per_gpu}; {len(train_ds)} train / {len(val_ds)} val images, "
          f"{len(train_ds.label_map)} classes; torch threads {args.threads}; load average {load_average():.2f}")
    step, data_t, step_cpu, model = bench_training(train_ds, preset, args.iters, args.warmup)
    infer, infer_cpu, dets = bench_inference(model, val_ds, args.infer_images)
    rows = [('training (fwd+bwd+step)', f'{step:.3f} s/iter', f'{step_cpu:.3f}', f'{preset.images_per_gpu / step:.2f}'),
            ('  data loading', f'{data_t:.3f} s/batch', '', f'{preset.images_per_gpu / max(data_t, 1e-9):.1f}'),
            ('inference (+ RLE results)', f'{infer:.3f} s/image', f'{infer_cpu:.3f}', f'{1 / infer:.2f}')]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'':{w}}  {'wall time':>14}  {'CPU s':>6}  {'images/s':>9}")
    for r in rows: print(f'{r[0]:{w}}  {r[1]:>14}  {r[2]:>6}  {r[3]:>9}')
    print('(CPU s: process CPU time of the step, all threads; with one thread the best guide to an idle machine)')
    print(f'(inference: {dets:.0f} detections per image with the untrained-to-briefly-trained model; '
          f'load average now {load_average():.2f})')
    if args.full:
        from simcal.train import train_detector
        from simcal.testing import test_detector
        out = Path(args.out or Path(tmp.name) / 'demo')
        t0 = time.perf_counter()
        res = train_detector(paths.train_ann, paths.image_root, out, preset='demo', overrides=overrides,
                             checkpoint_every=0, num_workers=0, progress=False)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        test = test_detector(res['final'], paths.val_ann, paths.image_root, out / 'test', num_workers=0, progress=False)
        t_test = time.perf_counter() - t0
        m = json.loads(Path(test['metrics']).read_text())
        print(f"\ndemo base training: {res['iterations']} iterations in {t_train:.0f} s ({t_train / 60:.1f} min; "
              f"load average {load_average():.2f}); test on val: {t_test:.0f} s")
        print(f"{'':6} {'AP':>6} {'AP50':>6} " + ' '.join(f"{b['label']:>10}" for b in m['bbox']['bins']) + f" {'bAP':>6}")
        for t in ('bbox', 'segm'):
            mm = m[t]
            print(f"{t:6} {100 * mm['AP']:6.1f} {100 * mm['AP50']:6.1f} "
                  + ' '.join(f"{100 * (b['AP'] if b['AP'] is not None else float('nan')):10.1f}" for b in mm['bins'])
                  + f" {100 * mm['bAP']:6.1f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
