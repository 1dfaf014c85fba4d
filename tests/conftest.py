import os
import tempfile

# A fresh inductor cache per test session: the on-disk cache keys do not cover a custom op's fake
# kernel, so a cache written by an older version of this package can replay stale output shapes.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="threeg-inductor-"))
