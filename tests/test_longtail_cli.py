"""The long-tail fixes through `simcal test`: inference-only corrections (NorCal, logit adjustment, tau-norm) with a
given or searched strength, and re-trained classifiers (`simcal retrain`), on a tiny frozen detector."""
import contextlib, io, json, os, subprocess, sys
from pathlib import Path

import pytest

from simcal.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY, write_toy_lvis  # noqa: E402

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try: code = main([str(a) for a in argv])
        except SystemExit as e: code = e.code
    return code, err.getvalue()


@pytest.fixture(scope='module')
def det(tmp_path_factory):
    d = tmp_path_factory.mktemp('lt')
    ann, root = write_toy_lvis(d / 'train', n_images=10, seed=1)
    val, vroot = write_toy_lvis(d / 'val', n_images=4, seed=2)
    # the val set's images get other ids than the training set's (a held-out split must not meet them)
    data = json.loads(Path(val).read_text())
    for im in data['images']: im['id'] += 100
    for a in data['annotations']: a['image_id'] += 100; a['id'] += 100
    Path(val).write_text(json.dumps(data))
    code, err = run(['train', '--train-ann', ann, '--image-root', root, '--out', d / 'det', '--iters', 4,
                     '--batch-per-gpu', 2, '--num-workers', 0, '--no-progress', '--set'] + TINY)
    assert code == 0, err
    return {'dir': d, 'ann': ann, 'root': root, 'val': val, 'vroot': vroot, 'ckpt': d / 'det' / 'model_final.pth'}


def cmd_test(det, out, *extra):
    return ['test', '--checkpoint', det['ckpt'], '--ann', det['val'], '--image-root', det['vroot'], '--out', out,
            '--num-workers', 0, '--no-progress', '--max-dets', 30, *extra]


def results(out): return json.loads((Path(out) / 'results.json').read_text())


def same_scores(a, b, tol=1e-6):
    assert len(a) == len(b) > 0
    return all((x['image_id'], x['category_id']) == (y['image_id'], y['category_id']) and abs(x['score'] - y['score']) <= tol
               for x, y in zip(a, b))


def test_zero_strength_is_the_detector_and_one_changes_it(det, tmp_path):
    assert run(cmd_test(det, tmp_path / 'plain'))[0] == 0
    plain = results(tmp_path / 'plain')
    for method in ('norcal', 'logit_adjustment', 'tau_norm'):
        code, err = run(cmd_test(det, tmp_path / f'{method}0', '--correction', method, '--strength', 0))
        assert code == 0, err
        assert same_scores(results(tmp_path / f'{method}0'), plain), method
        code, err = run(cmd_test(det, tmp_path / f'{method}1', '--correction', method, '--strength', 1))
        assert code == 0, err
        one = results(tmp_path / f'{method}1')
        assert not same_scores(one, plain) if len(one) == len(plain) else True, method
        m = json.loads((tmp_path / f'{method}1' / 'metrics.json').read_text())
        assert m['correction'] == {'method': method, 'strength': 1.0, 'search': None}
        assert 0 <= m['bbox']['AP'] <= 1


def test_search_strength_on_heldout_training_images(det, tmp_path):
    code, err = run(cmd_test(det, tmp_path / 's', '--correction', 'logit_adjustment', '--search-strength',
                             '--train-ann', det['ann'], '--train-image-root', det['root'], '--heldout-fraction', 0.3))
    assert code == 0, err
    m = json.loads((tmp_path / 's' / 'metrics.json').read_text())['correction']
    scores = {float(k): v for k, v in m['search']['scores'].items()}
    assert sorted(scores) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    best = max(scores.values())
    assert m['strength'] == min(k for k, v in scores.items() if v == best)   # the first value with the best score
    assert m['search']['heldout_images'] == 3
    # the same search under two torchrun processes chooses the same value (rank 0 scores, every rank applies it)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', '-m', 'simcal.cli'] + \
          [str(a) for a in cmd_test(det, tmp_path / 's2', '--correction', 'logit_adjustment', '--search-strength',
                                    '--train-ann', det['ann'], '--train-image-root', det['root'], '--heldout-fraction', 0.3)]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    m2 = json.loads((tmp_path / 's2' / 'metrics.json').read_text())['correction']
    assert m2['strength'] == m['strength'] and m2['search']['scores'] == pytest.approx(m['search']['scores'], abs=1e-6)


@pytest.mark.parametrize('extra, option, msg', [
    (['--strength', '1'], '--strength', 'applies to a --correction'),
    (['--correction', 'norcal', '--search-strength'], '--search-strength', 'pass --train-ann and --train-image-root'),
    (['--correction', 'norcal', '--strength', '1', '--search-strength', '--train-ann', 'a', '--train-image-root', 'b'],
     '--strength', 'pass one of them'),
    (['--correction', 'norcal', '--retrained', 'x.pt'], '--retrained', 'one change of the classifier at a time'),
    (['--correction', 'bogus'], '--correction', 'invalid choice'),
    (['--correction', 'norcal', '--strength', '-1'], '--strength', 'must be a finite number >= 0'),
])
def test_bad_combinations(det, tmp_path, extra, option, msg):
    code, err = run(cmd_test(det, tmp_path / 'out', *extra))
    assert code == 2 and option in err and msg in err, err
    assert not (tmp_path / 'out').exists()


def test_retrained_classifier_through_test(det, tmp_path):
    code, err = run(['retrain', '--detector', det['ckpt'], '--train-ann', det['ann'], '--image-root', det['root'],
                     '--out', tmp_path / 'lws', '--method', 'lws', '--settings', 'demo', '--iters', 2,
                     '--images-per-batch', 2, '--rois-per-image', 32, '--no-progress'])
    assert code == 0, err
    ck = next((tmp_path / 'lws').glob('*.pt'))
    code, err = run(cmd_test(det, tmp_path / 'out', '--retrained', ck))
    assert code == 0, err
    m = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert m['retrained'] == str(ck) and 0 <= m['segm']['AP'] <= 1


def test_rfs_trained_detector_takes_every_fix(det, tmp_path):
    "RFS is an option of `simcal train`; SimCal and the other fixes apply to an RFS-trained detector as to any other."
    code, err = run(['train', '--train-ann', det['ann'], '--image-root', det['root'], '--out', tmp_path / 'rfs', '--iters', 2,
                     '--batch-per-gpu', 2, '--num-workers', 0, '--no-progress', '--repeat-threshold', 0.5, '--set'] + TINY)
    assert code == 0, err
    cfg = json.loads((tmp_path / 'rfs' / 'config.json').read_text())
    assert cfg['train']['repeat_threshold'] == 0.5
    ckpt = tmp_path / 'rfs' / 'model_final.pth'
    code, err = run(['calibrate', '--detector', ckpt, '--train-ann', det['ann'], '--image-root', det['root'], '--out',
                     tmp_path / 'cal', '--iters', 2, '--classes-per-iter', 2, '--num-workers', 0, '--no-progress'])
    assert code == 0, err
    for extra in (['--cal-head', tmp_path / 'cal' / 'calibration.pt'], ['--correction', 'norcal', '--strength', 1]):
        argv = cmd_test(det, tmp_path / 'test', *extra)
        argv[argv.index('--checkpoint') + 1] = ckpt
        code, err = run(argv + ['--no-eval'])
        assert code == 0, err
    # another threshold in the same folder is other settings: refused without --force, replaced whole with it
    again = ['train', '--train-ann', det['ann'], '--image-root', det['root'], '--out', tmp_path / 'rfs', '--iters', 2,
             '--batch-per-gpu', 2, '--num-workers', 0, '--no-progress', '--repeat-threshold', 0.1, '--set'] + TINY
    code, err = run(again)
    assert code == 2 and 'differs in train.repeat_threshold' in err, err
    code, err = run(again[:-len(TINY) - 1] + ['--force', '--set'] + TINY)
    assert code == 0, err
    assert json.loads((tmp_path / 'rfs' / 'config.json').read_text())['train']['repeat_threshold'] == 0.1
