"""docs/configuration.md is generated from the schema; it must match the code."""

from pathlib import Path

from tollway.config.reference import generate

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_current() -> None:
    assert DOC.read_text() == generate(), (
        "docs/configuration.md is out of date; regenerate it with:\n"
        "  python -m tollway.config.reference > docs/configuration.md"
    )


def test_reference_covers_every_entity_and_duration_types() -> None:
    text = generate()
    for section in (
        "## `gateway`",
        "## `services[]`",
        "## `routes[]`",
        "## `upstreams[]`",
        "## `consumers[]`",
    ):
        assert section in text
    assert "| `drain_timeout` | duration |" in text
    assert "| `max_body_size` | size |" in text
