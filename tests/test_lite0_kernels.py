"""The lite0-fpn backbone's faster CPU kernels compute what the obvious ones compute.

- ``FusedFrozenBatchNorm2d`` (one ``F.batch_norm`` inference kernel) equals torchvision's
  ``FrozenBatchNorm2d`` on the same buffers, forward and input gradient, and keeps its state
  dict keys (old checkpoints load).
- ``SameConv2d`` lets the convolution pad itself when TF "same" padding is symmetric: the result
  equals an explicit padded copy exactly, for stride 1 and 2, odd and even input sizes.
- The backbone runs channels-last: its weights and its feature maps are NHWC in memory, and its
  features equal those of the same backbone in contiguous NCHW (to float rounding).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FrozenBatchNorm2d

from fewshot.model.efficientnet_lite import FusedFrozenBatchNorm2d, Lite0FPNBackbone, SameConv2d


def test_fused_frozen_batchnorm_equals_torchvision_frozen_batchnorm():
    torch.manual_seed(0)
    ref, fused = FrozenBatchNorm2d(16, eps=1e-3), FusedFrozenBatchNorm2d(16, eps=1e-3)
    for m in (ref, fused):
        m.weight.copy_(torch.linspace(0.5, 2.0, 16))
        m.bias.copy_(torch.linspace(-1.0, 1.0, 16))
        m.running_mean.copy_(torch.linspace(-0.3, 0.3, 16))
        m.running_var.copy_(torch.linspace(0.1, 3.0, 16))
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 16, 9, 11, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), fused(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    assert not any(t.requires_grad for t in fused.buffers())


def _padded_copy_conv(conv: SameConv2d, x: torch.Tensor) -> torch.Tensor:
    ih, iw = x.shape[-2:]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
    pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 28), (5, 1, 27), (1, 1, 14), (3, 2, 28),
                                                (3, 2, 27), (5, 2, 28), (5, 2, 29)])
def test_same_conv_padding_equals_an_explicit_padded_copy(kernel, stride, size):
    torch.manual_seed(0)
    conv = SameConv2d(8, 8, kernel, stride=stride, groups=8 if kernel > 1 else 1, bias=False)
    x = torch.randn(2, 8, size, size)
    out = conv(x)
    assert out.shape[-1] == math.ceil(size / stride)
    assert torch.equal(out, _padded_copy_conv(conv, x))


def test_backbone_is_channels_last_and_matches_nchw():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    nhwc = Lite0FPNBackbone(64, weights=True).eval()
    nchw = Lite0FPNBackbone(64, weights=True).eval()
    nchw.load_state_dict(nhwc.state_dict())
    nchw.channels_last = False
    nchw.to(memory_format=torch.contiguous_format)
    w = nhwc.fpn.layer_blocks[0][0].weight  # 64x64x3x3: the two layouts differ
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        a, b = nhwc(x), nchw(x)
    assert list(a) == list(b) == ["0", "1", "2", "3", "pool"]
    assert a["0"].is_contiguous(memory_format=torch.channels_last)
    for k in a:
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
