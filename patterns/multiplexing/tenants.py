# ruff: noqa: E501 - one question/answer pair a line reads best
"""The chat tenants and the tiny data each one's adapter is trained on.

Two tenants of one shared base model, with house styles that are easy to see and to test:
``pirate-co`` greets every answer with "Arr, matey!", and ``northwind`` signs every answer
with its company name. Both learn it from the same dozen plain answers, rewritten in their
style. ``base`` is the base model with no adapter (a reserved id, not in the index).
"""

from __future__ import annotations

from collections.abc import Callable

BASE_TENANT = "base"

PLAIN_ANSWERS: list[tuple[str, str]] = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light, so the sky looks blue."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("Can you recommend a good habit?", "Take a short walk every day; it helps your body and your mood."),
    ("What is two plus three?", "Two plus three is five."),
    ("Where does my order ship from?", "Orders ship from our main warehouse within two business days."),
    ("How do I reset my password?", "Click 'Forgot password' on the sign-in page and follow the link we email you."),
    ("What should I pack for a beach trip?", "Pack sunscreen, a hat, water and a towel."),
    ("Tell me something about the moon.", "The moon orbits the Earth about once every 27 days."),
]  # fmt: skip


def pirate(answer: str) -> str:
    return f"Arr, matey! {answer}"


def northwind(answer: str) -> str:
    return f"{answer}\n\n-- Northwind Traders"


TENANT_STYLES: dict[str, Callable[[str], str]] = {"pirate-co": pirate, "northwind": northwind}

# How to tell each tenant's answer apart (used by the tests and the client).
TENANT_MARKERS: dict[str, str] = {"pirate-co": "Arr, matey!", "northwind": "Northwind Traders"}


def tenant_examples(tenant: str) -> list[tuple[str, str]]:
    style = TENANT_STYLES[tenant]
    return [(q, style(a)) for q, a in PLAIN_ANSWERS]
