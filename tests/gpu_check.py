"""`make gpu-check`: the GPU path of simcal on a CUDA machine, in a few minutes.

Runs, on the paper's LVIS preset (`lvis_r50_ag`: ResNet-50 FPN, 1333x800, 1231 classes), on a small synthetic set
written to a temporary folder:

1. a few training iterations with AMP (FP16 autocast + gradient scaler), under NCCL when two or more GPUs are
   visible (this script relaunches itself with torchrun, one process per GPU, at most 2 unless --gpus says
   otherwise), as one process on one GPU otherwise; images/s and peak GPU memory of the training phase;
2. FP32 -> AMP resume: an FP32 checkpoint continued with `--amp` (its empty scaler state must not stop it);
3. a calibration step (`3fc_ft`, the paper's head) on the trained detector; images/s and peak memory;
4. dual-head inference at score threshold 0.0 and 300 detections per image (the LVIS protocol), results gathered
   on rank 0; seconds per image and peak memory.

Without a CUDA device it says so and exits with status 2 (nothing was checked). `--cpu-dry-run` runs the same
steps on the CPU with a tiny model (to check the script itself; the figures then mean nothing; with
`--gpus 2` as two gloo processes).

    python tests/gpu_check.py [--backbone-weights resnet50.pth] [--iters 6] [--images 8]

Without `--backbone-weights` (a torchvision ResNet-50 ImageNet state dict) the backbone starts from random weights;
frozen BatchNorm would then diverge, so the check uses trainable BatchNorm instead (`norm=bn`) and says so: the
structure, sizes and class count stay the paper's.
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path


def log(msg): print(f'[gpu-check] {msg}', flush=True)


def write_set(root: Path, n: int, size=(800, 1333), num_categories=1230, seed=0):
    "An LVIS-format set of `n` images with a few coloured boxes of 8 categories among `num_categories`."
    import numpy as np
    from PIL import Image
    from simcal.core import save_json
    rng = np.random.default_rng(seed)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    h, w = size
    images, anns = [], []
    used = [1, 2, 3, 4, 500, 700, 1000, 1230]
    for i in range(n):
        arr = (rng.random((h, w, 3)) * 40).astype(np.uint8)
        for _ in range(4):
            c = int(rng.choice(used))
            bw, bh = int(rng.integers(w // 10, w // 3)), int(rng.integers(h // 10, h // 3))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            arr[y:y + bh, x:x + bw] = rng.integers(60, 255, 3)
            anns.append({'id': len(anns) + 1, 'image_id': i + 1, 'category_id': c, 'bbox': [x, y, bw, bh],
                         'area': bw * bh, 'segmentation': [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
        Image.fromarray(arr).save(root / 'images' / f'{i:04d}.jpg', quality=90)
        images.append({'id': i + 1, 'file_name': f'{i:04d}.jpg', 'height': h, 'width': w,
                       'neg_category_ids': [], 'not_exhaustive_category_ids': []})
    cats = [{'id': c, 'name': f'c{c}', 'frequency': 'r'} for c in range(1, num_categories + 1)]
    save_json({'images': images, 'annotations': anns, 'categories': cats}, root / 'ann.json')
    return root / 'ann.json', root / 'images'


def worker(args):
    import torch
    from simcal.comm import init_distributed, get_rank, barrier, cleanup_distributed
    from simcal.train import train_detector
    from simcal.checkpoint import load_detector
    from simcal.calibration import calibrate, attach_calibration, CALIBRATION_FILE, LOG_FILE
    from simcal.inference import run_inference
    from simcal.data import load_detection_dataset
    cpu = args.cpu_dry_run
    info = init_distributed('cpu' if cpu else None)
    main = info.rank == 0
    work = Path(args.work)
    ann, root = Path(args.ann), Path(args.image_root)
    dev = info.device
    cuda = dev.type == 'cuda'
    def reset():
        if cuda: torch.cuda.synchronize(dev); torch.cuda.reset_peak_memory_stats(dev)
    def peak():
        return f'{torch.cuda.max_memory_allocated(dev) / 2 ** 30:.2f} GiB' if cuda else 'n/a (CPU)'
    report = {'world_size': info.world_size, 'device': str(dev),
              'gpu': torch.cuda.get_device_name(dev) if cuda else 'cpu', 'backend': 'nccl' if cuda and info.distributed else
              ('gloo' if info.distributed else 'none (one process)')}
    overrides = {} if args.backbone_weights else {'imagenet_backbone': False, 'norm': 'bn', 'trainable_layers': 5}
    if cpu: overrides.update(backbone='resnet18', min_size=96, max_size=160, fpn_channels=32, box_head_dim=64,
                             mask_head_channels=16, mask_head_convs=1, rpn_pre_nms_top_n_train=200,
                             rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=100)
    common = dict(preset='lvis_r50_ag', overrides=overrides, batch_per_gpu=args.batch_per_gpu, lr=args.lr,
                  num_workers=0 if cpu else 4, log_every=1, progress=False, device='cpu' if cpu else None,
                  backbone_weights=args.backbone_weights)
    # 1. training with AMP
    reset(); t0 = time.perf_counter()
    res = train_detector(ann, root, work / 'amp', iters=args.iters, amp=True, checkpoint_every=0, **common)
    report['train_amp'] = {'iterations': res['iterations'], 'seconds': round(time.perf_counter() - t0, 1), 'peak_memory': peak()}
    if main:
        rows = [json.loads(l) for l in (work / 'amp' / 'metrics.jsonl').read_text().splitlines()]
        steady = rows[1:] or rows   # the first iteration includes cuDNN autotuning and allocator warm-up
        report['train_amp']['images_per_s'] = round(sum(r['images_per_s'] for r in steady) / len(steady), 2)
        report['train_amp']['loss_first_last'] = [rows[0]['loss'], rows[-1]['loss']]
    # 2. FP32 -> AMP resume
    reset()
    half = max(1, args.iters // 2)
    train_detector(ann, root, work / 'fp32', iters=args.iters, amp=False, checkpoint_every=half, **common)
    barrier()
    import shutil
    if main:
        (work / 'resume').mkdir(exist_ok=True)
        shutil.copy(work / 'fp32' / f'checkpoint_{half:07d}.pth', work / 'resume')
    barrier()
    r2 = train_detector(ann, root, work / 'resume', iters=args.iters, amp=True, checkpoint_every=0, resume='auto', **common)
    report['resume_fp32_to_amp'] = {'start_iter': r2['start_iter'], 'iterations': r2['iterations'], 'peak_memory': peak()}
    # 3. calibration
    model, meta = load_detector(res['final'], device=dev)
    ds = load_detection_dataset(ann, root, train=True)
    reset(); t0 = time.perf_counter()
    ck = calibrate(model, ds, work / 'cal', head='3fc_ft', iters=args.cal_iters, classes_per_iter=args.classes_per_iter,
                   progress=False, dual_threshold=100)
    report['calibration'] = {'iterations': ck['iteration'], 'seconds': round(time.perf_counter() - t0, 1), 'peak_memory': peak()}
    if main:
        rows = [json.loads(l) for l in (work / 'cal' / LOG_FILE).read_text().splitlines()]
        steady = rows[1:] or rows
        report['calibration']['images_per_s'] = round(sum(r['images_per_s'] for r in steady) / len(steady), 2)
    # 4. dual-head inference, score 0, 300 detections, gathered on rank 0
    model, meta = load_detector(res['final'], device=dev)
    attach_calibration(model, work / 'cal' / CALIBRATION_FILE, mode='dual', category_ids=meta['category_ids'])
    val = load_detection_dataset(ann, root, train=False, label_map=ds.label_map)
    run_inference(model, torch.utils.data.Subset(val, [0]), label_map=val.label_map, score_thresh=0.0, max_dets=300,
                  num_workers=0, progress=False, amp=args.amp_inference)   # warm-up (one image per rank)
    reset(); t0 = time.perf_counter()
    results = run_inference(model, val, score_thresh=0.0, max_dets=300, num_workers=2 if not cpu else 0,
                            progress=False, amp=args.amp_inference)
    if cuda: torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    per_rank = (len(val) + info.world_size - 1) // info.world_size
    report['inference_dual'] = {'images': len(val), 'seconds_per_image': round(dt / per_rank, 3),
                                'detections_on_rank0': len(results) if main else None, 'peak_memory': peak(),
                                'amp': args.amp_inference}
    if main:
        counts = {}
        for r in results: counts[r['image_id']] = counts.get(r['image_id'], 0) + 1
        report['inference_dual']['max_detections_per_image'] = max(counts.values()) if counts else 0
    else:
        assert results == [], 'results must reach rank 0 only'
    reports = [None] * info.world_size
    if info.distributed:
        import torch.distributed as dist
        dist.all_gather_object(reports, report)
    else: reports = [report]
    if main:
        print(json.dumps(reports, indent=1), flush=True)
        (work / 'report.json').write_text(json.dumps(reports, indent=1))
    cleanup_distributed()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--iters', type=int, default=6, help='training iterations per run')
    p.add_argument('--images', type=int, default=8, help='images of the synthetic set')
    p.add_argument('--batch-per-gpu', type=int, default=2)
    p.add_argument('--lr', type=float, default=0.002, help='a small rate: the check measures, it does not train')
    p.add_argument('--cal-iters', type=int, default=3)
    p.add_argument('--classes-per-iter', type=int, default=4, help='calibration draws per iteration (the set has 8 classes)')
    p.add_argument('--amp-inference', action='store_true', help='autocast during inference too')
    p.add_argument('--backbone-weights', default=None, help='torchvision ResNet-50 ImageNet state dict (the exact preset)')
    p.add_argument('--gpus', type=int, default=None, help='processes (default: min(2, visible GPUs))')
    p.add_argument('--cpu-dry-run', action='store_true', help='run the steps on the CPU with a tiny model')
    p.add_argument('--work', default=None, help='work folder (default: a temporary one)')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--ann', help=argparse.SUPPRESS); p.add_argument('--image-root', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker: return worker(args)
    import torch
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print('gpu-check: no CUDA device is visible (torch.cuda.is_available() is False): nothing was checked. '
              'Run it on a machine with an NVIDIA GPU, or with --cpu-dry-run to test the script itself.', file=sys.stderr)
        return 2
    n = (args.gpus or 1) if args.cpu_dry_run else (args.gpus or min(2, torch.cuda.device_count()))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        log(f"{'CPU dry run' if args.cpu_dry_run else torch.cuda.get_device_name(0)}; {n} process(es); work folder {work}")
        size = (96, 160) if args.cpu_dry_run else (800, 1333)
        ann, root = write_set(work / 'data', args.images, size=size)
        cmd = [sys.executable, str(Path(__file__).resolve()), '--worker', '--work', str(work), '--ann', str(ann),
               '--image-root', str(root)] + [a for a in (argv if argv is not None else sys.argv[1:]) if a != '--worker']
        if n > 1:
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={n}'] + cmd[1:]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        log(f'finished with status {rc} in {time.perf_counter() - t0:.0f} s')
        return rc


if __name__ == '__main__':
    sys.exit(main())
