"""The auto_LiRPA 0.3 fixes in certood.verifiers.compat, one test (or more) per fix.

Each test exercises the code path that broke without its fix (checked by disabling the
fixes one at a time), so a regression shows up here with a name, not as a stack trace
somewhere in the bound code.
"""
from __future__ import annotations

import sys

import numpy
import pytest
import torch
from torch import nn

from certood.verifiers import bound_module, compat, ensure_lirpa


@pytest.fixture(scope="module")
def lirpa():
    return ensure_lirpa()


def test_ensure_lirpa_is_idempotent(lirpa):
    fixes = compat.applied_fixes()
    from auto_LiRPA.operators.activation import BoundRelu
    from auto_LiRPA.operators.pooling import BoundAveragePool

    patched = (
        lirpa.BoundedModule._named_members,
        BoundRelu._relu_mask_alpha,
        BoundAveragePool.bound_backward,
        getattr(torch._C.Node, "__getitem__", None),
    )
    assert ensure_lirpa() is lirpa
    # Running every fix again must not stack a second patch on the first.
    compat._fix_node_getitem()
    compat._fix_named_members(lirpa)
    compat._fix_relu_alpha_clamp(lirpa)
    compat._fix_avgpool_contiguous(lirpa)
    assert ensure_lirpa() is lirpa
    assert compat.applied_fixes() == fixes
    assert patched == (
        lirpa.BoundedModule._named_members,
        BoundRelu._relu_mask_alpha,
        BoundAveragePool.bound_backward,
        getattr(torch._C.Node, "__getitem__", None),
    )


def test_fix1_numpy_arraysetops_shim_is_temporary(lirpa):
    from auto_LiRPA.operators import base

    assert base.isin is numpy.isin
    if int(numpy.__version__.split(".")[0]) >= 2:
        assert "numpy_arraysetops_shim" in compat.applied_fixes()
        assert "numpy.lib.arraysetops" not in sys.modules  # shim removed after import


def test_fix2_opset_stand_in_sets_the_exporter_global(lirpa):
    from auto_LiRPA import parse_graph
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    import torch.onnx.symbolic_helper as symbolic_helper

    if "torch_onnx_set_opset_version" in compat.applied_fixes():
        assert parse_graph._set_opset_version is compat._set_opset_version
        assert not hasattr(symbolic_helper, "_set_opset_version")  # torch left as it was
    before = GLOBALS.export_onnx_opset_version
    try:
        parse_graph._set_opset_version(12)
        assert GLOBALS.export_onnx_opset_version == 12
    finally:
        GLOBALS.export_onnx_opset_version = before


def test_fix3_graph_nodes_are_subscriptable(lirpa):
    # auto_LiRPA reads node attributes as node[name] while parsing the traced graph.
    graph = torch._C.Graph()  # keep it alive: nodes die with their graph
    node = graph.create("prim::Constant")
    node.i_("value", 3)
    node.f_("scale", 0.5)
    assert node["value"] == 3
    assert node["scale"] == 0.5


def test_fix4_named_members_accepts_remove_duplicate(lirpa):
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    bounded = lirpa.BoundedModule(net, torch.zeros(1, 2), bound_opts={"sparse_features_alpha": False})
    assert len(list(bounded.parameters())) == 4
    assert len(list(bounded.named_parameters(remove_duplicate=False))) == 4


def test_fix4_alpha_crown_runs_in_matrix_mode(lirpa):
    # Two conv layers in matrix mode: alpha-CROWN calls self.parameters() there, which
    # raised "unexpected keyword argument 'remove_duplicate'" without the fix.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32, 3),
    ).eval()
    x = torch.randn(2, 1, 4, 4)
    bounded = lirpa.BoundedModule(
        net, torch.zeros_like(x), bound_opts={"sparse_features_alpha": False, "conv_mode": "matrix"}
    )
    bounded.set_bound_opts({"optimize_bound_args": {"iteration": 2}})
    bx = lirpa.BoundedTensor(x, lirpa.PerturbationLpNorm(eps=0.1))
    lower, upper = bounded.compute_bounds(x=(bx,), method="CROWN-Optimized")
    out = net(x)
    assert (lower <= out + 1e-5).all() and (out <= upper + 1e-5).all()


def test_fix5_alpha_slopes_get_gradient_at_zero_and_one(lirpa):
    # torch 2.x clamp has zero gradient exactly at its bounds, where alpha starts.
    from auto_LiRPA.operators.activation import BoundRelu

    lower = torch.tensor([-1.0, -1.0, 0.5, -2.0])
    upper = torch.tensor([1.0, 1.0, 1.0, -1.0])  # unstable, unstable, active, inactive
    alpha = torch.tensor([0.0, 1.0, 0.3, 0.7], requires_grad=True)
    lb_d, _, _ = BoundRelu._relu_mask_alpha(lower, upper, alpha, None)
    torch.testing.assert_close(lb_d.detach(), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    lb_d.sum().backward()
    assert alpha.grad[0] != 0 and alpha.grad[1] != 0  # unstable neurons can move
    assert alpha.grad[2] == 0 and alpha.grad[3] == 0  # stable ones are fixed


def test_fix5_clamped_values_stay_in_unit_interval(lirpa):
    from auto_LiRPA.operators.activation import BoundRelu

    lower, upper = -torch.ones(3), torch.ones(3)
    lb_d, ub_d, _ = BoundRelu._relu_mask_alpha(lower, upper, torch.tensor([-0.5, 0.5, 1.5]), torch.tensor([2.0, 0.2, -1.0]))
    torch.testing.assert_close(lb_d, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(ub_d, torch.tensor([1.0, 0.2, 0.0]))


def test_fix6_crown_through_avgpool_flatten_linear(lirpa):
    # Batch > 1 and a hidden Linear after Flatten: its identity spec reaches AvgPool as an
    # expanded, non-contiguous A, which 0.3's .view() rejected.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2),
    ).eval()
    x, eps = torch.randn(2, 1, 4, 4), 0.1
    b = bound_module(net, x, eps=eps, method="crown")
    samples = x + eps * (2 * torch.rand(200, *x.shape) - 1)
    with torch.no_grad():
        out = net(samples.flatten(0, 1)).view(200, *b.lower.shape)
    assert (b.lower <= out + 1e-5).all() and (out <= b.upper + 1e-5).all()
