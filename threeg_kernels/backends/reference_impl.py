"""The "reference" backend: `threeg_kernels.reference` with autograd, on any device."""

from .. import reference
from . import Loaded


def pool(x, weight, iters, eps, order, precision, keep_iterates):
    # autograd keeps what it needs: keep_iterates has no meaning here
    return reference.cov_pool(x, weight, iters, eps, order)


LOADED = Loaded(pool=pool, unavailable_on=lambda device: None)
