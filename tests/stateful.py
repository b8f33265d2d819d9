"""Settings shared by the stateful (RuleBasedStateMachine) tests."""

import os

from hypothesis import HealthCheck, settings


def state_machine_settings(step_count):
    """``MTHT_STATE_MACHINE_EXAMPLES`` sequences (100 unless set) of up to ``step_count`` steps."""
    return settings(
        max_examples=int(os.environ.get("MTHT_STATE_MACHINE_EXAMPLES", "100")),
        stateful_step_count=step_count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
