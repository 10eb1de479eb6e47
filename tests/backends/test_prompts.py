"""The seed's rerank prompt and output-parsing tests, ported."""

from __future__ import annotations

from car_inference.backends.prompts import classify_prompt, rerank_prompt, score_from_rerank_output


def test_rerank_prompt_matches_upstream_template_shape() -> None:
    p = rerank_prompt("retrieve relevant passages", "who runs the treasury?", "doc x")
    assert "<|im_start|>system" in p
    assert 'Note that the answer can only be "yes" or "no".' in p
    assert "<|im_start|>user\n<Instruct>: retrieve relevant passages" in p
    assert "<Query>: who runs the treasury?" in p
    assert "<Document>: doc x<|im_end|>" in p
    assert p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_rerank_score_yes_and_no_exactly() -> None:
    assert score_from_rerank_output("yes", "m") == 1.0
    assert score_from_rerank_output("no", "m") == 0.0


def test_rerank_score_handles_case_leading_space_and_chat_sentinels() -> None:
    assert score_from_rerank_output(" Yes", "m") == 1.0
    assert score_from_rerank_output("\nno.", "m") == 0.0
    assert score_from_rerank_output("<|im_end|>yes", "m") == 1.0


def test_rerank_score_scans_up_to_three_tokens() -> None:
    assert score_from_rerank_output("_bos_ yes", "m") == 1.0


def test_rerank_score_unexpected_is_neutral() -> None:
    assert score_from_rerank_output("maybe", "m") == 0.5
    assert score_from_rerank_output("", "m") == 0.5


def test_classify_prompt_lists_every_label() -> None:
    p = classify_prompt("I loved it", ["positive", "negative"])
    assert "- positive\n- negative" in p and "Text: I loved it" in p
