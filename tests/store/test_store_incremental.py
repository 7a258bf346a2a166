"""A node catching up validates only what changed, and ends with the same config as a full validation."""

from __future__ import annotations

import pytest

from tollway.store.incremental import apply_delta
from tollway.store.model import Change, Delete, Put, Row, Rows, WriteRefused, plan_write, validate_rows


def _base() -> Rows:
    ops = [Put("services", {"name": "s", "url": "http://127.0.0.1:9"})]
    ops += [Put("routes", {"name": f"r{i}", "service": "s", "paths": [f"/r{i}"]}) for i in range(20)]
    ops += [
        Put("consumers", {"username": f"c{i}", "credentials": {"key-auth": [{"key": f"k{i}"}]}})
        for i in range(5)
    ]
    ops += [Put("plugins", {"name": "key-auth", "route": "r3"})]
    rows, _ = plan_write(Rows(), ops, 1)
    return rows


@pytest.mark.parametrize(
    "ops",
    [
        [Put("routes", {"name": "r5", "service": "s", "paths": ["/changed"]})],
        [
            Put(
                "routes",
                {"name": "new", "service": "s", "paths": ["/new"], "plugins": [{"name": "key-auth"}]},
            )
        ],
        [Delete("plugins", "key-auth@route=r3"), Delete("routes", "r3")],
        [Put("consumers", {"username": "c9", "credentials": {"key-auth": [{"key": "k9"}]}})],
        [Put("plugins", {"name": "cors", "service": "s", "config": {"origins": ["*"]}})],
    ],
)
def test_a_delta_gives_the_same_config_as_a_full_validation(ops: list) -> None:
    before = _base()
    previous = validate_rows(before)
    after, changes = plan_write(before, ops, 2)
    assert apply_delta(previous, before, after, changes) == validate_rows(after)


def test_an_invalid_delta_reports_the_full_validations_messages() -> None:
    before = _base()
    previous = validate_rows(before)
    # as if a row had been edited by hand: plan_write would refuse it, so build the rows directly
    good, changes = plan_write(before, [Put("routes", {"name": "r5", "service": "s", "paths": ["/x"]})], 2)
    row = good.by_kind["routes"]["r5"]
    bad_row = type(row)(row.kind, row.key, {**row.data, "paths": ["x"]}, row.id, 2, row.position)
    bad = before.apply_changes(2, [type(changes[0])("routes", "r5", "update", bad_row)])
    with pytest.raises(WriteRefused) as refused:
        apply_delta(previous, before, bad, [type(changes[0])("routes", "r5", "update", bad_row)])
    assert refused.value.issues == [
        'store version 2: routes[5] "r5": paths[0]: must start with "/" '
        '(or "=/" for an exact path, "~" for a regular expression)'
    ]
    dangling = before.apply_changes(3, [type(changes[0])("services", "s", "delete", None)])
    with pytest.raises(WriteRefused, match="unknown service 's'"):
        apply_delta(previous, before, dangling, [type(changes[0])("services", "s", "delete", None)])


def test_a_delta_that_breaks_a_cross_entity_plugin_check_is_refused_like_a_full_validation() -> None:
    before = _base()
    previous = validate_rows(before)
    duplicate = {"username": "dup", "credentials": {"key-auth": [{"key": "k1"}]}}  # c1's key
    change = Change("consumers", "dup", "create", Row("consumers", "dup", duplicate, "id-dup", 2, 999))
    after = before.apply_changes(2, [change])
    with pytest.raises(WriteRefused) as full:
        validate_rows(after, source="store version 2")
    with pytest.raises(WriteRefused) as delta:
        apply_delta(previous, before, after, [change])
    assert delta.value.issues == full.value.issues


def test_catching_up_keeps_the_stores_order_as_a_full_load_would() -> None:
    before = _base()
    rows, log = before, []
    for ops in (
        [Delete("plugins", "key-auth@route=r3"), Delete("routes", "r3")],
        [Put("routes", {"name": "r3", "service": "s", "paths": ["/again"]})],  # re-created: now last
        [
            Put("routes", {"name": "z", "service": "s", "paths": ["/z"]}),
            Put("routes", {"name": "a", "service": "s", "paths": ["/a"]}),
        ],
        [Put("routes", {"name": "r1", "service": "s", "paths": ["/one"]})],  # updated in place
    ):
        rows, changes = plan_write(rows, ops, rows.version + 1)
        log.append(changes)
    latest = {}
    for changes in log:  # the change log gives each changed entity once, with its current row
        latest.update({(c.kind, c.key): c for c in changes})
    current = [
        c if c.action == "delete" else type(c)(c.kind, c.key, "update", rows.by_kind[c.kind].get(c.key))
        for c in latest.values()
    ]
    caught_up = before.apply_changes(rows.version, reversed(current))
    assert {k: list(v) for k, v in caught_up.by_kind.items()} == {k: list(v) for k, v in rows.by_kind.items()}
    assert list(caught_up.by_kind["routes"])[-3:] == ["r3", "z", "a"]
