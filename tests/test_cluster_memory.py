"""How a local cluster sizes its instances' KV arenas to fit one host (plain logic)."""

from yuebing.cluster import MIN_ARENA_BYTES, fit_arenas

MB = 1 << 20


def test_arenas_that_fit_are_kept_as_configured():
    assert fit_arenas(512 * MB, 256 * MB, 8, 8, budget=8192 * MB) == (512 * MB, 256 * MB)


def test_arenas_over_the_budget_are_scaled_alike_to_fit():
    # 16 colocated workers prefill and decode: 16 x 768 MB against a 9 GB budget
    p, d = fit_arenas(512 * MB, 256 * MB, 16, 16, budget=9216 * MB)
    assert 16 * p + 16 * d <= 9216 * MB
    assert p == 2 * d  # the same factor for both
    assert p > 256 * MB  # and no smaller than it has to be
    assert fit_arenas(512 * MB, 0, 16, 16, budget=4096 * MB) == (256 * MB, 0)  # an arena off stays off


def test_a_scaled_arena_keeps_a_floor():
    p, d = fit_arenas(512 * MB, 256 * MB, 100, 100, budget=1024 * MB)
    assert (p, d) == (MIN_ARENA_BYTES, MIN_ARENA_BYTES)
    assert fit_arenas(32 * MB, 32 * MB, 100, 100, budget=MB) == (32 * MB, 32 * MB)  # never scaled up to it
