"""MSDeformAttn takes batch-first inputs; a sequence-first (Lq, N, d_model) query is named as the
argument to fix, not input_flatten (whose batch size merely disagrees with it)."""

from __future__ import annotations

import pytest
import torch

from msda import MSDeformAttn


def inputs(n=2, lq=5, d=16, shapes=((4, 4), (2, 2))):
    spatial = torch.tensor(shapes, dtype=torch.long)
    start = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
    s = int((spatial[:, 0] * spatial[:, 1]).sum())
    return torch.randn(n, lq, d), torch.rand(n, lq, len(shapes), 2), torch.randn(n, s, d), spatial, start


@pytest.mark.parametrize("value_sequence_first", [False, True])
def test_sequence_first_query_names_query(value_sequence_first):
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query, reference_points, value, spatial, start = inputs()
    module(query, reference_points, value, spatial, start)  # batch first: fine
    if value_sequence_first:
        value = value.transpose(0, 1)
    with pytest.raises(ValueError, match=r"query must be batch first.*\(5, 2, 16\).*query\.transpose\(0, 1\)"):
        module(query.transpose(0, 1), reference_points, value, spatial, start)


def test_wrong_input_flatten_batch_still_names_input_flatten():
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query, reference_points, value, spatial, start = inputs()
    with pytest.raises(ValueError, match=r"input_flatten must have shape \(N=2, S, d_model=16\)"):
        module(query, reference_points, value[:1], spatial, start)
