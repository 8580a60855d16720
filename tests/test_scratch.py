"""The per-thread scratch buffers (scratch.py) that dropout masks and the per-token int8 layers write into."""

import threading

import pytest
import torch

from modeling_selfattn import scratch


@pytest.fixture(autouse=True)
def no_buffers(monkeypatch):
    monkeypatch.setattr(scratch, "MAX_BYTES", 100 * 4)  # 100 float32 elements
    scratch.release()
    yield
    scratch.release()


def test_requests_are_views_of_one_buffer_per_purpose_grown_to_the_largest():
    first = scratch.scratch("a", 10, torch.float32)
    assert first.shape == (10,) and first.dtype == torch.float32
    smaller = scratch.scratch("a", 4, torch.float32)
    assert smaller.data_ptr() == first.data_ptr()
    other = scratch.scratch("b", 4, torch.float32)
    assert other.data_ptr() != first.data_ptr()
    grown = scratch.scratch("a", 50, torch.float32)
    assert grown.numel() == 50 and scratch.held("a").numel() == 50
    assert scratch.scratch("a", 8, torch.int64).dtype == torch.int64  # another dtype: a new buffer


def test_requests_beyond_the_cap_are_fresh_and_not_kept():
    scratch.scratch("a", 10, torch.float32)
    kept = scratch.held("a")
    large = scratch.scratch("a", 101, torch.float32)
    assert large.numel() == 101
    assert scratch.held("a") is kept
    assert large.data_ptr() != kept.data_ptr()


def test_a_compiled_graph_gets_a_fresh_tensor(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert scratch.scratch("a", 10, torch.float32).numel() == 10
    assert scratch.held("a") is None


def test_a_trace_gets_fresh_tensors_and_runs_inputs_of_another_size():
    """torch.jit.trace would keep a view of the buffer, sized for the traced input, as a constant."""

    def doubled(x):
        return torch.mul(x, 2, out=scratch.scratch("a", x.numel(), torch.float32))

    traced = torch.jit.trace(doubled, torch.ones(4), check_trace=False)
    assert scratch.held("a") is None
    assert torch.equal(traced(torch.arange(6.0)), torch.arange(6.0) * 2)


def test_a_buffer_first_made_under_inference_mode_is_writable_outside_it():
    with torch.inference_mode():
        scratch.scratch("a", 10, torch.float32).fill_(1.0)
    assert not scratch.held("a").is_inference()
    scratch.scratch("a", 10, torch.float32).fill_(2.0)
    assert torch.equal(scratch.held("a"), torch.full((10,), 2.0))


def test_each_thread_has_its_own_buffers():
    mine = scratch.scratch("a", 10, torch.float32)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(scratch.scratch("a", 10, torch.float32).data_ptr()))
    thread.start()
    thread.join()
    assert theirs and theirs[0] != mine.data_ptr()
    assert scratch.held("a").data_ptr() == mine.data_ptr()


def test_release_drops_one_purpose_or_all():
    scratch.scratch("a", 10, torch.float32)
    scratch.scratch("b", 10, torch.float32)
    scratch.release("a")
    assert scratch.held("a") is None and scratch.held("b") is not None
    scratch.release()
    assert scratch.held("b") is None


def test_a_fake_tensor_mode_gets_a_fresh_tensor_and_leaves_no_buffer():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = scratch.scratch("a", 10, torch.float32)
    assert type(fake) is not torch.Tensor
    assert scratch.held("a") is None
    assert type(scratch.scratch("a", 10, torch.float32)) is torch.Tensor


def test_only_plain_cpu_tensors_outside_function_transforms_may_write_into_scratch():
    plain = torch.randn(4, 3)
    assert scratch.may_write_into_scratch(plain)
    assert not scratch.may_write_into_scratch(plain.as_subclass(SubclassedTensor))
    assert not scratch.may_write_into_scratch(torch.empty(4, 3, device="meta"))
    seen = []
    torch.func.vmap(lambda row: seen.append(scratch.may_write_into_scratch(row)) or row)(plain)
    with torch.autograd.forward_ad.dual_level():
        seen.append(scratch.may_write_into_scratch(torch.autograd.forward_ad.make_dual(plain, torch.ones_like(plain))))
    assert seen == [False, False]


class SubclassedTensor(torch.Tensor):
    pass
