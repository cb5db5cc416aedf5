"""The Feedback model's request: context + assistant(response) + user(FEEDBACK_INSTRUCTION).

Shared by the Feedback recipe (its SFT data and eval) and the Feedback-Edit inference loop (its/),
so the model is asked at inference exactly as it was trained.

FEEDBACK_INSTRUCTION is OUR RECONSTRUCTION, not NVIDIA's string. What the sources give: the message
layout [context..., assistant response, user <evaluation instruction>] (the Llama-3.3-Nemotron-70B-Feedback
model card's quick start, seen here through a mirror of the card: model.aibase.cn/models/details/
1915694010448109569), the instruction's opening words there, "Evaluate the response to the previous prompt
in terms of how helpful it is" (the rest of the sentence was cut off in every copy this project could
read), and the HelpSteer3 dataset card's statement that every feedback item begins "The response is
{not|slightly|partially|mostly|perfectly} helpful". So the string below keeps those opening words and
completes them with our own request for that format. It is a config value wherever it is used
(`prep.feedback_instruction`, `its.feedback_instruction`); a model trained with one string should be
asked with the same one, and with NVIDIA's released checkpoint, pass the card's full string.
"""
from __future__ import annotations

HELPFULNESS_LEVELS = ("not", "slightly", "partially", "mostly", "perfectly")

FEEDBACK_INSTRUCTION = (
    "Evaluate the response to the previous prompt in terms of how helpful it is. Begin with \"The response is "
    "{not / slightly / partially / mostly / perfectly} helpful\", then explain what the response does "
    "well and what it should improve."
)


def build_feedback_request(context: list[dict], response: str, instruction: str | None = None) -> list[dict]:
    """The messages a Feedback model answers: each context turn (role and content only), the response
    as an assistant turn, then the evaluation instruction as a user turn."""
    messages = [{"role": turn["role"], "content": turn["content"]} for turn in context]
    messages.append({"role": "assistant", "content": response})
    messages.append({"role": "user", "content": FEEDBACK_INSTRUCTION if instruction is None else instruction})
    return messages


def helpfulness_level(feedback: str) -> str | None:
    """The level a feedback text starts with ("The response is mostly helpful..." -> "mostly"), or None."""
    for level in HELPFULNESS_LEVELS:
        if feedback.startswith(f"The response is {level} helpful"):
            return level
    return None
