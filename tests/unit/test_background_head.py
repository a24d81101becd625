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


@pytest.mark.parametrize("failed", [False, True])
def test_close_tells_the_head_whether_the_flow_failed(monkeypatch, failed):
    """local_head() keeps its temp dir (the head's session logs) when its block raises; a failed flow must
    reach it that way, also through _Cluster's exit stack, or the logs that explain the failure are deleted."""
    import contextlib

    import flows.rlhf as flow_mod
    import tasks.ray_jobs as ray_jobs

    seen = []

    @contextlib.contextmanager
    def fake_head(log=print):
        try:
            yield "http://127.0.0.1:1"
            seen.append("clean")
        except BaseException as e:  # what local_head's `ok` flag tells apart
            seen.append(f"raised: {e}")
            raise

    monkeypatch.setattr(ray_jobs, "local_head", fake_head)
    head = BackgroundHead(lambda: True)
    assert head.address() == "http://127.0.0.1:1"
    monkeypatch.setattr(flow_mod, "_prestarted", head)
    cluster = flow_mod._Cluster("ray", log=print)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.address(needed=True) == "http://127.0.0.1:1"
    if failed:
        with pytest.raises(ValueError):
            with cluster:
                raise ValueError("stage sft failed")
    else:
        with cluster:
            pass
    head.close(failed=not failed)  # main()'s close afterwards changes nothing: closed once
    assert seen == (["raised: the flow failed"] if failed else ["clean"])
