"""The shared rate limit's Redis killed under load and restarted: reliability/redis_outage.py, per variant.

Parametrized over the lab's variants that serve the Redis store: each is asked
once, at collection (``redis_outage.serves_store``: the server started with the
options; a usage error means it does not serve them yet). The variants that
refuse are listed in ``REFUSED`` and by ``test_which_variants_serve_the_store``,
which fails if none does: the scenario must run somewhere. When the run selects
no live test (``-m unit``, ``-m "not live"``) nothing is asked and no process starts.
"""
from __future__ import annotations

import conftest
import pytest
from conclab.reliability import redis_outage, scenarios
from conclab.servers import VARIANTS as LAB_VARIANTS

pytestmark = pytest.mark.live

SCALE = scenarios.default_scale()
REFUSED: dict = {}              # variant -> its one-line refusal, filled at collection


def live_tests_selected(config) -> bool:
    expression = (config.getoption("markexpr", "") or "").replace(" ", "")
    return expression not in ("unit", "notlive", "unitandnotlive")


def pytest_generate_tests(metafunc):
    if "served" not in metafunc.fixturenames:
        return
    chosen = []
    for name, backend, options in conftest.VARIANTS:
        if LAB_VARIANTS[name].unavailable():
            continue
        refusal = redis_outage.serves_store(backend, options) if live_tests_selected(metafunc.config) else None
        if refusal:
            REFUSED[name] = refusal
        else:
            chosen.append((name, backend, options))
    metafunc.parametrize("served", chosen, ids=[c[0] for c in chosen])


def test_redis_killed_and_restarted_under_load_loses_nothing(served):
    name, backend, options = served
    outcome = scenarios.run("redis_outage", backend, options, SCALE)
    assert outcome.passed, f"{name}: " + "; ".join(outcome.failures) + f" [{outcome.figure}]"
    assert outcome.metrics["store_errors_during_outage"] > 0 and outcome.metrics["store_calls_after"] > 0
    assert outcome.metrics["lost"] == 0 and outcome.metrics["replies"] > 0


def test_which_variants_serve_the_store(request):
    served = [n for n, _, _ in conftest.VARIANTS if n not in REFUSED and not LAB_VARIANTS[n].unavailable()]
    print(f"serve the Redis store: {', '.join(served) or 'none'}; refuse it: "
          + ("; ".join(f"{n} ({why})" for n, why in REFUSED.items()) or "none"))
    assert served, f"no variant serves --rate-limit-store redis:// yet: {REFUSED}"
