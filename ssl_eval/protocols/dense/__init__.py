"""What the dense protocols (dense_seg, dense_knn, depth) share: the geometry, training tokens
and sliding-window prediction (common.py), and the full-resolution metrics (metrics.py)."""
