"""The "reference" backend: `threeg_kernels.reference` with autograd, on any device."""

from .. import reference
from . import Loaded

LOADED = Loaded(pool=reference.cov_pool, unavailable_on=lambda device: None)
