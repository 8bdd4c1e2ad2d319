"""Test (and evaluate) a detector: mmdet 3.3's tools/test.py, with ce_mmdet.

Same command line as mmdet's: CONFIG CHECKPOINT [--work-dir] [--out]
[--show] [--show-dir] [--cfg-options ...] [--launcher ...] [--tta].
Prints the COCO metrics through mmengine's logger; ``main()`` returns them.
``--tta`` with a model that predicts masks (Mask R-CNN) stops before the
runner is built, saying why: mmdet 3.3's TTA merges boxes only.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import ce_mmdet  # noqa: E402,F401  (registers modules, safe checkpoint load)
from ce_mmdet.engine import (enable_cpu_distributed,  # noqa: E402
                             shutdown_distributed)

from ce_mmdet.utils.mmdet_tools import (check_tta,  # noqa: E402
                                        keep_test_metrics, load_mmdet_tool,
                                        tool_config)


def main():
    # CPU-only torch: let mmengine's pytorch launcher run with gloo (a no-op
    # on CUDA builds; see ce_mmdet/engine/cpu_distributed.py)
    enable_cpu_distributed()
    tool = load_mmdet_tool('test')
    args = tool.parse_args()
    if args.tta:
        check_tta(tool_config(args), args.config)
    with keep_test_metrics() as metrics:
        tool.main()
    # destroy the process group before exit: torch 2.13 can abort a rank at
    # exit otherwise (see ce_mmdet/engine/dist_shutdown.py)
    shutdown_distributed()
    return metrics


if __name__ == '__main__':
    main()
