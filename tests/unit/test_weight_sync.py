"""rlhf_ops.generation.weight_sync: the broadcast protocol between the sender and vllm_server's receiver.

Both ends run here, in two threads of one process (each its own rank of a gloo group), so the
protocol is tested without vLLM; tests/integration/test_vllm_cpu.py runs it against a real engine.
"""
import threading

import pytest
import torch

from rlhf_ops.generation.vllm_server import WeightReceiver
from rlhf_ops.generation.weight_sync import WeightSender, sync_backend


def _receive_in_thread(host, port, rank, world, times, out):
    def run():
        try:
            r = WeightReceiver(host, port, rank, world, timeout_s=60)
            out[rank] = [r.receive() for _ in range(times)]
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out[rank] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_every_engine_receives_every_tensor_with_its_name_dtype_and_shape():
    g = torch.Generator().manual_seed(0)
    first = {"model.embed_tokens.weight": torch.randn(7, 4, generator=g),
             "model.layers.0.mlp.up_proj.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
             "model.norm.weight": torch.randn(4, generator=g),
             "step": torch.tensor([3, 1], dtype=torch.int64)}
    second = {k: v * 2 if v.is_floating_point() else v + 1 for k, v in first.items()}
    sender = WeightSender("127.0.0.1", 0, world=3)
    out: dict = {}
    threads = [_receive_in_thread("127.0.0.1", sender.port, rank, 3, 2, out) for rank in (1, 2)]
    sender.connect()
    sent = [sender.send(first), sender.send(second)]
    for t in threads:
        t.join(timeout=60)
    assert sent[0] == sent[1] > sum(v.numel() * v.element_size() for v in first.values())
    for rank in (1, 2):
        assert not isinstance(out[rank], BaseException), out[rank]
        for want, got in zip((first, second), out[rank]):
            assert [name for name, _ in got] == list(want)
            for name, t in got:
                assert t.dtype == want[name].dtype and t.shape == want[name].shape
                assert torch.equal(t, want[name]), name


def test_what_ray_carries_unpacks_to_the_same_broadcast():
    """--vllm_sync_with_ray: rank 0's packed buffers as uint8 arrays (read-only, as Ray hands them over) give
    the engine's sender the same tensors to broadcast."""
    from rlhf_ops.generation.weight_sync import from_bytes, pack, to_bytes

    sd = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(5).to(torch.bfloat16), "c.bias": torch.randn(2)}
    header, flats = pack(sd)
    arrays = to_bytes(flats)
    for a in arrays:
        a.setflags(write=False)
    sender = WeightSender("127.0.0.1", 0, world=2)
    out: dict = {}
    thread = _receive_in_thread("127.0.0.1", sender.port, 1, 2, 1, out)
    sender.connect()
    sender.send_packed(header, from_bytes(header, arrays))
    thread.join(timeout=60)
    assert not isinstance(out[1], BaseException), out[1]
    got = dict(out[1][0])
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_backend_choice():
    assert sync_backend("gloo", on_gpu=False) == sync_backend("gloo", on_gpu=True) == "gloo"
    assert sync_backend("nccl", on_gpu=False) == "gloo"   # no CUDA: the same broadcast over gloo
    assert sync_backend("nccl", on_gpu=True) == "nccl"
    # --colocate_all: engine 0 shares actor rank 0's GPU, and NCCL groups one rank per GPU
    assert sync_backend("nccl", on_gpu=True, shares_gpu=True) == "ray"
    assert sync_backend("gloo", on_gpu=True, shares_gpu=True) == "gloo"
    assert sync_backend("gloo", on_gpu=False, with_ray=True) == sync_backend("nccl", True, True) == "ray"
    with pytest.raises(ValueError, match="mpi"):
        sync_backend("mpi", on_gpu=True)
    with pytest.raises(ValueError):
        from rlhf_ops.generation.vllm_engine import VLLMGenerator
        VLLMGenerator("/nonexistent", None, sync_backend="nccl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nccl_ends_refuse_a_machine_without_cuda_before_opening_anything():
    """Both ends say what nccl needs instead of hanging in a rendezvous or failing inside torch."""
    with pytest.raises(RuntimeError, match="nccl needs a CUDA GPU.*--vllm_sync_backend gloo"):
        WeightSender("127.0.0.1", 0, world=2, backend="nccl")
    # port 9 (discard): the receiver must refuse before it tries to reach any store
    with pytest.raises(RuntimeError, match="nccl needs a CUDA GPU"):
        WeightReceiver("127.0.0.1", 9, 1, 2, timeout_s=1, backend="nccl")
    with pytest.raises(ValueError, match="'gloo' or 'nccl'"):
        WeightReceiver("127.0.0.1", 9, 1, 2, timeout_s=1, backend="mpi")
