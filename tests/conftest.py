import os
import tempfile

import torch

# Without a GPU the Triton kernels can only run under Triton's interpreter, which is chosen when the
# kernels are decorated, i.e. when threeg_kernels is first imported: set it before any test imports it.
# It is slow: the backend x device matrix (tests/helpers.py, `interpreted`) gives 'triton' on CPU tiny shapes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh inductor cache per pytest run: the on-disk cache keys do not cover a custom op's fake kernel,
# so a cache written by an older version of this package can replay stale output shapes.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="threeg-inductor-"))
