"""Stand-ins shared by the tests: a two-stage view of the tiny Mask R-CNN (a cascade as only its adapter knows it)."""
import torch
from simcal.detector import MaskRCNNAdapter, ScoredBoxPredictor


class TwoStageAdapter(MaskRCNNAdapter):
    "The tiny Mask R-CNN seen as two stages: stage 2 re-samples the RoIs with its own seeds and reads the same features."
    num_stages = 2
    def _check_stage(self, stage): assert 0 <= stage < 2
    def sample_training_rois(self, images, targets, flips, seeds, **kw):
        s = super().sample_training_rois(images, targets, flips, seeds, **kw)
        s2 = super().sample_training_rois(images, targets, flips, [x + 1 for x in seeds], **kw)
        return {**s, 'stages': s['stages'] + s2['stages']}
    def install_scorer(self, scorer):
        super().install_scorer(scorer)
        self.model.roi_heads.box_predictor = TwoStagePredictor(self.model.roi_heads.box_predictor.box_predictor, scorer)


class TwoStagePredictor(ScoredBoxPredictor):
    "Both stages' logits and features (the same ones) to the scorer."
    def forward(self, x):
        box_features, roi_features = x
        logits, deltas = self.box_predictor(box_features)
        return torch.log(self.scorer([logits, logits], [roi_features, roi_features])), deltas


# the demo preset's structure at a size that runs in seconds; train/test proposal counts differ on purpose
TINY = dict(fpn_channels=16, box_head_dim=32, mask_head_convs=1, mask_head_channels=16, min_size=64, max_size=64,
            rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=32, box_batch_size_per_image=32)


def tiny_detector(num_classes, seed=0, **extra):
    "A tiny demo-structure Mask R-CNN with random weights (eval mode) and its preset."
    from simcal.model import PRESETS, build_mask_rcnn
    preset = PRESETS['demo'].replace(**{**TINY, **extra})
    torch.manual_seed(seed)
    return build_mask_rcnn(num_classes, **preset.model_kwargs()).eval(), preset


def save_tiny_detector(path, train_set):
    "`tiny_detector` for a training set, saved as `simcal train` would; returns `path`."
    from simcal.checkpoint import make_meta, save_checkpoint
    model, preset = tiny_detector(train_set.label_map.num_classes)
    save_checkpoint(path, model, make_meta(preset, train_set.label_map, stats=train_set.stats))
    return path
