"""Triton kernels of the 3G pooling head, one module per op; the equations are those of docs/math.md.

    covariance.py     the weighted covariance (1) and its backward (13)-(14).
    newton_schulz.py  trace normalisation (2) and the iteration (3)-(6), fused; the plain reverse sweep
                      (10) and step 1 (12), as autograd runs them.
    triangle.py       the packed triangle (7)-(8), packed in the last product's epilogue, and its
                      backward scatter (the gradient at the triangle, as autograd gives it).
    _tiles.py         tile helpers shared by the three (masked and transposed loads, the matmul in each
                      precision mode, the mirrored store of a symmetric tile) and the default launch settings.
    head.py           the whole head as kernel launches, forward and backward, for one launch config.
    tuning.py         the launch config per shape: timed on the GPU at first use, fixed under the interpreter.

Kernel files hold kernels and host launchers only; the autograd glue is threeg_kernels/_registration.py
and the registered ops are in threeg_kernels/backends/triton_impl.py.
"""
