"""What the demo model says: keyword intents over the conversation, answered from real tool results."""

import re
from dataclasses import dataclass, field

_NAME_TOLD = re.compile(r"\bmy name is ([A-Z][\w'-]*(?: [A-Z][\w'-]*)?)", re.IGNORECASE)
_NAME_ASKED = re.compile(r"\b(what'?s|what is|do you (know|remember)) my name\b", re.IGNORECASE)
_NAME_IN_INSTRUCTIONS = re.compile(r"The customer's name is '([^']+)'")
_BALANCE = re.compile(r"\b(balance|how much (money )?(do i have|is (in|on) my)|funds|overdrawn)\b", re.IGNORECASE)
_TRANSACTIONS = re.compile(r"\b(transactions?|spent|spending|payments?|purchases?|charges?|statement)\b", re.I)
_LOST_CARD = re.compile(
    r"\b(lost|stolen|missing|can'?t find|misplaced|stole)\b.*\bcard\b|\bcard\b.*\b(lost|stolen)\b", re.I
)
_FRAUD = re.compile(r"\b(fraud|scam|phishing|didn'?t make|don'?t recogni[sz]e|unauthori[sz]ed|hacked)\b", re.I)
_CREATIVE = re.compile(r"\b(poem|story|haiku|song|limerick|tale)\b", re.IGNORECASE)
_GREETING = re.compile(r"^\s*(hi|hello|hey|good (morning|afternoon|evening))\b", re.IGNORECASE)
_THANKS = re.compile(r"\b(thanks|thank you|cheers)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
# What a user says of themselves, or an amount: what a summary keeps.
_FACT = re.compile(
    r"\b(my|i am|i'm|i live|i work|i have|i owe|i paid|i sent|i earn)\b|[$€£]\s?\d|\d\s?(dollars|euros|pounds)\b",
    re.IGNORECASE,
)
_SUMMARY_BLOCK = re.compile(r"<summary>(.*?)</summary>", re.DOTALL)
_USER_BLOCK = re.compile(r"<user>(.*?)</user>", re.DOTALL)
FACTS_KEPT = 30

POEM = (
    "Digits dance across the ledger's face,\n"
    "each cent a footstep keeping time and place.\n"
    "The morning coffee, the rent that's due,\n"
    "the quiet savings waiting just for you.\n"
    "A card that taps, a transfer sent,\n"
    "a careful note of where it went.\n"
    "Not gold in vaults nor coins that shine,\n"
    "but plans that grow, one line by line.\n"
    "So keep your balance, steady, true:\n"
    "the bank keeps count, the dreams are you.\n"
    "And when the month turns its last page,\n"
    "may every sum be kind, and every wage\n"
    "arrive like spring to an open field,\n"
    "with more to save than what you yield."
)

STORY = (
    "Once upon a time, in a small town by the sea, there lived a baker named Elena who kept her savings in a "
    "blue tin behind the flour sacks. Every evening she counted the coins, and every evening there were a few "
    "more than the night before. One winter, a storm cracked the old oven in two, and the town woke to find "
    "no bread on the shelves. Elena opened the blue tin, walked to the bank on the hill, and asked for advice. "
    "The clerk, a patient man with ink on his fingers, helped her turn the coins into a plan: a small loan, a "
    "new oven, and a schedule she could keep. By spring the smell of fresh bread drifted down every street "
    "again, and Elena started a second tin, painted green, for the next storm. The town never forgot that "
    "winter, and Elena never forgot that a little saved each day, and a good plan, can carry you through "
    "almost anything. And whenever a child asked her the secret of her bakery, she would wink and say: "
    "count your coins, ask for help when you need it, and always keep the oven warm."
)


@dataclass
class Context:
    prompt: str
    earlier_prompts: list[str]
    instructions: str
    summary: str = ""
    """The thread's summary of the exchanges before `earlier_prompts`."""
    tool_results: dict[str, object] = field(default_factory=dict)
    """Results of the tools called for this prompt; None where the tool failed."""
    denied: dict[str, str] = field(default_factory=dict)
    """Tools the customer did not let run for this prompt, and what they were told instead."""


@dataclass
class Answer:
    text: str
    block_card: bool = False
    risk_level: int = 0
    follow_up_actions: list[str] = field(default_factory=list)

    def as_output(self) -> dict[str, object]:
        # Field order is the streaming order: the advice shows first.
        return {
            "support_advice": self.text,
            "block_card": self.block_card,
            "risk_level": self.risk_level,
            "follow_up_actions": self.follow_up_actions,
        }


def tool_for(prompt: str, tools: set[str]) -> tuple[str, dict[str, object]] | None:
    """The tool call a question needs, among the tools the agent has."""
    if "block_card" in tools and (_LOST_CARD.search(prompt) or _FRAUD.search(prompt)):
        return "block_card", {}
    if "customer_balance" in tools and _BALANCE.search(prompt):
        return "customer_balance", {"include_pending": "pending" in prompt.lower()}
    if "recent_transactions" in tools and _TRANSACTIONS.search(prompt):
        return "recent_transactions", {"limit": 5}
    return None


def told_name(prompts: list[str]) -> str | None:
    for prompt in reversed(prompts):
        if told := _NAME_TOLD.findall(prompt):
            return told[-1]
    return None


def _name(context: Context) -> str | None:
    if told := told_name([context.summary, *context.earlier_prompts, context.prompt]):
        return told
    match = _NAME_IN_INSTRUCTIONS.search(context.instructions)
    return match.group(1) if match else None


def _money(amount: object) -> str:
    return f"${float(amount):,.2f}" if isinstance(amount, int | float) else str(amount)


def _common(context: Context) -> str | None:
    """Answers both agents give alike."""
    name = _name(context)
    if _NAME_ASKED.search(context.prompt):
        known = told_name([context.summary, *context.earlier_prompts]) or name
        return f"Your name is {known}." if known else "You haven't told me your name yet."
    if told := told_name([context.prompt]):
        return f"Nice to meet you, {told}! How can I help you today?"
    if _CREATIVE.search(context.prompt):
        return STORY if re.search(r"\b(story|tale)\b", context.prompt, re.I) else POEM
    if _GREETING.search(context.prompt):
        return f"Hello{' ' + name if name else ''}! How can I help you today?"
    if _THANKS.search(context.prompt):
        return f"You're welcome{', ' + name if name else ''}! Is there anything else I can do for you?"
    return None


def _transactions_text(rows: object) -> str:
    if not isinstance(rows, list) or not rows:
        return "I don't see any recent card transactions on your account."
    lines = [f"{row['date']}: {row['description']} {_money(row['amount'])}" for row in rows if isinstance(row, dict)]
    return "Here are your most recent transactions: " + "; ".join(lines) + "."


def support_answer(context: Context) -> Answer:
    greeting = f"{name}, " if (name := _name(context)) else ""
    results = context.tool_results
    if any(result is None for result in results.values()):
        return Answer(
            "I couldn't find a bank account linked to you, so I can't look that up. "
            "Please sign in with the account you bank with, or contact a branch.",
            risk_level=1,
            follow_up_actions=["Contact the bank to link your account"],
        )
    if "customer_balance" in results:
        return Answer(
            f"{greeting}your current balance is {_money(results['customer_balance'])}.",
            risk_level=0,
            follow_up_actions=["Set up a low-balance alert"],
        )
    if "recent_transactions" in results:
        return Answer(
            _transactions_text(results["recent_transactions"]),
            risk_level=1,
            follow_up_actions=["Report any transaction you don't recognise"],
        )
    if "block_card" in results:
        said = str(results["block_card"])
        card = re.search(r"ending in (\d{4})", said)
        which = f"your card ending in {card.group(1)}" if card else "your card"
        state = "was already blocked" if "already" in said else "is now blocked"
        return Answer(
            f"{greeting}{which} {state}: nobody can use it. A replacement card will be sent to your address on "
            "file within 3 to 5 business days.",
            block_card=True,
            risk_level=8,
            follow_up_actions=["Order a replacement card", "Review recent transactions"],
        )
    if "block_card" in context.denied:
        expired = "in time" in context.denied["block_card"]
        return Answer(
            f"{greeting}"
            + (
                "you did not answer my request to block your card in time, so it is still active. "
                if expired
                else "as you asked, I have not blocked your card: it is still active. "
            )
            + "If it turns up missing after all, ask me again and I'll block it.",
            risk_level=6,
            follow_up_actions=["Keep an eye on your recent transactions", "Ask again to block the card"],
        )
    if _LOST_CARD.search(context.prompt) or _FRAUD.search(context.prompt):
        return Answer(
            f"I'm sorry to hear that{', ' + name if name else ''}. Please call us so we can block your card: "
            "I can't block it from here.",
            risk_level=8,
            follow_up_actions=["Call the bank to block the card", "Review recent transactions"],
        )
    if text := _common(context):
        return Answer(text, risk_level=0)
    return Answer(
        f"{greeting}I can help with your balance, your recent transactions, or a lost or stolen card. "
        "Could you tell me a little more about what you need?",
        risk_level=0,
        follow_up_actions=["Tell us more about your request"],
    )


def chat_answer(context: Context) -> str:
    if text := _common(context):
        return text
    topic = context.prompt.strip().rstrip("?.!")
    return (
        f"Good question. About “{topic[:200]}”: I'm the offline demo model, so I can't look things up, "
        "but I'm happy to keep you company, remember what you tell me, or write you a poem or a story."
    )


def summary(prompt: str) -> str:
    """The summary the demo model writes: what the user said of themselves, and amounts, in their words; the
    summary so far (in <summary>) first, then the exchanges that came after it (each question in <user>)."""
    previous = _SUMMARY_BLOCK.search(prompt)
    facts = [line[2:] for line in (previous.group(1) if previous else "").splitlines() if line.startswith("- ")]
    for question in _USER_BLOCK.findall(prompt):
        for sentence in _SENTENCE_END.split(question.strip()):
            sentence = sentence.strip()
            if sentence and not sentence.endswith("?") and _FACT.search(sentence):
                facts.append(sentence if sentence[-1] in ".!" else sentence + ".")
    facts = list({fact.casefold(): fact for fact in facts}.values())  # the latest wording of each, in order
    kept = facts[-FACTS_KEPT:]
    if (name := next((fact for fact in reversed(facts) if _NAME_TOLD.search(fact)), None)) and name not in kept:
        kept = [name, *kept[1:]]  # the user's name outlasts the other facts
    if not kept:
        return "Nothing the user said earlier needs remembering."
    return "The user said earlier:\n" + "\n".join(f"- {fact}" for fact in kept)
