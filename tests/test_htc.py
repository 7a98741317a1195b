"HTC (simcal.htc) and its detector adapter (simcal.htc_adapter): cascade mechanics, DCN, mask flow, semantic branch."
import pytest, torch
import torch.nn.functional as F
from torchvision.ops import boxes as box_ops
from simcal.core import InputError
from simcal import htc as H

TINY = dict(dcn_stages=(), fpn_channels=16, box_head_dim=64, mask_head_convs=1, mask_head_channels=16, min_size=64,
            max_size=64, anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
            rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
            box_batch_size_per_image=32, box_detections_per_img=20, semantic=False)

def tiny(num_classes=4, **kw):
    "The demo preset at a tiny size, with HTC's class-specific masks (the paper's; the demo preset's are agnostic)."
    torch.manual_seed(0)
    return H.build_htc('htc_demo', num_classes, **{**TINY, 'mask_class_agnostic': False, **kw})

def target(h=64, w=64, sem_classes=None):
    b = torch.tensor([[4., 4., 30., 28.], [24., 20., 60., 58.]])
    m = torch.zeros(2, h, w, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(b.long().tolist()): m[i, y0:y1, x0:x1] = 1
    t = {'boxes': b, 'labels': torch.tensor([1, 2]), 'masks': m}
    if sem_classes:
        s = torch.zeros(h, w, dtype=torch.long); s[h // 2:] = 1; s[:, :4] = 255; t['semantic'] = s
    return t

def images(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 64, generator=g) for _ in range(n)]

def test_presets_are_the_papers():
    p = H.HTC_PRESETS['htc_x101_lvis']
    assert (p.backbone, p.epochs, p.lr_steps, p.train_size_range, p.train_max_size) == ('resnext101_64x4d', 20, (16, 19), (400, 1400), 1600)
    assert (p.min_size, p.max_size, p.box_score_thresh, p.box_detections_per_img) == (800, 1333, 0.0, 300)
    assert p.stage_ious == (0.5, 0.6, 0.7) and p.stage_loss_weights == (1.0, 0.5, 0.25) and p.semantic_loss_weight == 0.2
    assert p.box_coder_weights == ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15))
    assert H.HTCPreset.from_dict(p.to_dict()) == p
    m = tiny()
    assert [s.box_coder.weights for s in m.roi_heads.stages] == list(p.box_coder_weights)
    assert [s.proposal_matcher.high_threshold for s in m.roi_heads.stages] == [0.5, 0.6, 0.7]
    assert [s.proposal_matcher.low_threshold for s in m.roi_heads.stages] == [0.5, 0.6, 0.7]

def test_multiscale_transform_trains_in_range_tests_at_min_size():
    t = H.MultiScaleTransform.from_transform(tiny().transform, (40, 50), 200)
    t.train(); sizes = {min(t([torch.rand(3, 64, 96)])[0].image_sizes[0]) for _ in range(20)}
    assert min(sizes) >= 40 and max(sizes) <= 50 and len(sizes) > 3
    t.eval(); assert t([torch.rand(3, 64, 64)])[0].image_sizes[0] == (64, 64)   # test size: min_size, max_size

def test_deformable_conv_with_zero_offsets_is_the_plain_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4, bias=False)
    d = H.DeformConvV1.from_conv(conv)
    x = torch.randn(2, 8, 11, 13)
    assert torch.count_nonzero(d.conv_offset(x)) == 0
    torch.testing.assert_close(d(x), conv(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad(): d.conv_offset.bias.fill_(0.5)   # moved sampling points change the output
    assert not torch.allclose(d(x), conv(x), atol=1e-3)
    # offset layout: (dy, dx) per kernel point; dy = 1 everywhere samples one row down = the plain conv of the shifted input
    d1 = H.DeformConvV1.from_conv(torch.nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False))
    with torch.no_grad(): d1.conv_offset.bias.copy_(torch.tensor([1.0, 0.0] * 9))
    shifted = F.pad(x[:, :, 1:], (0, 0, 0, 1))
    # (row 0 differs: its top taps read x's row 0 where the shifted input has zero padding)
    torch.testing.assert_close(d1(x)[..., 1:, :], F.conv2d(shifted, d1.conv.weight, padding=1, groups=4)[..., 1:, :], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(d1(x)[..., 1:, :], d1.conv(x, torch.zeros_like(d1.conv_offset(x)))[..., 1:, :], atol=1e-3)
    m = tiny(dcn_stages=('layer3', 'layer4'))
    body = m.backbone.body
    assert isinstance(body.layer3[0].conv2, H.DeformConvV1) and not isinstance(body.layer2[0].conv2, H.DeformConvV1)
    with pytest.raises(ValueError, match='layer9'): H.make_deformable(body, ('layer9',))

def test_cascade_stages_refine_and_assign_with_their_thresholds():
    m = tiny(); rh = m.roi_heads
    t = {'boxes': torch.tensor([[10., 10., 50., 50.]]), 'labels': torch.tensor([1])}
    # proposals of IoU 0.9, 0.65, 0.55 and 0.2 with the ground truth
    props = [torch.tensor([[10., 10., 48., 46.], [10., 10., 50., 36.], [10., 10., 50., 32.], [10., 10., 18., 50.]])]
    iou = box_ops.box_iou(props[0], t['boxes'])[:, 0]
    assert iou[0] > 0.7 and 0.6 < iou[1] < 0.7 and 0.5 < iou[2] < 0.6 and iou[3] < 0.5
    pos = []
    for st in rh.stages:
        s = H.sample_stage(st, props, [t])
        real = ~s['is_gt'][0]
        pos.append(sorted(s['proposals'][0][real & (s['labels'][0] > 0)].tolist()))
    assert [len(p) for p in pos] == [3, 2, 1]
    # training: stage k+1 RoIs are stage k's refined boxes (GT removed), then GT added back
    m.train(); torch.manual_seed(3)
    with torch.no_grad():
        for st in rh.stages: st.box_predictor.bbox_pred.bias.copy_(torch.tensor([0.1, -0.1, 0.05, 0.02]))
    imgs, tg = images(1), [target()]
    seen = {}
    orig = rh.box_forward
    def spy(k, x):
        z, d = orig(k, x); seen[k] = d; return z, d
    rh.box_forward = spy
    m(imgs, tg)
    shapes = [(64, 64)]
    for k in range(2):
        st = rh.stages[k]
        s_rois = rh.last_stage_rois[k][0]
        gt_rows = (s_rois[:, None] == tg[0]['boxes'][None]).all(-1).any(-1)
        refined = H.refine_boxes(st, seen[k], [s_rois], shapes)[0]
        nxt = rh.last_stage_rois[k + 1][0]
        assert not torch.equal(refined, s_rois)
        # every non-GT RoI of the next stage is one of the refined, non-GT boxes of this stage
        cand = refined[~gt_rows]
        nxt_real = nxt[~(nxt[:, None] == tg[0]['boxes'][None]).all(-1).any(-1)]
        assert len(nxt_real) > 0 and all((cand == r).all(-1).any() for r in nxt_real)
    # test path: stage k+1 RoIs are stage k's decoded boxes
    m.eval()
    with torch.no_grad():
        il, _ = m.transform(imgs); feats = m.backbone(il.tensors); props, _ = m.rpn(il, feats)
        o = rh.stage_outputs(feats, props, il.image_sizes)
    for k in range(2):
        torch.testing.assert_close(o['rois'][k + 1][0], H.refine_boxes(rh.stages[k], o['deltas'][k], o['rois'][k], il.image_sizes)[0])

def test_stage_loss_weights_are_applied():
    imgs, tg = images(1), [target()]
    def losses(w):
        m = tiny(stage_loss_weights=w); m.train(); torch.manual_seed(5)
        return {k: float(v.detach()) for k, v in m(imgs, tg).items()}
    a, b = losses((1.0, 0.5, 0.25)), losses((1.0, 1.0, 1.0))
    for k in range(3):
        for name in ('loss_classifier', 'loss_box_reg', 'loss_mask'):
            assert a[f's{k}.{name}'] == pytest.approx((1.0, 0.5, 0.25)[k] * b[f's{k}.{name}'], rel=1e-5)
    assert a['s1.loss_classifier'] > 0
    with pytest.raises(ValueError, match='one entry per stage'): tiny(stage_loss_weights=(1.0, 0.5))

def test_mask_information_flow_changes_later_stages_only():
    m = tiny(); rh = m.roi_heads; m.eval()
    with torch.no_grad():
        il, _ = m.transform(images(1)); feats = m.backbone(il.tensors)
        rois = [torch.tensor([[4., 4., 30., 28.], [20., 20., 60., 50.]])]
        a = rh.mask_logits(feats, rois, il.image_sizes)
        for p in rh.mask_heads[1].conv_res.parameters(): p.add_(0.3)
        b = rh.mask_logits(feats, rois, il.image_sizes)
        rh.mask_info_flow = False
        c = rh.mask_logits(feats, rois, il.image_sizes)
    assert rh.mask_heads[0].conv_res is None and rh.mask_heads[2].conv_res is not None
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1]) and not torch.allclose(a[2], b[2])
    assert not torch.allclose(c[1], b[1]) and torch.equal(c[0], b[0])

def test_semantic_branch_loss_falls_and_missing_map_is_an_error():
    torch.manual_seed(0)
    head = H.FusedSemanticHead(8, 3, 1, 2, 8, num_classes=3, loss_weight=0.2)
    feats = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    tg = [{'semantic': (torch.arange(64)[None].expand(64, 64) // 22).long()} for _ in range(2)]
    labels = H.semantic_labels(tg, [(64, 64)] * 2, (8, 8), head.stride)
    assert labels.shape == (2, 8, 8) and set(labels.unique().tolist()) == {0, 1, 2}
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    first = None
    for _ in range(30):
        logits, emb = head(feats); loss = head.loss(logits, labels)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad(); loss.backward(); opt.step()
    assert emb.shape == (2, 8, 8, 8) and float(loss.detach()) < 0.5 * first
    # padding and 255 are ignored
    lab = H.semantic_labels([{'semantic': torch.full((32, 64), 255)}], [(32, 64)], (8, 8), 8)
    assert (lab[0, :4] == 255).all() and (lab[0, 4:] == 255).all()
    m = tiny(semantic=True, semantic_classes=3); m.train()
    with pytest.raises(InputError, match="record 0: field 'semantic'"): m(images(1), [target()])
    out = m(images(1), [target(sem_classes=3)])
    assert out['loss_semantic_seg'] > 0

def test_tiny_htc_trains_and_infers():
    m = tiny(semantic=True, semantic_classes=3, dcn_stages=('layer4',))
    imgs, tg = images(2), [target(sem_classes=3), target(sem_classes=3)]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    m.train(); torch.manual_seed(0)
    totals = []
    for _ in range(6):
        loss = sum(m(imgs, tg).values()); totals.append(float(loss.detach()))
        opt.zero_grad(); loss.backward(); opt.step()
    assert min(totals[-2:]) < totals[0]
    m.eval()
    with torch.no_grad(): out = m(imgs)
    for o in out:
        assert 0 < len(o['boxes']) <= 20 and o['masks'].shape[1:] == (1, 64, 64)
        assert ((o['masks'] >= 0) & (o['masks'] <= 1)).all() and (o['labels'] > 0).all()

def test_test_path_averages_logits_and_mask_sigmoids():
    m = tiny(); rh = m.roi_heads; m.eval()
    with torch.no_grad():
        imgs = images(1)
        out = m(imgs)[0]
        il, _ = m.transform(imgs); feats = m.backbone(il.tensors); props, _ = m.rpn(il, feats)
        o = rh.stage_outputs(feats, props, il.image_sizes)
        p = F.softmax((o['logits'][0] + o['logits'][1] + o['logits'][2]) / 3, -1)
        boxes = H.refine_boxes(rh.stages[2], o['deltas'][2], o['rois'][2], il.image_sizes)[0]
        # the best detection is the best (box, class) pair of the averaged softmax
        sc = p[:, 1:]; best = int(sc.argmax()); r, c = divmod(best, sc.shape[1])
        assert float(out['scores'][0]) == pytest.approx(float(sc.max()), rel=1e-5) and int(out['labels'][0]) == c + 1
        torch.testing.assert_close(out['boxes'][0], boxes[r])
        # masks: mean over stages of each stage's sigmoid of the label's channel
        det_boxes, labels = [boxes[r:r + 1]], [torch.tensor([c + 1])]
        zs = rh.mask_logits(feats, det_boxes, il.image_sizes)
        mean = sum(z[:, c + 1].sigmoid() for z in zs) / 3
        res, _ = rh._forward_test(feats, props, il.image_sizes)
        torch.testing.assert_close(res[0]['masks'][0, 0], mean[0])

# ---- the detector contract (simcal.htc_adapter)
from simcal.detector import as_detector, MaskRCNNAdapter
from simcal.htc_adapter import HTCAdapter

def test_inference_caps_follow_the_heads_settings():
    m = tiny(); m.eval(); m.roi_heads.detections_per_img = 3
    with torch.no_grad(): out = m(images(1))[0]
    assert len(out['boxes']) == 3
    m.roi_heads.score_thresh = 1.0
    with torch.no_grad(): assert len(m(images(1))[0]['boxes']) == 0

def test_adapter_paths_are_the_models_own():
    m = tiny(); m.eval(); det = as_detector(m)
    assert isinstance(det, HTCAdapter) and det.num_stages == 3 and det.num_classes() == 4 and det.feature_shape() == (16, 7, 7)
    from simcal.model import build_mask_rcnn
    assert isinstance(as_detector(build_mask_rcnn(3, backbone='resnet18', fpn_channels=8, box_head_dim=16, mask_head_channels=8)), MaskRCNNAdapter)
    s = det.sample_training_rois(images(2), [target(), target()], [False, True], [11, 12], rois_per_image=16, positive_fraction=0.5)
    assert len(s['stages']) == 3
    rh = m.roi_heads
    for k in range(3):
        rois = s['stages'][k]['rois']
        assert all(len(r) <= 16 for r in rois) and all((l > 0).sum() <= 8 for l in s['stages'][k]['labels'])
        x = det.roi_features(s, rois, k)
        with torch.no_grad(): direct = rh.box_forward(k, x)[0]
        torch.testing.assert_close(det.original_logits(x, k), direct)
        fcs, cls = det.classification_path(k)
        assert fcs[0] is rh.stages[k].box_head.fc6 and cls is rh.stages[k].box_predictor.cls_score
        torch.testing.assert_close(cls(F.relu(fcs[1](F.relu(fcs[0](x.flatten(1)))))), direct)   # what 3fc_ft copies
    # the sampling settings were restored and are reproducible from the seeds
    assert rh.stages[0].fg_bg_sampler.batch_size_per_image == 32
    s2 = det.sample_training_rois(images(2), [target(), target()], [False, True], [11, 12], rois_per_image=16, positive_fraction=0.5)
    assert all(torch.equal(a, b) for k in range(3) for a, b in zip(s['stages'][k]['rois'], s2['stages'][k]['rois']))
    with pytest.raises(ValueError, match='stage 3 of a 3-stage'): det.original_logits(x, 3)

def test_adapter_stage_rois_come_from_the_previous_stages_refined_boxes():
    m = tiny(); m.eval(); det = HTCAdapter(m)
    with torch.no_grad():
        for st in m.roi_heads.stages: st.box_predictor.bbox_pred.bias.copy_(torch.tensor([0.2, -0.1, 0.1, 0.05]))
    s = det.sample_training_rois(images(1), [target()], [False], [7], rois_per_image=24, positive_fraction=0.5)
    gt = target()['boxes']
    for k in range(2):
        r0, r1 = s['stages'][k]['rois'][0], s['stages'][k + 1]['rois'][0]
        is_gt0 = (r0[:, None] == gt[None]).all(-1).any(-1)
        x = det.roi_features(s, [r0], k)
        refined = H.refine_boxes(m.roi_heads.stages[k], m.roi_heads.box_forward(k, x)[1], [r0], [(64, 64)])[0][~is_gt0]
        real1 = r1[~(r1[:, None] == gt[None]).all(-1).any(-1)]
        assert len(real1) > 0 and all((refined == r).all(-1).any() for r in real1)
    # stage thresholds: a stage's positives have IoU >= its threshold (or are a GT's best match)
    for k, thr in enumerate((0.5, 0.6, 0.7)):
        r, l = s['stages'][k]['rois'][0], s['stages'][k]['labels'][0]
        assert (box_ops.box_iou(r[l > 0], gt).max(1).values >= thr - 1e-6).all()
    with pytest.raises(ValueError, match='stage_proposals'): HTCAdapter(m, stage_proposals='x')

class _Scorer(torch.nn.Module):
    "Records what it receives; scores with the calibrated-only rule on given per-stage heads."
    def __init__(self, heads):
        super().__init__(); self.calibration_heads = torch.nn.ModuleList(heads); self.seen = None
    def forward(self, logits, feats):
        self.seen = (logits, feats)
        return F.softmax(sum(h(f.flatten(1)) for h, f in zip(self.calibration_heads, feats)) / len(feats), -1)

def test_scorer_gets_every_stage_and_averaged_dual_rule():
    m = tiny(); m.eval(); det = as_detector(m)
    torch.manual_seed(0)
    heads = [torch.nn.Linear(16 * 49, 4) for _ in range(3)]
    sc = _Scorer(heads)
    with pytest.raises(ValueError, match='2 stage'): det.install_scorer(_Scorer(heads[:2]))
    det.install_scorer(sc); assert det.scorer() is sc
    imgs = images(1)
    with torch.no_grad():
        out = m(imgs)[0]
        logits, feats = sc.seen
        assert len(logits) == len(feats) == 3
        for k in range(3): torch.testing.assert_close(logits[k], det.original_logits(feats[k], k))
        # the dual rule on the averaged logits, computed directly: calibrated columns {3}, original elsewhere
        cols = torch.tensor([False, False, False, True])
        p_o = F.softmax(sum(logits) / 3, -1); p_c = F.softmax(sum(h(f.flatten(1)) for h, f in zip(heads, feats)) / 3, -1)
        want = torch.where(cols, p_c, p_o)
        sc.forward = lambda lg, ft: torch.where(cols, F.softmax(sum(h(f.flatten(1)) for h, f in zip(heads, ft)) / 3, -1),
                                                F.softmax(sum(lg) / 3, -1))
        out2 = m(imgs)[0]
    top = want[:, 1:].max()
    assert float(out2['scores'][0]) == pytest.approx(float(top), rel=1e-5)
    det.remove_scorer(); assert det.scorer() is None
    with torch.no_grad(): plain = m(imgs)[0]
    assert float(plain['scores'][0]) == pytest.approx(float(p_o[:, 1:].max()), rel=1e-5)

def test_per_stage_3fc_ft_and_the_dual_head_scorer():
    from simcal.calibration import build_calibration_head, DualHeadScorer
    m = tiny(); m.eval(); det = as_detector(m)
    s = det.sample_training_rois(images(1), [target()], [False], [3], rois_per_image=16)
    heads = []
    for k in range(3):
        h = build_calibration_head(det, '3fc_ft', stage=k); heads.append(h)
        x = det.roi_features(s, s['stages'][k]['rois'], k)
        with torch.no_grad(): torch.testing.assert_close(h(x), det.original_logits(x, k))   # starts as that stage's head
    with torch.no_grad():
        for h in heads: h.cls_score.bias.add_(torch.tensor([0.0, 0.0, 0.0, 2.0]))   # calibration moves class 3
    counts = [0, 500, 500, 5]
    with pytest.raises(ValueError, match='2 stage'): det.install_scorer(DualHeadScorer(heads[:2], counts, 'dual', 100))
    det.install_scorer(DualHeadScorer(heads, counts, 'dual', 100))
    imgs = images(1)
    with torch.no_grad():
        out = m(imgs)[0]
        il, _ = m.transform(imgs); feats = m.backbone(il.tensors); props, _ = m.rpn(il, feats)
        o = m.roi_heads.stage_outputs(feats, props, il.image_sizes)
        p_o = F.softmax(sum(o['logits']) / 3, -1)
        p_c = F.softmax(sum(h(f) for h, f in zip(heads, o['features'])) / 3, -1)
        want = torch.cat([p_o[:, :3], p_c[:, 3:]], 1)   # class 3 (5 instances < T=100) calibrated, no renormalisation
    assert float(out['scores'][0]) == pytest.approx(float(want[:, 1:].max()), rel=1e-5)
    assert not torch.allclose(want, p_o)
    det.remove_scorer()
    with torch.no_grad(): assert float(m(imgs)[0]['scores'][0]) == pytest.approx(float(p_o[:, 1:].max()), rel=1e-5)

def test_the_papers_model_is_x101_64x4d_with_dcn_in_c3_c5():
    m = H.build_htc('htc_x101_lvis', 1231)
    body = m.backbone.body
    dcn = [b.conv2 for n in ('layer2', 'layer3', 'layer4') for b in getattr(body, n)]
    assert len(dcn) == 4 + 23 + 3 and all(isinstance(c, H.DeformConvV1) for c in dcn)
    assert {(c.conv.groups, c.conv_offset.out_channels, c.conv.bias is None) for c in dcn} == {(64, 18, True)}
    assert not any(isinstance(b.conv2, H.DeformConvV1) for b in body.layer1)
    assert not any(p.requires_grad for p in body.layer1.parameters()) and all(p.requires_grad for p in dcn[0].parameters())
    rh = m.roi_heads
    assert rh.semantic_head.conv_logits.out_channels == 183 and rh.semantic_head.loss_weight == 0.2
    assert rh.semantic_head.stride == 8 and rh.semantic_roi_pool.output_size == (14, 14)
    assert [h.conv_res is not None for h in rh.mask_heads] == [False, True, True]
    assert rh.mask_heads[0].predictor.mask_fcn_logits.out_channels == 1231   # class-specific masks
    assert [s.box_head.fc6.out_features for s in rh.stages] == [1024] * 3
    assert [s.box_predictor.bbox_pred.out_features for s in rh.stages] == [4] * 3   # class-agnostic regression
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img) == (0.0, 0.5, 300)
    assert (m.transform.min_size, m.transform.max_size, m.transform.train_max_size) == ((800,), 1333, 1600)
    assert m.transform.train_min_sizes[0] == 400 and m.transform.train_min_sizes[-1] == 1400

def test_calibration_batches_have_one_part_per_stage():
    from simcal.calibration import compose_calibration_batch
    m = tiny(); m.eval()
    b = compose_calibration_batch(m, images(2), [target(), target()], [0, 1], [1, 2], 2, seed=0, iteration=0, rois_per_image=32, flip_prob=0.0)
    assert len(b['stages']) == 3
    for k, st in enumerate(b['stages']):
        assert st['features'].shape[1:] == (16, 7, 7) and st['num_fg'] > 0 and len(st['labels']) == len(st['features'])
        assert set(st['labels'].tolist()) <= {0, 1, 2}
        # the features are the stage's own RoI features of the composed RoIs
        torch.testing.assert_close(st['features'], as_detector(m).roi_features(
            as_detector(m).sample_training_rois(images(2), [target(), target()], [False, False], [0, 0]), st['rois'], k))

def test_imagenet_weights_reach_the_deformable_convs(tmp_path):
    from torchvision.models import resnet18
    torch.manual_seed(0)
    ref = resnet18(weights=None).eval()
    torch.save(ref.state_dict(), tmp_path / 'r18.pth')
    m = tiny(dcn_stages=('layer3', 'layer4'), norm='frozen_bn')
    H.load_htc_backbone_weights(m, tmp_path / 'r18.pth')
    body = m.backbone.body
    torch.testing.assert_close(body.layer4[0].conv2.conv.weight, ref.layer4[0].conv2.weight)
    torch.testing.assert_close(body.layer2[1].conv2.weight, ref.layer2[1].conv2.weight)
    assert torch.count_nonzero(body.layer3[0].conv2.conv_offset.weight) == 0
    with torch.no_grad():   # zero offsets: the backbone computes what the ImageNet ResNet computes
        x = torch.randn(1, 3, 64, 64)
        want = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        torch.testing.assert_close(body(x)['3'], want, rtol=1e-4, atol=1e-4)
    torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'bad.pth')
    with pytest.raises(InputError, match='bad.pth'): H.load_htc_backbone_weights(m, tmp_path / 'bad.pth')

def test_bfloat16_autocast_on_cpu():
    m = tiny(semantic=True, semantic_classes=3, dcn_stages=('layer4',)); m.train()
    d = m.backbone.body.layer4[0].conv2
    x = torch.randn(1, 512, 4, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):   # torchvision's CPU deform_conv2d has no bfloat16 kernel
        y = d(x.bfloat16())
        losses = m(images(1), [target(sem_classes=3)])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), d.conv(x.bfloat16().float(), torch.zeros(1, 18, 4, 4)), rtol=2e-2, atol=2e-2)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert d.conv.weight.grad is not None and torch.isfinite(d.conv.weight.grad).all()


# ---------------------------------------------------------------------------------------------------------------------
# HTC through the commands: train, per-stage calibration and dual-head test, under torchrun, resumed exactly

def _torchrun(args, nproc=2, timeout=400):
    import os, subprocess, sys
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}', '-m', 'simcal.cli']
    p = subprocess.run(cmd + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_htc_train_calibrate_test_commands_resume_exactly(tmp_path):
    import json, shutil, sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import TINY as TINY_SET, write_toy_lvis
    from simcal.checkpoint import load_checkpoint, load_detector
    from simcal.calibration import load_calibration
    from simcal.htc import HybridTaskCascade
    import numpy as np
    from PIL import Image
    ann, root = write_toy_lvis(tmp_path / 'toy', n_images=8)
    # semantic maps for the semantic branch: stuff 1 / 2 on the left / right half, 0 on the objects' boxes
    for im in json.loads(Path(ann).read_text())['images']:
        m = np.ones((im['height'], im['width']), np.uint8); m[:, im['width'] // 2:] = 2
        for a in json.loads(Path(ann).read_text())['annotations']:
            if a['image_id'] == im['id']:
                x, y, w, h = a['bbox']; m[y:y + h, x:x + w] = 0
        (tmp_path / 'sem').mkdir(exist_ok=True); Image.fromarray(m).save(tmp_path / 'sem' / im['file_name'])
    train = ['train', '--preset', 'htc_demo', '--train-ann', ann, '--image-root', root, '--semantic-root', tmp_path / 'sem',
             '--batch-per-gpu', 1, '--iters', 4,
             '--checkpoint-every', 2, '--num-workers', 0, '--deterministic', '--no-progress', '--set'] + TINY_SET
    _torchrun(train + ['--out', tmp_path / 'full'])
    (tmp_path / 'part').mkdir(); shutil.copy(tmp_path / 'full' / 'checkpoint_0000002.pth', tmp_path / 'part')
    _torchrun(train + ['--out', tmp_path / 'part', '--resume'])
    a, b = (load_checkpoint(tmp_path / d / 'model_final.pth') for d in ('full', 'part'))
    assert a['meta']['family'] == 'htc' and a['meta']['train']['world_size'] == 2
    log = [json.loads(l) for l in (tmp_path / 'full' / 'metrics.jsonl').read_text().splitlines()]
    assert all(r['loss_semantic_seg'] > 0 for r in log)             # the semantic branch trained on the maps
    assert [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])] == []
    det = tmp_path / 'full' / 'model_final.pth'
    model, meta = load_detector(det)
    assert isinstance(model, HybridTaskCascade) and len(model.roi_heads.stages) == 3
    # per-stage calibration: one head per stage; stopped at 2 and resumed to 4 equals 4 straight
    cal = ['calibrate', '--detector', det, '--train-ann', ann, '--image-root', root, '--head', '3fc_ft', '--classes-per-iter', 2,
           '--rois-per-image', 32, '--lr-steps', 3, '--checkpoint-every', 1, '--num-workers', 0, '--no-progress']
    _torchrun(cal + ['--out', tmp_path / 'cal', '--iters', 4])
    _torchrun(cal + ['--out', tmp_path / 'cal_part', '--iters', 2])
    _torchrun(cal + ['--out', tmp_path / 'cal_part', '--iters', 4, '--resume'])
    full, part = (load_calibration(tmp_path / d / 'calibration.pt') for d in ('cal', 'cal_part'))
    assert len(full['stage_heads']) == 2 and full['iteration'] == part['iteration'] == 4
    for x, y in zip([full['head']] + full['stage_heads'], [part['head']] + part['stage_heads']):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # the dual-head test of HTC, with the same command as for Mask R-CNN
    from simcal.cli import main
    assert main(['test', '--checkpoint', str(det), '--ann', str(ann), '--image-root', str(root), '--out', str(tmp_path / 't'),
                 '--cal-head', str(tmp_path / 'cal' / 'calibration.pt'), '--num-workers', '0', '--no-progress',
                 '--max-dets', '20']) == 0
    m = json.loads((tmp_path / 't' / 'metrics.json').read_text())
    assert m['calibration']['mode'] == 'dual' and 0 <= m['segm']['AP'] <= 1 and m['protocol'] == 'synth'
    # several modes in one pass under torchrun (2 processes): its 'dual' is the dual run alone, byte for byte
    test = ['test', '--checkpoint', det, '--ann', ann, '--image-root', root, '--cal-head', tmp_path / 'cal' / 'calibration.pt',
            '--num-workers', 0, '--no-progress', '--max-dets', 20]
    _torchrun(test + ['--out', tmp_path / 'tv', '--mode', 'orig', 'dual'])
    _torchrun(test + ['--out', tmp_path / 'td', '--mode', 'dual'])
    assert json.loads((tmp_path / 'tv' / 'variants.json').read_text())['dual']['mode'] == 'dual'
    for f in ('results.json', 'results_segm.json'):
        assert (tmp_path / 'tv' / 'dual' / f).read_bytes() == (tmp_path / 'td' / f).read_bytes(), f
    assert (tmp_path / 'tv' / 'orig' / 'results.json').read_bytes() != (tmp_path / 'td' / 'results.json').read_bytes()
    # bad input: the semantic branch without maps; a calibration of the other family (stage counts named)
    import contextlib, io
    def run(argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()): code = main([str(a) for a in argv])
        return code, err.getvalue()
    no_maps = [a for a in train if a not in ('--semantic-root', tmp_path / 'sem')]
    code, err = run(no_maps + ['--out', tmp_path / 'x'])
    assert code == 2 and '--semantic-root' in err and "preset 'htc_demo' trains a semantic branch" in err, err
    code, err = run(['train', '--train-ann', ann, '--image-root', root, '--out', tmp_path / 'mrcnn', '--iters', 1,
                     '--num-workers', 0, '--no-progress', '--set'] + TINY_SET)
    assert code == 0, err
    code, err = run(['calibrate', '--detector', tmp_path / 'mrcnn' / 'model_final.pth', '--train-ann', ann, '--image-root',
                     root, '--out', tmp_path / 'mcal', '--iters', 0, '--no-progress', '--num-workers', 0])
    assert code == 0, err
    for ckpt, cal, msg in [(det, tmp_path / 'mcal' / 'calibration.pt', 'heads for 1 stage(s) but the detector has 3'),
                           (tmp_path / 'mrcnn' / 'model_final.pth', tmp_path / 'cal' / 'calibration.pt',
                            'heads for 3 stage(s) but the detector has 1')]:
        code, err = run(['test', '--checkpoint', ckpt, '--ann', ann, '--image-root', root, '--out', tmp_path / 'bad',
                         '--cal-head', cal, '--num-workers', 0, '--no-progress'])
        assert code == 2 and "field 'stage_heads'" in err and msg in err, err
        assert not (tmp_path / 'bad').exists()
