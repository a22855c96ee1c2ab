"""Every prompt the project uses, in one place, one function per prompt.

Why one module: a model is trained on ``prompt + target`` and later asked with the
same ``prompt``. If training and inference built their prompts separately, a changed
newline on one side would silently put the model out of distribution. Here the
training example is *made from* the inference prompt (:func:`training_example`), so
the two cannot drift.

The format is plain text, for base models such as Llama-2-7B that know no chat
template (Alpaca-style headers; each prompt ends with a newline, where the target
begins)::

    Forward model, p(output | instruction), with an optional tag line (see below):

        Answer in the style of an AI Assistant.

        ### Instruction:
        How do magnets work?

        ### Response:
        <target: the output>

    Backward model, p(instruction | output), the same headers in the other order:

        ### Response:
        Magnets attract iron because ...

        ### Instruction:
        <target: the instruction>

Tags (paper, Section 2.3, "Tagging"): when seed data and augmented data are mixed in
fine-tuning, each example starts with a system-prompt-like line telling the two
apart: "Answer in the style of an AI Assistant." for seed data, "Answer with
knowledge from web search." for augmented data. At inference the assistant tag is
used, to ask for answers in the style of the human-written seed data.

Rating (self-curation, paper Table 1): the seed model scores each augmented pair
1-5 with the paper's prompt, :data:`TABLE1_PROMPT`; it is given to the model as the
instruction of a forward prompt (the rater *is* an instruction-following model).
:func:`rating_instruction` can put k few-shot examples of our own before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

Tag = Literal["seed", "augmented"]

SEED_TAG = "Answer in the style of an AI Assistant."
AUGMENTED_TAG = "Answer with knowledge from web search."
TAGS: dict[str, str] = {"seed": SEED_TAG, "augmented": AUGMENTED_TAG}

INSTRUCTION_HEADER = "### Instruction:\n"
RESPONSE_HEADER = "### Response:\n"
# Where a generated instruction or answer ends: at the next header, which a model that has
# finished often goes on to write, as in its training text. Every command stops sampling
# there (``generate(..., stop=[HEADER_STOP, ...])``).
HEADER_STOP = "\n### "


class TrainingExample(NamedTuple):
    """A (prompt, target) split: the loss is computed on the target tokens only.

    Tokenize ``prompt`` and ``target`` separately and concatenate the ids (then add
    EOS, so the model learns to stop): the mask boundary is then exact, with no token
    straddling it. ``text`` is the full training string.
    """

    prompt: str
    target: str

    @property
    def text(self) -> str:
        return self.prompt + self.target


def training_example(prompt: str, target: str) -> TrainingExample:
    """Pair an inference prompt with the text the model should produce after it."""
    if not prompt.endswith("\n"):
        raise ValueError("a prompt must end with a newline (where the target begins)")
    if not target.strip():
        raise ValueError("empty target: nothing to learn")
    return TrainingExample(prompt, target.strip())


# ----------------------------------------------------------------- forward / backward


def forward_prompt(instruction: str, tag: Tag | None = None) -> str:
    """Prompt for the forward model p(output | instruction).

    Args:
        instruction: the user's request.
        tag: ``"seed"`` (assistant style), ``"augmented"`` (web style) or None (no tag
            line), see the module docstring.
    """
    head = f"{TAGS[tag]}\n\n" if tag is not None else ""
    return f"{head}{INSTRUCTION_HEADER}{instruction.strip()}\n\n{RESPONSE_HEADER}"


def backward_prompt(output: str) -> str:
    """Prompt for the backward model p(instruction | output): self-augmentation asks it
    which instruction a given (web) text would be the answer to."""
    return f"{RESPONSE_HEADER}{output.strip()}\n\n{INSTRUCTION_HEADER}"


def forward_example(instruction: str, output: str, tag: Tag | None = None) -> TrainingExample:
    """Training example for the forward model (seed data, or curated augmented data)."""
    return training_example(forward_prompt(instruction, tag), output)


def backward_example(instruction: str, output: str) -> TrainingExample:
    """Training example for the backward model: the seed pair read the other way round."""
    return training_example(backward_prompt(output), instruction)


# ----------------------------------------------------------------------------- rating

# The self-curation prompt of Table 1 in Li et al., "Self-Alignment with Instruction
# Backtranslation" (arXiv:2308.06259; Table 1 in the first version, moved to the
# appendix in later ones), as spelled by the public Humback reproduction (Apache-2.0). The rater writes a brief reasoning, then "Score: <rating>" on its last
# line (parsed by humback.scores.parse_score). Kept verbatim, typographic quotes included.
TABLE1_PROMPT = """Below is an instruction from an user and a candidate answer. Evaluate whether or not the answer is a good example of how AI Assistant should respond to the user's instruction. Please assign a score using the following 5-point scale:
1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked for. For example, some content seems missing, numbered list does not start from the beginning, the opening sentence repeats user's question. Or the response is from another person’s perspective with their personal experience (e.g. taken from blog posts), or looks like an answer from a forum. Or it contains promotional text, navigation text, or other irrelevant information.
2: It means the answer addresses most of the asks from the user. It does not directly address the user's question. For example, it only provides a high-level methodology instead of the exact solution to user's question.
3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from the user. It is complete and self contained with the drawback that the response is not written from an AI assistant's perspective, but from other people's perspective. The content looks like an excerpt from a blog post, web page, or web search results. For example, it contains personal experience or opinion, mentions comments section, or share on social media, etc.
4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the instruction. It provide a complete, clear, and comprehensive response to user’s question or instruction without missing or irrelevant information. It is well organized, self-contained, and written in a helpful tone. It has minor room for improvement, e.g. more concise and focused.
5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI Assistant, where the response looks like intentionally written to address the user's question or instruction without any irrelevant sentences. The answer provides high quality content, demonstrating expert knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful.

Please first provide a brief reasoning you used to derive the rating score, and then write "Score: <rating>" in the last line.

{generated_instruction}
{response}
"""


@dataclass(frozen=True)
class RatingExample:
    """A few-shot demonstration for the rater (our own writing, not from the paper)."""

    instruction: str
    answer: str
    reasoning: str
    score: int


# Ordered so that any first k spread over the scale: 5, 1, 3, 4, 2.
RATING_EXAMPLES: tuple[RatingExample, ...] = (
    RatingExample(
        instruction="How long should I boil an egg to get a firm yolk?",
        answer=(
            "For a fully set yolk, lower the egg into boiling water and cook it for 9 to 10 "
            "minutes, then move it to cold water for a few minutes. The cold water stops the "
            "cooking and makes the shell easier to peel. If you like the centre slightly "
            "soft, take it out after about 7 minutes instead."
        ),
        reasoning=(
            "The answer gives the exact time asked for plus a useful tip, in a clear and "
            "focused assistant voice with nothing irrelevant."
        ),
        score=5,
    ),
    RatingExample(
        instruction="What are some tips for keeping houseplants alive?",
        answer=(
            "Don't miss our summer sale! All indoor planters are 30% off this week only. "
            "Sign up for our newsletter and get free shipping on orders over $50."
        ),
        reasoning="The answer is promotional text and gives no tips at all, so it does not address the instruction.",
        score=1,
    ),
    RatingExample(
        instruction="How can I get my toddler to sleep through the night?",
        answer=(
            "When our son turned two, bedtime became a battle every night. What finally "
            "worked for us was a fixed routine: bath at 7, two books, lights out at 7:30. "
            "It took about two weeks, but now he sleeps until 6. Tell us in the comments "
            "what worked for your family!"
        ),
        reasoning=(
            "The routine is helpful, but the text is one parent's personal experience, like "
            "a blog post, and it ends by pointing to a comments section."
        ),
        score=3,
    ),
    RatingExample(
        instruction="Explain what a hash table is.",
        answer=(
            "A hash table stores key-value pairs. A hash function turns each key into an "
            "index in an array, so a value can be found in constant time on average. When "
            "two keys land on the same index (a collision), the table resolves it, for "
            "example by keeping a short list at that index. Hash tables implement "
            "dictionaries, sets and caches. In summary, a hash table is a very useful and "
            "important data structure that is used in many programs."
        ),
        reasoning=(
            "The explanation is correct, complete and written as an assistant would, but the "
            "last sentence repeats itself and adds nothing."
        ),
        score=4,
    ),
    RatingExample(
        instruction="How do I convert a list of strings to integers in Python?",
        answer=(
            "You need to go through the list and change the type of each element. Python "
            "has built-in functions for converting between types, so look those up and "
            "apply them to your data."
        ),
        reasoning=(
            "The answer only outlines a general method and never gives the actual solution, "
            "such as [int(s) for s in strings]."
        ),
        score=2,
    ),
)


def format_rating_example(number: int, example: RatingExample) -> str:
    """One demonstration, laid out like the end of Table 1 (instruction line, answer
    line) followed by what the rater should write (reasoning, then the score line)."""
    return (
        f"Example {number}:\n{example.instruction}\n{example.answer}\n"
        f"{example.reasoning}\nScore: {example.score}\n\n"
    )


def _rating_examples(k: int) -> tuple[RatingExample, ...]:
    if not 0 <= k <= len(RATING_EXAMPLES):
        raise ValueError(f"k must be in 0..{len(RATING_EXAMPLES)}, got {k}")
    return RATING_EXAMPLES[:k]


def rating_demonstrations(k: int) -> list[tuple[str, str]]:
    """The first k demonstrations as chat exchanges, for a chat model that reads them as earlier
    turns of its conversation (:func:`humback.rating.rater_prompt`): the user turn is Table 1
    filled with the example's pair, the assistant turn what the rater should write (reasoning,
    then the score line). A model imitates its own earlier replies more closely than examples
    quoted inside one message: it keeps their length and ends on the score."""
    return [(rating_instruction(ex.instruction, ex.answer), f"{ex.reasoning}\nScore: {ex.score}")
            for ex in _rating_examples(k)]


def rating_instruction(instruction: str, response: str, k: int = 0) -> str:
    """The rater's instruction: k demonstrations, then Table 1 filled with this pair.

    Args:
        instruction: the generated instruction being judged.
        response: the candidate answer (the unlabelled text).
        k: number of few-shot examples, 0 <= k <= len(RATING_EXAMPLES). The paper
            prompts zero-shot (k=0); a few examples help small models keep the format.
    """
    shots = "".join(format_rating_example(i + 1, ex) for i, ex in enumerate(_rating_examples(k)))
    # str.format only reads placeholders in the template, never in the filled values,
    # so braces inside the instruction or the response are safe.
    return shots + TABLE1_PROMPT.format(generated_instruction=instruction.strip(), response=response.strip())


def rating_prompt(instruction: str, response: str, k: int = 0, tag: Tag | None = "seed") -> str:
    """Full prompt for the rating model: :func:`rating_instruction` inside a forward prompt.

    ``tag`` should be the one the rater saw on seed data in training (the assistant
    tag by default; None if it was trained without tags).
    """
    return forward_prompt(rating_instruction(instruction, response, k), tag)


# The judge's prompt (evaluate.py --forward compares a model's answers with the base model's):
# an instruction in the project's forward format, followed by "Verdict:", so the verdict is the
# next word and its log-probability can be read off (humback.measures.choice_scorer).
JUDGE_INSTRUCTION = (
    "Compare two answers to the same question and decide which one is better: more helpful, correct, "
    "relevant and clear. Reply with one word: A if answer A is better, B if answer B is better, or tie "
    "if they are equally good." + """

Question:
{question}

Answer A:
{answer_a}

Answer B:
{answer_b}""")
JUDGE_SUFFIX = "Verdict:"


def judge_prompt(question: str, answer_a: str, answer_b: str, max_chars: int = 2000) -> str:
    """The judge's prompt for one ordered pair of answers (each cut to ``max_chars``)."""
    instruction = JUDGE_INSTRUCTION.format(question=question.strip(), answer_a=answer_a.strip()[:max_chars],
                                           answer_b=answer_b.strip()[:max_chars])
    return forward_prompt(instruction) + JUDGE_SUFFIX
