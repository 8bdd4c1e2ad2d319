"""Count a detector's FLOPs and parameters: mmdet 3.3's get_flops.py with
ce_mmdet loaded, so CE layers are counted (rule in ce_mmdet/analysis/flops.py).

Usage (as mmdet's):
    python tools/analysis_tools/get_flops.py CONFIG [--num-images 100]
        [--cfg-options ...]
"""
import os.path as osp
import sys

sys.path.insert(
    0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import ce_mmdet  # noqa: E402,F401  (registers the modules)
from ce_mmdet.analysis import register_ce_flop_handles  # noqa: E402
from ce_mmdet.utils.mmdet_tools import load_mmdet_tool  # noqa: E402

if __name__ == '__main__':
    register_ce_flop_handles()  # this tool's own analyser setting
    load_mmdet_tool('analysis_tools/get_flops').main()
