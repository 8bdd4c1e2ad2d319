"""What our tools check before they hand over to mmdet's."""
import os.path as osp

import pytest
from mmengine.config import Config

from ce_mmdet.utils.mmdet_tools import check_tta

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MASK_CE = osp.join(ROOT,
                   'configs/ce_mask_rcnn/mask-rcnn_r50-ce_fpn_1x_coco.py')
RETINA_CE = osp.join(ROOT,
                     'configs/ce_retinanet/retinanet_r50-ce_fpn_1x_coco.py')


def test_tta_of_a_mask_model_stops_naming_the_mask_head():
    with pytest.raises(SystemExit) as stop:
        check_tta(Config.fromfile(MASK_CE), 'mask.py')
    message = str(stop.value)
    assert '--tta cannot test mask.py' in message
    assert 'model.roi_head.mask_head' in message
    assert 'retinanet_r50-ce_fpn_1x_coco.py CKPT --tta' in message


@pytest.mark.parametrize('tta_type', [None, 'DetTTAModel',
                                      'mmdet.DetTTAModel'])
def test_tta_of_a_box_detector_goes_on(tta_type):
    cfg = Config.fromfile(RETINA_CE)
    if tta_type is not None:
        cfg.tta_model = dict(type=tta_type)
    assert check_tta(cfg, 'retina.py') is None


def test_tta_goes_on_without_a_mask_head_or_with_another_tta_model():
    cfg = Config.fromfile(MASK_CE)
    cfg.model.roi_head.mask_head = None
    assert check_tta(cfg, 'boxes.py') is None
    cfg = Config.fromfile(MASK_CE)
    cfg.tta_model = dict(type='MyMaskTTAModel')  # one that merges masks
    assert check_tta(cfg, 'mine.py') is None
