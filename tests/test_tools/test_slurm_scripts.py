"""tools/slurm_train.sh and tools/slurm_test.sh hand srun the job they
say, with a stand-in ``srun`` on PATH that records its arguments (no Slurm
here; the launched tools themselves are tested through torchrun)."""
import json
import os
import os.path as osp
import subprocess

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

FAKE_SRUN = '''#!/usr/bin/env python3
import json, os, sys
with open(os.environ['SRUN_RECORD'], 'w') as f:
    json.dump(dict(argv=sys.argv[1:], pythonpath=os.environ.get(
        'PYTHONPATH', '')), f)
'''


def run_script(tmp_path, script, args, **env):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    srun = bin_dir / 'srun'
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    record = tmp_path / 'srun.json'
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
               SRUN_RECORD=str(record), PYTHON='python-of-the-job', **env)
    env.pop('PYTHONPATH', None)
    proc = subprocess.run(['bash', osp.join('tools', script)] + args,
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(record.read_text())


@pytest.mark.parametrize('script,tool,positional', [
    ('slurm_train.sh', 'train.py', ['CONFIG.py', 'WORK']),
    ('slurm_test.sh', 'test.py', ['CONFIG.py', 'CKPT.pth']),
])
def test_slurm_script_hands_srun_the_job(script, tool, positional, tmp_path):
    extra = ['--cfg-options', 'a=1 b=2']
    called = run_script(tmp_path, script, ['dev', 'my-job'] + positional +
                        extra, GPUS='16', GPUS_PER_NODE='4',
                        SRUN_ARGS='--quotatype=auto --time=1:00:00')
    argv = called['argv']
    resources = argv[:argv.index('python-of-the-job')]
    assert resources == [
        '-p', 'dev', '--job-name=my-job', '--gres=gpu:4', '--ntasks=16',
        '--ntasks-per-node=4', '--cpus-per-task=5', '--kill-on-bad-exit=1',
        '--quotatype=auto', '--time=1:00:00'
    ]
    job = argv[len(resources):]
    assert job[:2] == ['python-of-the-job', '-u']
    assert osp.samefile(osp.join(ROOT, job[2]), osp.join(ROOT, 'tools', tool))
    expected = (['CONFIG.py', '--work-dir=WORK'] if tool == 'train.py' else
                ['CONFIG.py', 'CKPT.pth'])
    assert job[3:] == expected + ['--launcher=slurm'] + extra
    # the job imports this checkout's ce_mmdet
    assert osp.samefile(
        osp.join(ROOT, called['pythonpath'].split(os.pathsep)[0]), ROOT)


def test_slurm_defaults_are_one_node_of_eight_gpus(tmp_path):
    argv = run_script(tmp_path, 'slurm_train.sh',
                      ['dev', 'job', 'CONFIG.py', 'WORK'])['argv']
    assert '--ntasks=8' in argv and '--gres=gpu:8' in argv
    assert '--ntasks-per-node=8' in argv
