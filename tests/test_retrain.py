"""Checks of simcal.retrain (cRT, LWS and BAGS re-trained on a frozen detector) on the demo detector structure at a
tiny size and the embedded synthetic set: the loss goes down for each method; 2-process runs under torchrun (gloo)
through `simcal retrain`, stopped and resumed, equal the uninterrupted runs exactly; cRT under 2 processes ends
where one process ends; a run killed with SIGKILL resumes exactly; bad checkpoint files are one `InputError` naming
the field; an attached classifier scores the detector's RoIs (LWS with all scales 1 = the detector's own detections,
the BAGS merge: background plus any one group's classes <= 1); a two-stage detector gets one head per stage.

The detector has random weights: the checks are about mechanics, not accuracy.
"""
import copy, json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simcal.checkpoint import load_detector
from simcal.cli import main as cli_main
from simcal.core import InputError
from simcal.data import load_detection_dataset
from simcal.detector import as_detector
from simcal.longtail import bags_scores
from simcal.retrain import (RETRAIN_FILE, RETRAIN_LOG, RETRAIN_METHODS, attach_retrained, build_retrain_heads,
                            detach_retrained, load_retrained, retrain_classifier)

sys.path.insert(0, os.path.dirname(__file__))
from stand_ins import tiny_detector, save_tiny_detector  # noqa: E402

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
# one run's settings: 4 images of 32 RoIs per iteration, no warm-up, explicit LR steps (a resumed run keeps them)
RUN = ['--settings', 'demo', '--images-per-batch', 4, '--rois-per-image', 32, '--warmup-iters', 0, '--lr-steps', 3,
       '--seed', 3, '--no-progress', '--checkpoint-every', 2]


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    from simcal.synth import make_synthetic
    p = make_synthetic(tmp_path_factory.mktemp('synth') / 'set', seed=0, num_classes=20, num_train=60, num_val=20,
                       image_size=64, progress=False)
    return p.train_ann, p.train_images, p.val_ann, p.val_images


@pytest.fixture(scope='module')
def train_set(synth):
    return load_detection_dataset(synth[0], synth[1], train=True, masks=False)


@pytest.fixture(scope='module')
def detector_ckpt(train_set, tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp('det') / 'model_final.pth', train_set)


@pytest.fixture(scope='module')
def detector(detector_ckpt):
    return load_detector(detector_ckpt)[0]


def log(folder):
    return [json.loads(l) for l in (Path(folder) / RETRAIN_LOG).read_text().splitlines()]


def run(model, ds, out, method, iters=20, **kw):
    kw = {'lr': 0.05, 'images_per_batch': 4, 'rois_per_image': 32, 'warmup_iters': 0, 'progress': False, **kw}
    return retrain_classifier(model, ds, out, method, 'demo', iters=iters, **kw)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "One torch thread: the machine's cores are shared (several threads per process slow these runs down 10x)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize('method', RETRAIN_METHODS)
def test_loss_goes_down(detector, train_set, tmp_path, method):
    if method == 'lws':   # the random classifier's logits are near 0 (weights N(0, 0.01)): make them matter, wrongly scaled
        detector = copy.deepcopy(detector)
        with torch.no_grad(): detector.roi_heads.box_predictor.cls_score.weight.mul_(100)
    ck = run(detector, train_set, tmp_path, method)
    loss = [r['loss'] for r in log(tmp_path)]
    assert len(loss) == 20 and ck['iteration'] == 20 and all(np.isfinite(loss))
    first, last = np.mean(loss[:5]), np.mean(loss[-5:])
    print(f'{method}: {first:.3f} -> {last:.3f}')
    assert last < first - 0.05, (method, first, last)
    if method == 'crt': assert abs(loss[0] - np.log(train_set.label_map.num_classes)) < 0.1   # a fresh classifier: chance
    # only the trained parameters moved: the trunk copies are the detector's
    fc6 = as_detector(detector).classification_path()[0][0]
    assert torch.equal(ck['head']['fc6.weight'], fc6.weight.detach())
    if method == 'lws':
        assert torch.equal(ck['head']['cls_score.weight'], as_detector(detector).classification_path()[1].weight.detach())
        assert not torch.equal(ck['head']['scales'], torch.ones_like(ck['head']['scales']))


DRIVER = r'''
import sys
import simcal.retrain
from simcal.cli import main
from simcal.comm import cleanup_distributed
# one process group for the nine commands (joining a fresh gloo group right after leaving one is not reliable)
simcal.retrain.cleanup_distributed = lambda: None
base, out = sys.argv[1:-1], sys.argv[-1]
for method in ('crt', 'lws', 'bags'):
    args = base + ['--method', method, '--lr', '0.05']
    assert main(args + ['--out', f'{out}/{method}-full', '--iters', '4']) == 0
    assert main(args + ['--out', f'{out}/{method}-part', '--iters', '2']) == 0
    assert main(args + ['--out', f'{out}/{method}-part', '--iters', '4', '--resume']) == 0
cleanup_distributed()
'''


def test_torchrun_exact_resume(synth, detector_ckpt, detector, train_set, tmp_path):
    # one torchrun launch (2 CPU processes, gloo) runs `simcal retrain` 9 times: per method a run of 4 iterations,
    # and a run of 2 iterations continued to 4 with --resume; the two end bitwise equal
    (tmp_path / 'driver.py').write_text(DRIVER)
    args = ['retrain', '--detector', detector_ckpt, '--train-ann', synth[0], '--image-root', synth[1]] + RUN
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', str(tmp_path / 'driver.py')]
    p = subprocess.run(cmd + [str(a) for a in args] + [str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count('2 processes') == 9 and 'a bags classifier for 4 iterations' in p.stdout
    for m in RETRAIN_METHODS:
        full, part = load_retrained(tmp_path / f'{m}-full' / RETRAIN_FILE), load_retrained(tmp_path / f'{m}-part' / RETRAIN_FILE)
        assert full['iteration'] == part['iteration'] == 4 and full['world_size'] == part['world_size'] == 2
        assert full['method'] == m and full['config']['lr_steps'] == [3]
        for k in full['head']: assert torch.equal(full['head'][k], part['head'][k]), (m, k)
        mom = lambda ck: [s['momentum_buffer'] for s in ck['optimizer']['state'].values()]
        assert all(torch.equal(a, b) for a, b in zip(mom(full), mom(part))) and mom(full)
        lf, lp = log(tmp_path / f'{m}-full'), log(tmp_path / f'{m}-part')
        assert [r['iter'] for r in lf] == [r['iter'] for r in lp] == [1, 2, 3, 4]
        assert [r['loss'] for r in lf] == [r['loss'] for r in lp]
        assert [r['lr'] for r in lf] == pytest.approx([0.05] * 3 + [0.005])
        # what it recorded about the detector and the data
        assert full['detector']['checkpoint'] == str(detector_ckpt) and len(full['detector']['sha256']) == 64
        assert full['category_ids'] == list(train_set.label_map.category_ids)
    # cRT's loss is normalised by the global RoI count: one process computing the same global batches ends where two did
    full = load_retrained(tmp_path / 'crt-full' / RETRAIN_FILE)
    one = run(detector, train_set, tmp_path / 'one', 'crt', iters=4, lr_steps=[3], seed=3)
    for k in full['head']: torch.testing.assert_close(one['head'][k], full['head'][k], atol=1e-5, rtol=1e-4)
    # the BAGS classifier plugs into `simcal test`-style inference
    model = load_detector(detector_ckpt)[0]
    attach_retrained(model, tmp_path / 'bags-full' / RETRAIN_FILE, category_ids=train_set.label_map.category_ids)
    with torch.no_grad(): out = model([train_set[0][0]])[0]
    assert out['scores'].numel() > 0 and (out['scores'] <= 1).all()


def test_bad_checkpoint_files(detector, train_set, detector_ckpt, tmp_path):
    ck = run(detector, train_set, tmp_path / 'b', 'bags', iters=1, lr_steps=[5], detector_info={'sha256': 'a' * 64})
    good = tmp_path / 'b' / RETRAIN_FILE
    assert load_retrained(good)['method'] == 'bags'

    def fails(obj, field):
        path = tmp_path / 'bad.pt'
        torch.save(obj, path)
        with pytest.raises(InputError, match=f"bad.pt: field '{field}'"): load_retrained(path)

    fails({**ck, 'format': 'simcal-calibration-head'}, 'format')
    fails([1, 2], 'format')
    fails({k: v for k, v in ck.items() if k != 'head'}, 'head')
    fails({**ck, 'num_classes': '21'}, 'num_classes')
    fails({**ck, 'method': 'eql'}, 'method')
    fails({**ck, 'groups': None}, 'groups')
    fails({**ck, 'groups': {**ck['groups'], 'members': ck['groups']['members'][:-1]}}, 'groups')
    fails({**ck, 'hidden': 7}, 'head')
    fails({**ck, 'head': {**ck['head'], 'cls_score.weight': ck['head']['cls_score.weight'][:-1]}}, 'head')
    fails({**ck, 'category_ids': ck['category_ids'][:-1]}, 'category_ids')
    fails({**ck, 'head_options': {'scale_bias': True}}, 'head_options')
    with pytest.raises(InputError, match="model_final.pth: field 'format'"): load_retrained(detector_ckpt)
    with pytest.raises(InputError, match='not found'): load_retrained(tmp_path / 'nope.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(InputError, match='junk.pt: not a readable'): load_retrained(tmp_path / 'junk.pt')
    # a classifier for another detector
    other, _ = tiny_detector(train_set.label_map.num_classes + 3)
    with pytest.raises(InputError, match="field 'num_classes'"): attach_retrained(other, good)
    narrow, _ = tiny_detector(train_set.label_map.num_classes, fpn_channels=8)
    with pytest.raises(InputError, match="field 'feature_shape'"): attach_retrained(narrow, good)
    with pytest.raises(InputError, match="field 'category_ids'"):
        attach_retrained(detector, good, category_ids=[c + 1 for c in ck['category_ids']])
    assert as_detector(detector).scorer() is None
    # resuming with other settings, or from another detector
    with pytest.raises(InputError, match="field 'config'.*seed"):
        run(detector, train_set, tmp_path / 'b', 'bags', iters=2, lr_steps=[5], seed=1, resume=True)
    with pytest.raises(InputError, match="field 'detector'"):
        run(detector, train_set, tmp_path / 'b', 'bags', iters=2, lr_steps=[5], resume=True, detector_info={'sha256': 'x' * 64})


def test_cli_options_are_checked(synth, detector_ckpt, tmp_path, capsys):
    base = ['retrain', '--detector', str(detector_ckpt), '--train-ann', str(synth[0]), '--image-root', str(synth[1]),
            '--out', str(tmp_path / 'o')]
    for bad in (['--method', 'eql'], ['--method', 'crt', '--iters', '0'], ['--method', 'crt', '--momentum', '2'],
                ['--method', 'bags', '--others-ratio', '-1'], ['--method', 'crt', '--lr', 'nan']):
        with pytest.raises(SystemExit) as e: cli_main(base + bad)
        assert e.value.code == 2, bad
        assert bad[-2] in capsys.readouterr().err, bad
    assert cli_main(base + ['--method', 'crt', '--iters', '1', '--epochs', '1']) == 2
    assert '--epochs' in capsys.readouterr().err
    assert cli_main(base + ['--method', 'bags', '--bags-boundaries', '100', '10', '--iters', '1']) == 2
    assert '--bags-boundaries' in capsys.readouterr().err


def test_attached_classifier_scores(detector, train_set, synth, tmp_path):
    val = load_detection_dataset(synth[2], synth[3])
    images = [val[i][0] for i in range(3)]
    det = as_detector(detector)
    saved = detector.roi_heads.score_thresh
    detector.roi_heads.score_thresh = 0.0
    try:
        with torch.no_grad(): before = detector(images)
        # LWS with all scales 1 (LR 0) is the detector's own classifier: the same detections
        ck = run(detector, train_set, tmp_path / 'lws', 'lws', iters=1, lr=0.0)
        assert torch.equal(ck['head']['scales'], torch.ones(train_set.label_map.num_classes))
        attach_retrained(detector, tmp_path / 'lws' / RETRAIN_FILE)
        x = torch.randn(50, *det.feature_shape()) * 3
        torch.testing.assert_close(det.scorer()([det.original_logits(x)], [x]), torch.softmax(det.original_logits(x), 1))
        with torch.no_grad(): after = detector(images)
        for b, a in zip(before, after):   # (near-equal scores may swap places: compare the sorted scores)
            assert len(a['scores']) == len(b['scores']) > 0
            torch.testing.assert_close(a['scores'].sort().values, b['scores'].sort().values, atol=1e-6, rtol=1e-5)
        # trained scales change the scores
        run(detector, train_set, tmp_path / 'lws2', 'lws', iters=5, lr=50.0)
        attach_retrained(detector, tmp_path / 'lws2' / RETRAIN_FILE)
        with torch.no_grad(): changed = detector(images)
        assert not torch.allclose(changed[0]['scores'][:5], before[0]['scores'][:5])
        # BAGS: the merged scores are in [0, 1]; background plus the classes of any one group sum to <= 1 (the group's
        # "others" take the rest of p_fg). Over all C+1 columns the merge is not normalised: with several groups the
        # sum is p_bg + p_fg * sum_g (1 - p_others_g), which can exceed 1 (as in the published merge)
        ck = run(detector, train_set, tmp_path / 'bags', 'bags', iters=5)
        attach_retrained(detector, tmp_path / 'bags' / RETRAIN_FILE)
        p = det.scorer()([det.original_logits(x)], [x])
        h = det.scorer().heads[0]
        assert h.groups.num_groups >= 3 and p.shape == (50, train_set.label_map.num_classes)
        assert (p >= 0).all() and (p <= 1).all()
        for labels in h.groups.members[1:]:
            assert (p[:, 0] + p[:, list(labels)].sum(1) <= 1 + 1e-6).all()
        torch.testing.assert_close(p, bags_scores(h(x), h.groups))
        z = h(x)
        fg = torch.softmax(z[:, :2], 1)[:, 1]
        others = [torch.softmax(z[:, a:a + n], 1)[:, 0] for a, n in h.groups.slices[1:]]
        torch.testing.assert_close(p.sum(1), 1 - fg + fg * sum(1 - o for o in others))
        with torch.no_grad(): merged = detector(images)
        assert all(len(o['scores']) > 0 and (o['scores'] <= 1).all() for o in merged)
        # cRT: the softmax of the new classifier
        run(detector, train_set, tmp_path / 'crt', 'crt', iters=5)
        attach_retrained(detector, tmp_path / 'crt' / RETRAIN_FILE)
        h, = build_retrain_heads(detector, 'crt')
        h.load_state_dict(load_retrained(tmp_path / 'crt' / RETRAIN_FILE)['head'])
        torch.testing.assert_close(det.scorer()([det.original_logits(x)], [x]), torch.softmax(h(x), 1))
    finally:
        detach_retrained(detector); detector.roi_heads.score_thresh = saved
    with torch.no_grad(): again = detector(images)
    assert torch.equal(again[0]['scores'], before[0]['scores'])


def test_a_multi_stage_detector_plugs_in(detector_ckpt, train_set, tmp_path):
    # a stand-in for a cascade: the tiny Mask R-CNN seen as two stages (stage 2 re-samples its RoIs with other seeds
    # and reads the same features); only the adapter knows it
    from stand_ins import TwoStageAdapter as TwoStage, TwoStagePredictor

    model = load_detector(detector_ckpt)[0]
    two = TwoStage(model)
    ck = run(two, train_set, tmp_path / 'bags', 'bags', iters=2)
    assert len(ck['stage_heads']) == 1 and any(not torch.equal(ck['head'][k], ck['stage_heads'][0][k]) for k in ck['head'])
    with pytest.raises(InputError, match="heads for 2 stage.*field|field 'stage_heads'"):
        attach_retrained(load_detector(detector_ckpt)[0], tmp_path / 'bags' / RETRAIN_FILE)
    attach_retrained(two, tmp_path / 'bags' / RETRAIN_FILE)
    assert len(two.scorer().heads) == 2
    with torch.no_grad(): out = model([train_set[i][0] for i in range(2)])
    assert all(len(o['scores']) > 0 for o in out)


def test_a_killed_run_resumes_exactly(synth, detector_ckpt, train_set, tmp_path):
    # `simcal retrain` killed (SIGKILL) after a checkpoint, then resumed: the classifier of the uninterrupted run
    import time
    out, iters = tmp_path / 'killed', 40
    args = ['retrain', '--detector', detector_ckpt, '--train-ann', synth[0], '--image-root', synth[1], '--out', out,
            '--method', 'lws', '--iters', iters, '--lr', 0.05, '--lr-steps', 20] + RUN[:RUN.index('--lr-steps')] + \
           ['--seed', 3, '--no-progress', '--checkpoint-every', 2]
    p = subprocess.Popen([sys.executable, '-m', 'simcal.cli'] + [str(a) for a in args], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (out / RETRAIN_FILE).is_file() and p.poll() is None and time.time() - t0 < 120: time.sleep(0.05)
        p.kill()
    finally:
        p.communicate()
    stopped = load_retrained(out / RETRAIN_FILE)['iteration']
    print(f'killed after iteration {stopped} of {iters}')
    assert stopped < iters, 'the run ended before it was killed: nothing was resumed'
    model = load_detector(detector_ckpt)[0]
    kw = dict(lr_steps=[20], seed=3, checkpoint_every=1000)
    resumed = run(model, train_set, out, 'lws', iters=iters, resume=True, **kw)
    whole = run(model, train_set, tmp_path / 'whole', 'lws', iters=iters, **kw)
    for k in whole['head']: assert torch.equal(whole['head'][k], resumed['head'][k]), k
    assert [r['loss'] for r in log(out)] == [r['loss'] for r in log(tmp_path / 'whole')]
