"""Train a detector: mmdet 3.3's tools/train.py, with ce_mmdet loaded.

Same command line as mmdet's: CONFIG [--work-dir] [--resume [PATH]] [--amp]
[--auto-scale-lr] [--cfg-options ...] [--launcher {none,pytorch,slurm,mpi}].
Before mmdet builds the runner, a missing local pretrained checkpoint stops
the run with instructions.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import ce_mmdet  # noqa: E402,F401  (registers modules, safe checkpoint load)
from ce_mmdet.engine import (enable_cpu_distributed,  # noqa: E402
                             shutdown_distributed)

from ce_mmdet.utils.mmdet_tools import (check_pretrained,  # noqa: E402
                                        load_mmdet_tool, tool_config)


def main():
    # CPU-only torch: let mmengine's pytorch launcher run with gloo (a no-op
    # on CUDA builds; see ce_mmdet/engine/cpu_distributed.py)
    enable_cpu_distributed()
    tool = load_mmdet_tool('train')
    check_pretrained(tool_config(tool.parse_args()))
    tool.main()
    # destroy the process group before exit: torch 2.13 can abort a rank at
    # exit otherwise (see ce_mmdet/engine/dist_shutdown.py)
    shutdown_distributed()


if __name__ == '__main__':
    main()
