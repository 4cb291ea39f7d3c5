"""The CPU thread count a run chooses (pipeline/threads.py), with the machine's cores and load injected."""

from __future__ import annotations

from latentpatch.pipeline.threads import SMALL_MODEL, choose_threads, recent_load, usable_cores


def test_small_models_get_one_thread_whatever_the_machine():
    for cores, load in ((1, 0.0), (2, 0.0), (64, 0.5), (2, 5.0)):
        assert choose_threads(128, 4, cores=cores, load=load).count == 1
    assert choose_threads(SMALL_MODEL, 1, cores=8, load=0.0).count == 1
    assert choose_threads(SMALL_MODEL + 1, 1, cores=8, load=0.0).count == 8


def test_larger_models_get_the_free_cores():
    # SmolLM2-135M: d 576 x 30 layers
    assert choose_threads(576, 30, cores=2, load=0.0).count == 2  # a free 2-core machine
    assert choose_threads(576, 30, cores=2, load=0.3).count == 2
    assert choose_threads(576, 30, cores=2, load=1.0).count == 1  # the other core is busy
    assert choose_threads(576, 30, cores=2, load=3.7).count == 1  # never fewer than one
    assert choose_threads(576, 30, cores=16, load=5.2).count == 11
    choice = choose_threads(576, 30, cores=16, load=5.2)
    assert choice.reason == "11 of 16 cores free (load 5.20)"
    assert choice.to_dict() == {"count": 11, "reason": "11 of 16 cores free (load 5.20)"}


def test_threads_option_overrides():
    assert choose_threads(128, 4, override=3, cores=2, load=9.0).to_dict() == {"count": 3, "reason": "--threads"}
    assert choose_threads(576, 30, override=1, cores=16, load=0.0).count == 1


def test_this_machine_is_read():
    assert usable_cores() >= 1 and recent_load() >= 0.0
    assert 1 <= choose_threads(576, 30).count <= usable_cores()


def test_small_models_get_a_worker_per_free_core_and_enough_pairs():
    from latentpatch.pipeline.threads import PAIRS_PER_WORKER, choose_workers

    assert choose_workers(128, 4, 57, cores=2, load=0.0).count == 2
    assert choose_workers(128, 4, 57, cores=2, load=1.0).count == 1  # the other core is busy
    assert choose_workers(128, 4, 57, cores=16, load=0.0).count == 57 // PAIRS_PER_WORKER
    assert choose_workers(128, 4, PAIRS_PER_WORKER - 1, cores=16, load=0.0).count == 1  # too few pairs
    assert choose_workers(576, 30, 57, cores=16, load=0.0).count == 1  # a larger model gets threads
    assert choose_workers(128, 4, 57, on_cpu=False, cores=16, load=0.0).count == 1
    assert choose_workers(576, 30, 57, override=3).to_dict() == {"count": 3, "reason": "--workers"}


def test_cores_busy_elsewhere_count_other_processes_not_this_one():
    """The start-up CPU sample (``/proc/stat`` less this process's own CPU time) sees a busy child
    process and does not count this process's own work (the 1-minute load average would count
    both, and a process that ended a minute ago)."""
    import subprocess
    import sys
    import time

    import pytest

    from latentpatch.pipeline.threads import CpuSample

    if CpuSample.now().ticks is None:
        pytest.skip("no /proc/stat")
    sample = CpuSample.now()
    t = time.process_time()
    while time.process_time() - t < 0.5:  # 0.5 s of our CPU however busy the machine: not counted
        pass
    others, end = sample.others_busy(), CpuSample.now()
    assert end.ticks is not None and sample.ticks is not None
    machine = (end.ticks[0] - sample.ticks[0]) / (end.ticks[1] - sample.ticks[1]) * end.ticks[2]  # all busy cores
    own = (end.own - sample.own) / (end.wall - sample.wall)  # this process's cores, from os.times()
    assert end.own - sample.own >= 0.45 and others is not None  # our own work is there to be left out
    assert abs(others - max(0.0, machine - own)) < 0.15  # the machine's busy cores less ours
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.5)  # the child's start-up
        sample = CpuSample.now()
        time.sleep(1.0)
        assert sample.others_busy() > 0.6
    finally:
        child.kill()
        child.wait()
