"""The README and docs/ point at things that exist.

The README is short and sends readers to docs/ for details, so a renamed
file, a retitled section or a moved script must not leave a dead link.
"""
import functools
import glob
import os.path as osp
import re

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: every Markdown file that links to others
LINKING = ['README.md', 'configs/ce_mask_rcnn/README.md',
           'configs/ce_retinanet/README.md'] + sorted(
               osp.relpath(p, ROOT)
               for p in glob.glob(osp.join(ROOT, 'docs', '*.md')))
#: the pages users read as the current state (docs/benchmark.md is a log of
#: sessions and names files as they were then)
CURRENT = ['README.md', 'docs/implementation.md', 'docs/compatibility.md']

LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
CODE_BLOCK = re.compile(r'^```.*?^```', re.S | re.M)
#: a repository path in backticks: a top-level folder, then a file name
PATH = re.compile(r'`((?:ce_mmdet|tools|configs|docs|requirements|tests|\.ci)'
                  r'/[\w./-]*\.(?:py|sh|md|txt|yml|c|json))`')


def read(rel):
    with open(osp.join(ROOT, rel), encoding='utf-8') as f:
        return f.read()


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace('`', '')
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors_of(text):
    """GitHub's anchors for the headings of a Markdown text: a repeated
    heading's slug gets ``-1``, ``-2``, ... in order."""
    seen, found = {}, set()
    for heading in re.findall(r'^#+ (.*)$', CODE_BLOCK.sub('', text), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(f'{base}-{count}' if count else base)
    return found


@functools.lru_cache(maxsize=None)
def anchors(rel):
    return anchors_of(read(rel))


def test_slug_follows_github():
    assert slug('Quick start (a fresh machine, CPU is enough)') == \
        'quick-start-a-fresh-machine-cpu-is-enough'
    assert slug('Install into an existing mmdet 3.x environment') == \
        'install-into-an-existing-mmdet-3x-environment'
    assert slug('`torch.compile`') == 'torchcompile'


def test_anchors_number_repeated_headings():
    text = '# Run\n```\n# not a heading\n```\n## Run\n### Run\n## Other\n'
    assert anchors_of(text) == {'run', 'run-1', 'run-2', 'other'}


@pytest.mark.parametrize('page', LINKING)
def test_links_resolve(page):
    text = CODE_BLOCK.sub('', read(page))
    links = [t for t in LINK.findall(text)
             if not t.startswith(('http://', 'https://', 'mailto:'))]
    assert links or page == 'docs/mmdet_configs.md', \
        f'{page} has no relative links; is the pattern still right?'
    dead = []
    for target in links:
        path, _, anchor = target.partition('#')
        rel = (osp.normpath(osp.join(osp.dirname(page), path))
               if path else page)
        if not osp.exists(osp.join(ROOT, rel)):
            dead.append(f'{target} (no file {rel})')
        elif anchor and anchor not in anchors(rel):
            dead.append(f'{target} (no heading #{anchor} in {rel})')
    assert not dead, f'{page}: ' + '; '.join(dead)


@pytest.mark.parametrize('page', CURRENT)
def test_named_files_exist(page):
    named = set(PATH.findall(read(page)))
    assert named, f'{page} names no repository files; is the pattern right?'
    missing = sorted(p for p in named if not osp.exists(osp.join(ROOT, p)))
    assert not missing, f'{page} names files that do not exist: {missing}'
