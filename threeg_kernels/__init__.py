"""threeg-kernels: fast, exact global covariance pooling (the 3G-Net / iSQRT-COV head) for PyTorch.

    >>> import threeg_kernels
    >>> y = threeg_kernels.cov_pool(x, weight)        # (B, C, H, W) -> (B, C(C+1)/2)
    >>> threeg_kernels.available_backends("cuda")     # e.g. ['triton', 'ext', 'torch', 'reference']
    >>> head = threeg_kernels.CovPoolHead(2048, num_classes=200)  # any backbone's map or tokens -> logits

`python -m threeg_kernels` prints versions, devices and the backends present with reasons for the rest.
"""

from .api import CovPool, cov_pool
from .dispatch import BACKENDS, BackendUnavailableError, available_backends
from .head import CovPoolHead

__version__ = "0.1.0"

__all__ = [
    "cov_pool",
    "CovPool",
    "CovPoolHead",
    "available_backends",
    "BACKENDS",
    "BackendUnavailableError",
    "__version__",
]
