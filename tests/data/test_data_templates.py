"""Prompt templates: training text is exactly inference prompt + target."""
from __future__ import annotations

from pathlib import Path

import pytest

from data import templates as T
from humback.scores import parse_score

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
TABLE1_FILE = SHARED / "prompts" / "self_curation_table1.txt"

INSTRUCTION = "Explain why the sky is blue."
OUTPUT = "Sunlight is scattered by air molecules; blue light scatters the most."


@pytest.mark.parametrize("tag", [None, "seed", "augmented"])
def test_forward_training_text_is_prompt_plus_target(tag: T.Tag | None) -> None:
    example = T.forward_example(INSTRUCTION, OUTPUT, tag)
    prompt = T.forward_prompt(INSTRUCTION, tag)  # what inference will send
    assert example.prompt == prompt
    assert example.text == prompt + OUTPUT
    assert prompt.endswith("### Response:\n")
    prompt_text, target = example  # a plain (prompt, target) tuple too
    assert (prompt_text, target) == (prompt, OUTPUT)


def test_backward_training_text_is_prompt_plus_target() -> None:
    example = T.backward_example(INSTRUCTION, OUTPUT)
    assert example.prompt == T.backward_prompt(OUTPUT)
    assert example.text == T.backward_prompt(OUTPUT) + INSTRUCTION
    assert example.prompt.index(OUTPUT) < example.prompt.index("### Instruction:")
    assert example.prompt.endswith("### Instruction:\n")


def test_exact_forward_layout() -> None:
    assert T.forward_prompt("Hi?", "seed") == (
        "Answer in the style of an AI Assistant.\n\n### Instruction:\nHi?\n\n### Response:\n"
    )
    assert T.forward_prompt("Hi?") == "### Instruction:\nHi?\n\n### Response:\n"
    assert T.forward_prompt("Hi?", "augmented").startswith("Answer with knowledge from web search.\n\n")


def test_training_example_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="end with a newline"):
        T.training_example("no newline", "target")
    with pytest.raises(ValueError, match="empty target"):
        T.training_example("prompt\n", "   ")


@pytest.mark.skipif(not TABLE1_FILE.is_file(), reason="../shared/prompts is not available")
def test_table1_constant_is_the_paper_prompt_verbatim() -> None:
    assert T.TABLE1_PROMPT == TABLE1_FILE.read_text(encoding="utf-8")


def test_rating_prompt_contains_table1_and_the_pair() -> None:
    instruction, response = "How do I {format} a string?", "Use str.format() or an f-string."
    text = T.rating_instruction(instruction, response)
    rubric = T.TABLE1_PROMPT.split("{generated_instruction}")[0]
    assert text.startswith(rubric)  # k=0: Table 1 alone
    assert text.endswith(f"{instruction}\n{response}\n")  # braces in the pair survive
    assert "{generated_instruction}" not in text and "{response}" not in text
    prompt = T.rating_prompt(instruction, response)
    assert prompt == T.forward_prompt(text, "seed")  # the rater is asked like any instruction


@pytest.mark.parametrize("k", range(len(T.RATING_EXAMPLES) + 1))
def test_rating_few_shot_count(k: int) -> None:
    text = T.rating_instruction("Q?", "A.", k=k)
    assert text.count("\nScore: ") == k
    for n, example in enumerate(T.RATING_EXAMPLES[:k], start=1):
        assert f"Example {n}:\n{example.instruction}\n{example.answer}\n" in text
    # the demonstrations come first, then the whole Table 1 prompt
    assert text.index("Below is an instruction from an user") == len(
        "".join(T.format_rating_example(i + 1, e) for i, e in enumerate(T.RATING_EXAMPLES[:k]))
    )


@pytest.mark.parametrize("k", [-1, len(T.RATING_EXAMPLES) + 1])
def test_rating_few_shot_bounds(k: int) -> None:
    with pytest.raises(ValueError, match="k must be in"):
        T.rating_instruction("Q?", "A.", k=k)
    with pytest.raises(ValueError, match="k must be in"):
        T.rating_demonstrations(k)


def test_rating_demonstrations_are_table1_exchanges() -> None:
    """As chat turns: the user's is Table 1 filled with the example's pair, the assistant's ends on
    the score line parse_score reads."""
    from humback.scores import parse_score
    demos = T.rating_demonstrations(len(T.RATING_EXAMPLES))
    for (user, reply), ex in zip(demos, T.RATING_EXAMPLES):
        assert user == T.TABLE1_PROMPT.format(generated_instruction=ex.instruction, response=ex.answer)
        assert reply.startswith(ex.reasoning) and parse_score(reply) == ex.score
    assert T.rating_demonstrations(0) == []


def test_rating_examples_are_parseable_and_cover_the_scale() -> None:
    scores = [e.score for e in T.RATING_EXAMPLES]
    assert sorted(scores) == [1, 2, 3, 4, 5]
    for n, example in enumerate(T.RATING_EXAMPLES, start=1):
        shot = T.format_rating_example(n, example)
        assert parse_score(shot) == example.score
        assert "\n" not in example.reasoning  # one-line reasoning
