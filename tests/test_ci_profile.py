"""Property tests are reproducible unless asked otherwise (issue 35): CI and `make test` draw the same examples."""

from hypothesis import given, settings
from hypothesis import strategies as st


def _draw() -> list[int]:
    out: list[int] = []

    @settings(max_examples=8)
    @given(st.lists(st.integers(), max_size=5))
    def probe(xs):
        out.extend(xs)

    probe()
    return out


def test_property_tests_draw_the_same_examples_every_run(request):
    if request.config.getoption("--hypothesis-profile") not in (None, "ci"):
        return  # a developer exploring on purpose (--hypothesis-profile=dev): nothing to hold
    assert settings().derandomize and settings().database is None
    assert _draw() == _draw()  # two runs of the same property test see the same examples
