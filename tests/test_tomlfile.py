from __future__ import annotations

from car_inference._tomlfile import locate

TEXT = """\
# comment
[hosts.openai]
base_url = "x"

[[models]]
id = "a/b"
name = "b"

[[models]]
id = "c/d"
capabilities = ["generate"]
[models.source]
kind = "gguf"
path = "/x"
[models.cost]
size_mb = -1
"""


def test_locate_finds_keys_in_the_right_array_entry() -> None:
    assert locate(TEXT, ["hosts", "openai", "base_url"]) == 3
    assert locate(TEXT, ["models", 0, "name"]) == 7
    assert locate(TEXT, ["models", 1, "capabilities"]) == 11
    assert locate(TEXT, ["models", 1, "source", "path"]) == 14
    assert locate(TEXT, ["models", 1, "cost", "size_mb"]) == 16


def test_locate_falls_back_to_the_enclosing_table() -> None:
    assert locate(TEXT, ["models", 1, "cost", "missing"]) == 15
    assert locate(TEXT, ["models", 0, "missing"]) == 5
    assert locate(TEXT, ["nothing"]) is None
