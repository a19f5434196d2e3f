"""The chat template goldens of the router still match transformers.

router/tests/chat_template_goldens.rs checks that the Rust router renders every case of
router/tests/data/chat_templates/*.json as its "expected" string; this re-renders each case
with transformers (as scripts/gen-chat-template-goldens does) so that those strings cannot
drift from what `apply_chat_template` produces.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
GOLDENS = ROOT / "router/tests/data/chat_templates"
GENERATOR = ROOT / "scripts/gen-chat-template-goldens"


def load_generator() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gen_chat_template_goldens", str(GENERATOR))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


gen = load_generator()
FILES = sorted(GOLDENS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


CASES = [
    pytest.param(path, i, id=f"{path.stem}-{i}")
    for path in FILES
    for i in range(len(load(path)["cases"]))
]


def test_there_are_at_least_five_templates() -> None:
    assert len(FILES) >= 5, FILES
    for path in FILES:
        golden = load(path)
        assert golden["name"] == path.stem
        assert golden["source"] and golden["chat_template"] and golden["cases"]


@pytest.mark.parametrize(("path", "index"), CASES)
def test_case_matches_transformers(path: Path, index: int) -> None:
    golden = load(path)
    case = golden["cases"][index]
    text, error = gen.render(golden, case)
    if "expected_error" in case:
        assert text is None, f"transformers rendered {text!r}, the golden expects an error"
        assert case["expected_error"] in error
    else:
        assert error is None, f"transformers raised {error!r}"
        assert text == case["expected"]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_pinned_clock_texts_match(path: Path) -> None:
    """The Rust test replaces these texts by today's: they must be what strftime wrote."""
    golden = load(path)
    values = gen.strftime_values(golden)
    assert values == golden.get("clock", {}).get("strftime", {})
    for pinned in values.values():
        # and the goldens do render it
        assert any(pinned in c.get("expected", "") for c in golden["cases"])


def test_goldens_are_written_as_the_generator_writes_them() -> None:
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        assert gen.dumps(gen.regenerate(json.loads(text))) == text, (
            f"{path} is stale: run scripts/gen-chat-template-goldens"
        )


def test_smollm2_golden_is_the_cached_models_template() -> None:
    cached = sorted(Path.home().glob(".cache/tensorgate/models/smollm2-135m-instruct-*"))
    config = cached[-1] / "tokenizer_config.json" if cached else None
    if config is None or not config.is_file():
        pytest.skip("no cached SmolLM2 checkpoint")
    model = json.loads(config.read_text(encoding="utf-8"))
    golden = load(GOLDENS / "smollm2.json")
    assert golden["chat_template"] == model["chat_template"]
    assert (golden["bos_token"], golden["eos_token"]) == (model["bos_token"], model["eos_token"])
