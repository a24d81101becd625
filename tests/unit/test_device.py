"""rlhf_ops.distributed.device: --ref_reward_offload's moves, recorded (this machine has no GPU, so the
copies themselves are not run: the test checks that the model goes to the accelerator for the block and
back to host memory after it, also when the block raises, and that the CPU is left alone)."""
import pytest
import torch

from rlhf_ops.distributed.device import accelerator, param_device, resident


class Recorder(torch.nn.Linear):
    def __init__(self):
        super().__init__(2, 2)
        self.moves: list[str] = []

    def to(self, *args, **kwargs):  # records instead of copying: "cuda" cannot be reached here
        self.moves.append(str(torch.device(args[0])))
        return self


def test_the_model_visits_the_accelerator_for_the_block_only():
    m = Recorder()
    with resident(m, "cuda:0") as inside:
        assert inside is m and m.moves == ["cuda:0"]
    assert m.moves == ["cuda:0", "cpu"]
    with pytest.raises(RuntimeError, match="boom"):
        with resident(m, torch.device("cuda", 0)):
            raise RuntimeError("boom")
    assert m.moves == ["cuda:0", "cpu", "cuda:0", "cpu"]


def test_on_the_cpu_nothing_moves():
    m = Recorder()
    with resident(m, "cpu"):
        pass
    assert m.moves == []
    assert param_device(m) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert accelerator() == torch.device("cpu")
