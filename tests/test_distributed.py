"""Distributed runs as users launch them, on CPU (gloo): more processes than calibration draws, two torchrun
launchers joined as two nodes by a c10d rendezvous on 127.0.0.1, and the mixed-precision (bfloat16 autocast) code
path of training.

Tiny models and a few iterations, so that the file stays within a few minutes on two shared cores.
"""
import json, os, socket, subprocess, sys
from pathlib import Path

import pytest
import torch

from simcal.calibration import CALIBRATION_FILE, LOG_FILE, calibrate, load_calibration
from simcal.checkpoint import load_checkpoint, load_detector, make_meta, save_checkpoint
from simcal.data import load_detection_dataset
from simcal.model import PRESETS, build_mask_rcnn
from test_train import TINY, write_toy_lvis

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
CAL_TINY = dict(fpn_channels=16, box_head_dim=32, mask_head_convs=1, mask_head_channels=16, min_size=64, max_size=64,
                rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=100,
                rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=32, box_batch_size_per_image=32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def single_node(args, nproc, timeout=300):
    "`torchrun --standalone --nproc-per-node nproc -m simcal.cli ARGS`."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}', '-m', 'simcal.cli']
    p = subprocess.run(cmd + [str(a) for a in args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def two_nodes(args, timeout=300):
    "Two torchrun launchers, one process each, joined by a c10d rendezvous on 127.0.0.1 (as on two machines)."
    port, rid = free_port(), f'simcal-test-{os.getpid()}'
    procs = []
    for host in (1, 0):   # the launcher that hosts the rendezvous store, then the other one
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc-per-node=1', '--rdzv-backend=c10d',
               f'--rdzv-endpoint=127.0.0.1:{port}', f'--rdzv-id={rid}', f'--rdzv-conf=is_host={host}',
               '--max-restarts=0', '-m', 'simcal.cli'] + [str(a) for a in args]
        procs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs: outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
    for p, (o, e) in zip(procs, outs): assert p.returncode == 0, o[-3000:] + e[-3000:]
    return ''.join(o for o, _ in outs)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    return write_toy_lvis(tmp_path_factory.mktemp('toy'), n_images=8, square=True)


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    from simcal.synth import make_synthetic
    p = make_synthetic(tmp_path_factory.mktemp('synth') / 'set', seed=0, num_classes=20, num_train=60, num_val=20,
                       image_size=64, progress=False)
    return p.train_ann, p.train_images


@pytest.fixture(scope='module')
def detector_ckpt(synth, tmp_path_factory):
    ds = load_detection_dataset(synth[0], synth[1], train=True)
    preset = PRESETS['demo'].replace(**CAL_TINY)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('det') / 'model_final.pth'
    save_checkpoint(path, build_mask_rcnn(ds.label_map.num_classes, **preset.model_kwargs()).eval(),
                    make_meta(preset, ds.label_map, stats=ds.stats))
    return path


def calibrate_args(synth, detector_ckpt, out, iters, classes_per_iter=4):
    return ['calibrate', '--detector', detector_ckpt, '--train-ann', synth[0], '--image-root', synth[1], '--out', out,
            '--head', '3fc_ft', '--iters', iters, '--lr', 0.05, '--classes-per-iter', classes_per_iter,
            '--rois-per-image', 32, '--seed', 2, '--no-progress', '--checkpoint-every', iters]


def test_more_processes_than_draws(synth, detector_ckpt, tmp_path):
    # 3 processes, 2 draws per iteration: rank 0 has no image in any iteration, adds nothing to the loss and still
    # joins every collective; the head ends where one process computing the same global batches ends
    single_node(calibrate_args(synth, detector_ckpt, tmp_path / 'three', 3, classes_per_iter=2), nproc=3)
    three = load_calibration(tmp_path / 'three' / CALIBRATION_FILE)
    assert three['iteration'] == 3 and three['world_size'] == 3
    log = [json.loads(l) for l in (tmp_path / 'three' / LOG_FILE).read_text().splitlines()]
    assert [r['iter'] for r in log] == [1, 2, 3] and all(r['fg'] == r['bg'] > 0 for r in log)
    model = load_detector(detector_ckpt)[0]
    ds = load_detection_dataset(synth[0], synth[1], train=True)
    one = calibrate(model, ds, tmp_path / 'one', head='3fc_ft', iters=3, lr=0.05, classes_per_iter=2, rois_per_image=32,
                    seed=2, progress=False)
    start = load_detector(detector_ckpt)[0].roi_heads.box_head.fc6.weight
    assert not torch.equal(one['head']['fc6.weight'], start)          # the head moved
    for k in one['head']: torch.testing.assert_close(three['head'][k], one['head'][k], atol=1e-5, rtol=1e-4)
    one_log = [json.loads(l) for l in (tmp_path / 'one' / LOG_FILE).read_text().splitlines()]
    assert [r['loss'] for r in log] == pytest.approx([r['loss'] for r in one_log], rel=1e-4)


def test_two_nodes_equal_one_node(toy, synth, detector_ckpt, tmp_path):
    ann, root = toy
    train = ['train', '--train-ann', ann, '--image-root', root, '--preset', 'demo', '--iters', 3, '--batch-per-gpu', 2,
             '--checkpoint-every', 0, '--log-every', 1, '--num-workers', 0, '--deterministic', '--seed', 4,
             '--no-progress', '--set'] + TINY
    out = two_nodes(train[:1] + ['--out', tmp_path / 'nodes'] + train[1:])
    assert 'trained 3 iterations' in out
    single_node(train[:1] + ['--out', tmp_path / 'node'] + train[1:], nproc=2)
    a = load_checkpoint(tmp_path / 'nodes' / 'model_final.pth')
    b = load_checkpoint(tmp_path / 'node' / 'model_final.pth')
    assert a['meta']['train']['world_size'] == b['meta']['train']['world_size'] == 2
    assert [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])] == []       # bitwise
    la, lb = [(tmp_path / d / 'metrics.jsonl').read_text() for d in ('nodes', 'node')]
    assert [json.loads(l)['loss'] for l in la.splitlines()] == [json.loads(l)['loss'] for l in lb.splitlines()]
    # calibration across the two nodes
    two_nodes(calibrate_args(synth, detector_ckpt, tmp_path / 'cal_nodes', 2))
    single_node(calibrate_args(synth, detector_ckpt, tmp_path / 'cal_node', 2), nproc=2)
    ca, cb = load_calibration(tmp_path / 'cal_nodes' / CALIBRATION_FILE), load_calibration(tmp_path / 'cal_node' / CALIBRATION_FILE)
    assert ca['world_size'] == cb['world_size'] == 2 and ca['iteration'] == 2
    for k in ca['head']: assert torch.equal(ca['head'][k], cb['head'][k]), k


def test_amp_path_on_cpu(toy, tmp_path):
    # `--amp` on CPU runs the training step under bfloat16 autocast (the GPU path with float16 + scaler is the
    # same code); then an FP32 checkpoint is resumed with AMP
    ann, root = toy
    args = ['train', '--train-ann', ann, '--image-root', root, '--preset', 'demo', '--iters', 4, '--batch-per-gpu', 2,
            '--checkpoint-every', 2, '--log-every', 1, '--num-workers', 0, '--seed', 1, '--no-progress', '--set'] + TINY
    from simcal.cli import main
    assert main([str(a) for a in args[:1] + ['--out', tmp_path / 'fp32'] + args[1:]]) == 0
    assert main([str(a) for a in args[:1] + ['--out', tmp_path / 'amp', '--amp'] + args[1:]]) == 0
    amp = load_checkpoint(tmp_path / 'amp' / 'model_final.pth')
    fp32 = load_checkpoint(tmp_path / 'fp32' / 'model_final.pth')
    assert amp['meta']['train']['amp'] is True
    log = [json.loads(l) for l in (tmp_path / 'amp' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in log] == [1, 2, 3, 4] and all(0 < r['loss'] < 100 for r in log)
    # bfloat16 really ran: same data and seed, weights differ from the FP32 run's
    assert any(not torch.equal(amp['model'][k], fp32['model'][k]) for k in amp['model'] if amp['model'][k].is_floating_point())
    # FP32 checkpoint -> AMP resume (its scaler state is empty), and AMP checkpoint -> FP32 resume
    (tmp_path / 'mix').mkdir()
    (tmp_path / 'mix' / 'checkpoint_0000002.pth').write_bytes((tmp_path / 'fp32' / 'checkpoint_0000002.pth').read_bytes())
    assert main([str(a) for a in args[:1] + ['--out', tmp_path / 'mix', '--amp', '--resume'] + args[1:]]) == 0
    (tmp_path / 'mix2').mkdir()
    (tmp_path / 'mix2' / 'checkpoint_0000002.pth').write_bytes((tmp_path / 'amp' / 'checkpoint_0000002.pth').read_bytes())
    assert main([str(a) for a in args[:1] + ['--out', tmp_path / 'mix2', '--resume'] + args[1:]]) == 0
    assert load_checkpoint(tmp_path / 'mix2' / 'model_final.pth')['meta']['train']['amp'] is False
