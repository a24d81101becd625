"""Stage output -> task log lines (tasks.ray_jobs.LogLines): progress bars are thinned, nothing else is."""
from tasks.ray_jobs import LogLines


def _bar(p: int, label: str = "sft") -> str:
    return f"{label}:  {p}%|##   | {p}/100 [00:01<00:02, 8.0it/s]"


def test_carriage_return_redraws_keep_their_last_state():
    split = LogLines()
    assert split("\r".join(_bar(p) for p in range(101)) + "\n") == [_bar(100)]
    assert split("loading 1\rloading 2\rdone\n") == ["done"]


def test_progress_bars_are_logged_every_ten_percent_and_at_the_end_other_lines_always():
    split = LogLines()
    kept = [line for p in range(101) for line in split(_bar(p) + "\n")]
    assert kept == [_bar(p) for p in range(0, 101, 10)]
    assert split(_bar(5, "rm") + "\n") == [_bar(5, "rm")]  # another bar has its own count
    assert split(_bar(3) + "\n") == [_bar(3)]  # a new bar under the same label starts again
    assert split("INFO loss=0.5\n\nWARNING x\n") == ["INFO loss=0.5", "WARNING x"]
