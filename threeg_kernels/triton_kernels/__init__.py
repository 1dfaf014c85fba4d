"""Triton kernels of the 3G pooling head, one module per op (shared/SPEC.md sections 1-3).

    covariance.py     Sigma = Xc Xc^T / N + eps I (weights, centring, eps fused; upper tiles, mirrored)
                      and its backward dX_w = 2 dSigma Xc / N with dX = dX_w w, dw = sum_c dX_w X.
    newton_schulz.py  the coupled iteration (trace normalisation folded into step 1, T = 1.5 I - 0.5 Z Y
                      in the epilogue of its product, T Y and T Z in one launch, no Z in the last step,
                      triangle pack fused into the last step) and its symmetric reverse sweep.
    triangle.py       packed-triangle indexing for either order, the pack epilogue with sqrt(tr),
                      and the backward scatter into a symmetric C x C gradient.
    _tiles.py         tile helpers shared by the three (masked loads, the matmul in each precision mode,
                      the mirrored store of a symmetric tile) and the default launch settings.
    head.py           the whole head as kernel launches, forward and backward, for one launch config.
    tuning.py         the launch config per shape: timed on the GPU at first use, fixed under the interpreter.

Kernel files hold kernels and host launchers only; the autograd glue is threeg_kernels/_registration.py
and the registered ops are in threeg_kernels/backends/triton_impl.py.
"""
