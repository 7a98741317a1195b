"""Checks of simcal.model against the method specification (section 9 and 11) and torchvision's behaviour."""
import math

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import boxes as box_ops, misc as misc_nn_ops

from simcal.model import (PRESETS, AgnosticBoxPredictor, DetectorPreset, MaxIoUMatcher, NormEvalBatchNorm2d,
                          SimCalRoIHeads, anchor_inside_flags, build_detector, build_mask_rcnn, load_backbone_weights)


# the numbers of spec section 9 (base detector, LVIS v0.5) and section 5 / 9 (COCO-LT), written out here
SPEC_LVIS = dict(num_classes=1231, backbone='resnet50', norm='bn_eval', trainable_layers=3, fpn_channels=256,
                 anchor_sizes=(32, 64, 128, 256, 512), anchor_ratios=(0.5, 1.0, 2.0),
                 rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
                 rpn_post_nms_top_n_test=1000, rpn_nms_thresh=0.7, rpn_batch_size_per_image=256,
                 box_batch_size_per_image=512, box_positive_fraction=0.25, neg_iou_floor=0.1, box_head_dim=1024,
                 mask_head_convs=4, mask_head_channels=256, box_loss_beta=1.0, min_size=800, max_size=1333,
                 hflip_prob=0.5, momentum=0.9, weight_decay=1e-4, grad_clip=35.0, warmup_iters=500,
                 warmup_ratio=1 / 3, lr_gamma=0.1, epochs=12, lr_steps=(8, 11), images_per_gpu=2, base_lr=0.01,
                 base_batch=16, rpn_allowed_border=0, rpn_min_pos_iou=0.3, box_min_pos_iou=0.5, gt_max_assign_all=True, box_score_thresh=0.0, box_nms_thresh=0.5, box_detections_per_img=300)


@pytest.mark.parametrize('name,agnostic', [('lvis_r50_ag', True), ('lvis_r50', False)])
def test_lvis_presets_are_the_spec(name, agnostic):
    p = PRESETS[name]
    for k, v in SPEC_LVIS.items():
        assert getattr(p, k) == (pytest.approx(v) if isinstance(v, float) else v), k
    assert p.class_agnostic is agnostic
    # the release: lr 0.01 unscaled on 8 GPUs x 2 images; linear scaling from there
    assert p.lr_for(16) == pytest.approx(0.01) and p.lr_for(32) == pytest.approx(0.02) and p.lr_for(8) == pytest.approx(0.005)


def test_coco_lt_preset_is_the_spec():
    p = PRESETS['coco_lt_r50_ag']
    # normal_training/mask_rcnn_r50_fpn_1x_coco_lt_agnostic.py: lr 0.01 at 2 images per GPU, as LVIS
    assert (p.num_classes, p.base_lr, p.base_batch, p.images_per_gpu) == (81, 0.01, 16, 2)
    assert (p.box_score_thresh, p.box_detections_per_img, p.class_agnostic) == (0.05, 100, True)
    assert (p.epochs, p.lr_steps, p.neg_iou_floor, p.norm) == (12, (8, 11), 0.1, 'bn_eval')
    assert (p.rpn_allowed_border, p.rpn_min_pos_iou, p.box_min_pos_iou) == (0, 0.3, 0.5)


def test_demo_preset_is_small_and_from_scratch():
    p = PRESETS['demo']
    assert p.schedule_unit == 'iter' and p.iters <= 1500 and p.lr_steps[-1] < p.iters
    assert p.norm in ('bn', 'gn') and p.trainable_layers == 5 and not p.imagenet_backbone
    assert p.backbone == 'resnet18' and p.min_size <= 160 and p.fpn_channels <= 64
    assert (p.box_score_thresh, p.box_detections_per_img, p.neg_iou_floor) == (0.0, 300, 0.1)
    # the demo keeps torchvision's anchor and RoI matching (its measured figures were trained with it)
    assert (p.rpn_allowed_border, p.rpn_min_pos_iou, p.box_min_pos_iou) == (None, None, None)
    m = build_detector('demo', num_classes=5)
    assert m.rpn.allowed_border is None and type(m.rpn.proposal_matcher).__name__ == 'Matcher'
    assert type(m.roi_heads.proposal_matcher).__name__ == 'Matcher'


def test_built_models_carry_the_preset():
    m = build_detector('lvis_r50')
    rh = m.roi_heads
    assert isinstance(rh, SimCalRoIHeads)
    assert (rh.box_predictor.cls_score.out_features, rh.box_predictor.bbox_pred.out_features) == (1231, 4 * 1231)
    assert rh.mask_predictor.mask_fcn_logits.out_channels == 1231
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img, rh.neg_iou_floor) == (0.0, 0.5, 300, 0.1)
    assert (rh.proposal_matcher.high_threshold, rh.proposal_matcher.low_threshold) == (0.5, 0.5)
    assert rh.box_roi_pool.output_size == (7, 7) and rh.mask_roi_pool.output_size == (14, 14)
    assert rh.box_roi_pool.sampling_ratio == 2
    assert (m.rpn.nms_thresh, m.rpn.fg_bg_sampler.batch_size_per_image, m.rpn.fg_bg_sampler.positive_fraction) == (0.7, 256, 0.5)
    assert (m.rpn.proposal_matcher.high_threshold, m.rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    # ImageNet normalisation (mmdet's mean/std in RGB, divided by 255)
    assert m.transform.image_mean == [0.485, 0.456, 0.406] and m.transform.image_std == [0.229, 0.224, 0.225]
    assert m.transform.size_divisible == 32
    c = build_detector('coco_lt_r50_ag')
    assert (c.roi_heads.score_thresh, c.roi_heads.detections_per_img) == (0.05, 100)
    assert c.roi_heads.box_predictor.bbox_pred.out_features == 4 and c.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 1


def test_imagenet_resnet50_weights_load(tmp_path):
    ref = tv_resnet.resnet50(weights=None)
    g = torch.Generator().manual_seed(0)
    for mod in ref.modules():     # non-trivial statistics and affine parameters, as in a trained network
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(generator=g); mod.running_var.uniform_(0.5, 2.0, generator=g)
            with torch.no_grad(): mod.weight.uniform_(0.5, 1.5, generator=g); mod.bias.normal_(generator=g)
    torch.save(ref.state_dict(), tmp_path / 'resnet50.pth')
    model = build_detector('lvis_r50_ag')
    load_backbone_weights(model, tmp_path / 'resnet50.pth')
    body = model.backbone.body.state_dict()
    for k, v in ref.state_dict().items():
        if k.startswith('fc.') or k.endswith('num_batches_tracked'): continue
        assert torch.equal(body[k], v), k
    # BN statistics frozen (mmdet v1 norm_eval), the stem and res2 frozen (frozen_stages = 1); res3-res5 trainable,
    # their BN affine weights included
    assert all(isinstance(m, NormEvalBatchNorm2d) for n, m in model.backbone.body.named_modules() if 'bn' in n.split('.')[-1])
    trainable = {n.split('.')[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {'layer2', 'layer3', 'layer4'}
    assert model.backbone.body.layer3[0].bn2.weight.requires_grad and not model.backbone.body.layer1[0].bn2.weight.requires_grad
    # frozen BN computes y = (x - mean) / sqrt(var + eps) * w + b with the loaded numbers
    bn, rbn = model.backbone.body.bn1, ref.bn1.eval()
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(bn(x), rbn(x), rtol=1e-5, atol=1e-5)
    # the wrong depth, a wrapped checkpoint, a missing file
    torch.save(tv_resnet.resnet101(weights=None).state_dict(), tmp_path / 'r101.pth')
    with pytest.raises(ValueError, match='unexpected: layer3.10'): load_backbone_weights(model, tmp_path / 'r101.pth')
    torch.save({'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}}, tmp_path / 'wrapped.pth')
    load_backbone_weights(build_detector('lvis_r50_ag'), tmp_path / 'wrapped.pth')
    with pytest.raises(ValueError, match='not found'): load_backbone_weights(model, tmp_path / 'none.pth')


def _tiny(**kw):
    args = dict(backbone='resnet18', norm='gn', trainable_layers=5, fpn_channels=16, box_head_dim=32,
                mask_head_convs=1, mask_head_channels=16, min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128))
    args.update(kw)
    return build_mask_rcnn(4, **args)


def test_neg_iou_floor_in_select_training_samples():
    torch.manual_seed(0)
    gt = torch.tensor([[20., 20., 40., 40.]])
    # 400 proposals sliding away from the box: IoUs from 1 down to 0
    shifts = torch.linspace(0, 40, 400)
    props = torch.stack([20 + shifts, 20 + shifts * 0.5, 40 + shifts, 40 + shifts * 0.5], 1)
    iou = box_ops.box_iou(gt, props)[0]
    assert (iou < 0.1).sum() > 100 and ((iou >= 0.1) & (iou < 0.5)).sum() > 50
    targets = [{'boxes': gt, 'labels': torch.tensor([2]), 'masks': torch.zeros(1, 96, 96, dtype=torch.uint8)}]
    for floor in (0.0, 0.1, 0.3):
        rh = _tiny(neg_iou_floor=floor, box_batch_size_per_image=512).roi_heads
        sampled, matched, labels, _ = rh.select_training_samples([props.clone()], targets)
        neg = labels[0] == 0
        ious = box_ops.box_iou(gt, sampled[0])[0]
        assert neg.sum() > 0
        if floor == 0.0: assert ious[neg].min() < 0.1        # torchvision: negatives down to IoU 0
        else:
            assert ious[neg].min() >= floor - 1e-6               # the release: none below the floor
            assert int(neg.sum()) == int(((iou >= floor) & (iou < 0.5)).sum())   # and all above it are kept
        assert ious[labels[0] > 0].min() >= 0.5
        assert (labels[0][labels[0] > 0] == 2).all()
    with pytest.raises(ValueError, match='neg_iou_floor'): _tiny(neg_iou_floor=0.7)


def test_class_agnostic_and_classwise_outputs():
    torch.manual_seed(0)
    ag, cw = _tiny(class_agnostic=True).eval(), _tiny(class_agnostic=False).eval()
    feats = torch.randn(5, 32)
    with torch.no_grad():
        _, d_ag = ag.roi_heads.box_predictor(feats)
        _, d_cw = cw.roi_heads.box_predictor(feats)
        m_ag = ag.roi_heads.mask_predictor(torch.randn(5, 16, 14, 14))
    d_ag = d_ag.view(5, 4, 4)
    assert torch.equal(d_ag, d_ag[:, :1].expand(5, 4, 4)) and not torch.equal(d_cw.view(5, 4, 4)[:, 1], d_cw.view(5, 4, 4)[:, 2])
    assert m_ag.shape[1] == 1                        # one mask channel, used for every class
    # mmdet v1 initialisation of the box predictor
    pred = build_detector('lvis_r50_ag').roi_heads.box_predictor
    assert isinstance(pred, AgnosticBoxPredictor)
    assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)


def test_paper_model_trains_a_step(tmp_path):
    torch.save(tv_resnet.resnet50(weights=None).state_dict(), tmp_path / 'r50.pth')
    torch.manual_seed(0)
    # the paper's model at a small image size, sampling 64 RoIs per image (not 512) to keep the mask head cheap
    model = build_detector('lvis_r50_ag', min_size=128, max_size=160, box_batch_size_per_image=64)
    load_backbone_weights(model, tmp_path / 'r50.pth')
    imgs = [torch.rand(3, 120, 150), torch.rand(3, 150, 120)]
    tg = [{'boxes': torch.tensor([[10., 10., 60., 70.], [70., 20., 140., 100.]]), 'labels': torch.tensor([5, 1230]),
           'masks': torch.zeros(2, 120, 150, dtype=torch.uint8)},
          {'boxes': torch.tensor([[5., 30., 100., 140.]]), 'labels': torch.tensor([17]), 'masks': torch.ones(1, 150, 120, dtype=torch.uint8)}]
    body = model.backbone.body
    stats = {k: v.clone() for k, v in body.state_dict().items() if 'running' in k}
    losses = model(imgs, tg)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert body.conv1.weight.grad is None and body.layer1[0].conv1.weight.grad is None
    assert body.layer2[0].conv1.weight.grad is not None and body.layer2[0].conv1.weight.grad.abs().sum() > 0
    # mmdet v1 norm_eval: running statistics untouched by a training step, BN affine weights of res3-res5 get gradients
    assert all(torch.equal(v, body.state_dict()[k]) for k, v in stats.items())
    assert body.layer4[2].bn3.weight.grad.abs().sum() > 0 and body.layer2[0].bn1.bias.grad.abs().sum() > 0
    assert body.bn1.weight.grad is None and body.layer1[0].bn1.weight.grad is None
    # inference keeps 300 detections per image at score threshold 0 (50 proposals x 1230 classes compete for them;
    # the paper's 1000 proposals make this step take a minute on a CPU)
    # (boxes only here: 300 masks of the paper's 4x256 mask head cost half a minute on a CPU)
    model.eval()
    model.rpn._pre_nms_top_n['testing'] = model.rpn._post_nms_top_n['testing'] = 50
    model.roi_heads.mask_roi_pool = None
    with torch.no_grad(): out = model(imgs)
    assert [len(o['boxes']) for o in out] == [300, 300]
    assert all(o['scores'].min() > 0 and o['labels'].min() >= 1 for o in out)


def test_preset_overrides_and_round_trip():
    p = PRESETS['lvis_r50_ag']
    assert p.replace(iters=90000).lr_steps == (60000, 82500)
    assert DetectorPreset.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match='exactly one of epochs and iters'): p.replace(iters=10, epochs=2)
    with pytest.raises(ValueError, match='norm'): p.replace(norm='ln')


# ---- mixed precision: box coding in float32 (issue 16) ----

def _record_decodes(coder, log):
    orig = coder.decode
    def decode(rel_codes, boxes):
        out = orig(rel_codes, boxes)
        log.append((coder.weights, rel_codes.detach().clone(), [b.detach().clone() for b in boxes], out.detach().clone()))
        return out
    coder.decode = decode


def test_bf16_autocast_keeps_box_coding_in_float32():
    from torchvision.models.detection._utils import BoxCoder
    torch.manual_seed(0)
    # 96-px images (cheap: BF16 convolutions are slow on CPUs); BF16 steps are 0.25-0.5 px at 32-96 px, so a box
    # decoded in BF16 is visibly off there, and float32 decoding agrees with float64 to 1e-3 px
    model = _tiny(min_size=96, max_size=96, box_batch_size_per_image=64, rpn_post_nms_top_n_test=100,
                  box_detections_per_img=50)
    imgs = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    tg = [{'boxes': torch.tensor([[50., 52., 90., 94.], [3., 40., 30., 70.]]), 'labels': torch.tensor([1, 3]),
           'masks': torch.zeros(2, 96, 96, dtype=torch.uint8)},
          {'boxes': torch.tensor([[21., 10., 83., 70.]]), 'labels': torch.tensor([2]),
           'masks': torch.ones(1, 80, 96, dtype=torch.uint8)}]
    head_dtypes = []
    for mod in (model.rpn.head, model.roi_heads.box_predictor):
        mod.register_forward_hook(lambda m, i, o: head_dtypes.append(o[1][0].dtype if isinstance(o[1], list) else o[1].dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model(imgs, tg)
    assert head_dtypes == [torch.bfloat16, torch.bfloat16]          # the network does run in BF16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
    model.eval()
    log = []
    _record_decodes(model.rpn.box_coder, log); _record_decodes(model.roi_heads.box_coder, log)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(imgs)
        il, _ = model.transform(imgs)
        feats = list(model.backbone(il.tensors).values())
        a16 = model.rpn.anchor_generator(il, feats)
    assert feats[0].dtype == torch.bfloat16
    a32 = model.rpn.anchor_generator(il, [f.float() for f in feats])
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(a16, a32))
    assert [w for w, *_ in log] == [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]   # RPN, then R-CNN
    for weights, rel, boxes, dec in log:
        exact = BoxCoder(weights).decode(rel.double(), [b.double() for b in boxes])   # float64 reference
        assert dec.dtype == torch.float32 and dec.shape == exact.shape
        assert (dec.double() - exact).abs().max() < 1e-3
        bf16 = BoxCoder(weights).decode(rel.bfloat16(), [b.bfloat16() for b in boxes])  # torchvision under autocast
        assert (bf16.double() - exact).abs().max() > 0.1
    assert all(o['boxes'].dtype == torch.float32 and o['scores'].dtype == torch.float32 for o in out)
    assert all(o['masks'].dtype == torch.float32 and len(o['boxes']) == 50 for o in out)


# ---- class-agnostic masks never expand to C channels (issue 16) ----

class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    "Records the largest number of elements of any 28 x 28 mask-shaped tensor an operator returns (forward and backward)."
    def __init__(self): super().__init__(); self.max_numel = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and tuple(t.shape[-2:]) == (28, 28): self.max_numel = max(self.max_numel, t.numel())
        return out


def test_agnostic_masks_stay_one_channel_with_many_classes():
    from torchvision.models.detection.roi_heads import maskrcnn_inference, paste_masks_in_image
    torch.manual_seed(0)
    C, dets = 301, 20     # 1231 classes behave the same, at four times the cost of per-class NMS (see the notebook)
    model = build_mask_rcnn(C, backbone='resnet18', norm='gn', trainable_layers=5, fpn_channels=16, box_head_dim=32,
                            mask_head_convs=1, mask_head_channels=16, min_size=64, max_size=64,
                            anchor_sizes=(8, 16, 32, 64, 128), rpn_post_nms_top_n_test=100,
                            box_detections_per_img=dets, box_batch_size_per_image=64)
    imgs = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    per_mask = C * 28 * 28             # what the expanded predictor built (and its gradient) for every mask
    model.eval()
    logits = []
    model.roi_heads.mask_predictor.register_forward_hook(lambda m, i, o: logits.append(o))
    with torch.no_grad(), _LargestOutput() as rec:
        out = model(imgs)
    assert [len(o['boxes']) for o in out] == [dets, dets] and logits[0].shape[1] == 1
    assert rec.max_numel < 2 * dets * per_mask / 4    # the largest is the mask head's 16-channel deconvolution
    # the masks equal torchvision's post-processing of the C-fold expanded logits
    probs = maskrcnn_inference(logits[0].expand(-1, C, -1, -1), [o['labels'] for o in out])
    for o, p in zip(out, probs):
        assert torch.equal(o['masks'], paste_masks_in_image(p, o['boxes'], (64, 64)))
    # training: the mask loss and its gradient stay at one channel too, with the same value
    model.train()
    tg = [{'boxes': torch.tensor([[4., 6., 40., 50.], [30., 20., 60., 60.]]), 'labels': torch.tensor([5, C - 1]),
           'masks': torch.ones(2, 64, 64, dtype=torch.uint8)}] * 2
    torch.manual_seed(1)
    with _LargestOutput() as rec:
        losses = model(imgs, tg)
        losses['loss_mask'].backward()
    n_pos = logits[-1].shape[0]
    assert n_pos >= 4 and logits[-1].shape[1] == 1
    assert rec.max_numel < n_pos * per_mask / 4 and losses['loss_mask'] > 0
    from simcal.model import mask_loss
    from torchvision.models.detection.roi_heads import maskrcnn_loss
    x = torch.randn(3, 1, 28, 28)
    props, gtm = [torch.tensor([[0., 0., 20., 20.], [5., 5., 30., 40.], [10., 0., 60., 30.]])], [torch.rand(2, 64, 64).round()]
    gtl, idx = [torch.tensor([7, C - 2])], [torch.tensor([0, 1, 1])]
    assert torch.equal(mask_loss(x, props, gtm, gtl, idx), maskrcnn_loss(x.expand(-1, C, -1, -1), props, gtm, gtl, idx))


# ---- release assignment: mmdet v1 MaxIoUAssigner and allowed_border (issue 10) ----

def _mmdet_v1_assign(overlaps, pos_thr, neg_thr, min_pos_iou, gt_max_assign_all):
    "mmdet v1 MaxIoUAssigner.assign_wrt_overlaps as described: -1 ignore, 0 negative, k + 1 ground truth k."
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()   # mmdet compares float32 tensors with the thresholds
    pos_thr, neg_thr, min_pos_iou = f32(pos_thr), f32(neg_thr), f32(min_pos_iou)
    G, N = overlaps.shape
    ov = overlaps.tolist()
    assigned = [-1] * N
    for j in range(N):
        col = [ov[i][j] for i in range(G)]
        best = max(col)
        if 0 <= best < neg_thr: assigned[j] = 0
        if best >= pos_thr: assigned[j] = col.index(best) + 1
    for i in range(G):
        row = ov[i]
        gmax = max(row)
        if gmax >= min_pos_iou:
            if gt_max_assign_all:
                for j in range(N):
                    if row[j] == gmax: assigned[j] = i + 1
            else: assigned[row.index(gmax)] = i + 1
    return assigned


def test_max_iou_matcher_is_mmdet_v1_on_random_cases():
    g = torch.Generator().manual_seed(0)
    cases = 0
    for trial in range(300):
        G, N = int(torch.randint(1, 6, (), generator=g)), int(torch.randint(1, 30, (), generator=g))
        q = (torch.rand(G, N, generator=g) * 20).floor() / 20      # IoUs on a 0.05 grid: many ties
        for pos, neg, mp in ((0.7, 0.3, 0.3), (0.5, 0.5, 0.5)):
            for assign_all in (True, False):
                m = MaxIoUMatcher(pos, neg, mp, assign_all)(q)
                ours = torch.where(m >= 0, m + 1, torch.where(m == m.new_tensor(-1), 0, -1)).tolist()
                assert ours == _mmdet_v1_assign(q, pos, neg, mp, assign_all), (q, pos, mp, assign_all)
                cases += 1
    assert cases == 1200


def test_rpn_targets_only_inside_the_image():
    torch.manual_seed(0)
    model = _tiny(min_size=64, max_size=96, rpn_batch_size_per_image=64)
    seen = []
    orig = model.rpn.assign_targets_to_anchors
    def spy(anchors, targets, image_sizes=None):
        labels, matched = orig(anchors, targets, image_sizes)
        seen.append((anchors, labels, image_sizes))
        return labels, matched
    model.rpn.assign_targets_to_anchors = spy
    # a 64 x 96 and a 64 x 64 image: the second is padded to 96 wide, its anchors on the padding get no target
    imgs = [torch.rand(3, 64, 96), torch.rand(3, 64, 64)]
    tg = [{'boxes': torch.tensor([[2., 2., 40., 30.]]), 'labels': torch.tensor([1]), 'masks': torch.ones(1, 64, 96, dtype=torch.uint8)},
          {'boxes': torch.tensor([[30., 30., 62., 62.]]), 'labels': torch.tensor([2]), 'masks': torch.ones(1, 64, 64, dtype=torch.uint8)}]
    losses = model(imgs, tg)
    assert torch.isfinite(losses['loss_objectness'])
    anchors, labels, sizes = seen[0]
    assert [tuple(s) for s in sizes] == [(64, 96), (64, 64)]
    for a, lab, (h, w) in zip(anchors, labels, sizes):
        inside = (a[:, 0] >= 0) & (a[:, 1] >= 0) & (a[:, 2] <= w) & (a[:, 3] <= h)
        assert torch.equal(inside, anchor_inside_flags(a, (h, w)))
        assert (lab[~inside] == -1).all() and (lab[inside] == 1).sum() >= 1 and (lab[inside] == 0).sum() > 0
    on_padding = anchors[1][:, 0] >= 64
    assert on_padding.sum() > 0 and (labels[1][on_padding] == -1).all()
    # torchvision (rpn_allowed_border=None) labels every anchor, the padding included
    tv = _tiny(min_size=64, max_size=96, rpn_allowed_border=None, rpn_min_pos_iou=None).rpn
    tv_labels, _ = tv.assign_targets_to_anchors(anchors, tg)
    assert (tv_labels[1][on_padding] == 0).sum() > 0
    # the best anchor of a ground truth that no inside anchor matches at 0.7 is positive (min_pos_iou 0.3), and it is inside
    a, lab = anchors[0], labels[0]
    iou = box_ops.box_iou(tg[0]['boxes'], a)[0]
    inside = anchor_inside_flags(a, (64, 96))
    assert iou[inside].max() < 0.7 and lab[inside & (iou == iou[inside].max())].eq(1).all()


# ---- legacy mmdet v1 numerics (issue 12): each against the formula written from mmdet v1's description ----

def _mmdet_anchors(stride, scales, ratios, feat_h, feat_w):
    "mmdet v1 AnchorGenerator: base anchors centred at (s-1)/2, extents 0.5 (w-1), rounded; shifted over the grid."
    out = []
    for y in range(feat_h):
        for x in range(feat_w):
            for r in ratios:
                for sc in scales:
                    hr = math.sqrt(r); wr = 1 / hr
                    ws, hs = stride * wr * sc, stride * hr * sc
                    c = 0.5 * (stride - 1)
                    base = [c - 0.5 * (ws - 1), c - 0.5 * (hs - 1), c + 0.5 * (ws - 1), c + 0.5 * (hs - 1)]
                    base = torch.tensor(base, dtype=torch.float32).round().tolist()
                    out.append([base[0] + x * stride, base[1] + y * stride, base[2] + x * stride, base[3] + y * stride])
    return torch.tensor(out)


def test_legacy_anchors_are_mmdet_v1():
    from torchvision.models.detection.image_list import ImageList
    from simcal.model import LegacyAnchorGenerator, frame_to_legacy
    g = torch.Generator().manual_seed(0)
    strides = (4, 8, 16, 32, 64)
    for trial in range(6):
        ratios = tuple(sorted(float(r) for r in torch.rand(3, generator=g) * 2.5 + 0.25))
        scale = int(torch.randint(2, 12, (), generator=g))
        gen = LegacyAnchorGenerator(tuple((scale * s,) for s in strides), (ratios,) * 5, strides)
        H, W = [int(v) * 64 for v in torch.randint(1, 4, (2,), generator=g)]
        feats = [torch.zeros(1, 1, H // s, W // s) for s in strides]
        ours = gen(ImageList(torch.zeros(1, 3, H, W), [(H, W)]), feats)[0]
        ref = torch.cat([_mmdet_anchors(s, [scale], ratios, H // s, W // s) for s in strides])
        assert torch.equal(frame_to_legacy(ours), ref), (ratios, scale)
    # the values of the shared note
    gen = LegacyAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    assert frame_to_legacy(gen.cell_anchors[0]).tolist() == [[-21, -9, 24, 12], [-14, -14, 17, 17], [-9, -21, 12, 24]]
    assert frame_to_legacy(gen.cell_anchors[4])[1].tolist() == [-224, -224, 287, 287]


def _bbox2delta(p, g, stds):
    px, py = (p[:, 0] + p[:, 2]) * 0.5, (p[:, 1] + p[:, 3]) * 0.5
    pw, ph = p[:, 2] - p[:, 0] + 1.0, p[:, 3] - p[:, 1] + 1.0
    gx, gy = (g[:, 0] + g[:, 2]) * 0.5, (g[:, 1] + g[:, 3]) * 0.5
    gw, gh = g[:, 2] - g[:, 0] + 1.0, g[:, 3] - g[:, 1] + 1.0
    return torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], 1) / torch.tensor(stds)


def _delta2bbox(rois, deltas, stds):
    d = deltas * torch.tensor(stds)
    mr = abs(math.log(16 / 1000))
    dw, dh = d[:, 2].clamp(-mr, mr), d[:, 3].clamp(-mr, mr)
    px, py = (rois[:, 0] + rois[:, 2]) * 0.5, (rois[:, 1] + rois[:, 3]) * 0.5
    pw, ph = rois[:, 2] - rois[:, 0] + 1.0, rois[:, 3] - rois[:, 1] + 1.0
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    return torch.stack([gx - gw * 0.5 + 0.5, gy - gh * 0.5 + 0.5, gx + gw * 0.5 - 0.5, gy + gh * 0.5 - 0.5], 1)


def _legacy_boxes(g, n, size=1000.0, min_wh=1.0):
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 300 + min_wh
    return torch.cat([xy, xy + wh - 1], 1)          # x2 = x1 + w - 1


def test_legacy_box_coding_is_mmdet_v1():
    from simcal.model import LegacyBoxCoder, legacy_to_frame, frame_to_legacy
    g = torch.Generator().manual_seed(0)
    for stds in ((1., 1., 1., 1.), (0.1, 0.1, 0.2, 0.2)):
        coder = LegacyBoxCoder(tuple(1 / s for s in stds))
        for trial in range(20):
            props, gts = _legacy_boxes(g, 500), _legacy_boxes(g, 500)
            enc = coder.encode([legacy_to_frame(gts).float()], [legacy_to_frame(props).float()])[0]
            torch.testing.assert_close(enc.double(), _bbox2delta(props, gts, stds), rtol=1e-4, atol=1e-3)   # float32 coding
            deltas = torch.randn(500, 4, generator=g, dtype=torch.float64) * 0.5 / torch.tensor(stds)
            deltas[:50, 2] = -6 / stds[2]                # below mmdet's lower clamp
            dec = coder.decode(deltas.float(), [legacy_to_frame(props).float()]).reshape(-1, 4)
            torch.testing.assert_close(frame_to_legacy(dec).double(), _delta2bbox(props, deltas, stds), rtol=0, atol=2e-3)


def _mmdet_roi_align(feat, roi, scale, out=7, sample=2):
    "mmdet v1 RoIAlign (roi_align_kernel.cu as described): ends at (x2 + 1) * scale, `sample` x `sample` points per bin."
    H, W = feat.shape[-2:]
    x1, y1, x2, y2 = [float(v) for v in roi]
    sw, sh, ew, eh = x1 * scale, y1 * scale, (x2 + 1) * scale, (y2 + 1) * scale
    bw, bh = max(ew - sw, 0.0) / out, max(eh - sh, 0.0) / out

    def bilinear(y, x):
        if y < -1.0 or y > H or x < -1.0 or x > W: return torch.zeros(feat.shape[0], dtype=feat.dtype)
        y, x = max(y, 0.0), max(x, 0.0)
        yl, xl = int(y), int(x)
        if yl >= H - 1: yl = yh = H - 1; y = float(yl)
        else: yh = yl + 1
        if xl >= W - 1: xl = xh = W - 1; x = float(xl)
        else: xh = xl + 1
        ly, lx = y - yl, x - xl
        return ((1 - ly) * (1 - lx) * feat[:, yl, xl] + (1 - ly) * lx * feat[:, yl, xh]
                + ly * (1 - lx) * feat[:, yh, xl] + ly * lx * feat[:, yh, xh])

    res = torch.zeros(feat.shape[0], out, out, dtype=feat.dtype)
    for ph in range(out):
        for pw in range(out):
            acc = 0
            for iy in range(sample):
                for ix in range(sample):
                    acc = acc + bilinear(sh + ph * bh + (iy + 0.5) * bh / sample, sw + pw * bw + (ix + 0.5) * bw / sample)
            res[:, ph, pw] = acc / sample ** 2
    return res


def test_legacy_roi_align_level_mapping_and_nms_are_mmdet_v1():
    from torchvision.ops import roi_align, nms
    from torchvision.ops.poolers import LevelMapper
    from simcal.model import legacy_to_frame
    g = torch.Generator().manual_seed(0)
    # RoIAlign: ends at (x2 + 1) * scale = torchvision's (aligned=False) on the frame box, RoIs >= 1 feature pixel
    feat = torch.randn(3, 20, 24, generator=g, dtype=torch.float64)
    for scale in (1 / 4, 1 / 8):
        rois = _legacy_boxes(g, 6, size=24 / scale, min_wh=1 / scale)
        ours = roi_align(feat[None], [legacy_to_frame(rois)], 7, scale, 2, aligned=False)
        for r, o in zip(rois, ours):
            torch.testing.assert_close(o, _mmdet_roi_align(feat, r, scale), rtol=1e-9, atol=1e-9)
    # FPN level: floor(log2(sqrt((w + 1)(h + 1)) / 56 + 1e-6)) clamped to P2-P5 = torchvision's LevelMapper of the frame
    mapper = LevelMapper(2, 5)
    sides = torch.tensor([55., 56., 111., 112., 223., 224., 447., 448., 1000.])   # the boundaries, + random sizes
    boxes = torch.cat([torch.stack([torch.zeros(9), torch.zeros(9), sides - 1, sides - 1], 1), _legacy_boxes(g, 2000, min_wh=4).float()])
    scale_ = torch.sqrt((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1))
    ref = torch.floor(torch.log2(scale_ / 56 + 1e-6)).clamp(0, 3).long()
    assert torch.equal(mapper([legacy_to_frame(boxes)]), ref)
    assert ref[:9].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    # NMS with +1 areas = torchvision's nms of the frame boxes (integer boxes: many ties and touching edges)
    for trial in range(12):
        b = (_legacy_boxes(g, 120, size=200) / 4).round() * 4
        s = torch.rand(120, generator=g, dtype=torch.float64)
        thr = float(torch.rand((), generator=g)) * 0.6 + 0.2
        order, keep = s.argsort(descending=True).tolist(), []
        area = lambda a: (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
        while order:
            i = order.pop(0); keep.append(i)
            def iou(j):
                iw = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]) + 1
                ih = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]) + 1
                inter = max(float(iw), 0) * max(float(ih), 0)
                return inter / (float(area(b[i])) + float(area(b[j])) - inter)
            order = [j for j in order if iou(j) <= thr]
        assert nms(legacy_to_frame(b), s, thr).tolist() == keep


def test_legacy_model_switches_anchors_coder_and_resize():
    from simcal.model import LegacyAnchorGenerator, LegacyBoxCoder, LegacyTransform
    p = PRESETS['lvis_r50_ag']
    assert p.legacy_mmdet_v1 is False
    m = _tiny(legacy_mmdet_v1=True)
    assert isinstance(m.rpn.anchor_generator, LegacyAnchorGenerator) and isinstance(m.transform, LegacyTransform)
    assert isinstance(m.rpn.box_coder, LegacyBoxCoder) and isinstance(m.roi_heads.box_coder, LegacyBoxCoder)
    assert m.legacy_mmdet_v1 and not _tiny().legacy_mmdet_v1
    # resize: mmcv rounds the size and scales boxes by one factor; torchvision floors and scales per axis
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        h, w = [int(v) for v in torch.randint(100, 1500, (2,), generator=g)]
        s = min(1333 / max(h, w), 800 / min(h, w))
        t = LegacyTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        img, tg = t.resize(torch.zeros(3, h, w), {'boxes': torch.tensor([[1., 2., 30., 40.]])})
        assert tuple(img.shape[-2:]) == (int(h * s + 0.5), int(w * s + 0.5))
        torch.testing.assert_close(tg['boxes'], torch.tensor([[1., 2., 30., 40.]]) * s)
    m.eval()
    with torch.no_grad(): out = m([torch.rand(3, 50, 70)])
    assert out[0]['boxes'].shape[1] == 4 and out[0]['masks'].shape[-2:] == (50, 70)
    assert (out[0]['boxes'][:, 2] <= 70 + 1e-3).all()
