"""The package imports cheaply: heavy engines and SDKs load only when a model needs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("llama_cpp", "torch", "sentence_transformers", "transformers", "openai", "anthropic", "google.genai",
         "fastapi", "uvicorn", "numpy")  # fmt: skip


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_loads_no_heavy_engine() -> None:
    assert _loaded_after("import car_inference") == []


def test_building_an_engine_and_its_catalog_loads_no_heavy_engine() -> None:
    code = (
        "from car_inference import InferenceEngine\ne = InferenceEngine()\nassert len(e.list_models()) > 10"
    )
    assert _loaded_after(code) == []


def test_lazy_exports_resolve() -> None:
    import car_inference

    assert car_inference.GenerateRequest.__name__ == "GenerateRequest"
    assert "InferenceEngine" in dir(car_inference)
    try:
        car_inference.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("unknown attribute must raise")


def test_py_typed_marker_ships() -> None:
    from importlib import resources

    assert resources.files("car_inference").joinpath("py.typed").is_file()


def test_every_export_type_checks_for_a_strict_user(tmp_path: Path) -> None:
    """`__all__` was computed (`[*_EXPORTS]`), which mypy cannot read: under --strict every
    `from car_inference import X` was an attr-defined error. It is a literal list, the same names."""
    import car_inference
    from car_inference import _EXPORTS

    assert sorted(car_inference.__all__) == sorted(["__version__", *_EXPORTS])
    script = "from car_inference import " + ", ".join(_EXPORTS) + "\n"
    script += "".join(f"print({name})\n" for name in _EXPORTS)
    (tmp_path / "user.py").write_text(script)  # outside the project: its mypy settings not read
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "user.py"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout
