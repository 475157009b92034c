"""oneDNN's linear for the fp32 CPU products without a graph (fast/kernels.py), equal to torch's."""

import pytest
import torch

from grpo_lightning.fast.kernels import OneDNNLinear, linear, onednn_available, times_weight

pytestmark = pytest.mark.skipif(not onednn_available(), reason="needs torch's oneDNN (mkldnn) CPU kernels")


@pytest.mark.parametrize("packed_rows", [None, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_nn_linear(packed_rows, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 300, bias=bias)
    x = torch.randn(4, 3, 96)[..., ::2]  # [4, 3, 48], not contiguous
    with torch.no_grad():
        assert torch.allclose(OneDNNLinear(layer, packed_rows)(x), layer(x), atol=1e-5)
    assert OneDNNLinear(layer, packed_rows).weight is layer.weight
    with pytest.raises(RuntimeError, match="no backward"):
        OneDNNLinear(layer)(x)



def test_linear_and_times_weight_equal_torch_and_keep_autograd_where_a_graph_is_needed():
    torch.manual_seed(0)
    x, w, b, dz = torch.randn(5, 2, 48), torch.randn(300, 48), torch.randn(300), torch.randn(7, 300)
    assert torch.allclose(linear(x, w, b), x @ w.T + b, atol=1e-5)
    assert torch.allclose(times_weight(dz, w), dz @ w, atol=1e-5)  # through Wᵀ's strides
    w.requires_grad_()
    linear(x, w, b).sum().backward()  # torch's own product here: the graph is kept
    assert torch.allclose(w.grad, x.sum((0, 1)).expand(300, 48), atol=1e-5)
