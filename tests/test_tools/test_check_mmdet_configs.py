"""tools/misc/check_mmdet_configs.py: each check in its own process, the
table, the JSON and --compare's exit status."""
import json
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.fixture
def tool():
    sys.path.insert(0, osp.join(ROOT, 'tools', 'misc'))
    try:
        import check_mmdet_configs
        yield check_mmdet_configs
    finally:
        sys.path.pop(0)


def test_check_mmdet_configs(tool, tiny_coco, tmp_path, capsys):
    out = tmp_path / 'results.json'
    # a folder, a config refused at its tiny config, a folder with no
    # ResNet-50 config
    assert tool.main([
        'retinanet', 'rpn/rpn_r50_fpn_1x_coco.py', 'tridentnet',
        '--data-root', tiny_coco, '--work-dir', str(tmp_path / 'work'),
        '--json', str(out)
    ]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert [(r['config'], r['ok']) for r in results] == [
        ('retinanet/retinanet_r50_fpn_1x_coco.py', True),
        ('rpn/rpn_r50_fpn_1x_coco.py', False),
        ('tridentnet', None),
    ]
    assert results[1]['stage'] == 'tiny config'
    assert '| retinanet/retinanet_r50_fpn_1x_coco.py | ok | ' in printed
    assert ("| rpn/rpn_r50_fpn_1x_coco.py | failed | | | tiny config: "
            "ValueError: ") in printed
    assert '| tridentnet | no ResNet-50 config |' in printed
    assert '1 passed, 1 failed, 1 without a ResNet-50 config' in printed
    assert osp.isfile(tmp_path / 'work' / 'rpn' / 'rpn_r50_fpn_1x_coco' /
                      'traceback.txt')

    # --compare: the RPN passed before, fails now: exit status 1
    old = tmp_path / 'old.json'
    old.write_text(json.dumps([dict(results[1], ok=True, loss=1.0,
                                    detections=1)]))
    assert tool.main([
        'rpn/rpn_r50_fpn_1x_coco.py', '--data-root', tiny_coco,
        '--work-dir', str(tmp_path / 'work'), '--compare', str(old)
    ]) == 1
    assert ('fail now: rpn/rpn_r50_fpn_1x_coco.py'
            in capsys.readouterr().out)


def test_check_mmdet_configs_timeout(tool, tiny_coco, tmp_path):
    args = tool.parse_args(['retinanet', '--timeout', '0.1', '--data-root',
                            tiny_coco, '--work-dir', str(tmp_path)])
    result = tool.run_one('retinanet/retinanet_r50_fpn_1x_coco.py', args)
    assert result == dict(config='retinanet/retinanet_r50_fpn_1x_coco.py',
                          ok=False, stage='timeout',
                          error='no result within 0.1 s')


def test_check_mmdet_configs_keeps_each_configs_files(tool, tiny_coco,
                                                      tmp_path):
    """Two configs of one folder each keep their user config and traceback
    (a work folder per folder let the second overwrite the first's)."""
    configs = ['rpn/rpn_r50_fpn_1x_coco.py', 'rpn/rpn_r50_fpn_2x_coco.py']
    args = tool.parse_args([*configs, '--data-root', tiny_coco,
                            '--work-dir', str(tmp_path)])
    for config in configs:
        assert tool.run_one(config, args)['stage'] == 'tiny config'
    for config in configs:
        work_dir = tmp_path / osp.splitext(config)[0]
        assert osp.basename(config) in (work_dir / 'user_config.py'
                                        ).read_text()
        assert str(work_dir / 'user_config.py') in (
            work_dir / 'traceback.txt').read_text()


@pytest.mark.parametrize('argv,message', [
    ([], 'name configs or folders, or pass --all'),
    (['retinanet', '--all'], '--all checks every folder'),
    (['retinanet', 'retina'],
     'mmdet has no config folder retina; it has: albu_example, '),
])
def test_check_mmdet_configs_arguments(argv, message, tool, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_check_mmdet_configs_baseline(tool, tiny_coco, tmp_path):
    """--baseline checks mmdet's config with its own BN ResNet."""
    from mmengine.config import Config
    args = tool.parse_args(['retinanet', '--baseline', '--data-root',
                            tiny_coco, '--work-dir', str(tmp_path)])
    result = tool.run_one('retinanet/retinanet_r50_fpn_1x_coco.py', args)
    assert result['ok'] is True, result
    tiny = Config.fromfile(
        str(tmp_path / 'retinanet' / 'retinanet_r50_fpn_1x_coco' / 'tiny.py'))
    assert tiny.model.backbone.type == 'ResNet'


def test_docs_table_is_the_recorded_run(tool):
    """docs/mmdet_configs.md shows the table and counts of the run that
    docs/mmdet_configs.json keeps (the file --compare reads)."""
    with open(osp.join(ROOT, 'docs', 'mmdet_configs.json')) as f:
        results = json.load(f)
    with open(osp.join(ROOT, 'docs', 'mmdet_configs.md')) as f:
        doc = f.read()
    assert tool.table(results) in doc
    passed = sum(r['ok'] is True for r in results)
    failed = sum(r['ok'] is False for r in results)
    assert (f'**{passed} passed, {failed} failed, '
            f'{len(results) - passed - failed} folders without a ResNet-50 '
            'config.**') in doc
    # every failure's folder is named in the doc's table of causes
    causes = doc[doc.index('## Why'):doc.index('## The table')]
    assert all(r['config'].split('/')[0] in causes for r in results
               if r['ok'] is False)
