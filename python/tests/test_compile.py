"""torch.compile(fullgraph=True) through the op: the graph holds longattn::attention_forward (and
the backward op in the compiled backward) without a break, with eager's values and gradients."""

import torch

import longattn.torch as lt


def block(q, k, v, weight):
    o = lt.attention(torch.tanh(q) * weight, k, v, causal=True)
    return (o * o).sum(dim=-1)


def test_compiled_forward_and_backward_equal_eager(generator):
    q = torch.randn((48, 4, 16), generator=generator)
    k, v = (torch.randn((48, 2, 16), generator=generator) for _ in range(2))
    weight = torch.randn(16, generator=generator)
    d_out = torch.randn((48, 4), generator=generator)

    def run(function):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, weight)]
        out = function(*leaves)
        (out * d_out).sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    eager = run(block)
    compiled = run(torch.compile(block, fullgraph=True))
    for name, got, want in zip(("out", "dq", "dk", "dv", "dweight"), compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_fake_tensors_give_the_shapes_without_running(generator):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty((10, 6, 8)), torch.empty((10, 3, 8))
        o, lse = torch.ops.longattn.attention_forward(q, k, k, None, True, 0.5, "ring", "zigzag", -1, -1)
        dq, dk, dv = torch.ops.longattn.attention_backward(o, q, k, k, o, lse, None, True, 0.5, "ring", "zigzag",
                                                          -1, -1)
    assert o.shape == (10, 6, 8) and lse.shape == (6, 10) and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
