"""Generated conversations: arithmetic through the calculator tool, who the model is, spelling.

Each generator takes a ``random.Random`` and returns one conversation as the reference's chat data
holds it (``{"messages": [...]}``); assistant turns that use the calculator are lists of parts
(``text``, ``python``, ``python_output``) as in the reference's GSM8K task. Tool outputs come from
our own calculator, so they are exactly what the engine forces back at inference time.
"""

from __future__ import annotations

import random

from nanochat_mlx.tools import use_calculator

Conversation = dict[str, list[dict]]

# How a question names each operation, and the expression the tool gets.
_OPS = {
    "+": ("{a}+{b}", ["{a}+{b}", "{a} + {b}", "{a} plus {b}", "the sum of {a} and {b}", "{a} added to {b}"]),
    "-": ("{a}-{b}", ["{a}-{b}", "{a} - {b}", "{a} minus {b}", "{b} subtracted from {a}"]),
    "*": ("{a}*{b}", ["{a}*{b}", "{a} * {b}", "{a} times {b}", "{a} x {b}", "the product of {a} and {b}"]),
    "/": ("{a}/{b}", ["{a}/{b}", "{a} / {b}", "{a} divided by {b}"]),
}
_ASK = [
    "What is {q}?",
    "what is {q}?",
    "What's {q}?",
    "Compute {q}.",
    "Calculate {q}",
    "How much is {q}?",
    "{q} = ?",
    "{q}",
    "Can you work out {q}?",
    "Please tell me {q}.",
    "what's {q}",
]
_ANSWER = ["{e} = {r}.", "The answer is {r}.", "{e} is {r}.", "It's {r}."]


def _operand(rng: random.Random) -> int:
    digits = rng.choice([1, 1, 2, 2, 3, 3, 4, 4, 4])
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def arithmetic(rng: random.Random) -> Conversation:
    """A two-operand question (operands up to 4 digits) answered through the calculator."""
    op = rng.choice("++--**/")
    a, b = _operand(rng), _operand(rng)
    if op == "/":
        b = max(b, 1)
        if rng.random() < 0.7:  # mostly exact divisions, so most answers are integers
            b = rng.randint(1, 99)
            a = b * rng.randint(1, 999)  # so a dividend may have 5 digits (up to 98,901)
    expr_template, phrasings = _OPS[op]
    expr = expr_template.format(a=a, b=b)
    result = use_calculator(expr)
    question = rng.choice(_ASK).format(q=rng.choice(phrasings).format(a=a, b=b))
    answer = rng.choice(_ANSWER).format(e=expr, r=result)
    parts = [
        {"type": "python", "text": expr},
        {"type": "python_output", "text": result},
        {"type": "text", "text": answer},
    ]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


IDENTITY_QUESTIONS = [
    "Who are you?",
    "who are you",
    "What are you?",
    "What is your name?",
    "What's your name?",
    "Tell me about yourself.",
    "Introduce yourself.",
    "What can you do?",
    "What are you good at?",
    "Are you ChatGPT?",
    "Are you a real model?",
    "Who made you?",
    "How big are you?",
    "Can you help me with my homework?",
    "Can you browse the internet?",
    "Can you write code?",
    "Do you know the news?",
    "Are you smart?",
    "How do I get a better model?",
    "Can you answer hard questions?",
    "hi, what are you?",
    "Is this a real AI?",
]
_WHO = [
    "I'm the nanochat-mlx demo model: a tiny nanochat model of about 2 million parameters, "
    "trained in minutes on a laptop CPU.",
    "I am the built-in demo model of nanochat-mlx, a very small nanochat model trained on "
    "Shakespeare, chit-chat and arithmetic.",
    "I'm a tiny demo model that ships with nanochat-mlx so that you can chat without a download.",
]
_CAN = [
    "I can do arithmetic with my calculator, spell words, count letters, and chat a little.",
    "I'm good at sums and products (I use a calculator), spelling and counting letters. "
    "Everything else I only pretend to know.",
    "I can add, subtract, multiply and divide with a calculator tool, and spell words.",
]
_CANT = [
    "I can't browse the web, I know no facts to speak of, and I often make things up.",
    "I know very little about the world, so please don't trust my answers on anything but arithmetic.",
    "Hard questions are beyond me: I am far too small.",
]
_REAL = [
    "For real answers, try a real nanochat model such as karpathy/nanochat-d32: run "
    "nanochat-mlx models to see the choices, or nanochat-mlx --source hf:karpathy/nanochat-d32.",
    "A real model is one download away: nanochat-mlx --source hf:Antigma/nanochat-d32 "
    "(about 1.9 billion parameters), or see nanochat-mlx models.",
    "If you want a model that really knows things, run nanochat-mlx models and pick one of the "
    "nanochat models on the Hugging Face Hub, e.g. karpathy/nanochat-d32.",
]


def identity(rng: random.Random) -> Conversation:
    """Who the model is, what it can and can't do, and where to find a real model."""
    question = rng.choice(IDENTITY_QUESTIONS)
    reply = " ".join([rng.choice(_WHO), rng.choice(_CAN), rng.choice(_CANT), rng.choice(_REAL)][: rng.randint(2, 4)])
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


_SPELL_ASK = ["Spell {w}.", "How do you spell {w}?", "spell {w}", "Spell the word {w} letter by letter."]
_COUNT_ASK = [
    "How many {l}'s are in {w}?",
    "How many times does the letter {l} appear in {w}?",
    "Count the {l}'s in {w}.",
    "how many {l} in {w}?",
]


def spelling(rng: random.Random, words: list[str]) -> Conversation:
    """Spell a word letter by letter, or count one letter in it through the calculator."""
    word = rng.choice(words)
    if rng.random() < 0.5:
        question = rng.choice(_SPELL_ASK).format(w=word)
        content: str | list[dict] = f"{word} is spelled {'-'.join(word)}."
    else:
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        question = rng.choice(_COUNT_ASK).format(l=letter, w=word)
        expr = f"'{word}'.count('{letter}')"
        count = use_calculator(expr)
        content = [
            {"type": "text", "text": f"Spelled out, {word} is {'-'.join(word)}. Let me count the {letter}'s: "},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": count},
            {"type": "text", "text": f"There {'is' if count == '1' else 'are'} {count} {letter}'s in {word}."},
        ]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": content}]}


def chitchat(turns: list[str], rng: random.Random, max_turns: int = 6) -> Conversation:
    """A window of a people's chat as user/assistant turns (the first speaker is the user)."""
    start = rng.randrange(0, max(1, len(turns) - 1)) // 2 * 2
    window = turns[start : start + max_turns]
    if len(window) % 2:
        window = window[:-1]
    roles = ["user", "assistant"] * (len(window) // 2)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, window, strict=True)]}
