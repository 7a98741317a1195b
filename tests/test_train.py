"""Heavier checks of simcal.train: torchrun on CPU (gloo), DDP gradients, exact resume, loss and inference, bad input.

Every run uses tiny models and images so that the file stays within about two minutes on two shared cores.
"""
import json, os, subprocess, sys, textwrap, time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from simcal.cli import main as cli_main
from simcal.core import save_json
from simcal.data import load_detection_dataset
from simcal.model import PRESETS
from simcal.checkpoint import load_checkpoint, load_detector
from simcal.inference import run_inference
from simcal.train import GroupedBatchSchedule, forward_losses, train_detector

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
# a model small enough for seconds-long runs (the demo preset's structure at 64-80 px)
TINY = ['fpn_channels=16', 'box_head_dim=32', 'mask_head_convs=1', 'mask_head_channels=16', 'min_size=64',
        'max_size=80', 'rpn_pre_nms_top_n_train=200', 'rpn_post_nms_top_n_train=100', 'rpn_pre_nms_top_n_test=100',
        'rpn_post_nms_top_n_test=100', 'rpn_batch_size_per_image=32', 'box_batch_size_per_image=32', 'warmup_iters=2']


def tiny_overrides(extra=()):
    from simcal.train import parse_overrides
    return parse_overrides(TINY + list(extra))


def write_toy_lvis(root, n_images=8, size=64, n_classes=3, seed=0, square=False, objects=2, category_offset=0):
    "Coloured rectangles on a dark background, in LVIS format: root/images/*.png, root/train.json."
    from PIL import Image
    root = Path(root); (root / 'images').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = [(230, 40, 40), (40, 200, 40), (40, 80, 230), (220, 200, 30), (200, 40, 200)]
    images, anns = [], []
    for i in range(n_images):
        h, w = (size, size) if square else ((size, size + 16) if i % 3 else (size + 16, size))
        arr = np.full((h, w, 3), 20, np.uint8)
        for _ in range(objects):
            c = int(rng.integers(n_classes))
            bw, bh = int(rng.integers(14, w // 2)), int(rng.integers(14, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            arr[y:y + bh, x:x + bw] = colours[c]
            anns.append({'id': len(anns) + 1, 'image_id': i + 1, 'category_id': c + 1 + category_offset,
                         'bbox': [x, y, bw, bh], 'area': bw * bh,
                         'segmentation': [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
        Image.fromarray(arr).save(root / 'images' / f'{i:03d}.png')
        images.append({'id': i + 1, 'file_name': f'{i:03d}.png', 'height': h, 'width': w,
                       'neg_category_ids': [], 'not_exhaustive_category_ids': []})
    cats = [{'id': c + 1 + category_offset, 'name': f'class{c + 1}', 'frequency': 'f'} for c in range(n_classes)]
    save_json({'images': images, 'annotations': anns, 'categories': cats}, root / 'train.json')
    return root / 'train.json', root / 'images'


def torchrun(args, nproc=2, timeout=240):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}'] + [str(a) for a in args]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def states_equal(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    return write_toy_lvis(tmp_path_factory.mktemp('toy'), n_images=8)


def test_torchrun_two_processes_gloo(toy, tmp_path):
    ann, root = toy
    out = tmp_path / 'run'
    p = torchrun(['-m', 'simcal.cli', 'train', '--train-ann', ann, '--image-root', root, '--out', out, '--preset', 'demo',
                  '--iters', 4, '--batch-per-gpu', 2, '--checkpoint-every', 2, '--log-every', 2, '--num-workers', 0,
                  '--no-progress', '--set'] + TINY)
    assert 'trained 4 iterations' in p.stdout
    assert sorted(x.name for x in out.iterdir()) == ['checkpoint_0000002.pth', 'config.json', 'last_checkpoint',
                                                    'metrics.jsonl', 'model_final.pth']
    ck = load_checkpoint(out / 'checkpoint_0000002.pth')
    assert ck['iteration'] == 2 and {'optimizer', 'scheduler', 'model', 'meta'} <= set(ck)
    train = ck['meta']['train']
    # two ranks of 2 images: global batch 4, so the demo's lr 0.02 (for 4 images) is used as is
    assert (train['world_size'], train['global_batch'], train['lr']) == (2, 4, pytest.approx(0.02))
    assert ck['meta']['category_ids'] == [1, 2, 3] and ck['meta']['preset'] == 'demo'
    log = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in log] == [2, 4]
    for r in log:
        assert all(np.isfinite(r[k]) for k in ('loss', 'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness'))
        assert r['loss'] == pytest.approx(sum(r[k] for k in r if k.startswith('loss_')), rel=1e-4)
    model, meta = load_detector(out / 'model_final.pth')
    assert meta['num_classes'] == 4
    # the final model moved away from the iteration-2 checkpoint (training happened on both ranks' data)
    assert states_equal(ck['model'], model.state_dict())
    # distributed inference: each rank takes every other image, rank 0 gathers; same detections as one process
    torchrun(['-m', 'simcal.cli', 'test', '--checkpoint', out / 'model_final.pth', '--ann', ann, '--image-root', root,
              '--out', out / 'test', '--num-workers', 0, '--no-progress', '--no-eval', '--max-dets', 20])
    dist_res = json.loads((out / 'test' / 'results.json').read_text())
    torch.set_num_threads(1)
    one = run_inference(model, load_detection_dataset(ann, root, label_map=None), max_dets=20, progress=False)
    assert len(dist_res) == len(one) == 20 * 8
    assert [r['image_id'] for r in dist_res] == [r['image_id'] for r in one]
    for a, b in zip(dist_res, one):
        assert a['category_id'] == b['category_id'] and a['score'] == pytest.approx(b['score'], abs=1e-4)
        assert a['bbox'] == pytest.approx(b['bbox'], abs=0.05)


# A worker that computes one DDP step's gradients; the test compares them with one process on the same global batch.
DDP_WORKER = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_train import deterministic_model, toy_dataset
    from simcal.comm import init_distributed, cleanup_distributed
    from simcal.train import forward_losses, GroupedBatchSchedule
    info = init_distributed('cpu')
    ds = toy_dataset({ann!r}, {root!r})
    model = deterministic_model(ds)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = GroupedBatchSchedule(ds.image_sizes(), 2, info.world_size, info.rank, seed=5).batch(3)
    images, targets = zip(*[ds[i] for i in batch])
    loss, _ = forward_losses(ddp, list(images), list(targets), 5, 3, info.rank, hflip_prob=0.0)
    loss.backward()
    if info.rank == 0:
        torch.save({{'batch0': batch, 'grads': {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}}}, {out!r})
    else:
        torch.save({{'batch1': batch}}, {out!r} + '.1')
    cleanup_distributed()
''')


def toy_dataset(ann, root):
    return load_detection_dataset(ann, root, train=True)


def deterministic_model(ds):
    "A GroupNorm model whose RPN and R-CNN samplers take the first k candidates (no randomness, equal counts per image)."
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
    from simcal.model import build_mask_rcnn

    class FirstK(BalancedPositiveNegativeSampler):
        def __call__(self, matched_idxs):
            pos_all, neg_all = [], []
            for m in matched_idxs:
                pos, neg = torch.where(m >= 1)[0], torch.where(m == 0)[0]
                n_pos = min(pos.numel(), int(self.batch_size_per_image * self.positive_fraction))
                n_neg = min(neg.numel(), self.batch_size_per_image - n_pos)
                pm, nm = torch.zeros_like(m, dtype=torch.uint8), torch.zeros_like(m, dtype=torch.uint8)
                pm[pos[:n_pos]] = 1; nm[neg[:n_neg]] = 1
                pos_all.append(pm); neg_all.append(nm)
            return pos_all, neg_all

    p = PRESETS['demo'].replace(**tiny_overrides(['norm="gn"', 'box_batch_size_per_image=8', 'neg_iou_floor=0.0']))
    torch.manual_seed(0)
    model = build_mask_rcnn(ds.label_map.num_classes, **p.model_kwargs())
    for s in (model.rpn, model.roi_heads):
        s.fg_bg_sampler = FirstK(s.fg_bg_sampler.batch_size_per_image, s.fg_bg_sampler.positive_fraction)
    return model.train()


def test_ddp_gradients_equal_single_process(tmp_path):
    # square images (no batch-dependent padding), 2 objects each: every image contributes the same number of
    # sampled anchors (32), RoIs (8) and positive RoIs (2), so the mean losses of a 4-image batch are the means of
    # the two ranks' 2-image losses, and DDP's averaged gradient must equal the single-process gradient.
    ann, root = write_toy_lvis(tmp_path / 'sq', n_images=8, square=True, objects=2)
    script = tmp_path / 'worker.py'
    out = str(tmp_path / 'grads.pth')
    script.write_text(DDP_WORKER.format(tests=str(Path(__file__).parent), ann=str(ann), root=str(root), out=out))
    torchrun([script])
    ddp = torch.load(out, weights_only=True)
    b1 = torch.load(out + '.1', weights_only=True)['batch1']
    ds = toy_dataset(ann, root)
    sched = GroupedBatchSchedule(ds.image_sizes(), 2, 2, 0, seed=5)
    assert ddp['batch0'] == sched.batch(3, 0) and b1 == sched.batch(3, 1)   # the ranks took their own shards
    model = deterministic_model(ds)
    images, targets = zip(*[ds[i] for i in ddp['batch0'] + b1])
    loss, _ = forward_losses(model, list(images), list(targets), 5, 3, 0, hflip_prob=0.0)
    loss.backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(single) == set(ddp['grads'])
    worst = 0.0
    for n, g in single.items():
        scale = g.abs().max().item() + 1e-8
        worst = max(worst, (g - ddp['grads'][n]).abs().max().item() / scale)
    # float32 sums in another order: agreement to 1e-4 of each tensor's largest entry
    assert worst < 1e-4, worst
    # and the check has teeth: the gradient of rank 0's half alone is far from it
    model.zero_grad()
    loss0, _ = forward_losses(model, list(images[:2]), list(targets[:2]), 5, 3, 0, hflip_prob=0.0)
    loss0.backward()
    assert max((model.get_parameter(n).grad - g).abs().max().item() / (g.abs().max().item() + 1e-8)
               for n, g in single.items()) > 1e-2


def test_resume_after_stop_matches_uninterrupted(toy, tmp_path):
    ann, root = toy
    args = ['simcal.cli', 'train', '--train-ann', ann, '--image-root', root, '--preset', 'demo', '--iters', 12,
            '--batch-per-gpu', 2, '--checkpoint-every', 3, '--log-every', 1, '--num-workers', 0, '--deterministic',
            '--seed', 3, '--no-progress', '--set'] + TINY
    def cmd(out, *extra): return [sys.executable, '-m'] + [str(a) for a in args] + ['--out', str(out)] + list(extra)
    # uninterrupted
    subprocess.run(cmd(tmp_path / 'full'), env=ENV, check=True, capture_output=True, timeout=240)
    # the same run, killed once its first checkpoint is on disk, then resumed
    stop = tmp_path / 'stop'
    p = subprocess.Popen(cmd(stop), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (stop / 'last_checkpoint').exists() and p.poll() is None and time.time() - t0 < 240: time.sleep(0.02)
    p.kill(); p.wait()
    assert not (stop / 'model_final.pth').exists(), 'the run finished before it could be stopped'
    stopped_at = int((stop / 'last_checkpoint').read_text().split('_')[1].split('.')[0])
    assert stopped_at in (3, 6, 9)
    r = subprocess.run(cmd(stop, '--resume'), env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_checkpoint(tmp_path / 'full' / 'model_final.pth')['model']
    b = load_checkpoint(stop / 'model_final.pth')['model']
    assert states_equal(a, b) == []          # bitwise
    log = [json.loads(l) for l in (stop / 'metrics.jsonl').read_text().splitlines()]
    assert [x['iter'] for x in log] == list(range(1, 13))      # no duplicated lines from the killed run
    full = [json.loads(l) for l in (tmp_path / 'full' / 'metrics.jsonl').read_text().splitlines()]
    assert [x['loss'] for x in log] == [x['loss'] for x in full]


def test_loss_falls_and_inference_limits(toy, tmp_path):
    ann, root = toy
    res = train_detector(ann, root, tmp_path / 'run', preset='demo', overrides=tiny_overrides(), iters=40,
                         batch_per_gpu=2, lr=0.02, checkpoint_every=0, num_workers=0, log_every=5, progress=False)
    log = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    first, last = log[0]['loss'], np.mean([r['loss'] for r in log[-2:]])
    assert last < 0.75 * first, (first, last)
    model, meta = load_detector(res['final'])
    ds = load_detection_dataset(ann, root)
    results = run_inference(model, ds, progress=False)
    per_image = Counter(r['image_id'] for r in results)
    assert 0 < max(per_image.values()) <= 300
    assert {r['category_id'] for r in results} <= {1, 2, 3}
    # simcal test honours --max-dets and writes results.json (boxes) and results_segm.json (masks, no box), and
    # metrics.json
    out = tmp_path / 'test'
    rc = cli_main(['test', '--checkpoint', str(res['final']), '--ann', str(ann), '--image-root', str(root),
                   '--out', str(out), '--max-dets', '7', '--num-workers', '0', '--no-progress'])
    assert rc == 0
    written = json.loads((out / 'results.json').read_text())
    assert max(Counter(r['image_id'] for r in written).values()) == 7
    masks = json.loads((out / 'results_segm.json').read_text())
    assert len(masks) == len(written) and all('bbox' not in r and 'segmentation' not in w for r, w in zip(masks, written))
    assert all(isinstance(r['segmentation']['counts'], str) for r in masks)
    # scores at full float32 precision: the records hold the model's float32 values, not 6-decimal roundings
    assert all(np.float32(r['score']) == r['score'] for r in written) and any(r['score'] != round(r['score'], 6) for r in written)
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['protocol'] == 'synth' and len(metrics['bbox']['bins']) == 4 and 0 <= metrics['segm']['AP'] <= 1


def test_bad_inputs(toy, tmp_path, capsys):
    ann, root = toy
    ckpt = tmp_path / 'run' / 'model_final.pth'
    train_detector(ann, root, tmp_path / 'run', preset='demo', overrides=tiny_overrides(), iters=1, batch_per_gpu=2,
                   checkpoint_every=0, num_workers=0, progress=False)
    def test_cli(checkpoint, ann_file):
        rc = cli_main(['test', '--checkpoint', str(checkpoint), '--ann', str(ann_file), '--image-root', str(root),
                       '--out', str(tmp_path / 'o'), '--num-workers', '0', '--no-progress', '--no-eval'])
        return rc, capsys.readouterr().err
    rc, err = test_cli(tmp_path / 'missing.pth', ann)
    assert rc == 2 and 'missing.pth: checkpoint not found' in err
    bad = tmp_path / 'corrupt.pth'; bad.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
    rc, err = test_cli(bad, ann)
    assert rc == 2 and 'not a readable PyTorch checkpoint' in err
    # a dataset with other categories than the model's
    other_ann, _ = write_toy_lvis(tmp_path / 'other', n_images=2, category_offset=10)
    rc, err = test_cli(ckpt, other_ann)
    assert rc == 2 and 'categories' in err and 'ids only in the dataset: [11, 12, 13]' in err
    # a wrong class count, and a checkpoint of another model
    with pytest.raises(ValueError, match='has 4 classes'): load_detector(ckpt, num_classes=81)
    with pytest.raises(ValueError, match='a checkpoint of another model'): load_detector(ckpt, backbone='resnet34')
    # resuming on a dataset with other classes
    with pytest.raises(ValueError, match='cannot resume exactly: .*category_ids'):
        train_detector(other_ann, other_ann.parent / 'images', tmp_path / 'run2', preset='demo', overrides=tiny_overrides(),
                       iters=1, batch_per_gpu=2, num_workers=0, progress=False, resume=ckpt)
    # the final model carries no optimizer state: it cannot be resumed, and says so
    # bad --set values
    rc = cli_main(['train', '--train-ann', str(ann), '--image-root', str(root), '--out', str(tmp_path / 'r3'),
                   '--set', 'no_such_setting=1'])
    assert rc == 2 and 'unknown preset setting' in capsys.readouterr().err
