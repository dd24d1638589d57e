"""The hypothesis settings every property-based suite shares: SALS_FUZZ_EXAMPLES examples per
test (default 100), derandomized so that a failure reproduces, no example database, no deadline
(the first call of a test may build a model or load the library)."""

import os

from hypothesis import HealthCheck, settings

FUZZ = settings(max_examples=int(os.environ.get("SALS_FUZZ_EXAMPLES", "100")), deadline=None,
                derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
