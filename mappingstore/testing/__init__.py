"""The conformance suite every mappingstore backend and adapter runs.

A backend joins it with a test module like::

    import pytest
    from mappingstore.testing import StoreTests

    class TestMyStore(StoreTests):
        persistent = True     # close + reopen of the same name keeps the data
        multiprocess = False  # several processes can share one name
        fake_clock = True     # the backend honours the clock= option for TTL

        @pytest.fixture
        def factory(self, tmp_path):
            def open_(name="a", **options):
                return MyStore(tmp_path / name, **options)
            return open_

``factory(name="a", **options)`` opens a store: the same *name* reopens the same
underlying storage, another name is an independent store. The suite closes every store
it opens and checks results against the raw records (``_get_record``/``_put``), so a
backend cannot pass by agreeing with itself. See ``docs/guides/testing-backends.md``.

Needs ``pytest`` and ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

from ._base import ENCRYPTION, OpenStore, StoreFactory, SuiteBase
from ._dotnames import DotNamesTests
from ._encryption import EncryptionTests
from ._fixtures import (
    HOSTILE_KEYS,
    HOSTILE_NAMESPACE_PAIRS,
    UNSUPPORTED_VALUES,
    VALUE_SAMPLES,
    FakeClock,
    assert_same,
)
from ._lifecycle import LifecycleTests
from ._mapping import MappingTests
from ._stateful import DotNamesStateMachine, StoreStateMachine, run_state_machine
from ._timeseries import EventTests, SeriesTests
from ._ttl import TTLTests

__all__ = [
    "ENCRYPTION",
    "HOSTILE_KEYS",
    "HOSTILE_NAMESPACE_PAIRS",
    "UNSUPPORTED_VALUES",
    "VALUE_SAMPLES",
    "DotNamesStateMachine",
    "EventTests",
    "FakeClock",
    "OpenStore",
    "SeriesTests",
    "StoreFactory",
    "StoreStateMachine",
    "StoreTests",
    "assert_same",
    "run_state_machine",
]


class StoreTests(
    MappingTests,
    TTLTests,
    LifecycleTests,
    EncryptionTests,
    DotNamesTests,
    SeriesTests,
    EventTests,
    SuiteBase,
):
    """The whole conformance suite; subclass it as ``Test<Backend>`` and add ``factory``.

    Class attributes (see :class:`SuiteBase` for their defaults): ``persistent``,
    ``multiprocess``, ``fake_clock``, ``supports_encryption_without_password``,
    ``shared_by_name``. Override the raw helpers (``raw_record``, ``raw_put``...) only
    if the backend's records are not reachable through the contract methods.
    """

    def test_state_machine(self, open_store: OpenStore) -> None:
        run_state_machine(open_store, persistent=self.persistent)

    def test_dot_names_state_machine(self, open_store: OpenStore) -> None:
        run_state_machine(open_store, persistent=self.persistent, dot_names=True)
