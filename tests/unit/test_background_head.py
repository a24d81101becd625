"""tasks.ray_jobs.BackgroundHead: the local head `python -m flows.rlhf` starts ahead of the flow, only when needed."""
import pytest

from tasks.ray_jobs import BackgroundHead


def test_no_head_when_nothing_has_to_run():
    head = BackgroundHead(lambda: False, log=pytest.fail)
    assert head.address() is None
    head.close()
    head.close()  # idempotent


def test_an_error_of_the_check_is_raised_where_the_address_is_asked_for():
    def needed():
        raise ValueError("params/presets/x/sft.yaml: bad")

    head = BackgroundHead(needed)
    with pytest.raises(ValueError, match="sft.yaml"):
        head.address()
    head.close()
