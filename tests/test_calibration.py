"""Checks of simcal.calibration on the demo detector structure at a tiny size and the embedded synthetic set:
proposal-level sampling and batch composition, the 3fc_ft copy, dual-head inference (against the real predictor),
the T sweep from two runs, 2-process calibration under torchrun (gloo) with exact resume, several heads trained
on the same batches in one run (bitwise the heads of separate runs; exact resume; refused resumes), and bad input.

Every detector here has random weights: the checks are about mechanics, not accuracy (see the repro notebooks).
"""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from simcal.calibration import (CALIBRATION_FILE, LOG_FILE, DualHeadScorer, attach_calibration, build_calibration_head,
                                calibrate, combine_dual_results, compose_calibration_batch, detach_calibration,
                                detections_to_records, dual_head_scores, load_calibration, set_dual_mode)
from simcal.detector import ScoredBoxPredictor, as_detector, train_proposal_counts
from simcal.cli import main as cli_main
from simcal.core import InputError, PROTOCOLS, save_json
from simcal.data import load_detection_dataset
from simcal.sampler import BiLevelSampler
from simcal.checkpoint import load_detector

sys.path.insert(0, os.path.dirname(__file__))
from stand_ins import tiny_detector, save_tiny_detector  # noqa: E402

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
T_SYNTH = PROTOCOLS['synth'].dual_threshold


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    "The embedded synthetic set (a small instance of it): (train_ann, train_images, val_ann, val_images)."
    from simcal.synth import make_synthetic
    p = make_synthetic(tmp_path_factory.mktemp('synth') / 'set', seed=0, num_classes=40, num_train=200, num_val=30,
                       image_size=64, progress=False)
    return p.train_ann, p.train_images, p.val_ann, p.val_images


@pytest.fixture(scope='module')
def train_set(synth):
    return load_detection_dataset(synth[0], synth[1], train=True)


@pytest.fixture(scope='module')
def detector_ckpt(train_set, tmp_path_factory):
    "A tiny demo-structure detector with random weights, saved as `simcal train` would."
    return save_tiny_detector(tmp_path_factory.mktemp('det') / 'model_final.pth', train_set)


@pytest.fixture(scope='module')
def detector(detector_ckpt):
    return load_detector(detector_ckpt)[0]


def drawn_batch(ds, iteration=0, seed=0, n=8):
    s = BiLevelSampler(ds.class_to_indices(), classes_per_iter=n, seed=seed)
    draws = s.draws(iteration)
    items = [ds[i] for _, i in draws]
    return [x[0] for x in items], [x[1] for x in items], [l for l, _ in draws]


def test_rpn_uses_training_counts_in_eval_mode(detector, train_set):
    images, _, _ = drawn_batch(train_set)
    il, _ = detector.transform(images)
    feats = detector.backbone(il.tensors)
    with torch.no_grad():
        test_props, _ = detector.rpn(il, feats)
        with train_proposal_counts(detector.rpn):
            train_props, _ = detector.rpn(il, feats)
            assert not detector.rpn.training
    assert max(len(p) for p in test_props) <= 50
    assert max(len(p) for p in train_props) > 50 and max(len(p) for p in train_props) <= 150
    assert detector.rpn.post_nms_top_n() == 50   # restored


@pytest.mark.parametrize('floor', [0.0, 0.1])
def test_batch_composition(detector, train_set, floor):
    images, targets, drawn = drawn_batch(train_set, iteration=3)
    n_bg_low = 0
    for it in range(3):
        images, targets, drawn = drawn_batch(train_set, iteration=it)
        b = compose_calibration_batch(detector, images, targets, list(range(len(images))), drawn, len(images), seed=1,
                                      iteration=it, rois_per_image=64, positive_fraction=0.25, neg_iou_floor=floor)
        assert b['num_fg'] > 0 and b['num_fg'] == b['num_bg']                  # fg:bg = 1:1 over the batch
        assert b['features'].shape == (2 * b['num_fg'], 16, 7, 7)
        assert len(b['labels']) == 2 * b['num_fg']
        for rois, labels, gt, gl, c in zip(b['rois'], b['roi_labels'], b['gt_boxes'], b['gt_labels'], drawn):
            assert set(labels.tolist()) <= {0, c}                              # only the drawn class's foreground
            iou = box_iou(rois, gt)
            fg = labels == c
            assert (iou[fg][:, gl == c].max(1).values >= 0.5).all()
            neg_iou = iou[~fg].max(1).values
            assert (neg_iou < 0.5).all()
            if floor: assert (neg_iou >= floor).all()
            n_bg_low += int((neg_iou < 0.1).sum())
    if floor == 0.0: assert n_bg_low > 0   # without the floor, low-overlap negatives are used (the floor matters)
    assert detector.roi_heads.neg_iou_floor == 0.1 and detector.roi_heads.fg_bg_sampler.batch_size_per_image == 32


def test_3fc_ft_starts_from_the_detector(detector, train_set):
    images, targets, drawn = drawn_batch(train_set)
    b = compose_calibration_batch(detector, images, targets, list(range(8)), drawn, 8, seed=0, iteration=0)
    head = build_calibration_head(detector, '3fc_ft')
    with torch.no_grad():
        ours = head(b['features'])
        theirs = detector.roi_heads.box_predictor(detector.roi_heads.box_head(b['features']))[0]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert head.fc6.weight.data_ptr() != detector.roi_heads.box_head.fc6.weight.data_ptr()


def cal_checkpoint(model, ds, kind='3fc_rand', seed=5):
    torch.manual_seed(seed)
    head = build_calibration_head(model, kind)
    ids = list(ds.label_map.category_ids)
    counts = [0] + [ds.stats.instance_counts[c] for c in ids]
    return {'format': 'simcal-calibration-head', 'kind': kind, 'num_classes': head.num_classes,
            'feature_shape': list(head.feature_shape), 'hidden': head.hidden, 'head': head.state_dict(),
            'category_ids': ids, 'instance_counts': counts, 'dual_threshold': T_SYNTH, 'iteration': 0}


def test_dual_predictor_columns(detector, train_set):
    ck = cal_checkpoint(detector, train_set)
    counts = torch.tensor(ck['instance_counts'])
    rare = torch.where(counts[1:] < T_SYNTH)[0] + 1
    common = torch.where(counts[1:] >= T_SYNTH)[0] + 1
    assert len(rare) and len(common)   # the synthetic set has both sides of T
    images, targets, drawn = drawn_batch(train_set)
    feats = compose_calibration_batch(detector, images, targets, list(range(8)), drawn, 8, seed=0, iteration=0)['features']
    with torch.no_grad():
        p_o = torch.softmax(detector.roi_heads.box_predictor(detector.roi_heads.box_head(feats))[0], -1)
        head = build_calibration_head(detector, ck['kind']); head.load_state_dict(ck['head'])
        p_c = torch.softmax(head(feats), -1)
        try:
            attach_calibration(detector, ck, mode='dual')
            rh = detector.roi_heads
            assert isinstance(rh.box_predictor, ScoredBoxPredictor) and as_detector(detector).scorer().threshold == T_SYNTH
            assert isinstance(as_detector(detector).scorer(), DualHeadScorer)
            logp, deltas = rh.box_predictor(rh.box_head(feats))
        finally:
            detach_calibration(detector)
    p = logp.exp()
    torch.testing.assert_close(p[:, common], p_o[:, common], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p[:, rare], p_c[:, rare], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p[:, 0], p_o[:, 0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(p_o[:, rare], p_c[:, rare], atol=1e-3)
    # the pure function agrees, and the columns do not sum to one (no renormalisation)
    torch.testing.assert_close(dual_head_scores(p_o, p_c, counts, 'dual', T_SYNTH), p, atol=1e-6, rtol=1e-5)
    assert (p.sum(1) - 1).abs().max() > 1e-3
    assert type(detector.roi_heads.box_predictor).__name__ == 'AgnosticBoxPredictor'


def test_combine_equals_real_dual_inference(detector, train_set, synth):
    val = load_detection_dataset(synth[2], synth[3], train=False, label_map=train_set.label_map)
    images = [val[i][0] for i in range(3)]
    ids = [val[i][1]['image_id'] for i in range(3)]
    cat = [None] + list(train_set.label_map.category_ids)
    ck = cal_checkpoint(detector, train_set, seed=7)
    counts = dict(zip(ck['category_ids'], ck['instance_counts'][1:]))

    def run(mode, T=None, max_dets=300):
        detector.roi_heads.detections_per_img = max_dets
        set_dual_mode(detector, mode, T)
        with torch.no_grad(): return detections_to_records(detector(images), ids, cat)

    saved = detector.roi_heads.detections_per_img
    attach_calibration(detector, ck, mode='orig')
    try:
        orig_all, cal_all = run('orig', max_dets=10 ** 7), run('cal', max_dets=10 ** 7)
        assert len(orig_all) > 300 * 3   # uncapped runs keep more than the cap
        for T in (2, T_SYNTH, 64, 10 ** 9):
            for cap in (300, 50):
                real = run('dual', T, cap)
                comb = combine_dual_results(orig_all, cal_all, counts, T, cap)
                key = lambda r: (r['image_id'], -r['score'], r['category_id'], r['bbox'])
                real, comb = sorted(real, key=key), sorted(comb, key=key)
                assert len(real) == len(comb) == 3 * cap
                for a, b in zip(real, comb):
                    assert (a['image_id'], a['category_id']) == (b['image_id'], b['category_id'])
                    assert a['score'] == pytest.approx(b['score'], abs=1e-7)
                    np.testing.assert_allclose(a['bbox'], b['bbox'], atol=1e-3)
    finally:
        detach_calibration(detector); detector.roi_heads.detections_per_img = saved


def torchrun(args, nproc=2, timeout=240):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}',
           '-m', 'simcal.cli'] + [str(a) for a in args]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_torchrun_calibration_and_exact_resume(synth, detector_ckpt, train_set, tmp_path):
    common = ['calibrate', '--detector', detector_ckpt, '--train-ann', synth[0], '--image-root', synth[1],
              '--head', '3fc_ft', '--lr', 0.05, '--lr-steps', 4, 5, '--rois-per-image', 64, '--seed', 3,
              '--no-progress', '--checkpoint-every', 2]
    # the uninterrupted run trains two heads on the same batches (one DDP wrapper each); the interrupted one, 3fc_ft
    # alone: bitwise equal heads show both exact resume and that a head trained beside another is the head trained alone
    head = common.index('--head') + 1
    both = common[:head] + ['2fc_rand'] + common[head:]
    p = torchrun(both + ['--out', tmp_path / 'full', '--iters', 6])
    assert 'a 3fc_ft head for 6 iterations' in p.stdout and 'a 2fc_rand head' in p.stdout and '2 processes' in p.stdout
    assert sorted(x.name for x in (tmp_path / 'full').iterdir()) == ['2fc_rand', '3fc_ft']
    torchrun(common + ['--out', tmp_path / 'part', '--iters', 3])
    torchrun(common + ['--out', tmp_path / 'part', '--iters', 6, '--resume'])
    full, part = load_calibration(tmp_path / 'full' / '3fc_ft' / CALIBRATION_FILE), load_calibration(tmp_path / 'part' / CALIBRATION_FILE)
    assert load_calibration(tmp_path / 'full' / '2fc_rand' / CALIBRATION_FILE)['kind'] == '2fc_rand'
    assert full['iteration'] == part['iteration'] == 6 and full['world_size'] == 2
    for k in full['head']: assert torch.equal(full['head'][k], part['head'][k]), k
    log = [json.loads(l) for l in (tmp_path / 'full' / '3fc_ft' / LOG_FILE).read_text().splitlines()]
    part_log = [json.loads(l) for l in (tmp_path / 'part' / LOG_FILE).read_text().splitlines()]
    assert [r['loss'] for r in log] == [r['loss'] for r in part_log]
    assert [r['iter'] for r in log] == list(range(1, 7))
    assert [r['lr'] for r in log] == pytest.approx([0.05] * 4 + [0.005, 0.0005])
    assert all(r['fg'] == r['bg'] > 0 for r in log)
    assert [r['iter'] for r in part_log] == list(range(1, 7))
    # what it recorded about the detector and the data
    assert full['detector']['checkpoint'] == str(detector_ckpt) and len(full['detector']['sha256']) == 64
    assert full['category_ids'] == list(train_set.label_map.category_ids)
    assert full['dual_threshold'] == T_SYNTH and full['config']['neg_iou_floor'] == 0.1
    # one process computes the same global batches: the head ends (numerically) where the 2-process run did
    model = load_detector(detector_ckpt)[0]
    one = calibrate(model, train_set, tmp_path / 'one', head='3fc_ft', iters=6, lr=0.05, lr_steps=[4, 5],
                    rois_per_image=64, seed=3, progress=False)
    for k in full['head']: torch.testing.assert_close(one['head'][k], full['head'][k], atol=1e-5, rtol=1e-4)
    # the calibrated head plugs into `simcal test`
    out = tmp_path / 'test'
    args = ['test', '--checkpoint', detector_ckpt, '--ann', synth[2], '--image-root', synth[3], '--out', out,
            '--cal-head', tmp_path / 'full' / '3fc_ft' / CALIBRATION_FILE, '--mode', 'dual', '--no-eval', '--no-progress', '--num-workers', 0]
    assert cli_main([str(a) for a in args]) == 0
    res = json.loads((out / 'results.json').read_text())
    assert len(res) > 0 and set(r['category_id'] for r in res) <= set(full['category_ids'])


MULTI = dict(iters=4, lr=0.05, lr_steps=[3], classes_per_iter=6, rois_per_image=32, seed=2, progress=False,
             checkpoint_every=2, dual_threshold=T_SYNTH)
KINDS = ['2fc_rand', '3fc_rand', '3fc_ft']


def logged_losses(folder):
    return [r['loss'] for r in map(json.loads, (Path(folder) / LOG_FILE).read_text().splitlines())]


def test_several_heads_equal_separate_runs(detector, train_set, tmp_path):
    # three heads on the same batches in one run == each head alone with the same seed: bitwise weights and losses
    multi = calibrate(detector, train_set, tmp_path / 'multi', head=KINDS, **MULTI)
    assert list(multi) == KINDS and sorted(x.name for x in (tmp_path / 'multi').iterdir()) == sorted(KINDS)
    for kind in KINDS:
        alone = calibrate(detector, train_set, tmp_path / kind, head=kind, **MULTI)
        on_disk = load_calibration(tmp_path / 'multi' / kind / CALIBRATION_FILE)   # a normal single-head file
        assert alone['kind'] == on_disk['kind'] == kind and on_disk['config'] == alone['config']
        assert set(on_disk['head']) == set(alone['head'])
        for k in alone['head']:
            assert torch.equal(on_disk['head'][k], alone['head'][k]), (kind, k)
            assert torch.equal(multi[kind]['head'][k], alone['head'][k]), (kind, k)
        losses = logged_losses(tmp_path / 'multi' / kind)
        assert len(losses) == 4 and losses == logged_losses(tmp_path / kind), kind
        assert not (tmp_path / kind / kind).exists()   # one head: today's layout, files in the folder itself
    # the heads trained: weights moved, and the kinds differ from each other
    assert logged_losses(tmp_path / 'multi' / '2fc_rand') != logged_losses(tmp_path / 'multi' / '3fc_rand')
    start = build_calibration_head(detector, '3fc_ft')
    assert not torch.equal(multi['3fc_ft']['head']['cls_score.weight'], start.cls_score.weight.detach())
    # a one-element list keeps the one-head layout and returns {kind: checkpoint}
    one = calibrate(detector, train_set, tmp_path / 'list', head=['3fc_rand'], **{**MULTI, 'iters': 1})
    assert list(one) == ['3fc_rand'] and (tmp_path / 'list' / CALIBRATION_FILE).is_file()


def test_several_heads_resume_exactly(detector, train_set, tmp_path):
    two = ['3fc_ft', '2fc_rand']
    full = calibrate(detector, train_set, tmp_path / 'full', head=two, **{**MULTI, 'iters': 3})
    part = calibrate(detector, train_set, tmp_path / 'int', head=two, **{**MULTI, 'iters': 1})
    resumed = calibrate(detector, train_set, tmp_path / 'int', head=two, resume=True, **{**MULTI, 'iters': 3})
    assert all(part[k]['iteration'] == 1 and resumed[k]['iteration'] == 3 for k in two)
    for kind in two:
        for k in full[kind]['head']: assert torch.equal(resumed[kind]['head'][k], full[kind]['head'][k]), (kind, k)
        assert logged_losses(tmp_path / 'int' / kind) == logged_losses(tmp_path / 'full' / kind)
    # heads out of step: one head's checkpoint from another iteration
    import shutil
    calibrate(detector, train_set, tmp_path / 'step', head=two, **{**MULTI, 'iters': 1})
    shutil.copy(tmp_path / 'full' / '2fc_rand' / CALIBRATION_FILE, tmp_path / 'step' / '2fc_rand' / CALIBRATION_FILE)
    with pytest.raises(InputError, match=r"out of step.*3fc_ft 1, 2fc_rand 3"):
        calibrate(detector, train_set, tmp_path / 'step', head=two, resume=True, **MULTI)
    # resuming with a head that did not run with them, or without one of them
    for other in (['3fc_rand', '2fc_rand'], ['3fc_ft'], ['3fc_rand']):
        with pytest.raises(InputError, match=r"int: field 'head': cannot resume --head .* the folder holds the checkpoints "
                                             r"of the heads 2fc_rand 3fc_ft, which resume together"):
            calibrate(detector, train_set, tmp_path / 'int', head=other, resume=True, **MULTI)
    with pytest.raises(InputError, match=r"cannot resume 2 heads: this is a one-head run \(3fc_ft\)"):
        calibrate(detector, train_set, tmp_path / 'int' / '3fc_ft', head=['3fc_rand', '2fc_rand'], resume=True, **MULTI)
    with pytest.raises(InputError, match=r"3fc_rand.*checkpoints of 3fc_ft, 2fc_rand exist but not of 3fc_rand"):
        calibrate(detector, train_set, tmp_path / 'int', head=two + ['3fc_rand'], resume=True, **MULTI)
    (tmp_path / 'int' / '2fc_rand' / CALIBRATION_FILE).unlink()   # one head's checkpoint lost
    with pytest.raises(InputError, match=r"2fc_rand.*checkpoints of 3fc_ft exist but not of 2fc_rand"):
        calibrate(detector, train_set, tmp_path / 'int', head=two, resume=True, **MULTI)
    # duplicate or unknown kinds, from the function and the command line
    with pytest.raises(InputError, match=r"--head.*more than once: 3fc_ft"):
        calibrate(detector, train_set, tmp_path / 'dup', head=['3fc_ft', '2fc_rand', '3fc_ft'], **MULTI)
    with pytest.raises(InputError, match=r"--head.*unknown head kind.*'4fc'"):
        calibrate(detector, train_set, tmp_path / 'dup', head=['4fc'], **MULTI)
    assert not (tmp_path / 'dup').exists()


def test_several_heads_on_the_command_line(synth, detector_ckpt, tmp_path, capsys):
    args = ['calibrate', '--detector', str(detector_ckpt), '--train-ann', str(synth[0]), '--image-root', str(synth[1]),
            '--iters', '1', '--rois-per-image', '32', '--classes-per-iter', '4', '--no-progress']
    rc = cli_main(args + ['--out', str(tmp_path / 'dup'), '--head', '3fc_ft', '3fc_ft'])
    err = capsys.readouterr().err
    assert rc == 2 and '--head' in err and 'more than once' in err
    assert cli_main(args + ['--out', str(tmp_path / 'two'), '--head', '3fc_rand', '3fc_ft']) == 0
    out = capsys.readouterr().out
    assert 'a 3fc_rand head for 1 iterations' in out and 'a 3fc_ft head for 1 iterations' in out
    for kind in ('3fc_rand', '3fc_ft'):
        assert load_calibration(tmp_path / 'two' / kind / CALIBRATION_FILE)['kind'] == kind
        assert len(logged_losses(tmp_path / 'two' / kind)) == 1
    assert cli_main(args + ['--out', str(tmp_path / 'one')]) == 0   # the default: one 3fc_ft head, today's files
    assert sorted(x.name for x in (tmp_path / 'one').iterdir()) == [CALIBRATION_FILE, LOG_FILE]


def test_bad_input(detector, train_set, synth, detector_ckpt, tmp_path, capsys):
    ck = cal_checkpoint(detector, train_set)
    other, _ = tiny_detector(train_set.label_map.num_classes + 3)
    with pytest.raises(InputError, match='num_classes'): attach_calibration(other, ck)
    narrow, _ = tiny_detector(train_set.label_map.num_classes, fpn_channels=8)
    with pytest.raises(InputError, match='feature_shape'): attach_calibration(narrow, ck)
    wrong_ids = {c + 1000: n for c, n in train_set.stats.instance_counts.items()}
    with pytest.raises(InputError, match='another dataset'): attach_calibration(detector, ck, instance_counts=wrong_ids)
    with pytest.raises(InputError, match='another dataset'):
        attach_calibration(detector, ck, category_ids=[c + 1 for c in ck['category_ids']])
    assert type(detector.roi_heads.box_predictor).__name__ == 'AgnosticBoxPredictor'
    # files: missing, not a checkpoint, a detector checkpoint instead of a head
    with pytest.raises(InputError, match='not found'): attach_calibration(detector, tmp_path / 'nope.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(InputError, match='junk.pt'): load_calibration(tmp_path / 'junk.pt')
    with pytest.raises(InputError, match='format'): load_calibration(detector_ckpt)
    # calibrating a detector on a dataset with other categories: a one-line error, exit code 2
    data = json.loads(Path(synth[0]).read_text())
    for c in data['categories']: c['id'] += 1000
    for a in data['annotations']: a['category_id'] += 1000
    save_json(data, tmp_path / 'other.json')
    rc = cli_main(['calibrate', '--detector', str(detector_ckpt), '--train-ann', str(tmp_path / 'other.json'),
                   '--image-root', str(synth[1]), '--out', str(tmp_path / 'cal'), '--iters', '1', '--no-progress'])
    err = capsys.readouterr().err
    assert rc == 2 and 'other.json' in err and 'categories' in err
    # resuming with other settings
    opts = dict(iters=1, rois_per_image=32, progress=False)
    calibrate(detector, train_set, tmp_path / 'r', seed=0, **opts)
    with pytest.raises(InputError, match='seed'): calibrate(detector, train_set, tmp_path / 'r', seed=1, resume=True, **{**opts, 'iters': 2})


def test_a_multi_stage_detector_plugs_in(detector_ckpt, train_set, tmp_path):
    # A stand-in for a cascade: the tiny Mask R-CNN seen as two stages (stage 2 re-samples the RoIs with its own
    # seeds and reads the same features). Only the adapter knows it: calibration, batch composition, heads,
    # checkpoints and dual-head inference are the library's, untouched.
    from stand_ins import TwoStageAdapter as TwoStage, TwoStagePredictor

    model = load_detector(detector_ckpt)[0]
    two = TwoStage(model)
    ck = calibrate(two, train_set, tmp_path / 'cal', head='3fc_ft', iters=2, lr=0.05, classes_per_iter=4,
                   rois_per_image=32, seed=1, progress=False, dual_threshold=T_SYNTH)
    assert len(ck['stage_heads']) == 1 and ck['config']['iters'] == 2
    # both heads started as the same copy of the classification path and were trained on different RoIs
    assert any(not torch.equal(ck['head'][k], ck['stage_heads'][0][k]) for k in ck['head'])
    one = load_detector(detector_ckpt)[0]
    with pytest.raises(InputError, match='heads for 2 stage'): attach_calibration(one, ck)   # a one-stage detector
    val_images = [train_set[i][0] for i in range(2)]
    with torch.no_grad():
        plain = model(val_images)
        attach_calibration(two, ck, mode='orig')
        assert isinstance(model.roi_heads.box_predictor, TwoStagePredictor)
        orig = model(val_images)
        set_dual_mode(two, 'dual')
        dual = model(val_images)
        detach_calibration(two)
    for a, b in zip(plain, orig):     # the mean of two equal stages' logits: the detector's own scores
        torch.testing.assert_close(a['scores'], b['scores'], atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(a['scores'], b['scores']) for a, b in zip(plain, dual))
    assert type(model.roi_heads.box_predictor).__name__ == 'AgnosticBoxPredictor'


def test_one_test_pass_of_several_variants_equals_separate_passes(detector, detector_ckpt, train_set, synth, tmp_path):
    # `simcal test` with two heads, three modes and two thresholds: one pass, each variant's files equal to its own run
    from simcal.testing import test_detector
    heads = calibrate(detector, train_set, tmp_path / 'cal', head=['2fc_rand', '3fc_ft'], **{**MULTI, 'iters': 2})
    a, b = (tmp_path / 'cal' / k / CALIBRATION_FILE for k in ('3fc_ft', '2fc_rand'))
    common = dict(checkpoint=detector_ckpt, ann=synth[2], image_root=synth[3], stats=synth[0], num_workers=0,
                  progress=False, max_dets=50)
    res = test_detector(out_dir=tmp_path / 'all', cal_head=[f'A={a}', b], mode=['orig', 'cal', 'dual'],
                        dual_threshold=[4, T_SYNTH], **common)
    names = ['orig', 'A.cal', 'A.dual_T4', f'A.dual_T{T_SYNTH:g}', '2fc_rand.cal', '2fc_rand.dual_T4', f'2fc_rand.dual_T{T_SYNTH:g}']
    assert list(res['variants']) == names
    index = json.loads((tmp_path / 'all' / 'variants.json').read_text())
    assert index['2fc_rand.dual_T4'] == {'cal_head': str(b), 'mode': 'dual', 'dual_threshold': 4}
    for name, head, mode, T in [('orig', a, 'orig', None), ('A.dual_T4', a, 'dual', 4), ('2fc_rand.cal', b, 'cal', None),
                                (f'2fc_rand.dual_T{T_SYNTH:g}', b, 'dual', None)]:
        test_detector(out_dir=tmp_path / name, cal_head=head, mode=mode, dual_threshold=T, **common)
        for f in ('results.json', 'results_segm.json'):
            assert (tmp_path / name / f).read_bytes() == (tmp_path / 'all' / name / f).read_bytes(), (name, f)
        one, many = (json.loads((d / 'metrics.json').read_text()) for d in (tmp_path / name, tmp_path / 'all' / name))
        for t in ('bbox', 'segm'):   # everything but the results file's name
            one[t]['meta'].pop('results'); many[t]['meta'].pop('results')
            assert one[t] == many[t], (name, t)
        assert one['calibration'] == many['calibration']
    assert len(json.loads((tmp_path / 'orig' / 'results.json').read_text())) > 0
    # refused: a threshold without mode dual; two heads of one name
    with pytest.raises(InputError, match='applies to mode dual'):
        test_detector(out_dir=tmp_path / 'x', cal_head=a, mode=['cal'], dual_threshold=[4], **common)
    with pytest.raises(InputError, match="two heads are named '3fc_ft'"):
        test_detector(out_dir=tmp_path / 'x', cal_head=[a, a], **common)
    assert not (tmp_path / 'x').exists()
