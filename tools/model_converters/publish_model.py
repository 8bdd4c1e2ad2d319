"""Publish a trained checkpoint: mmdet 3.3's
``tools/model_converters/publish_model.py``, for torch >= 2.6.

Same command line as mmdet's::

    python tools/model_converters/publish_model.py IN_FILE OUT_FILE \\
        [--save-keys meta state_dict]

Keeps only the keys named by ``--save-keys`` (by default the weights and the
meta: the optimizer state, the schedulers and the message hub go) and
writes ``OUT-XXXXXXXX.pth``, XXXXXXXX the first 8 hex digits of the file's
SHA-256, as mmdet's model zoo names its files. A training run with
``EMAHook`` already saved the averaged weights as ``state_dict``.

mmdet's own tool stops on any checkpoint mmengine writes with torch >= 2.6
("Unsupported global: ...HistoryBuffer"): it calls ``torch.load`` with the
default, now ``weights_only=True``. This one loads with the same restricted
unpickler and ce_mmdet's allow-list (``ce_mmdet/utils/safe_load.py``); it
also hashes in Python (mmdet runs ``sha256sum``, which macOS lacks) and has
renamed the file when it returns (mmdet starts ``mv`` without waiting). The
published file holds tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)`` without ce_mmdet's allow-list.
"""
import hashlib
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

import torch  # noqa: E402

import ce_mmdet  # noqa: E402,F401  (safe checkpoint load)
from ce_mmdet.utils.mmdet_tools import load_mmdet_tool  # noqa: E402


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def process_checkpoint(in_file, out_file, save_keys=('meta', 'state_dict')):
    """Write ``in_file`` with only ``save_keys`` as ``OUT-XXXXXXXX.pth``
    (``out_file`` without ``.pth``, then the hash's first 8 hex digits).

    Returns:
        str: the published file's path.

    Raises:
        SystemExit: ``in_file`` is not a dict holding any of ``save_keys``
            (nothing would be published).
    """
    checkpoint = torch.load(in_file, map_location='cpu', weights_only=True)
    kept = [k for k in save_keys
            if isinstance(checkpoint, dict) and k in checkpoint]
    if not kept:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else \
            type(checkpoint).__name__
        raise SystemExit(
            f'{in_file} holds none of --save-keys {list(save_keys)} '
            f'(it holds {found}); nothing to publish')
    for key in sorted(set(checkpoint) - set(kept)):
        print(f'Key `{key}` is removed: it is not in --save-keys.')
    if osp.dirname(out_file):
        os.makedirs(osp.dirname(out_file), exist_ok=True)
    torch.save({k: checkpoint[k] for k in kept}, out_file)
    stem = out_file[:-4] if out_file.endswith('.pth') else out_file
    final_file = f'{stem}-{sha256_of(out_file)[:8]}.pth'
    os.replace(out_file, final_file)
    print(f'The published model is saved at {final_file}.')
    return final_file


def main():
    args = load_mmdet_tool('model_converters/publish_model').parse_args()
    process_checkpoint(args.in_file, args.out_file, args.save_keys)


if __name__ == '__main__':
    main()
