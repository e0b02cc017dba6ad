"""The compiled grouping of a batch's result codes against numpy's unique and bincount."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flowshift._codes import group_codes


@settings(deadline=None)  # the first example compiles the kernel
@given(codes=arrays(np.int64, st.integers(1, 3000),
                    elements=st.sampled_from([0, 1, 7, 1 << 40, (1 << 62) + 5, 12345])
                    | st.integers(0, 1 << 62)),
       seed=st.integers(0, 2**32 - 1))
def test_group_codes_is_unique_with_counts(codes, seed):
    weights = np.random.default_rng(seed).integers(0, 65536, len(codes)).astype(np.uint32)
    uniq, inverse, packets, octets = group_codes(codes, weights)
    want_uniq, want_inverse = np.unique(codes, return_inverse=True)
    assert uniq.tolist() == want_uniq.tolist()
    assert inverse.tolist() == want_inverse.ravel().tolist()
    assert packets.tolist() == np.bincount(want_inverse.ravel()).tolist()
    assert octets.tolist() == np.bincount(want_inverse.ravel(), weights=weights).astype(
        np.int64).tolist()
