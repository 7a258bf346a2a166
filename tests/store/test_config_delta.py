"""Workers get what changed when the new config reuses the previous one's entity objects."""

from __future__ import annotations

import pickle

from tollway.runtime import config_delta
from tollway.store.incremental import apply_delta
from tollway.store.model import Delete, Put, Rows, plan_write, validate_rows


def _rows(n: int) -> Rows:
    ops = [Put("services", {"name": "s", "url": "http://127.0.0.1:9"})]
    ops += [Put("routes", {"name": f"r{i}", "service": "s", "paths": [f"/r{i}"]}) for i in range(n)]
    rows, _ = plan_write(Rows(), ops, 1)
    return rows


def test_a_store_delta_travels_as_indexes_plus_the_changed_entities() -> None:
    before = _rows(200)
    previous = validate_rows(before)
    ops = [Put("routes", {"name": "r7", "service": "s", "paths": ["/seven"]}), Delete("routes", "r9")]
    ops.append(Put("routes", {"name": "new", "service": "s", "paths": ["/new"]}))
    after, changes = plan_write(before, ops, 2)
    config = apply_delta(previous, before, after, changes)
    payload = config_delta.encode(previous, config)
    assert payload is not None and "services" not in payload  # untouched lists are not sent
    assert sum(not isinstance(x, int) for x in payload["routes"]) == 2  # r7 and new
    worker_copy = pickle.loads(pickle.dumps(previous))  # the worker holds its own unpickled copy
    rebuilt = config_delta.decode(worker_copy, pickle.loads(pickle.dumps(payload)))
    assert rebuilt == config == validate_rows(after)
    assert len(pickle.dumps(payload)) * 5 < len(pickle.dumps(config))


def test_unrelated_configs_and_small_ones_go_whole() -> None:
    assert config_delta.encode(validate_rows(_rows(200)), validate_rows(_rows(200))) is None  # no reuse
    small = validate_rows(_rows(5))
    assert config_delta.encode(small, small.model_copy()) is None
