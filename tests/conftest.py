import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=int(os.environ.get("DPCOMPILE_HYPOTHESIS_EXAMPLES", "15")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("ci")

settings.register_profile(
    "slow-sweeps",
    parent=settings.get_profile("ci"),
    max_examples=max(4, (2 * settings.get_profile("ci").max_examples) // 3),
)
