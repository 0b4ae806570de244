"""How a host's cores are shared between model workers (pure logic, and pinning this thread)."""

import os
import threading

import pytest

from libs.cpus import CorePlan, available_cores, format_cpu_list, parse_cpu_list, pin_current_thread


def test_cpu_lists_round_trip():
    assert parse_cpu_list("0-3,8,2") == [0, 1, 2, 3, 8]
    assert parse_cpu_list("") == []
    assert format_cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert parse_cpu_list(format_cpu_list([5, 1, 2])) == [1, 2, 5]
    for bad in ("a", "3-1", "-2", "1-x"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_plan_splits_threads_and_pins_only_when_asked():
    two = CorePlan([0, 1], 2)
    assert not two.pinned and two.cpus(0) == "" and [two.threads(0), two.threads(1)] == [1, 1]
    assert CorePlan(list(range(4)), 1).threads(0) == 4
    two = CorePlan([0, 1], 2, pin=True)
    assert two.pinned and [two.cpus(0), two.cpus(1)] == ["0", "1"] and two.threads(0) == 1
    eight = CorePlan(list(range(8)), 3, pin=True)  # uneven: the first workers get the spare core
    assert [eight.cpus(i) for i in range(3)] == ["0-2", "3-5", "6-7"]
    assert [eight.threads(i) for i in range(3)] == [3, 3, 2]
    flat = {c for i in range(3) for c in eight.sets[i]}
    assert flat == set(range(8)) and sum(len(x) for x in eight.sets) == 8
    crowded = CorePlan([0, 1], 5, pin=True)  # more workers than cores: no pinning, one thread each
    assert not crowded.pinned and crowded.cpus(4) == "" and crowded.threads(4) == 1
    assert CorePlan([4, 6], 1, pin=True).cpus(0) == "4,6"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs Linux")
def test_pinning_applies_to_the_calling_thread_only():
    cores = available_cores()
    result = {}

    def worker():
        result["used"] = pin_current_thread(str(cores[-1]))
        result["affinity"] = os.sched_getaffinity(0)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result["used"] == [cores[-1]] and result["affinity"] == {cores[-1]}
    assert sorted(os.sched_getaffinity(0)) == cores  # this thread is untouched
    with pytest.raises(ValueError):
        pin_current_thread("100000")
