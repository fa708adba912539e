"""Load-time transforms (weights/transforms.py) on hand-computed cases.

The fused splitters are covered end to end by the fixtures in test_oracles.py.
"""

import numpy as np

from slimllm.weights.transforms import l2_normalize_rows, norm_head


def test_l2_normalize_rows():
    w = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize_rows(w), [[0.6, 0.8], [0.0, 0.0]])


def test_norm_head_normalises_each_vocabulary_row():
    w = np.array([[3.0, 0.0], [4.0, 2.0]], np.float32)  # our [e, v]: the hub's rows are columns
    np.testing.assert_allclose(norm_head(w, None), [[0.6, 0.0], [0.8, 1.0]])
