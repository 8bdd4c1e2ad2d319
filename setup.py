"""ce_mmdet: Channel Equilibrium networks for MMDetection 3.x."""
import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_requirements(name):
    """Requirement lines of ``requirements/NAME.txt`` (comments dropped)."""
    with open(osp.join(HERE, 'requirements', name + '.txt')) as f:
        lines = (line.split('#', 1)[0].strip() for line in f)
        return [line for line in lines if line]


def read_version():
    scope = {}
    with open(osp.join(HERE, 'ce_mmdet', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='ce_mmdet',
    version=read_version(),
    description='Channel Equilibrium networks (ICML 2020) for MMDetection 3.x',
    long_description=open(osp.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',  # torch >= 2.7 (ce_mmdet.utils.torch_version)
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'tools')),
    # the fused CPU kernels (ce_mmdet.ops.cpu_kernels) build from it
    package_data={'ce_mmdet.ops': ['csrc/*.c']},
    install_requires=read_requirements('runtime'),
    extras_require={
        'tests': read_requirements('tests'),
        'mim': read_requirements('mminstall'),
    },
    zip_safe=False,
)
