"""Build of threeg-kernels.

The Python package works on its own (backends 'reference' and 'torch'; 'triton' where Triton and a
GPU are present). The compiled extension `threeg_kernels._C` (backend 'ext', csrc/) is added by
`extension_modules()`; when it is not built, the package still imports and
`python -m threeg_kernels` says why 'ext' is missing.

Install for development without build isolation, so the extension compiles against the torch that
is already installed (an isolated build would download a second torch):
    pip install --no-build-isolation -e .
"""

from setuptools import find_packages, setup


def extension_modules():
    """The compiled extension's modules and build command class; none until csrc/ exists."""
    return [], {}


ext_modules, cmdclass = extension_modules()

setup(
    name="threeg-kernels",
    version="0.1.0",
    description="Fast, exact global covariance pooling (3G-Net / iSQRT-COV head) for PyTorch",
    packages=find_packages(include=["threeg_kernels", "threeg_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
